"""``gradscope diff``: two real short runs (healthy, vanishing) compared against numbers taken from their reports."""

from __future__ import annotations

import argparse
import base64
import math

import numpy as np
import pytest

from gradscope import diff as run_diff
from gradscope.report import Report


def _main(argv: list[str]) -> int:
    """The subcommand as ``gradscope`` runs it (cli.py registers ``add_parser``; its main returns ``func(args)``)."""
    parser = argparse.ArgumentParser(prog="gradscope")
    run_diff.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def _profile_by_hand(report: Report) -> dict[str, float]:
    """Median over steps of log10 of each layer's gradient norm, straight from report.stats."""
    s = report.stats
    rows = s[(s["param"] == "*") & (s["layer"] != "*") & (s["stat"] == "l2_norm")]
    out = {}
    for layer in rows["layer"].unique():
        v = rows.loc[rows["layer"] == layer, "value"].to_numpy()
        out[layer] = float(np.median(np.log10(v)))
    return out


def test_profile_and_findings_match_the_reports(two_runs):
    a, _, _ = two_runs["healthy"]
    b, _, _ = two_runs["vanishing"]
    d = run_diff.compare_runs(a, b)
    pa, pb = _profile_by_hand(a), _profile_by_hand(b)
    assert set(pa) == {"fc0", "fc1", "head"} and set(pb) == {f"fc{i}" for i in range(8)} | {"head"}
    assert [c.layer for c in d.layers] == ["fc0", "fc1", "head"]  # depth order
    for c in d.layers:
        assert c.a == pytest.approx(pa[c.layer], abs=1e-12)
        assert c.b == pytest.approx(pb[c.layer], abs=1e-12)
        assert c.ratio == pytest.approx(10 ** (pb[c.layer] - pa[c.layer]), rel=1e-9)
    assert d.only_a == [] and d.only_b == [f"fc{i}" for i in range(2, 8)]
    # the vanishing run's input layer gets orders of magnitude less gradient than the healthy one's
    assert d.layers[0].ratio < 1e-3
    keys = lambda fs: {(f.kind, f.layer) for f in fs}  # noqa: E731
    assert keys(d.new) == keys(b.findings) - keys(a.findings)
    assert ("vanishing_gradients", "fc4") in keys(d.new) and d.gone == [] and d.exit_code == 1
    back = run_diff.compare_runs(b, a)
    assert keys(back.gone) == keys(b.findings) and back.new == [] and back.exit_code == 0
    assert [c.ratio for c in back.layers] == pytest.approx([1 / c.ratio for c in d.layers], rel=1e-9)


def test_command_text_html_and_exit_codes(two_runs, tmp_path, capsys):
    a, a_json, a_dir = two_runs["healthy"]
    b, b_json, _ = two_runs["vanishing"]
    html_path = tmp_path / "diff.html"
    # event dir against JSON report: the same numbers either way
    assert _main(["diff", str(a_dir), str(b_json), "--html", str(html_path)]) == 1
    text = capsys.readouterr().out
    d = run_diff.compare_runs(a, b)
    for c in d.layers:
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(c.layer + " "))
        shown = float(line.split()[3])
        assert shown == pytest.approx(c.ratio, rel=5e-3)
    fc0 = next(ln for ln in text.splitlines() if ln.strip().startswith("fc0 "))
    assert fc0.rstrip().endswith("<<")
    assert "layers only in B (6): fc2, fc3, fc4, fc5, fc6, fc7" in text
    assert "vanishing_gradients     fc4" in text and text.rstrip().endswith("(exit 1)")
    page = html_path.read_text()
    assert "vanishing_gradients" in page and "new finding(s) in B" in page
    png = base64.b64decode(page.split("base64,", 1)[1].split("'", 1)[0])
    assert png.startswith(b"\x89PNG")
    # B without new findings: 0 (the reverse, and a run against itself)
    assert _main(["diff", str(b_json), str(a_dir), "-q"]) == 0
    assert _main(["diff", str(a_json), str(a_dir), "-q"]) == 0
    capsys.readouterr()


def test_tensorboard_and_json_give_the_same_profile(two_runs):
    from gradscope.sinks.reader import read_report

    _, a_json, a_dir = two_runs["healthy"]
    from_tb, from_json = read_report(a_dir), read_report(a_json)
    p_tb, p_json = run_diff.gradient_profile(from_tb), run_diff.gradient_profile(from_json)
    assert p_tb.keys() == p_json.keys()
    for layer in p_json:  # TensorBoard stores float32
        assert p_tb[layer] == pytest.approx(p_json[layer], abs=1e-6)


def test_unreadable_input_exits_2(two_runs, tmp_path, capsys):
    _, a_json, _ = two_runs["healthy"]
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "gradscope.report", "version": 1, "stats": 5}')
    cases = [
        ([str(a_json), str(tmp_path / "missing.json")], "missing.json"),
        ([str(bad), str(a_json)], "'stats'"),
        ([str(a_json), str(a_json), "--stat", "nope"], "--stat 'nope'"),
    ]
    for argv, words in cases:
        assert _main(["diff", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("gradscope diff: error:") and words in err and "Traceback" not in err


def test_zero_and_missing_layers():
    import pandas as pd

    def report(values: dict[str, list[float]]) -> Report:
        rows = [(i + 1, layer, "*", "l2_norm", v) for layer, vs in values.items() for i, v in enumerate(vs)]
        return Report(findings=[], stats=pd.DataFrame(rows, columns=["step", "layer", "param", "stat", "value"]))

    a = report({"x": [1.0, 1.0, 1.0], "z": [0.0, 0.0, 1.0], "n": [math.nan, 2.0, 2.0]})
    b = report({"x": [0.0, 0.0, 0.0], "z": [0.0, 0.0, 0.0], "n": [20.0, 20.0, math.inf]})
    d = run_diff.compare_runs(a, b)
    by = {c.layer: c for c in d.layers}
    assert by["x"].b == -math.inf and by["x"].ratio == 0.0
    assert by["z"].a == -math.inf and by["z"].ratio is None  # zero in both: no factor
    assert by["n"].a == pytest.approx(math.log10(2.0)) and by["n"].ratio == pytest.approx(10.0)
    text = str(d)
    rows = {ln.split()[0]: ln.split()[1:] for ln in text.splitlines() if ln.startswith("  ") and ln.split()}
    assert rows["x"] == ["1", "0", "0", "<<"] and rows["z"] == ["0", "0", "-"] and rows["n"] == ["2", "20", "10", ">>"]
