"""PyTorch Lightning: a callback that watches the LightningModule during ``trainer.fit()``.

::

    from gradscope.integrations.lightning import GradscopeCallback

    callback = GradscopeCallback()
    trainer = lightning.Trainer(max_epochs=3, callbacks=[callback])   # default logger: TensorBoard
    trainer.fit(model, train_loader, val_loader)
    print(callback.report)

When statistics are taken: Lightning steps every optimizer through a closure that runs
``training_step`` and ``backward`` inside ``optimizer.step()``, then unscales (16-bit AMP) and clips
the gradients. gradscope reads the gradients once that closure returns, right before the update, so
the statistics describe the unscaled, clipped, accumulated gradients the optimizer uses. Under
``accumulate_grad_batches=k`` there is one gradscope step per optimizer step (every k batches), and
``scope.step`` is called from ``on_train_batch_end`` when ``trainer.global_step`` has advanced. A step
that the 16-bit GradScaler skips for inf/NaN is recorded as skipped.

Where it writes, on global rank 0: into the run of the trainer's ``TensorBoardLogger`` through its
``SummaryWriter`` (scalars, histograms, findings, figures), and into every other logger
(``CSVLogger``, ``MLFlowLogger``, ``WandbLogger``...) through its ``log_metrics``: the scalar records
and the findings' counts, plus the findings as text where the logger takes text (``WandbLogger``: a
table; ``MLFlowLogger``: an artifact); see :class:`gradscope.sinks.MetricsLoggerSink`. A trainer
without any logger gradscope can write into gets a warning saying so.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import Tensor

from gradscope.errors import ConfigurationError, GradscopeWarning
from gradscope.integrations._stopping import StopOnFindings
from gradscope.options import WatchOptions
from gradscope.sinks.metrics import MetricsLoggerSink

try:
    import lightning.pytorch as pl
except ModuleNotFoundError:  # the older standalone package
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]  # the same API under the older package name
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "gradscope.integrations.lightning needs PyTorch Lightning: pip install 'gradscope[lightning]' "
            "(or pip install lightning)."
        ) from exc

if TYPE_CHECKING:
    from gradscope.findings import Finding
    from gradscope.report import Report
    from gradscope.scope import GradScope

__all__ = ["GradscopeCallback"]


def _logger_outputs(trainer: Any, *, own_run: bool) -> tuple[Any, list[MetricsLoggerSink]]:
    """Where gradscope writes among the trainer's loggers, on global rank 0 (elsewhere: nowhere).

    The first ``TensorBoardLogger`` lends its ``SummaryWriter`` (the full TensorBoard output), unless
    ``own_run`` (a ``log_dir`` of gradscope's own replaces it); every other logger gets the scalar
    records through its ``log_metrics``.

    Returns:
        ``(writer or None, sinks)``.
    """
    if not trainer.is_global_zero:
        return None, []
    writer: Any = None
    sinks: list[MetricsLoggerSink] = []
    first_tensorboard = True
    for logger in trainer.loggers:
        if isinstance(logger, pl.loggers.TensorBoardLogger) and first_tensorboard:
            first_tensorboard = False
            writer = None if own_run else logger.experiment
            continue
        if callable(getattr(logger, "log_metrics", None)):
            sinks.append(MetricsLoggerSink(logger))
        else:
            warnings.warn(
                f"GradscopeCallback: the trainer's {type(logger).__name__} has no log_metrics(metrics, step) method, "
                "so gradscope writes nothing into it. Use a Lightning logger, or pass sinks=[...] to the callback.",
                GradscopeWarning,
                stacklevel=3,
            )
    if writer is None and not sinks and not own_run:
        warnings.warn(
            "GradscopeCallback: the trainer has no logger that gradscope can write into (logger=False?), so "
            "statistics and findings reach no tracker: read them from callback.report, or pass log_dir=... "
            "for a TensorBoard run of gradscope's own, or log_to_logger=False to silence this.",
            GradscopeWarning,
            stacklevel=3,
        )
    return writer, sinks


def _batch_loss(outputs: Any) -> Tensor | None:
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    return loss.detach() if isinstance(loss, Tensor) and loss.numel() == 1 else None


class GradscopeCallback(pl.Callback):
    """Watches the LightningModule's gradients during ``fit`` and logs through the trainer's loggers.

    At fit start it calls :func:`gradscope.watch` on the LightningModule with the trainer's optimizer,
    once per optimizer step it calls ``scope.step`` with the step's training loss (the mean over the
    accumulated batches), the learning rate, and the last validation loss when one is new; at fit end
    (or when fit raises) it closes the scope. On global rank 0, under ``gradscope/...`` tags:
    everything lands in the run of the trainer's ``TensorBoardLogger`` (its ``SummaryWriter``), and
    the statistics and scalars of each step go to every other logger (``CSVLogger``,
    ``MLFlowLogger``, ``WandbLogger``...) through its ``log_metrics``, at gradscope's step numbers.

    Args:
        optimizer_index: which of ``trainer.optimizers`` to watch (statistics are taken right before
            its update). ``None`` watches without an optimizer: statistics are then taken at the end
            of the batch, and neither ``update_ratio`` nor skipped steps are available.
        log_to_logger: write into the trainer's loggers (False: into none of them; the report is
            still there).
        val_loss_key: the key of ``trainer.callback_metrics`` holding the validation loss (what your
            ``validation_step`` logs with ``self.log(...)``); it is passed as ``val_loss`` at the first
            recorded optimizer step after each validation run. ``None`` to leave it out.
        stop_training_on: ``"error"``, ``"warning"`` or rule kinds: when such a finding is confirmed,
            set ``trainer.should_stop`` so the fit ends after that batch, through its normal end
            (``on_fit_end`` closes the scope and writes ``report_path``). None (default): never stop.
            ``stop_on`` (the option of :func:`gradscope.watch`, which raises from ``scope.step()``)
            means the same here; pass one of the two. ``on_finding`` is still called with every
            finding.
        **options: any option of :func:`gradscope.watch` (``every``, ``rules``, ``report_path``...; see
            :class:`gradscope.options.WatchOptions`), validated here. ``log_dir`` writes a separate
            TensorBoard run there instead of the TensorBoard logger's (other loggers still get the
            metrics); ``report_path`` is written when training ends, or raises.

    Attributes:
        scope: the open :class:`~gradscope.GradScope` during fit, else None.
        report: the :class:`~gradscope.Report` of the last fit (None before it ends).
        stopped_by: the finding that stopped the last fit (None if none did).

    Raises:
        ConfigurationError: for an invalid option, when the callback is built.
    """

    def __init__(
        self,
        *,
        optimizer_index: int | None = 0,
        log_to_logger: bool = True,
        val_loss_key: str | None = "val_loss",
        stop_training_on: Union[str, Iterable[str], None] = None,
        **options: Any,
    ) -> None:
        super().__init__()
        if optimizer_index is not None and (
            isinstance(optimizer_index, bool) or not isinstance(optimizer_index, int) or optimizer_index < 0
        ):
            raise ConfigurationError(
                f"Expected `optimizer_index` to be None or an index into trainer.optimizers, but got {optimizer_index!r}."
            )
        if not isinstance(log_to_logger, bool):
            raise ConfigurationError(f"Expected `log_to_logger` to be True or False, but got {log_to_logger!r}.")
        if val_loss_key is not None and not isinstance(val_loss_key, str):
            raise ConfigurationError(f"Expected `val_loss_key` to be a metric name or None, but got {val_loss_key!r}.")
        if "writer" in options:
            raise ConfigurationError(
                "GradscopeCallback writes into the trainer's loggers (log_to_logger=True) or into "
                "`log_dir`; it takes no `writer`."
            )
        self.options = WatchOptions(**options)
        self._stop = StopOnFindings(type(self).__name__, stop_training_on, self.options)
        self.stop_training_on = self._stop.selection
        self.stopped_by: Finding | None = None
        self.optimizer_index = optimizer_index
        self.log_to_logger = log_to_logger
        self.val_loss_key = val_loss_key
        self.scope: GradScope | None = None
        self.report: Report | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._global_step = 0
        self._losses: list[Tensor] = []
        self._val_loss: Tensor | float | None = None
        self._automatic = True

    # -- lifecycle -------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Attach :func:`gradscope.watch` to ``pl_module`` with the trainer's optimizer."""
        import gradscope

        self._close()
        optimizer = None
        if self.optimizer_index is not None:
            if self.optimizer_index >= len(trainer.optimizers):
                raise ConfigurationError(
                    f"GradscopeCallback(optimizer_index={self.optimizer_index}) but the trainer has "
                    f"{len(trainer.optimizers)} optimizer(s) from configure_optimizers(); pass an index below that, "
                    "or optimizer_index=None to take statistics at the end of each batch."
                )
            optimizer = trainer.optimizers[self.optimizer_index]
        writer: Any = None
        sinks: list[MetricsLoggerSink] = []
        if self.log_to_logger:
            writer, sinks = _logger_outputs(trainer, own_run=self.options.log_dir is not None)
        self._optimizer = optimizer
        self._automatic = bool(getattr(pl_module, "automatic_optimization", True))
        self._global_step = trainer.global_step
        self._losses = []
        self._val_loss = None
        self.report = None
        self._stop.reset()
        self.stopped_by = None
        options = self._stop.watch_options(self.options).replace(
            log_dir=self.options.log_dir if trainer.is_global_zero else None,
            writer=writer,
            sinks=(*self.options.sinks, *sinks),
        )
        self.scope = gradscope.watch(pl_module, optimizer=optimizer, **options.as_kwargs())

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Record one gradscope step when this batch ended an optimizer step."""
        if self.scope is None:
            return
        loss = _batch_loss(outputs)
        if loss is not None:
            self._losses.append(loss)
        if trainer.global_step == self._global_step:
            return  # accumulating: the optimizer has not stepped yet
        self._global_step = trainer.global_step
        scalars: dict[str, Any] = {}
        if self._losses:
            # Lightning divides each batch's loss by accumulate_grad_batches in automatic optimization,
            # so their sum is the mean loss of the optimizer step.
            stacked = torch.stack([x.float().reshape(()) for x in self._losses])
            scalars["loss"] = stacked.sum() if self._automatic else stacked.mean()
            self._losses = []
        if self._optimizer is not None:
            # a tensor for capturable/fused optimizers: kept as one, on its device (no sync)
            lr = self._optimizer.param_groups[0]["lr"]
            scalars["lr"] = lr if isinstance(lr, Tensor) else float(lr)
        if self._val_loss is not None and self.options.recorded(self.scope.step_count + 1):
            scalars["val_loss"] = self._val_loss
            self._val_loss = None
        self.scope.step(**scalars)
        if self._stop.active and self.stopped_by is None:
            self._maybe_stop(trainer)

    def _maybe_stop(self, trainer: Any) -> None:
        if self._stop.finding is None:
            return
        # Lightning ends the fit after this batch and calls on_fit_end, which closes the scope. Under
        # DDP every rank stops at the same batch: findings come from statistics reduced across ranks
        # at the same flushes (distributed="auto", the default), so they are identical on all ranks.
        trainer.should_stop = True
        self.stopped_by = self._stop.finding
        if trainer.is_global_zero:
            warnings.warn(self._stop.message(f"global step {trainer.global_step}"), GradscopeWarning, stacklevel=3)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        """Keep the validation loss for the next recorded step."""
        if self.scope is None or self.val_loss_key is None or trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.val_loss_key)
        if isinstance(value, Tensor) and value.numel() == 1:
            self._val_loss = value.detach().reshape(())
        elif isinstance(value, (int, float)):
            self._val_loss = float(value)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        """Final flush: write the verdict and remove every hook."""
        self._close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Fit raised (NaN with ``on_nonfinite="raise"``, Ctrl-C...): flush what was recorded, then let it go."""
        self._close()

    def _close(self) -> None:
        if self.scope is not None:
            scope, self.scope = self.scope, None
            self.report = scope.close()
