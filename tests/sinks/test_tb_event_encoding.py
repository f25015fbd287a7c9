"""gradscope's bulk event encoding: the bytes TensorBoard's own writer would write, checksums it accepts."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest
from sinkhelp import event_files, load_events, small_mlp, train

from gradscope.sinks.records import StepRecords, StepRow, records_of, scalar_records, scalar_rows
from gradscope.sinks.tensorboard_events import (
    EventFile,
    ScalarEvents,
    crc32c,
    frame_records,
    masked_crc32c,
    summary_event,
)


def _reference_event(step: int, wall: float, values: dict[str, float]) -> bytes:
    """What TensorBoard's protobuf runtime serializes for the same event."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary

    summary = Summary(value=[Summary.Value(tag=t, simple_value=v) for t, v in values.items()])
    return Event(wall_time=wall, step=step, summary=summary).SerializeToString()


def test_scalar_events_equal_protobuf_serialization_byte_for_byte():
    tags = ["gradscope/l2_norm/0", "gradscope/rms/é_unicode", "x" * 130, "gradscope/scalar/loss"]
    specials = [0.0, -0.0, 1e-45, 3.4028235e38, 1e300, -1e300, math.inf, -math.inf, 1 / 3, -2.5e-7]
    rng = np.random.default_rng(0)
    groups, walls = [], []
    for i, step in enumerate([1, 2, 3, 127, 128, 300000, 0, -5, 2**40]):
        values = {t: float(v) for t, v in zip(tags, rng.normal(size=len(tags)) * 10.0 ** rng.integers(-20, 20))}
        if i == 2:
            values = dict(zip(tags, specials[: len(tags)]))
        if i == 3:
            values = {tags[0]: specials[4], tags[3]: specials[6]}  # another set of tags in the middle
        if i == 4:
            values = dict(zip(tags, specials[6:]))
        groups.append(StepRecords(step, values))
        walls.append([1.7e9 + i * 0.125, None, 0.0][i % 3])
    encoded = ScalarEvents(max_templates=2).encode(groups, walls)
    assert len(encoded) == len(groups)
    for g, wall, data in zip(groups, walls, encoded):
        if wall is None:  # "now": read the wall time back from the bytes, then compare everything
            (wall,) = struct.unpack("<d", data[1:9])
        assert data == _reference_event(g.step, wall, g.values), g
    # the same records as arrays (shared tag tuples, one float64 array per step): the same bytes
    as_rows = []
    for g in groups:
        tags_now = tuple(g.values)
        same = as_rows and as_rows[-1].tags == tags_now
        as_rows.append(StepRow(g.step, as_rows[-1].tags if same else tags_now, np.array(list(g.values.values()))))
    fixed_walls = [struct.unpack("<d", data[1:9])[0] if data[:1] == b"\x09" else 0.0 for data in encoded]
    assert ScalarEvents(max_templates=2).encode_rows(as_rows, fixed_walls) == ScalarEvents().encode(groups, fixed_walls)


def test_a_flush_writes_the_same_events_from_arrays_as_from_its_records(tmp_path):
    run = train(small_mlp(), 23, flush_every=23, log_dir=tmp_path / "run", sample_every=5)
    frame = run.scope.frame
    rows = scalar_rows(frame, 0)
    assert records_of(rows) == scalar_records(frame, 0) and len(rows) == 23
    assert len({id(r.tags) for r in rows}) < len(rows)  # rows of one pattern share their tags
    walls = [1.7e9 + k for k in range(len(rows))]
    assert ScalarEvents().encode_rows(rows, walls) == ScalarEvents().encode(records_of(rows), walls)


def test_summary_event_equals_add_summary_bytes():
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

    histo = HistogramProto(min=-1.0, max=2.0, num=3, sum=1.5, sum_squares=5.25, bucket_limit=[0.5, 2.0], bucket=[1, 2])
    summary = Summary(value=[Summary.Value(tag="gradscope/grad_hist/0", histo=histo)])
    assert summary_event(summary, 101, 1.5e9) == Event(wall_time=1.5e9, step=101, summary=summary).SerializeToString()


@pytest.mark.parametrize("implementation", ["numpy", "auto"])
def test_crc32c_equals_tensorboards_checksum(implementation):
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import crc32c as tb_crc
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as tb_masked

    rng = np.random.default_rng(1)
    lengths = [0, 1, 2, 3, 4, 5, 8, 511, 512, 513, 1024, 1025, 3000, 7]
    chunks = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in lengths] + [b"\xff" * 600, bytes(600)]
    assert crc32c([b"123456789"], implementation=implementation).tolist() == [0xE3069283]  # the standard check value
    assert crc32c(chunks, implementation=implementation).tolist() == [tb_crc(c) & 0xFFFFFFFF for c in chunks]
    assert masked_crc32c(chunks, implementation=implementation).tolist() == [tb_masked(c) for c in chunks]
    assert crc32c([], implementation=implementation).tolist() == []


def test_numpy_crc_in_small_batches_equals_tensorboards(monkeypatch):
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import crc32c as tb_crc

    import gradscope.sinks.tensorboard_events as te

    monkeypatch.setattr(te, "_BATCH_BYTES", 3000)  # many batches, some of one string longer than a batch
    rng = np.random.default_rng(2)
    chunks = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in rng.integers(0, 5000, 30)]
    assert crc32c(chunks, implementation="numpy").tolist() == [tb_crc(c) & 0xFFFFFFFF for c in chunks]


def test_framed_records_equal_tensorboards_record_writer(tmp_path):
    import io

    from tensorboard.summary.writer.record_writer import RecordWriter

    events = [_reference_event(s, 1.0 + s, {"a": s * 0.5, "b/c": -float(s)}) for s in range(1, 6)] + [b"", b"xyz"]
    buf = io.BytesIO()
    w = RecordWriter(buf)
    for e in events:
        w.write(e)
    assert frame_records(events) == buf.getvalue()


def test_event_file_is_read_by_tensorboard_and_steps_round_to_float32(tmp_path):
    f = EventFile(tmp_path)
    enc = ScalarEvents()
    groups = [StepRecords(s, {"t/a": s / 3, "t/b": 1e-3 * s}) for s in range(1, 40)]
    f.extend(enc.encode(groups, [1e9 + s for s in range(1, 40)]))
    f.flush()
    f.extend(enc.encode([StepRecords(40, {"t/a": 7.0})], [None]))
    f.close()
    f.close()  # a second close does nothing
    assert event_files(tmp_path) == [Path(f.path)]
    acc = load_events(tmp_path)
    a = acc.Scalars("t/a")
    assert [e.step for e in a] == list(range(1, 41))
    np.testing.assert_array_equal([e.value for e in a], np.float32([s / 3 for s in range(1, 40)] + [7.0]))
    assert [e.wall_time for e in acc.Scalars("t/b")] == [1e9 + s for s in range(1, 40)]
    assert acc.file_version == 2.0  # the brain.Event:2 header, as SummaryWriter writes it
    with pytest.raises(ValueError, match="closed"):
        f.flush()


def test_watched_run_writes_one_checksummed_file_tensorboards_loader_accepts(tmp_path):
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as tb_masked

    run = train(small_mlp(), 12, log_dir=tmp_path, flush_every=5, histogram_every=4)
    [path] = event_files(tmp_path)
    raw = path.read_bytes()
    records, at = [], 0
    while at < len(raw):  # every record's framing checked with TensorBoard's own checksum
        (n,) = struct.unpack("<Q", raw[at : at + 8])
        assert struct.unpack("<I", raw[at + 8 : at + 12])[0] == tb_masked(raw[at : at + 8])
        data = raw[at + 12 : at + 12 + n]
        assert struct.unpack("<I", raw[at + 12 + n : at + 16 + n])[0] == tb_masked(data)
        records.append(data)
        at += 16 + n
    assert records == list(RawEventFileLoader(str(path)).Load())
    acc = load_events(tmp_path)
    assert [e.step for e in acc.Histograms("gradscope/grad_hist/2")] == [1, 5, 9]
    assert [e.step for e in acc.Scalars("gradscope/rms/2")] == list(range(1, 13))
    assert run.report.steps == 12
