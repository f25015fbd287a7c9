"""Builds the rules a scope runs and runs them at each flush, on host data only."""

from __future__ import annotations

import dataclasses
import json
import numbers
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Union

from gradscope.errors import ConfigurationError, GradscopeWarning, RegistryError
from gradscope.findings import SEVERITIES, Finding, jsonable
from gradscope.rules.base import Rule, RuleContext
from gradscope.rules.registry import RULES

__all__ = ["RuleEngine", "RuleSelection", "RuleSpec", "build_rules"]

RuleSpec = Union[str, Iterable[Union[str, Rule]], None]


class RuleSelection(list[Rule]):
    """The rules :func:`build_rules` selected, in order, and which of them were selected only through ``"all"``.

    A list of rules, so it goes wherever one does. ``implicit`` names the rules that ``"all"`` brought
    in without the user naming them (nor giving them thresholds): :class:`RuleEngine` leaves those out
    quietly when the scope does not collect what they read, and raises for the others. A plain list
    of rules has none.

    Args:
        rules: the rule instances.
        implicit: names of the rules selected only through ``"all"``.
    """

    def __init__(self, rules: Iterable[Rule] = (), implicit: Iterable[str] = ()) -> None:
        super().__init__(rules)
        self.implicit: frozenset[str] = frozenset(implicit)


def _rule_class(name: str, where: str = "rules") -> type[Rule]:
    # `where` names the argument the name came from, so the error says which one to fix
    try:
        return RULES.get(name)
    except RegistryError as exc:
        raise ConfigurationError(f"`{where}`: {exc}") from None


def build_rules(spec: RuleSpec, thresholds: Mapping[str, Mapping[str, Any]] | None = None) -> RuleSelection:
    """Instantiate the rules a scope runs.

    Args:
        spec: ``"all"`` (every registered rule, the default), ``"none"``, or an iterable of rule names and
            :class:`Rule` instances. A name prefixed with ``-`` removes that rule, so
            ``["all", "-overfitting"]`` runs every rule but one; a spec that starts with a removal
            starts from ``"all"`` (``["-overfitting"]`` is the same).
        thresholds: ``{rule name: {threshold: value}}`` overrides.

    Returns:
        The rules, with the names of those selected only through ``"all"`` (:class:`RuleSelection`).

    Raises:
        ConfigurationError: for unknown rule names, thresholds of rules not selected, or bad values.
    """
    if spec is None:
        spec = "all"
    if isinstance(spec, str):
        spec = [spec]
    if isinstance(spec, Rule) or not isinstance(spec, Iterable):
        raise ConfigurationError(
            f'Expected `rules` to be "all", "none" or a list of rule names / Rule instances, but got {spec!r}.'
        )
    items = list(spec)
    if items and isinstance(items[0], str) and items[0].startswith("-"):
        items.insert(0, "all")  # removals from nothing would select nothing: they remove from "all"
    chosen: dict[str, Rule | None] = {}
    named: set[str] = set()  # rules asked for by name or instance (not only through "all")
    for item in items:
        if isinstance(item, Rule):
            chosen[item.name] = item
            named.add(item.name)
        elif isinstance(item, type) and issubclass(item, Rule):
            raise ConfigurationError(
                f"`rules` got the class {item.__name__}; pass an instance ({item.__name__}()) or its name {item.name!r}."
            )
        elif item == "all":
            for name in RULES.keys():
                chosen.setdefault(name, None)
        elif item == "none":
            chosen.clear()
        elif isinstance(item, str) and item.startswith("-"):
            _rule_class(item[1:])
            chosen.pop(item[1:], None)
        elif isinstance(item, str):
            _rule_class(item)
            chosen.setdefault(item, None)
            named.add(item)
        else:
            raise ConfigurationError(
                f"Expected each entry of `rules` to be a rule name or a Rule instance, but got {item!r}."
            )
    if thresholds is not None and not isinstance(thresholds, Mapping):
        raise ConfigurationError(
            f"Expected `thresholds` to be a dict {{rule name: {{threshold: value}}}}, but got {thresholds!r}; "
            'for example thresholds={"vanishing_gradients": {"ratio": 1e-4}}.'
        )
    thresholds = dict(thresholds or {})
    for name, values in thresholds.items():
        _rule_class(name, "thresholds")
        if name not in chosen:
            raise ConfigurationError(
                f"`thresholds` sets values for rule {name!r}, which is not enabled in `rules`. Enable it or drop the entry."
            )
        if not isinstance(values, Mapping):
            raise ConfigurationError(
                f"Expected thresholds[{name!r}] to be a dict of threshold values, but got {values!r}."
            )
        if chosen[name] is not None:
            raise ConfigurationError(
                f"Rule {name!r} was passed as an instance and has thresholds in `thresholds` too; set them in one place."
            )
    rules = [
        instance if instance is not None else _rule_class(name)(**dict(thresholds.get(name, {})))
        for name, instance in chosen.items()
    ]
    # Built only because of "all" (not named, no thresholds, not the user's own object): left out
    # quietly when the scope lacks what they read.
    explicit = named | set(thresholds)
    implicit = [name for name, instance in chosen.items() if instance is None and name not in explicit]
    return RuleSelection(rules, implicit)


class RuleEngine:
    """Runs rules at each flush and keeps the findings, one per (kind, layer), at their first step.

    A rule that reports a (kind, layer) it reported before is updating that finding's episode: the
    engine copies the new ``last_step`` and ``resolved_step`` onto the finding it keeps (see
    :meth:`Rule.check`); the first finding's step, message and evidence stay. A rule that raises is
    reported as a warning and switched off: monitoring never crashes training. So is a rule whose
    ``check()`` returns something other than a list of :class:`Finding` (None, a dict, a finding with a
    step that is not an int...); the other rules go on. Evidence that is not JSON-able is written as
    its ``repr`` (with a warning naming the rule), so the report can always be written.

    Args:
        rules: the rules to run; from :func:`build_rules`, a :class:`RuleSelection` that says which
            were selected only through ``"all"``.
    """

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = list(rules)
        self._implicit = rules.implicit if isinstance(rules, RuleSelection) else frozenset()
        self.findings: list[Finding] = []
        self.errors: list[str] = []
        self.inactive: list[str] = []  # rules from "all" left out: the scope does not collect what they read
        self._seen: set[tuple[str, str | None]] = set()
        self._broken: set[str] = set()
        self._broken_evidence: set[str] = set()
        # (kind, layer) -> (the finding last checked, its evidence made JSON-safe): a rule following an
        # episode returns that finding again at every evaluation, its last_step and resolved_step moved and
        # everything else the same objects; such a copy has its steps checked, nothing else (tens of findings
        # followed at once would cost a millisecond per evaluation, hundreds several, walked again).
        self._known: dict[tuple[str, str | None], tuple[Finding, Any]] = {}
        self.updated: list[Finding] = []  # kept findings whose episode the last run() changed

    def check_requirements(self, collected: Iterable[str], *, activations: bool) -> None:
        """Raise ``ConfigurationError`` when a rule asked for by name needs a statistic that is not collected.

        Rules selected only through ``"all"`` are left out instead (listed in :attr:`inactive`), so
        ``watch(model, activations=False)`` or a narrow ``stats=`` still runs every rule it can.
        """
        have = set(collected)
        kept: list[Rule] = []
        for rule in self.rules:
            missing = [s for s in rule.requires if s not in have]
            lacks_acts = rule.requires_activations and not activations
            if (missing or lacks_acts) and rule.name in self._implicit:
                need = ", ".join(missing) if missing else "activation statistics"
                self.inactive.append(f"{rule.name} (needs {need})")
                continue
            kept.append(rule)
            if missing == ["noise_scale"]:
                raise ConfigurationError(
                    f"Rule {rule.name!r} needs the gradient noise scale, which this scope does not estimate. Watch "
                    "with noise_scale=<micro-batch size> (per rank under DDP; or True), or leave the rule out with "
                    f"rules=['all', '-{rule.name}']."
                )
            if missing:
                raise ConfigurationError(
                    f"Rule {rule.name!r} needs statistic(s) {', '.join(map(repr, missing))}, which this scope does "
                    f"not collect. Add them to `stats`, or leave the rule out with rules=['all', '-{rule.name}']."
                )
            if lacks_acts:
                raise ConfigurationError(
                    f"Rule {rule.name!r} needs activation statistics, but activations=False. Turn them on, or leave "
                    f"the rule out with rules=['all', '-{rule.name}']."
                )
        self.rules = kept

    def run(self, ctx: RuleContext) -> list[Finding]:
        """Run every rule; return the findings not reported before, ordered by step.

        Episode updates (a (kind, layer) reported again) change the kept finding in :attr:`findings`
        and are listed, as changed, in :attr:`updated`.
        """
        new: list[Finding] = []
        episodes: dict[tuple[str, str | None], Finding] = {}
        for rule in self.rules:
            if rule.name in self._broken:
                continue
            try:
                found = self._checked(rule, rule.check(ctx))
            except _Malformed as exc:
                self._switch_off(rule, str(exc))
                continue
            except Exception as exc:  # a broken rule must not stop training
                self._switch_off(rule, f"raised {type(exc).__name__}: {exc}")
                continue
            for f in found:
                key = (f.kind, f.layer)
                if key not in self._seen:
                    self._seen.add(key)
                    new.append(f)
                else:
                    episodes[key] = f
        new.sort(key=lambda f: f.step)
        self.findings.extend(new)
        self.findings.sort(key=lambda f: f.step)
        self.updated = []
        for i, kept in enumerate(self.findings):
            update = episodes.get((kept.kind, kept.layer))
            if update is None or (update.last_step, update.resolved_step) == (kept.last_step, kept.resolved_step):
                continue
            self.findings[i] = kept.with_episode(update.last_step, update.resolved_step)
            self.updated.append(self.findings[i])
        return new

    # -- isolation -------------------------------------------------------------------------------------
    def _switch_off(self, rule: Rule, why: str) -> None:
        self._broken.add(rule.name)
        msg = f"Rule {rule.name!r} ({type(rule).__name__}) {why}; it is switched off for this run."
        self.errors.append(msg)
        warnings.warn(msg, GradscopeWarning, stacklevel=3)

    def _checked(self, rule: Rule, found: Any) -> list[Finding]:
        """``found`` as a list of well-formed findings, or ``_Malformed`` naming what is wrong."""
        if isinstance(found, (str, bytes, Mapping, Finding)) or not isinstance(found, Iterable):
            raise _Malformed(f"check() returned {type(found).__name__}, not a list of Finding")
        out = list(found)
        for f in out:
            if not isinstance(f, Finding):
                raise _Malformed(f"check() returned a {type(f).__name__} among its findings, not a Finding")
        for i, f in enumerate(out):
            key = (f.kind, f.layer)
            known = self._known.get(key)
            if known is not None and _same_but_steps(known[0], f):
                bad = _malformed_steps(f)
                if bad:
                    raise _Malformed(f"check() returned a Finding whose {bad}")
                safe = known[1]
            else:
                bad = _malformed_field(f)
                if bad:
                    raise _Malformed(f"check() returned a Finding whose {bad}")
                safe = _json_safe(f.evidence)
                self._known[key] = (f, safe)
                if safe is not f.evidence:
                    self._warn_evidence(rule)
            if safe is not f.evidence:
                out[i] = dataclasses.replace(f, evidence=safe)
        return out

    def _warn_evidence(self, rule: Rule) -> None:
        key = f"{rule.name}-evidence"
        if key not in self._broken_evidence:
            self._broken_evidence.add(key)
            msg = (
                f"Rule {rule.name!r} ({type(rule).__name__}) gave evidence that is not JSON-able; the values "
                "that are not are written as their repr()."
            )
            self.errors.append(msg)
            warnings.warn(msg, GradscopeWarning, stacklevel=4)


def _same_but_steps(a: Finding, b: Finding) -> bool:
    """``b`` is a copy of ``a`` with at most its ``last_step`` and ``resolved_step`` moved (the same objects)."""
    return (
        a.step == b.step
        and a.severity is b.severity
        and a.message is b.message
        and a.suggestion is b.suggestion
        and a.evidence is b.evidence
        and a.provisional == b.provisional
    )


class _Malformed(Exception):
    """A rule's ``check()`` returned something that is not a list of well-formed findings."""


def _malformed_steps(f: Finding, names: tuple[str, ...] = ("last_step", "resolved_step")) -> str | None:
    for name in names:
        value = getattr(f, name)
        if (value is not None or name == "step") and (
            isinstance(value, bool) or not isinstance(value, numbers.Integral)
        ):
            return f"{name} is {value!r}, not an int"
    return None


def _malformed_field(f: Finding) -> str | None:
    if not isinstance(f.kind, str) or not f.kind:
        return f"kind is {f.kind!r}, not a rule name"
    if f.severity not in SEVERITIES:
        return f"severity is {f.severity!r}, not one of {SEVERITIES}"
    bad = _malformed_steps(f, ("step", "last_step", "resolved_step"))
    if bad:
        return bad
    if f.layer is not None and not isinstance(f.layer, str):
        return f"layer is {f.layer!r}, not a layer key or None"
    if not isinstance(f.message, str) or not isinstance(f.suggestion, str):
        return "message or suggestion is not a str"
    if not isinstance(f.evidence, Mapping):
        return f"evidence is a {type(f.evidence).__name__}, not a dict"
    return None


def _json_safe(evidence: Mapping[str, Any]) -> Any:
    """``evidence`` itself when it is JSON-able; else a copy whose offending values are their ``repr``."""
    try:
        json.dumps(jsonable(evidence), allow_nan=False)
        return evidence
    except (TypeError, ValueError, RecursionError):
        pass

    def fix(x: Any, depth: int = 0) -> Any:
        if depth > 32:
            return repr(x)
        if isinstance(x, Mapping):
            return {str(k): fix(v, depth + 1) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [fix(v, depth + 1) for v in x]
        try:
            json.dumps(jsonable(x), allow_nan=False)
            return x
        except (TypeError, ValueError, RecursionError):
            return repr(x)

    return fix(evidence)
