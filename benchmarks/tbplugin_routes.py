"""How fast the gradscope tab's routes answer on a large run, through a real TensorBoard server.

Writes a run of ``--layers`` layers x ``--steps`` steps the way the TensorBoard sink lays it out
(one event per step holding every value of the step: ``l2_norm`` and ``rms`` of each layer and of
the model at every step, ``abs_max``, ``update_ratio`` and ``zero_fraction`` every 10th step, the
loss; gradscope's ``_meta``, ``_findings`` and ``_report`` records), directly as TFRecord files (the
checksums vectorised with NumPy: TensorBoard's own writer checksums in pure Python, minutes for a
run this size). Then it starts ``tensorboard --logdir DIR --port PORT`` (default flags), waits until
the tab sees the last step, and prints each route's response time, first (cold) and second call::

    python benchmarks/tbplugin_routes.py                       # 200 layers x 20k steps
    python benchmarks/tbplugin_routes.py --steps 100000        # the issue's 100k steps

Each route is meant to answer in under 2 s; this prints, it does not assert.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gradscope.sinks import tags as T  # noqa: E402

# -- TFRecord with vectorised CRC32C ------------------------------------------------------------------
_POLY = 0x82F63B78
_TABLE = np.zeros(256, dtype=np.uint32)
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ _POLY if _c & 1 else _c >> 1
    _TABLE[_i] = _c


def _masked_crc(rows: np.ndarray) -> np.ndarray:
    """Masked CRC32C (TFRecord's) of each row of ``rows`` ``[N, B]`` uint8, all N at once: ``[N]`` uint32."""
    crc = np.full(rows.shape[0], 0xFFFFFFFF, dtype=np.uint32)
    for j in range(rows.shape[1]):
        crc = _TABLE[(crc ^ rows[:, j]) & 0xFF] ^ (crc >> np.uint32(8))
    crc ^= np.uint32(0xFFFFFFFF)
    masked = ((crc >> np.uint32(15)) | (crc << np.uint32(17))) + np.uint32(0xA282EAD8)
    return masked.astype(np.uint32)


def write_records(path: Path, payloads: list[bytes]) -> None:
    """A TFRecord file of ``payloads`` (serialized ``Event`` protos), checksums computed per length group."""
    n = len(payloads)
    lengths = np.array([len(p) for p in payloads], dtype=np.uint64)
    len_bytes = lengths.astype("<u8").view(np.uint8).reshape(n, 8)
    len_crc = _masked_crc(len_bytes)
    data_crc = np.zeros(n, dtype=np.uint32)
    for length in np.unique(lengths):
        idx = np.nonzero(lengths == length)[0]
        rows = np.frombuffer(b"".join(payloads[i] for i in idx), dtype=np.uint8).reshape(len(idx), int(length))
        data_crc[idx] = _masked_crc(rows)
    with path.open("wb") as fh:
        for i, p in enumerate(payloads):
            fh.write(struct.pack("<QI", int(lengths[i]), int(len_crc[i])))
            fh.write(p)
            fh.write(struct.pack("<I", int(data_crc[i])))


def _check_crc() -> None:
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    sample = [b"gradscope", b"x" * 37, bytes(range(256))]
    for s in sample:
        got = int(_masked_crc(np.frombuffer(s, dtype=np.uint8).reshape(1, -1))[0])
        assert got == masked_crc32c(s), "CRC32C mismatch with TensorBoard's"


# -- the run ----------------------------------------------------------------------------------------------
def _record(tag: str, payload: object) -> object:
    from tensorboard.compat.proto.summary_pb2 import DATA_CLASS_TENSOR, Summary, SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto

    meta = SummaryMetadata(
        plugin_data=SummaryMetadata.PluginData(plugin_name=T.PLUGIN_NAME), data_class=DATA_CLASS_TENSOR
    )
    tensor = TensorProto(dtype="DT_STRING", string_val=[json.dumps(payload).encode()], tensor_shape=TensorShapeProto())
    return Summary(value=[Summary.Value(tag=tag, tensor=tensor, metadata=meta)])


def write_run(run_dir: Path, layers: int, steps: int, seed: int = 0) -> float:
    """Write the run; returns the seconds it took."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary

    t0 = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    names = [f"blocks.{i // 4}.{('attn.qkv', 'attn.proj', 'mlp.fc1', 'mlp.fc2')[i % 4]}" for i in range(layers)]
    rng = np.random.default_rng(seed)
    # log10 norm: the input side several decades below the output side, a slow drift, noise
    base = np.linspace(-7.0, -1.0, layers)
    wall0 = 1_700_000_000.0
    payloads = [
        Event(wall_time=wall0, step=0, file_version="brain.Event:2").SerializeToString(),
        Event(
            wall_time=wall0,
            step=1,
            summary=_record(T.META_JSON_TAG, {"schema": "gradscope.run", "version": 1, "layers_by_depth": names}),
        ).SerializeToString(),
    ]
    stat_tags = {s: [T.stat_tag(s, n) for n in names] + [T.stat_tag(s, "*")] for s in ("l2_norm", "rms")}
    sampled_tags = {
        s: [T.stat_tag(s, n) for n in names] + [T.stat_tag(s, "*")]
        for s in ("abs_max", "update_ratio", "zero_fraction")
    }
    loss_tag = T.scalar_tag("loss")
    findings = []
    for step in range(1, steps + 1):
        logn = base + 0.3 * np.sin(step / 500.0 + np.arange(layers)) + 0.05 * rng.standard_normal(layers)
        norm = np.append(10.0**logn, np.sqrt(np.sum(10.0 ** (2 * logn)))).astype(np.float32)
        values = []
        for s, scale in (("l2_norm", 1.0), ("rms", 0.01)):
            values += [Summary.Value(tag=t, simple_value=float(v) * scale) for t, v in zip(stat_tags[s], norm)]
        if step % 10 == 1:
            for s, scale in (("abs_max", 0.05), ("update_ratio", 1e-3), ("zero_fraction", 0.0)):
                values += [Summary.Value(tag=t, simple_value=float(v) * scale) for t, v in zip(sampled_tags[s], norm)]
        values.append(Summary.Value(tag=loss_tag, simple_value=float(2.0 / np.sqrt(step))))
        payloads.append(Event(wall_time=wall0 + step, step=step, summary=Summary(value=values)).SerializeToString())
        if step % 5000 == 0:  # a finding now and then, with status updates as new records
            f = {
                "kind": "vanishing_gradients",
                "severity": "error",
                "step": step - 100,
                "layer": names[step // 5000],
                "message": "gradient RMS far below the layers after it",
                "suggestion": "initialisation, normalisation, residual connections",
                "evidence": {"ratio": 1e-5},
            }
            findings.append(f)
            payloads.append(
                Event(wall_time=wall0 + step, step=step, summary=_record(T.FINDINGS_JSON_TAG, [f])).SerializeToString()
            )
    final = {"schema": "gradscope.report", "ok": not findings, "meta": {"layers_by_depth": names}, "findings": findings}
    payloads.append(
        Event(wall_time=wall0 + steps, step=steps, summary=_record(T.REPORT_JSON_TAG, final)).SerializeToString()
    )
    write_records(run_dir / f"events.out.tfevents.{int(wall0)}.bench.0.0", payloads)
    return time.perf_counter() - t0


# -- the server ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(base: str, route: str, **params: object) -> tuple[float, int]:
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    t0 = time.perf_counter()
    with urllib.request.urlopen(f"{base}/data/plugin/gradscope/{route}?{query}", timeout=300) as resp:
        body = resp.read()
    return time.perf_counter() - t0, len(body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=200)
    ap.add_argument("--steps", type=int, default=20_000)
    ap.add_argument("--keep", action="store_true", help="keep the log dir (printed)")
    args = ap.parse_args()
    _check_crc()
    tmp = Path(tempfile.mkdtemp(prefix="gradscope-tbbench-"))
    run = "big"
    try:
        took = write_run(tmp / run, args.layers, args.steps)
        size = sum(p.stat().st_size for p in (tmp / run).iterdir())
        print(f"wrote {args.layers} layers x {args.steps} steps: {size / 1e6:.0f} MB in {took:.1f} s")
        port = _free_port()
        exe = shutil.which("tensorboard")
        cmd = [exe] if exe else [sys.executable, "-m", "tensorboard.main"]
        log = (tmp / "tb.log").open("w")
        proc = subprocess.Popen([*cmd, "--logdir", str(tmp), "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
        base = f"http://localhost:{port}"
        try:
            t0 = time.perf_counter()
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"tensorboard exited: {(tmp / 'tb.log').read_text()}")
                try:
                    with urllib.request.urlopen(f"{base}/data/plugin/gradscope/runs", timeout=60) as resp:
                        runs = json.loads(resp.read())["runs"]
                    if runs and runs[0]["max_step"] >= args.steps:
                        break
                except OSError:
                    pass
                time.sleep(0.5)
            print(f"tensorboard loaded the run in {time.perf_counter() - t0:.1f} s (its own reservoir sampling)")
            layer = T.layer_from_tag(f"blocks.{args.layers // 8}.mlp.fc1")
            routes = [
                ("runs", {}),
                ("run", {"run": run}),
                ("flow", {"run": run}),
                ("flow", {"run": run, "step": args.steps // 2}),
                ("heatmap", {"run": run}),
                ("heatmap", {"run": run, "lo": args.steps // 4, "hi": args.steps // 2}),
                ("curves", {"run": run, "layer": layer}),
                ("scalars", {"run": run}),
            ]
            print(f"{'route':<42} {'cold s':>8} {'warm s':>8} {'KB':>8}")
            worst = 0.0
            for route, params in routes:
                cold, n = _get(base, route, **params)
                warm, _ = _get(base, route, **params)
                worst = max(worst, cold, warm)
                label = route + ("?" + urllib.parse.urlencode(params) if params else "")
                print(f"{label[:42]:<42} {cold:8.3f} {warm:8.3f} {n / 1e3:8.0f}")
            print(f"slowest answer: {worst:.2f} s (target: under 2 s each)")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log.close()
    finally:
        if args.keep:
            print(f"log dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
