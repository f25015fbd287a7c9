"""Hugging Face ``Trainer``: a ``TrainerCallback`` that watches the model during ``trainer.train()``.

::

    from gradscope.integrations.huggingface import GradscopeTrainerCallback

    callback = GradscopeTrainerCallback()
    trainer = Trainer(model=model, args=TrainingArguments(..., report_to=["tensorboard"]),
                      train_dataset=ds, callbacks=[callback])
    trainer.train()
    print(callback.report)

When statistics are taken: the Trainer accumulates gradients over ``gradient_accumulation_steps``
micro-batches, clips them (``max_grad_norm``, after unscaling under fp16) and calls
``optimizer.step()``. gradscope reads the gradients in that optimizer's step pre-hook, so they are
the accumulated, unscaled, clipped gradients the update uses; a step that the fp16 GradScaler skips
is recorded as skipped. The Trainer hands callbacks accelerate's ``AcceleratedOptimizer`` wrapper;
``watch`` watches the torch optimizer inside it.

Which loss is recorded: the Trainer keeps the per-step loss on the device and only reports its
average every ``logging_steps`` steps (``on_log``). That logged value is recorded at the step it is
logged at (``logging_steps=1`` gives one per step), and ``eval_loss`` from each evaluation as
``val_loss``. To receive them, each gradscope step is ended at the start of the next optimizer step
(or at the end of training) rather than in ``on_step_end``, which the Trainer calls before it logs.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import torch

from gradscope.errors import ConfigurationError, GradscopeWarning
from gradscope.integrations._stopping import StopOnFindings
from gradscope.options import WatchOptions

try:
    from transformers import TrainerCallback
except ModuleNotFoundError as exc:
    raise ModuleNotFoundError(
        "gradscope.integrations.huggingface needs Hugging Face transformers (and accelerate for its Trainer): "
        "pip install 'gradscope[hf]'."
    ) from exc

if TYPE_CHECKING:
    from gradscope.findings import Finding
    from gradscope.report import Report
    from gradscope.scope import GradScope

__all__ = ["GradscopeTrainerCallback", "trainer_tensorboard_dir"]


def trainer_tensorboard_dir(args: Any) -> str | None:
    """The folder the Trainer's TensorBoard integration writes into, once its ``on_train_begin`` has run.

    None when TensorBoard reporting is off (``report_to`` does not list it). Resolution, as the
    integration does it: the ``TENSORBOARD_LOGGING_DIR`` environment variable; ``args.logging_dir``
    (transformers 4); else the newest run folder under ``output_dir/runs`` that holds an event file
    (transformers 5 names a fresh ``runs/<date>_<host>`` folder when training starts).
    """
    report_to = args.report_to if isinstance(args.report_to, (list, tuple)) else [args.report_to]
    if "tensorboard" not in report_to and "all" not in report_to:
        return None
    env = os.getenv("TENSORBOARD_LOGGING_DIR")
    if env:
        return os.path.expanduser(env)
    logging_dir = getattr(args, "logging_dir", None)
    if logging_dir:
        return str(logging_dir)
    runs = Path(args.output_dir) / "runs"
    if not runs.is_dir():
        return None
    found = [d for d in runs.iterdir() if d.is_dir() and any(d.glob("events.out.tfevents.*"))]
    return str(max(found, key=lambda d: d.stat().st_mtime)) if found else None


class GradscopeTrainerCallback(TrainerCallback):
    """Watches the Trainer's model during ``train()`` and logs into the Trainer's TensorBoard run.

    At ``on_train_begin`` it calls :func:`gradscope.watch` with the Trainer's model and (unwrapped)
    optimizer; it ends one gradscope step per optimizer step, with the loss the Trainer logged at that
    step and the ``eval_loss`` of an evaluation run at that step; at ``on_train_end`` it closes the
    scope. With ``report_to=["tensorboard"]`` its statistics go into the folder of the Trainer's
    TensorBoard run (a second event file in the same run), on the main process only.

    Args:
        log_to_trainer: write into the Trainer's TensorBoard folder when TensorBoard reporting is on.
        stop_training_on: ``"error"``, ``"warning"`` or rule kinds: when such a finding is confirmed,
            set ``control.should_training_stop`` so the Trainer ends through its normal end
            (``on_train_end`` closes the scope and writes ``report_path``). None (default): never
            stop. A step is recorded when the next one begins (the Trainer logs its loss after
            ``on_step_end``); the Trainer then stops after that step's first micro-batch, before its
            optimizer update. ``stop_on`` (the option of :func:`gradscope.watch`, which
            raises from ``scope.step()``) means the same here; pass one of the two. ``on_finding``
            is still called with every finding.
        **options: any option of :func:`gradscope.watch` (``every``, ``rules``, ``report_path``...; see
            :class:`gradscope.options.WatchOptions`), validated here. ``log_dir`` writes a separate
            TensorBoard run there, ``writer`` into your own ``SummaryWriter`` (gradscope never closes it),
            instead of the Trainer's folder; ``report_path`` is written when training ends, or raises.

    Attributes:
        scope: the open :class:`~gradscope.GradScope` during training, else None.
        report: the :class:`~gradscope.Report` of the last ``train()`` (None before it ends).
        log_dir: the TensorBoard folder written to, once training has started (None if none).
        stopped_by: the finding that stopped the last ``train()`` (None if none did).

    Raises:
        ConfigurationError: for an invalid option, when the callback is built.
    """

    def __init__(
        self,
        *,
        log_to_trainer: bool = True,
        stop_training_on: Union[str, Iterable[str], None] = None,
        **options: Any,
    ) -> None:
        if not isinstance(log_to_trainer, bool):
            raise ConfigurationError(f"Expected `log_to_trainer` to be True or False, but got {log_to_trainer!r}.")
        self.options = WatchOptions(**options)
        self._stop = StopOnFindings(type(self).__name__, stop_training_on, self.options)
        self.stop_training_on = self._stop.selection
        self.stopped_by: Finding | None = None
        self.log_to_trainer = log_to_trainer
        self.log_dir: str | None = None
        self.scope: GradScope | None = None
        self.report: Report | None = None
        self._open_step: int | None = None  # global_step of the optimizer step ended but not yet recorded
        self._scalars: dict[str, float] = {}
        self._val_loss: float | None = None

    # -- lifecycle -------------------------------------------------------------------------------------
    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kwargs: Any
    ) -> None:
        """Attach :func:`gradscope.watch` to the Trainer's model and optimizer."""
        import gradscope

        self._close()
        if model is None:
            raise ConfigurationError("GradscopeTrainerCallback.on_train_begin got no `model` from the Trainer.")
        # accelerate's AcceleratedOptimizer is unwrapped by watch(): its inner torch optimizer is watched
        opt = optimizer if isinstance(optimizer, torch.optim.Optimizer) else None
        main = bool(getattr(state, "is_world_process_zero", True))
        writer, log_dir = None, None
        if main:
            if self.options.writer is not None:
                writer = self.options.writer
            elif self.options.log_dir is not None:
                log_dir = str(self.options.log_dir)
            elif self.log_to_trainer:
                log_dir = trainer_tensorboard_dir(args)
        self.log_dir = log_dir if writer is None else getattr(writer, "log_dir", None)
        self._open_step, self._scalars, self._val_loss = None, {}, None
        self.report = None
        self._stop.reset()
        self.stopped_by = None
        options = self._stop.watch_options(self.options).replace(log_dir=log_dir, writer=writer)
        self.scope = gradscope.watch(model, optimizer=opt, **options.as_kwargs())

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """A new optimizer step starts: end the previous one (its logs and evaluation are in)."""
        self._end_step()
        self._maybe_stop(state, control)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The optimizer stepped; keep the step open for the loss the Trainer is about to log."""
        if self.scope is not None:
            self._end_step()  # defensive: on_step_begin was not called for the previous step
            self._maybe_stop(state, control)
            self._open_step = state.global_step

    def on_log(self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        """Take the logged training loss and learning rate for the open step."""
        if self._open_step is None or not logs or state.global_step != self._open_step:
            return
        for key, name in (("loss", "loss"), ("learning_rate", "lr")):
            value = logs.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._scalars[name] = float(value)

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """Keep ``eval_loss`` for the next recorded step."""
        value = (metrics or {}).get("eval_loss")
        if self.scope is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            self._val_loss = float(value)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """End the last step, then the final flush: write the verdict and remove every hook."""
        self._close()

    # -- helpers ---------------------------------------------------------------------------------------
    def _end_step(self) -> None:
        if self.scope is None or self._open_step is None:
            return
        scalars, self._scalars, self._open_step = self._scalars, {}, None
        if self._val_loss is not None and self.options.recorded(self.scope.step_count + 1):
            scalars["val_loss"], self._val_loss = self._val_loss, None
        self.scope.step(**scalars)

    def _maybe_stop(self, state: Any, control: Any) -> None:
        finding = self._stop.finding
        if finding is None or self.stopped_by is not None:
            return
        # The Trainer checks this after every micro-batch (so before the next optimizer step), then runs
        # on_train_end, which closes the scope. Every process stops at the same step: findings come from
        # statistics reduced across ranks at the same steps (distributed="auto", the default).
        control.should_training_stop = True
        self.stopped_by = finding
        if bool(getattr(state, "is_world_process_zero", True)):
            warnings.warn(self._stop.message(f"global step {state.global_step}"), GradscopeWarning, stacklevel=3)

    def _close(self) -> None:
        if self.scope is not None:
            self._end_step()
            scope, self.scope = self.scope, None
            self.report = scope.close()
