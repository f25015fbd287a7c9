"""The TensorBoard and torch APIs gradscope writes and reads runs with, pinned by what they must do.

Writing goes through ``SummaryWriter.file_writer`` (never the private ``_get_file_writer()``); reading
through the modules ``EventAccumulator`` is built on, with a reader of gradscope's own as fallback.
"""

from __future__ import annotations

import builtins

from sinkhelp import event_files, small_mlp, train

from gradscope.sinks import reader


def test_file_writer_is_the_public_attribute_every_add_method_ends_in(tmp_path):
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.writer import FileWriter

    writer = SummaryWriter(str(tmp_path))
    assert isinstance(writer.file_writer, FileWriter) and callable(writer.file_writer.add_summary)
    writer.close()


def test_own_tfrecord_reader_reads_what_tensorboard_reads(tmp_path):
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader

    run = train(small_mlp(), 6, log_dir=tmp_path / "run", flush_every=3)
    [path] = event_files(tmp_path / "run")
    ours = list(reader.tfrecords(path))
    assert ours == list(RawEventFileLoader(str(path)).Load()) and len(ours) > 10
    # a file cut mid-record (still being written) yields the whole records before the cut
    cut = tmp_path / "cut" / path.name
    cut.parent.mkdir()
    cut.write_bytes(path.read_bytes()[:-5])
    assert list(reader.tfrecords(cut)) == ours[:-1]
    assert run.report.steps == 6


def test_checksums_are_verified_and_a_bad_one_ends_the_file_where_tensorboard_stops(tmp_path):
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader

    train(small_mlp(), 6, log_dir=tmp_path / "run", flush_every=3)
    [path] = event_files(tmp_path / "run")
    raw = path.read_bytes()
    assert list(reader.tfrecords(path, verify=True)) == list(RawEventFileLoader(str(path)).Load())
    # flip one byte: in the data of a record, then in the checksum of a length
    starts, at = [], 0
    while at < len(raw):
        starts.append(at)
        at += 12 + int.from_bytes(raw[at : at + 8], "little") + 4
    k = len(starts) // 2
    for offset in (12 + 3, 9):
        bad = bytearray(raw)
        bad[starts[k] + offset] ^= 0x40
        damaged = tmp_path / f"bad{offset}" / path.name
        damaged.parent.mkdir()
        damaged.write_bytes(bytes(bad))
        ours = list(reader.tfrecords(damaged, verify=True))
        assert ours == list(RawEventFileLoader(str(damaged)).Load()) and len(ours) == k
        assert len(list(reader.tfrecords(damaged))) == len(starts)  # unverified: every record


def test_reports_read_back_without_tensorboards_loader_modules(tmp_path, monkeypatch):
    train(small_mlp(), 6, log_dir=tmp_path / "logs" / "run", flush_every=3)
    with_loader = reader.read_report(tmp_path / "logs", progress=False)
    real_import = builtins.__import__

    def no_loader(name, *args, **kwargs):
        if name.startswith("tensorboard.backend.event_processing"):
            raise ImportError(f"no {name} (simulated)")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_loader)
    assert reader.find_runs(tmp_path / "logs") == [tmp_path / "logs" / "run"]
    back = reader.read_report(tmp_path / "logs", progress=False)
    assert back.findings == with_loader.findings
    assert back.stats.equals(with_loader.stats) and back.scalars.equals(with_loader.scalars)
    assert len(back.stats) > 0
