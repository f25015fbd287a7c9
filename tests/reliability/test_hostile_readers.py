"""Damaged and hostile inputs to the readers and to a few numeric arguments (issue 14, items 9 and 11).

* ``read_run`` / ``read_report`` on event files holding undecodable events, JSON records that are
  not JSON or not what gradscope writes, scalar tensors that are not one number, a bad checksum:
  each damaged record is skipped and named in ``report.errors``; the rest of the run reads exactly
  as the undamaged file does. A damaged *final* record (the run's verdict) is a ``RunReadError``.
* ``Report.from_json`` with steps beyond int64, ``verify`` with inf/NaN tolerances, unknown rule
  names in ``rules`` vs ``thresholds``, ``check(seed=2**64)``: clear errors naming the argument.

Every event file here is a real one written by ``gradscope.watch`` (read back with TensorBoard's own
record reader), with records added or removed in TensorBoard's framing.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gradscope
from gradscope.cli import main
from gradscope.errors import ConfigurationError
from gradscope.report import JSON_SCHEMA, Report, ReportFormatError
from gradscope.rules.engine import build_rules
from gradscope.sinks import tags as T
from gradscope.sinks.reader import RunReadError, read_report, read_run

# -- TensorBoard's record framing -------------------------------------------------------------------------


def frame(data: bytes) -> bytes:
    """One TFRecord: length, masked CRC of the length, data, masked CRC of the data."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


def split_records(raw: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(raw):
        (n,) = struct.unpack("<Q", raw[i : i + 8])
        out.append(raw[i : i + 12 + n + 4])
        i += 12 + n + 4
    return out


def tags_of(record: bytes) -> set[str]:
    from tensorboard.compat.proto.event_pb2 import Event

    event = Event.FromString(record[12:-4])
    return {v.tag for v in event.summary.value}


def json_event(tag: str, payload: bytes | None, step: int) -> bytes:
    """A gradscope JSON record as the TensorBoard sink writes it (None: a string tensor with no payload)."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary

    value = Summary.Value(tag=tag)
    value.metadata.plugin_data.plugin_name = T.PLUGIN_NAME
    value.tensor.dtype = 7  # DT_STRING
    if payload is not None:
        value.tensor.string_val.append(payload)
    return frame(Event(step=step, wall_time=1.0, summary=Summary(value=[value])).SerializeToString())


def scalar_tensor_event(tag: str, values: list[float], shape: list[int], step: int) -> bytes:
    """A "new style" scalar (a float tensor under the scalars plugin), of any shape."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary

    value = Summary.Value(tag=tag)
    value.metadata.plugin_data.plugin_name = "scalars"
    value.tensor.dtype = 1  # DT_FLOAT
    for size in shape:
        value.tensor.tensor_shape.dim.add(size=size)
    value.tensor.float_val.extend(values)
    return frame(Event(step=step, wall_time=1.0, summary=Summary(value=[value])).SerializeToString())


# -- a real run -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A closed run with a nonfinite-gradient finding; its event file's bytes; the scope's own report."""
    d = tmp_path_factory.mktemp("hostile") / "run"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 4), torch.randn(16, 3)
    with gradscope.watch(model, optimizer=opt, log_dir=d, flush_every=3, figure_every=None) as scope:
        for step in range(6):
            loss = F.mse_loss(model(x), y)
            loss.backward()
            if step == 4:
                model[2].weight.grad[0, 0] = float("nan")
            opt.step()
            scope.step(loss=loss)
            opt.zero_grad()
    (events,) = [p for p in d.iterdir() if "tfevents" in p.name]
    report = scope.report()
    assert any(f.kind == "nonfinite_gradients" for f in report.findings)
    return events.name, events.read_bytes(), report


def write_run(tmp_path: Path, name: str, data: bytes, sub: str = "r") -> Path:
    d = tmp_path / sub
    d.mkdir()
    (d / name).write_bytes(data)
    return d


def unclosed(raw: bytes) -> bytes:
    """The run as a killed process leaves it: everything but the final ``_report`` record."""
    return b"".join(r for r in split_records(raw) if T.REPORT_JSON_TAG not in tags_of(r))


def finding_keys(report: Report) -> list[tuple[str, str | None, int, str]]:
    return [(f.kind, f.layer, f.step, f.severity) for f in report.findings]


def same_data(a: Report, b: Report) -> None:
    assert finding_keys(a) == finding_keys(b)
    assert a.stats.equals(b.stats)
    assert a.scalars.equals(b.scalars)
    assert a.skipped_steps == b.skipped_steps and a.frozen == b.frozen


def facts(report: Report) -> dict:
    return {k: v for k, v in report.meta.items() if k != "source"}  # the folder read differs


def damaged_notes(report: Report) -> list[str]:
    return [e for e in report.errors if "damaged" in e or "could not be read" in e]


# -- event files ------------------------------------------------------------------------------------------


def test_clean_run_reads_as_the_scope_reported(run, tmp_path):
    name, raw, live = run
    report = read_run(write_run(tmp_path, name, raw))
    assert finding_keys(report) == finding_keys(live)
    assert damaged_notes(report) == []


def test_undecodable_event_is_skipped_with_a_note(run, tmp_path):
    from google.protobuf.message import DecodeError
    from tensorboard.compat.proto.event_pb2 import Event

    name, raw, _ = run
    garbage = b"\x0a\xff\xff\xff\xff\xff"
    with pytest.raises(DecodeError):  # what used to escape read_run
        Event.FromString(garbage)
    records = split_records(raw)
    damaged = b"".join(records[:3]) + frame(garbage) + b"".join(records[3:])
    clean = read_run(write_run(tmp_path, name, raw, "clean"))
    report = read_run(write_run(tmp_path, name, damaged, "damaged"))
    same_data(report, clean)
    assert damaged_notes(report) == [
        f"damaged event record ({len(garbage)} bytes) in {name} skipped: not a TensorBoard event"
    ]


# Each of these used to raise out of read_run (IndexError, UnicodeDecodeError, JSONDecodeError,
# RecursionError, AttributeError/TypeError on the wrong shape, ValueError from Finding.from_dict).
BAD_PAYLOADS = {
    "no payload": None,
    "not UTF-8": b"\xff\xfe",
    "not JSON": b"{not json",
    "too deep": b"[" * 100_000 + b"]" * 100_000,
    "meta not an object": b"[1, 2]",
    "findings not a list": b'{"no": "findings"}',
    "finding with a bad severity": b'[{"kind": "x", "severity": "fatal", "step": 1, "message": "m"}]',
    "finding not an object": b"[3]",
    "meta steps a string": b'{"steps": "many"}',
}


@pytest.mark.parametrize("what", sorted(BAD_PAYLOADS))
@pytest.mark.parametrize("tag", [T.FINDINGS_JSON_TAG, T.META_JSON_TAG])
def test_damaged_json_records_are_skipped_with_a_note(run, tmp_path, tag, what):
    name, raw, _ = run
    # An unclosed run: its findings come from the flushed `_findings` records, so a damaged one
    # would change them if it were not skipped.
    base = unclosed(raw)
    clean = read_run(write_run(tmp_path, name, base, "clean"))
    assert clean.findings, "the flushed records carry the nonfinite finding"
    report = read_run(write_run(tmp_path, name, base + json_event(tag, BAD_PAYLOADS[what], 99), "damaged"))
    same_data(report, clean)
    notes = damaged_notes(report)
    if what == "meta steps a string" and tag == T.FINDINGS_JSON_TAG:
        assert notes == [f"damaged {tag} record at step 99 skipped: expected a list of findings, got dict"]
    elif what == "findings not a list" and tag == T.META_JSON_TAG:
        # a JSON object of run facts: a valid (if odd) meta record, and the latest one wins
        assert notes == []
        assert facts(report) == {"no": "findings", "steps": clean.meta["steps"]}
    else:
        assert facts(report) == facts(clean)
        assert len(notes) == 1 and notes[0].startswith(f"damaged {tag} record at step 99 skipped: "), notes


def test_cumulative_findings_record_in_either_form(run, tmp_path):
    """The sink's `_findings` record lists every finding so far; a dict {"findings": [...]} reads the same."""
    name, raw, live = run
    base = unclosed(raw)
    extra = {"kind": "custom_kind", "severity": "warning", "step": 5, "layer": "0", "message": "m"}
    for i, payload in enumerate([[extra], {"findings": [extra]}]):
        data = base + json_event(T.FINDINGS_JSON_TAG, json.dumps(payload).encode(), 50)
        report = read_run(write_run(tmp_path, name, data, f"r{i}"))
        assert damaged_notes(report) == []
        keys = {(f.kind, f.layer) for f in report.findings}
        assert ("custom_kind", "0") in keys
        assert {(f.kind, f.layer) for f in live.findings} <= keys  # the earlier records still count


@pytest.mark.parametrize("what", ["not JSON", "finding with a bad severity", "meta not an object", "too deep"])
def test_damaged_final_record_is_a_run_read_error(run, tmp_path, capsys, what):
    name, raw, _ = run
    payload = BAD_PAYLOADS[what]
    if what == "finding with a bad severity":
        payload = b'{"findings": ' + payload + b"}"
    d = write_run(tmp_path, name, raw + json_event(T.REPORT_JSON_TAG, payload, 7))
    with pytest.raises(RunReadError, match=rf"final {T.REPORT_JSON_TAG} record \(step 7\) .* is damaged"):
        read_run(d)
    with pytest.raises(RunReadError):
        read_report(d, progress=False)
    assert main(["report", str(d), "--no-html"]) == 2
    assert "is damaged" in capsys.readouterr().err


def test_damaged_final_record_superseded_by_a_later_one(run, tmp_path):
    name, raw, live = run
    records = split_records(raw)
    final = [r for r in records if T.REPORT_JSON_TAG in tags_of(r)]
    assert len(final) == 1
    rest = [r for r in records if r is not final[0]]
    data = b"".join(rest) + json_event(T.REPORT_JSON_TAG, b"{not json", 6) + final[0]
    report = read_run(write_run(tmp_path, name, data))
    assert finding_keys(report) == finding_keys(live)
    (note,) = damaged_notes(report)
    assert note.startswith(f"damaged {T.REPORT_JSON_TAG} record at step 6 skipped: not JSON")


def test_scalar_tensor_that_is_not_one_value(run, tmp_path):
    import numpy as np

    name, raw, _ = run
    tag = "gradscope/scalar/extra"
    good = scalar_tensor_event(tag, [0.25], [], 3)
    bad = scalar_tensor_event(tag, [1.0, 2.0, 3.0], [3], 4)
    with pytest.raises(ValueError):  # what used to escape: reshape of 3 values to ()
        np.zeros(3).reshape(())
    report = read_run(write_run(tmp_path, name, raw + good + bad))
    assert report.scalars["extra"].dropna().to_dict() == {3: 0.25}  # the good one read, the bad one skipped
    assert damaged_notes(report) == [f"damaged {tag} record at step 4 skipped: a scalar holding 3 values"]


def test_bad_checksum_stops_the_file_with_a_note(run, tmp_path):
    name, raw, _ = run
    records = split_records(raw)
    i = len(records) // 2
    bad = bytearray(records[i])
    bad[14] ^= 0xFF  # inside the data: the CRC no longer matches
    data = b"".join(records[:i]) + bytes(bad) + b"".join(records[i + 1 :])
    report = read_run(write_run(tmp_path, name, data))
    unread = sum(len(r) for r in records[i:])
    assert f"the last {unread} bytes of {name} could not be read (a damaged or unfinished record)" in report.errors


def test_many_damaged_records_are_counted_not_listed(run, tmp_path):
    name, raw, _ = run
    data = unclosed(raw) + b"".join(json_event(T.META_JSON_TAG, b"{", 100 + k) for k in range(25))
    notes = damaged_notes(read_run(write_run(tmp_path, name, data)))
    assert len(notes) == 21 and notes[-1] == "... and 5 more damaged record(s) skipped."


def test_not_a_folder_is_a_run_read_error(tmp_path):
    with pytest.raises(RunReadError, match="is not a folder"):
        read_run(tmp_path / "missing")


# -- Report.from_json: steps beyond int64 -----------------------------------------------------------------


@pytest.mark.parametrize("step", [2**63, 2**64, -1])
def test_report_steps_beyond_int64(step):
    stats = {"layer": "0", "param": "weight", "stat": "rms", "steps": [1, step], "values": [1.0, 2.0]}
    with pytest.raises(ReportFormatError, match=r"'stats\[0\]\.steps\[1\]' must be an int step"):
        Report.from_json({"schema": JSON_SCHEMA, "version": 1, "stats": [stats]})
    scalars = {"steps": [step], "values": {"loss": [1.0]}}
    with pytest.raises(ReportFormatError, match=r"'scalars\.steps\[0\]' must be an int step"):
        Report.from_json({"schema": JSON_SCHEMA, "version": 1, "scalars": scalars})


def test_report_largest_int64_step_reads():
    stats = {"layer": "0", "param": "weight", "stat": "rms", "steps": [2**63 - 1], "values": [1.5]}
    report = Report.from_json({"schema": JSON_SCHEMA, "version": 1, "stats": [stats]})
    assert int(report.stats["step"].iloc[0]) == 2**63 - 1 and report.stats["value"].iloc[0] == 1.5


# -- verify: non-finite tolerances ------------------------------------------------------------------------


def _broken_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    model[0].weight.register_hook(lambda g: g * 2)  # a hook that doubles a gradient: a real bug
    return model


@pytest.mark.parametrize("name", ["rtol", "atol", "fd_rtol", "fd_atol"])
@pytest.mark.parametrize("value", [float("inf"), float("nan"), 10**400])
def test_verify_refuses_non_finite_tolerances(name, value):
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    with pytest.raises(ConfigurationError, match=rf"Expected `{name}` to be a finite non-negative float"):
        gradscope.verify(_broken_model(), x, y, F.cross_entropy, **{name: value})


def test_verify_tolerances_still_catch_the_bug():
    torch.manual_seed(1)
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    assert not gradscope.verify(_broken_model(), x, y, F.cross_entropy).ok  # defaults catch the doubled gradient
    with pytest.raises(ConfigurationError, match=r"Expected `atol` to be a non-negative float, but got -inf\."):
        gradscope.verify(_broken_model(), x, y, F.cross_entropy, atol=float("-inf"))


# -- rules: which argument named the unknown rule ---------------------------------------------------------


@pytest.mark.parametrize(
    ("rules", "thresholds", "where"),
    [(["nope"], None, "rules"), (["all", "-nope"], None, "rules"), ("all", {"nope": {"x": 1}}, "thresholds")],
)
def test_unknown_rule_says_which_argument(rules, thresholds, where):
    with pytest.raises(ConfigurationError) as info:
        build_rules(rules, thresholds)
    message = str(info.value)
    assert message.startswith(f"`{where}`: Unknown rule 'nope'. Registered rules: ")
    assert "vanishing_gradients" in message  # the choices are still listed


# -- health.check: seed range -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
def test_check_seed_out_of_range(seed):
    model = nn.Linear(3, 2)
    batch = (torch.randn(4, 3), torch.randint(0, 2, (4,)))
    with pytest.raises(ConfigurationError, match=r"Expected `seed` to be an int from -2\*\*63 to 2\*\*64-1"):
        gradscope.check(model, batch, F.cross_entropy, steps=1, seed=seed)
