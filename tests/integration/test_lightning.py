"""GradscopeCallback in real Lightning fits: the statistics are those of the gradients the optimizer used.

The reference is taken by the LightningModule itself in ``on_before_optimizer_step`` (once per
optimizer step, after accumulation and AMP unscaling, before clipping) in float64; clipping is then
applied by hand: ``g * min(1, max_norm / (||g|| + 1e-6))``, as ``clip_grad_norm_`` defines it.
"""

from __future__ import annotations

import contextlib
import csv
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gradscope

pl = pytest.importorskip("lightning.pytorch")
from gradscope.integrations.lightning import GradscopeCallback  # noqa: E402

N_BATCHES, BATCH = 8, 16


class Tiny(pl.LightningModule):
    def __init__(self, *, inf_at: int | None = None, fail_at: int | None = None, manual: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
        self.inf_at, self.fail_at = inf_at, fail_at
        self.automatic_optimization = not manual
        self.refs: list[dict[str, float]] = []  # per optimizer step: layer -> sum of squares (float64)
        self.batch_losses: list[float] = []
        self.val_losses: list[float] = []

    def _loss(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        if batch_idx == self.fail_at and self.current_epoch == 0:
            raise RuntimeError("boom")
        if batch_idx == self.inf_at and self.current_epoch == 0:
            loss = loss * float("inf")
        return loss

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch, batch_idx)
        self.batch_losses.append(loss.item())
        self.log("train_loss", loss)
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self.net(batch[0]), batch[1]))

    def on_validation_epoch_end(self):
        if not self.trainer.sanity_checking:
            self.val_losses.append(float(self.trainer.callback_metrics["val_loss"]))

    def on_before_optimizer_step(self, optimizer):
        ref: dict[str, float] = {}
        for name, p in self.named_parameters():
            if p.grad is not None:
                layer = name.rpartition(".")[0]
                ref[layer] = ref.get(layer, 0.0) + float(p.grad.double().pow(2).sum())
        self.refs.append(ref)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def loader(seed: int) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_BATCHES * BATCH, 8, generator=g)
    y = (x[:, :4] * torch.tensor([1.0, -2.0, 0.5, 1.5])).argmax(dim=1)  # learnable
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)


def fit(tmp_path, module: Tiny, callback: GradscopeCallback, *, logger=None, **trainer_kw):
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=pl.loggers.TensorBoardLogger(str(tmp_path), name="run") if logger is None else logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
        **{"max_epochs": 2, "callbacks": [callback], **trainer_kw},
    )
    trainer.fit(module, loader(0), loader(1))
    return trainer


def l2(report: gradscope.Report, layer: str = "*") -> dict[int, float]:
    df = report.stats
    df = df[(df.stat == "l2_norm") & (df.layer == layer) & (df.param == "*")]
    return dict(zip(df.step.astype(int), df.value))


def scalars(log_dir: str) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def metrics_csv(path: Path) -> dict[str, dict[int, float]]:
    """What a ``CSVLogger`` wrote: column -> step -> value (cells left empty skipped)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    out: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in row.items():
            if key != "step" and value != "":
                # gradscope logs each of its tags once per step (Lightning may log "epoch" twice)
                assert not key.startswith("gradscope/") or int(row["step"]) not in out.get(key, {}), key
                out.setdefault(key, {})[int(row["step"])] = float(value)
    return out


def gradscope_series(report: gradscope.Report) -> dict[str, dict[int, float]]:
    """gradscope's tags -> step -> value, from the report's tables: layer and model aggregates, scalars."""
    df = report.stats
    df = df[(df.param == "*") & df.value.notna()]
    out: dict[str, dict[int, float]] = {}
    for step, layer, stat, value in zip(df.step, df.layer, df.stat, df.value):
        tag = f"gradscope/{stat}/{'_model' if layer == '*' else layer}"
        out.setdefault(tag, {})[int(step)] = float(value)
    for name, series in report.scalars.items():
        out[f"gradscope/scalar/{name}"] = {int(s): float(v) for s, v in series.dropna().items()}
    return out


@pytest.fixture(scope="module")
def accumulated(tmp_path_factory):
    """2 epochs x 8 batches, accumulate 2 batches per step, clip at 0.5: 8 optimizer steps."""
    tmp = tmp_path_factory.mktemp("lightning")
    module, callback = Tiny(), GradscopeCallback(sample_every=2)
    trainer = fit(tmp, module, callback, accumulate_grad_batches=2, gradient_clip_val=0.5)
    return trainer, module, callback


def test_one_gradscope_step_per_optimizer_step(accumulated):
    trainer, module, callback = accumulated
    report = callback.report
    assert callback.scope is None and report is not None  # closed at fit end
    assert trainer.global_step == report.steps == len(module.refs) == N_BATCHES  # 16 batches / 2
    assert report.skipped_steps == []


def test_statistics_are_the_clipped_accumulated_gradients(accumulated):
    _, module, callback = accumulated
    got = l2(callback.report)
    clipped = 0
    for step, ref in enumerate(module.refs, start=1):
        raw = math.sqrt(sum(ref.values()))
        scale = min(1.0, 0.5 / (raw + 1e-6))
        clipped += scale < 1
        assert math.isclose(got[step], raw * scale, rel_tol=1e-5), (step, got[step], raw, scale)
        for layer in ("net.0", "net.2"):
            want = math.sqrt(ref[layer]) * scale
            assert math.isclose(l2(callback.report, layer)[step], want, rel_tol=1e-5), (step, layer)
    assert clipped >= 2  # the clipping path was exercised


def test_loss_lr_and_val_loss_are_recorded(accumulated):
    _, module, callback = accumulated
    sc = callback.report.scalars
    # each step's loss is the mean over its two batches
    want = np.asarray(module.batch_losses).reshape(-1, 2).mean(axis=1)
    np.testing.assert_allclose(sc["loss"].to_numpy(), want, rtol=1e-6)
    assert (sc["lr"] == 0.1).all()
    # validation after epoch 1 lands on the next optimizer step (5); the last one has no step after it
    val = sc["val_loss"]
    assert val.notna().sum() == 1 and math.isclose(val.loc[5], module.val_losses[0], rel_tol=1e-6)


def test_written_into_the_lightning_tensorboard_run(accumulated):
    trainer, _, callback = accumulated
    log_dir = Path(trainer.logger.log_dir)
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 1  # the logger's own writer, not a second file
    tb = scalars(str(log_dir))
    assert {"train_loss", "val_loss", "epoch"} <= set(tb)  # Lightning's own scalars, same run
    model_l2 = tb["gradscope/l2_norm/_model"]
    for step, value in l2(callback.report).items():
        assert math.isclose(model_l2[step], value, rel_tol=1e-6)
    assert "gradscope/l2_norm/net.0" in tb and "gradscope/update_ratio/_model" in tb


def test_any_other_logger_gets_the_metrics_through_log_metrics(tmp_path):
    module, callback = Tiny(), GradscopeCallback(sample_every=3)
    logger = pl.loggers.CSVLogger(str(tmp_path), name="csv")
    fit(tmp_path, module, callback, logger=logger, accumulate_grad_batches=2)
    written = metrics_csv(Path(logger.log_dir) / "metrics.csv")
    want = gradscope_series(callback.report)
    assert {"gradscope/l2_norm/_model", "gradscope/l2_norm/net.0", "gradscope/abs_max/net.2"} <= set(want)
    assert {"gradscope/act_dead_fraction/net.1", "gradscope/scalar/loss", "gradscope/scalar/lr"} <= set(want)
    assert {t for t in written if t.startswith("gradscope/")} == set(want)
    for tag, series in want.items():
        assert written[tag] == series, tag  # exactly: float64 written as text and read back
    assert list(want["gradscope/abs_max/net.2"]) == [1, 4, 7]  # sampled statistics on sampled steps
    assert "train_loss" in written  # Lightning's own metrics, same file
    assert not list(tmp_path.rglob("*tfevents*"))  # no TensorBoard logger: no TensorBoard output


def test_tensorboard_logger_gets_everything_and_the_others_the_metrics(tmp_path):
    module, callback = Tiny(), GradscopeCallback()
    tb = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    csv_logger = pl.loggers.CSVLogger(str(tmp_path), name="csv")
    fit(tmp_path, module, callback, logger=[tb, csv_logger], max_epochs=1)
    want = gradscope_series(callback.report)["gradscope/l2_norm/_model"]
    assert metrics_csv(Path(csv_logger.log_dir) / "metrics.csv")["gradscope/l2_norm/_model"] == want
    events = list(Path(tb.log_dir).glob("events.out.tfevents.*"))
    assert len(events) == 1
    model_l2 = scalars(str(tb.log_dir))["gradscope/l2_norm/_model"]
    assert model_l2.keys() == want.keys()
    assert all(math.isclose(model_l2[s], v, rel_tol=1e-6) for s, v in want.items())


def test_log_to_logger_false_writes_into_no_logger(tmp_path):
    logger = pl.loggers.CSVLogger(str(tmp_path), name="csv")
    callback = GradscopeCallback(log_to_logger=False)
    fit(tmp_path, Tiny(), callback, logger=logger, max_epochs=1)
    assert callback.report.steps == N_BATCHES
    assert not [t for t in metrics_csv(Path(logger.log_dir) / "metrics.csv") if t.startswith("gradscope/")]


def test_hooks_are_removed_after_fit(accumulated):
    trainer, module, _ = accumulated
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())
    opt = trainer.optimizers[0]
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_healthy_fit_has_no_findings(accumulated):
    report = accumulated[2].report
    assert report.findings == [], "\n".join(map(str, report.findings))


def test_fp16_amp_skipped_step_is_recorded_as_skipped(tmp_path):
    # Lightning refuses precision="16-mixed" on CPU by flag; the plugin itself runs there (GradScaler("cpu")).
    from lightning.pytorch.plugins.precision import MixedPrecision

    module, callback = Tiny(inf_at=2), GradscopeCallback(sample_every=1)
    fit(tmp_path, module, callback, max_epochs=1, plugins=[MixedPrecision("16-mixed", "cpu")])
    report = callback.report
    assert report.steps == N_BATCHES
    assert report.skipped_steps == [3]  # batch 2: GradScaler found inf and did not step
    assert 3 not in l2(report)
    for step, ref in enumerate(module.refs, start=1):
        if step != 3:  # unscaled gradients: the loss scale (65536 at first) is divided out
            assert math.isclose(l2(report)[step], math.sqrt(sum(ref.values())), rel_tol=1e-4), step
    assert not [f for f in report.findings if f.kind in ("nonfinite_gradients", "exploding_gradients")]


def test_manual_optimization(tmp_path):
    module, callback = Tiny(manual=True), GradscopeCallback(sample_every=4)
    fit(tmp_path, module, callback, max_epochs=1)
    got = l2(callback.report)
    assert callback.report.steps == len(module.refs) == N_BATCHES
    for step, ref in enumerate(module.refs, start=1):
        assert math.isclose(got[step], math.sqrt(sum(ref.values())), rel_tol=1e-5)
    np.testing.assert_allclose(callback.report.scalars["loss"].to_numpy(), module.batch_losses, rtol=1e-6)


def test_exception_in_fit_still_flushes_and_detaches(tmp_path):
    module, callback = Tiny(fail_at=5), GradscopeCallback()
    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path, module, callback, max_epochs=1)
    assert callback.scope is None and callback.report.steps == 5
    assert len(l2(callback.report)) == 5
    assert not any(m._forward_pre_hooks for m in module.modules())


def test_report_path_is_written_when_fit_raises(tmp_path):
    module = Tiny(fail_at=7)
    callback = GradscopeCallback(report_path=tmp_path / "report.json", history=100, histogram_every=None)
    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path, module, callback, max_epochs=1)
    saved = gradscope.Report.from_json(tmp_path / "report.json")
    assert saved.steps == callback.report.steps == 7
    assert l2(saved) == pytest.approx(l2(callback.report), rel=1e-12)
    assert saved.meta["history"]["window"] == 100


def test_explicit_log_dir_and_no_optimizer(tmp_path):
    module, callback = Tiny(), GradscopeCallback(optimizer_index=None, log_dir=tmp_path / "gs")
    fit(tmp_path, module, callback, max_epochs=1)
    got = l2(callback.report)
    for step, ref in enumerate(module.refs, start=1):
        assert math.isclose(got[step], math.sqrt(sum(ref.values())), rel_tol=1e-5)
    assert "update_ratio" not in set(callback.report.stats.stat)
    assert "gradscope/l2_norm/_model" in scalars(str(tmp_path / "gs"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every": 0}, "Expected `every` to be a positive int, but got 0"),
        ({"sample_every": 3, "every": 2}, "multiple of `every`"),
        ({"rules": ["no_such_rule"]}, "no_such_rule"),
        ({"optimizer_index": -1}, "optimizer_index"),
        ({"on_nonfinite": "stop"}, "on_nonfinite"),
        ({"history": 10}, "Expected `history` to be None"),
        ({"report_path": 3}, "report_path"),
        ({"histogram_every": 0}, "histogram_every"),
    ],
)
def test_options_are_validated_when_the_callback_is_built(kwargs, match):
    with pytest.raises(gradscope.ConfigurationError, match=match):
        GradscopeCallback(**kwargs)


def test_optimizer_index_out_of_range_names_the_fix(tmp_path):
    with pytest.raises(gradscope.ConfigurationError, match="optimizer_index=None"):
        fit(tmp_path, Tiny(), GradscopeCallback(optimizer_index=1), max_epochs=1)


# -- graceful stop on findings -------------------------------------------------------------------------


def _finding(kind: str, severity: str, step: int, *, provisional: bool = False) -> gradscope.Finding:
    return gradscope.Finding(kind, severity, step, "net.0", "made up by the test.", "nothing.", provisional=provisional)


class Announces(pl.Callback):
    """Hands findings to the scope's ``on_finding`` hook at chosen batches, as the scope would."""

    def __init__(self, gs: GradscopeCallback, at: dict[int, list[gradscope.Finding]]) -> None:
        self.gs, self.at = gs, at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for finding in self.at.get(trainer.global_step + 1, []):
            self.gs.scope.options.on_finding(finding)


def test_stop_training_on_ends_the_fit_at_the_step_of_a_matching_finding(tmp_path):
    seen: list[gradscope.Finding] = []
    gs = GradscopeCallback(stop_training_on="error", on_finding=seen.append, rules="none")
    stop = _finding("nonfinite_gradients", "error", 5)
    ignored = [_finding("dead_units", "warning", 2), _finding("exploding_gradients", "error", 3, provisional=True)]
    announce = Announces(gs, {2: ignored[:1], 3: ignored[1:], 5: [stop]})
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        max_epochs=2,
        callbacks=[gs, announce],
    )
    with pytest.warns(gradscope.GradscopeWarning, match=r"stopping training \(global step 5\).*nonfinite_gradients"):
        trainer.fit(Tiny(), loader(0))
    # a warning and a provisional error do not stop an "error" selection; the error at step 5 does,
    # after its batch, through the normal end of fit (the scope closed)
    assert trainer.global_step == 5 and gs.report.steps == 5 and gs.scope is None
    assert gs.stopped_by is stop and seen == [*ignored, stop]
    assert gs.stop_training_on == frozenset({"error"})


@pytest.mark.parametrize(
    ("stop", "finding", "stops"),
    [
        ("warning", _finding("dead_units", "warning", 1), True),
        ("warning", _finding("nonfinite_gradients", "error", 1), True),
        (["dead_units"], _finding("dead_units", "warning", 1), True),
        (["dead_units"], _finding("nonfinite_gradients", "error", 1), False),
    ],
)
def test_stop_training_on_takes_severities_and_kinds(tmp_path, stop, finding, stops):
    gs = GradscopeCallback(stop_training_on=stop, rules="none")
    with pytest.warns(gradscope.GradscopeWarning, match="stopping") if stops else contextlib.nullcontext():
        fit(tmp_path, Tiny(), gs, callbacks=[gs, Announces(gs, {2: [finding]})], logger=False, max_epochs=1)
    assert gs.report.steps == (2 if stops else N_BATCHES)
    assert (gs.stopped_by is finding) == stops


def test_stop_on_in_a_callback_is_the_graceful_stop_and_not_both(tmp_path):
    gs = GradscopeCallback(stop_on="error", rules="none")
    assert gs.stop_training_on == gs.options.stop_on == frozenset({"error"})
    with pytest.warns(gradscope.GradscopeWarning, match="stopping"):
        fit(tmp_path, Tiny(), gs, callbacks=[gs, Announces(gs, {3: [_finding("x", "error", 3)]})], max_epochs=1)
    assert gs.report.steps == 3  # no GradientHealthError out of fit: the trainer stopped
    with pytest.raises(gradscope.ConfigurationError, match="pass `stop_training_on` only"):
        GradscopeCallback(stop_on="error", stop_training_on="error")
    with pytest.raises(gradscope.ConfigurationError, match="`stop_training_on` to name a severity"):
        GradscopeCallback(stop_training_on="fatal")


def test_a_diverging_fit_stops_at_the_first_error_and_the_report_on_disk_names_it(tmp_path):
    # batch 2 multiplies the loss by inf: step 3's gradients are non-finite, the weights NaN after it.
    # Between flushes the rules run live at a cadence measured from this machine's step and rule
    # times; flush_every=5 bounds it, so the stop comes by step 5 however loaded the machine is.
    gs = GradscopeCallback(stop_training_on="error", flush_every=5, report_path=tmp_path / "report.json")
    with pytest.warns(gradscope.GradscopeWarning, match="stopping training.*nonfinite_gradients"):
        trainer = fit(tmp_path, Tiny(inf_at=2), gs, logger=False, max_epochs=2)
    assert gs.stopped_by is not None and (gs.stopped_by.kind, gs.stopped_by.step) == ("nonfinite_gradients", 3)
    assert 3 <= trainer.global_step <= 5 < 2 * N_BATCHES
    saved = gradscope.Report.from_json(tmp_path / "report.json")
    assert saved.steps == trainer.global_step
    assert [(f.step, f.provisional) for f in saved.findings if f.kind == "nonfinite_gradients"] == [(3, False)]


# -- any logger: findings as counts, as text where the logger takes text; a warning when none can --------


class FlagsAt(gradscope.Rule):
    """A test rule: reports ``net.0`` first seen at step ``at`` once the run got there."""

    name = "exploding_gradients"
    severity = "error"

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def check(self, ctx):
        if not (ctx.steps >= self.at).any():
            return []
        return [
            self.finding(
                step=self.at, layer="net.0", message="made up by the test.", suggestion="nothing.", evidence={}
            )
        ]


def test_findings_reach_a_csv_logger_as_counts(tmp_path):
    callback = GradscopeCallback(rules=[FlagsAt(3)], flush_every=4)
    logger = pl.loggers.CSVLogger(str(tmp_path), name="csv")
    fit(tmp_path, Tiny(), callback, logger=logger, max_epochs=1)
    written = metrics_csv(Path(logger.log_dir) / "metrics.csv")
    assert [(f.kind, f.step) for f in callback.report.findings] == [("exploding_gradients", 3)]
    # counted at the flush that found it (steps 1-4), in the same row as that step's statistics
    assert written["gradscope/findings/count"] == {4: 1.0}
    assert written["gradscope/findings/errors"] == {4: 1.0} and written["gradscope/findings/warnings"] == {4: 0.0}


def test_mlflow_logger_gets_the_metrics_and_the_findings_as_an_artifact(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store behind this switch
    uri = f"file:{tmp_path / 'mlruns'}"
    logger = pl.loggers.MLFlowLogger(experiment_name="gs", tracking_uri=uri)
    callback = GradscopeCallback(rules=[FlagsAt(3)], flush_every=4)
    fit(tmp_path, Tiny(), callback, logger=logger, max_epochs=1)
    client = MlflowClient(uri)
    history = {m.step: m.value for m in client.get_metric_history(logger.run_id, "gradscope/l2_norm/_model")}
    assert history == gradscope_series(callback.report)["gradscope/l2_norm/_model"]
    assert [m.step for m in client.get_metric_history(logger.run_id, "gradscope/findings/count")] == [4]
    folder = Path(client.download_artifacts(logger.run_id, "gradscope", str(tmp_path / "art")))
    assert "| 3 | error | exploding_gradients | `net.0` |" in (folder / "findings.md").read_text()


def test_a_trainer_without_a_logger_says_that_nothing_reaches_a_tracker(tmp_path):
    callback = GradscopeCallback()
    with pytest.warns(gradscope.GradscopeWarning, match="no logger that gradscope can write into"):
        fit(tmp_path, Tiny(), callback, logger=False, max_epochs=1)
    assert callback.report.steps == N_BATCHES
    with warnings.catch_warnings():
        warnings.simplefilter("error", gradscope.GradscopeWarning)
        fit(tmp_path, Tiny(), GradscopeCallback(log_to_logger=False), logger=False, max_epochs=1)  # asked for: silent
