"""The trainer callbacks' graceful stop: which confirmed findings end training, and the first that did.

``watch(stop_on=...)`` raises :class:`~gradscope.errors.GradientHealthError` from ``scope.step()``,
which inside a trainer's loop is an exception in the middle of its step. The callbacks instead ask
the trainer to stop (``trainer.should_stop`` in Lightning, ``control.should_training_stop`` in the
Hugging Face ``Trainer``): it finishes the step, runs its end-of-training hooks, and the callback
closes the scope, so the report (and ``report_path``) names the finding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Union, cast

from gradscope.errors import ConfigurationError
from gradscope.findings import Finding, selects
from gradscope.options import WatchOptions

__all__ = ["StopOnFindings"]


class StopOnFindings:
    """The ``on_finding`` hook a callback passes to :func:`gradscope.watch`.

    It remembers the first confirmed finding that ``selection`` names (a severity, that or higher, or
    a rule kind; see :func:`gradscope.findings.selects`), then calls the user's own ``on_finding``
    with every finding.

    Args:
        owner: the callback's class name, for error messages.
        stop_training_on: the callback's option: ``"error"``, ``"warning"``, rule kinds, or None.
        options: the callback's validated ``WatchOptions``; a ``stop_on`` there means the same as
            ``stop_training_on`` (a graceful stop: inside a trainer, raising from its loop would skip
            its end-of-training hooks), and ``on_finding`` is chained.

    Attributes:
        selection: the normalised set of severities and kinds that stop training (None: never).
        finding: the first finding that asked the trainer to stop (None while none has).

    Raises:
        ConfigurationError: ``stop_training_on`` is not a severity, a rule kind or a set of them, or
            both it and ``stop_on`` are given.
    """

    def __init__(self, owner: str, stop_training_on: Union[str, Iterable[str], None], options: WatchOptions) -> None:
        if stop_training_on is not None and options.stop_on is not None:
            raise ConfigurationError(
                f"{owner} got both `stop_training_on` and `stop_on`; in a callback they mean the same "
                "(stop the trainer gracefully on such a finding): pass `stop_training_on` only."
            )
        # WatchOptions normalises stop_on to a frozenset (or None) when it is built
        self.selection = cast("frozenset[str] | None", options.stop_on)
        if stop_training_on is not None:
            try:  # WatchOptions holds the one check of a stop_on value; only its name differs here
                self.selection = cast("frozenset[str] | None", WatchOptions(stop_on=stop_training_on).stop_on)
            except ConfigurationError as exc:
                raise ConfigurationError(f"{owner}: {str(exc).replace('`stop_on`', '`stop_training_on`')}") from None
        self.user: Callable[[Finding], Any] | None = options.on_finding
        self.finding: Finding | None = None

    @property
    def active(self) -> bool:
        """Whether some finding can stop training."""
        return self.selection is not None

    def reset(self) -> None:
        """Forget the finding of a previous fit."""
        self.finding = None

    def watch_options(self, options: WatchOptions) -> WatchOptions:
        """``options`` as the callback passes them to ``watch``: this hook as ``on_finding``, no ``stop_on``.

        Unchanged when nothing can stop training (``stop_on`` is then None already).
        """
        return options.replace(on_finding=self, stop_on=None) if self.active else options

    def __call__(self, finding: Finding) -> None:
        # Taken before the user's hook runs, so a hook that raises cannot hold the stop back.
        if self.finding is None and not finding.provisional and selects(self.selection, finding):
            self.finding = finding
        if self.user is not None:
            self.user(finding)

    def message(self, where: str) -> str:
        """What the callback says when it stops the trainer."""
        return f"gradscope: stopping training ({where}) on {self.finding}"
