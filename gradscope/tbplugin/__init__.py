"""The gradscope tab of TensorBoard (a dynamic plugin; see :mod:`gradscope.tbplugin.plugin`).

Registered with TensorBoard through the ``tensorboard_plugins`` entry point, so ``tensorboard
--logdir runs`` shows it for runs written by ``gradscope.watch(..., log_dir=...)``. Importing this
package imports nothing of TensorBoard; :mod:`gradscope.tbplugin.plugin` does.
"""
