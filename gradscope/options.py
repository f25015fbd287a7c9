"""The options of :func:`gradscope.watch`: one dataclass, validated once, shared by every entry point.

``watch()`` keeps its explicit, documented signature and builds a :class:`WatchOptions` from it; the
trainer callbacks (Lightning, Hugging Face) take the same options as keyword arguments and build one
when they are constructed, so a typo fails there and not minutes later inside ``trainer.fit()``.

Adding an option is a two-place change: a field (with its check) here, and the parameter (with its
docstring line) in :func:`gradscope.scope.watch`. A test holds the two lists equal; the callbacks
forward every field without naming it.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

from gradscope._validate import boolean, optional_positive_int, positive_int
from gradscope.capture.distributed import MODES as DISTRIBUTED_MODES
from gradscope.errors import ConfigurationError, RegistryError
from gradscope.findings import SEVERITIES, Finding
from gradscope.rules.engine import RuleSpec, build_rules
from gradscope.sinks.base import Sink
from gradscope.sinks.tensorboard import check_writer
from gradscope.stats import DEFAULT_STATISTICS
from gradscope.stats.registry import STATISTICS

if TYPE_CHECKING:
    from gradscope.rules.base import Rule

__all__ = ["DEFAULT_HISTORY", "MAX_FLUSH_EVERY", "MIN_HISTORY", "ON_NONFINITE", "WatchOptions"]

#: Recorded steps kept at full resolution on the host by default, and the fewest allowed.
DEFAULT_HISTORY = 2000
MIN_HISTORY = 100
#: The most recorded steps buffered on the device between flushes (the buffer is allocated up front).
MAX_FLUSH_EVERY = 10_000
#: What ``on_nonfinite`` may say.
ON_NONFINITE = ("record", "raise")


@dataclass(frozen=True)
class WatchOptions:
    """Everything :func:`gradscope.watch` takes besides the model and the optimizer, validated.

    See :func:`gradscope.watch` for what each field means. Build a changed copy with
    :meth:`replace` (validated again).

    Raises:
        ConfigurationError: naming the option, what it expects and what it got.
    """

    log_dir: Union[str, os.PathLike[str], None] = None
    writer: Any = None
    every: int = 1
    flush_every: int = 50
    stats: Union[str, Iterable[str], None] = None
    rules: RuleSpec = "all"
    thresholds: Mapping[str, Mapping[str, Any]] | None = None
    activations: bool = True
    sample_every: int = 10
    on_nonfinite: str = "record"
    on_finding: Callable[[Finding], Any] | None = None
    stop_on: Union[str, Iterable[str], None] = None
    sinks: Sequence[Union[Sink, str]] = field(default_factory=tuple)
    history: int | None = DEFAULT_HISTORY
    report_path: Union[str, os.PathLike[str], None] = None
    distributed: str = "auto"
    histogram_every: int | None = 100
    histogram_weights: bool = False
    figure_every: int | None = 1000
    noise_scale: Union[bool, int] = False

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)  # frozen: normalised values are set once, here

        if self.log_dir is not None and self.writer is not None:
            raise ConfigurationError(
                "Pass either `log_dir` or `writer`, not both: with a writer, everything lands in its run."
            )
        if self.log_dir is not None:
            if not isinstance(self.log_dir, (str, os.PathLike)):
                raise ConfigurationError(
                    f"Expected `log_dir` to be a path (str or os.PathLike), but got {self.log_dir!r}."
                )
            put("log_dir", _path("log_dir", self.log_dir, "a directory such as 'runs/exp1'"))
        if self.writer is not None:
            check_writer(self.writer)
        every = positive_int("every", self.every)
        put("every", every)
        put("flush_every", positive_int("flush_every", self.flush_every))
        if self.flush_every > MAX_FLUSH_EVERY:
            raise ConfigurationError(
                f"Expected `flush_every` to be at most {MAX_FLUSH_EVERY}, but got {self.flush_every}: the device "
                "buffer holds flush_every rows and is allocated up front. Flush more often (the default is 50)."
            )
        sample_every = positive_int("sample_every", self.sample_every)
        if sample_every % every:
            raise ConfigurationError(
                f"Expected `sample_every` to be a multiple of `every` ({every}), but got {sample_every}: sampled "
                f"steps are recorded steps. Try sample_every={every * max(1, round(sample_every / every))}."
            )
        put("sample_every", sample_every)
        if self.on_nonfinite not in ON_NONFINITE:
            raise ConfigurationError(
                f"Expected `on_nonfinite` to be one of {ON_NONFINITE}, but got {self.on_nonfinite!r}."
            )
        if self.on_finding is not None and not callable(self.on_finding):
            raise ConfigurationError(
                f"Expected `on_finding` to be a function taking a Finding, but got {self.on_finding!r}."
            )
        put("stop_on", _stop_on(self.stop_on))
        boolean("activations", self.activations)
        put("history", _history(self.history, self.flush_every))
        if self.report_path is not None:
            if not isinstance(self.report_path, (str, os.PathLike)):
                raise ConfigurationError(
                    f"Expected `report_path` to be a path (str or os.PathLike), but got {self.report_path!r}."
                )
            put("report_path", _path("report_path", self.report_path, "a file such as 'gradscope.json'"))
        if self.distributed not in DISTRIBUTED_MODES:
            raise ConfigurationError(
                f"Expected `distributed` to be one of {DISTRIBUTED_MODES}, but got {self.distributed!r}."
            )
        put("histogram_every", optional_positive_int("histogram_every", self.histogram_every))
        boolean("histogram_weights", self.histogram_weights)
        put("figure_every", optional_positive_int("figure_every", self.figure_every))
        if not isinstance(self.noise_scale, bool) and not (
            isinstance(self.noise_scale, numbers.Integral) and self.noise_scale > 0
        ):
            raise ConfigurationError(
                "Expected `noise_scale` to be False, True (the gradient noise scale, in micro-batches) or the "
                f"micro-batch size in samples (per rank under DDP), but got {self.noise_scale!r}."
            )
        put("stats", _stat_list(self.stats))
        if isinstance(self.sinks, (str, Sink)) or not isinstance(self.sinks, Iterable):
            raise ConfigurationError(
                f"Expected `sinks` to be a list of Sink instances or registered names, but got {self.sinks!r}."
            )
        put("sinks", tuple(self.sinks))
        self.build_rules()  # unknown rule names or thresholds raise here, with the choices

    # -- derived -----------------------------------------------------------------------------------------
    def build_rules(self) -> list[Rule]:
        """The rule instances these options select (see :func:`gradscope.rules.engine.build_rules`)."""
        return build_rules(self.rules, self.thresholds)

    def stat_names(self, *, has_optimizer: bool) -> tuple[str, ...]:
        """The statistics to collect: the built-ins by default (``update_ratio`` only with an optimizer).

        Raises:
            ConfigurationError: a named statistic needs the optimizer and none was given.
        """
        if self.stats is None:
            return tuple(s for s in DEFAULT_STATISTICS if has_optimizer or not STATISTICS.get(s).needs_optimizer)
        for s in self.stats:
            if STATISTICS.get(s).needs_optimizer and not has_optimizer:
                raise ConfigurationError(
                    f"Statistic {s!r} needs the optimizer, to see the weights before and after its step: "
                    "pass it as watch(model, optimizer=opt), or drop the statistic."
                )
        return tuple(self.stats)

    def tensorboard_kwargs(self) -> dict[str, Any]:
        """The options of the TensorBoard sink that ``log_dir``/``writer`` creates."""
        return {
            "histogram_every": self.histogram_every,
            "histogram_weights": self.histogram_weights,
            "figure_every": self.figure_every,
        }

    def recorded(self, step: int) -> bool:
        """Whether step ``step`` (counted from 1) is recorded under ``every``."""
        return (step - 1) % self.every == 0

    def sampled(self, step: int) -> bool:
        """Whether step ``step`` also takes the sampled statistics (``sample_every``)."""
        return (step - 1) % self.sample_every == 0

    def replace(self, **changes: Any) -> WatchOptions:
        """A copy with ``changes`` applied, validated again."""
        return dataclasses.replace(self, **changes)

    def as_kwargs(self) -> dict[str, Any]:
        """Every field as keyword arguments of :func:`gradscope.watch`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in order."""
        return tuple(f.name for f in dataclasses.fields(cls))


def _path(name: str, value: Union[str, os.PathLike[str]], example: str) -> str:
    path = os.fspath(value)
    if not isinstance(path, str) or not path.strip():
        raise ConfigurationError(
            f"Expected `{name}` to be a non-empty path, but got {value!r}. Pass {example}, or None."
        )
    return path


def _history(history: Any, flush_every: int) -> int | None:
    if history is None:
        return None
    if isinstance(history, bool) or not isinstance(history, numbers.Integral) or history < MIN_HISTORY:
        raise ConfigurationError(
            f"Expected `history` to be None (keep every row) or an int >= {MIN_HISTORY} (recorded steps kept "
            f"at full resolution; rules read recent windows), but got {history!r}."
        )
    if history < flush_every:
        raise ConfigurationError(
            f"Expected `history` ({history}) to be at least `flush_every` ({flush_every}): the rules must "
            f"see every new row at full resolution. Raise history or lower flush_every."
        )
    return int(history)


def _stop_on(stop_on: Any) -> frozenset[str] | None:
    from gradscope.rules.registry import RULES

    if stop_on is None:
        return None
    items = [stop_on] if isinstance(stop_on, str) else stop_on
    if not isinstance(items, Iterable):
        raise ConfigurationError(
            f'Expected `stop_on` to be "error", "warning", rule kinds or None, but got {stop_on!r}.'
        )
    chosen = set()
    for item in items:
        if item not in SEVERITIES and item not in RULES:
            raise ConfigurationError(
                f"Expected `stop_on` to name a severity ({', '.join(SEVERITIES)}) or a rule kind "
                f"({', '.join(RULES.names())}), but got {item!r}."
            )
        chosen.add(item)
    return frozenset(chosen) or None


def _stat_list(stats: Any) -> tuple[str, ...] | None:
    if stats is None:
        return None
    if isinstance(stats, str):
        stats = (stats,)
    if not isinstance(stats, Iterable):
        raise ConfigurationError(f"Expected `stats` to be a statistic name or a list of them, but got {stats!r}.")
    names: list[str] = []
    for s in stats:
        if not isinstance(s, str):
            raise ConfigurationError(f"Expected `stats` to hold statistic names (str), but got {s!r}.")
        try:
            STATISTICS.get(s)
        except RegistryError as exc:
            raise ConfigurationError(str(exc)) from None
        if s not in names:
            names.append(s)
    if not names:
        raise ConfigurationError("Expected `stats` to name at least one statistic, but got an empty list.")
    return tuple(names)
