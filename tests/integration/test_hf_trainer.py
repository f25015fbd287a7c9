"""GradscopeTrainerCallback in real Hugging Face Trainer runs (CPU, tiny GPT-2, nothing downloaded).

The reference is a second callback that reads the gradients in ``on_pre_optimizer_step`` (after
accumulation and clipping, right before ``optimizer.step()``) in float64; the Trainer's own logs
(``loss``, ``learning_rate``, ``eval_loss``, and ``grad_norm``, the norm before clipping) are the
reference for the scalars.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import gradscope

# Models are built from small configs with random weights: nothing may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it
from gradscope.integrations.huggingface import GradscopeTrainerCallback, trainer_tensorboard_dir  # noqa: E402

VOCAB, SEQ, MAX_STEPS, CLIP = 64, 16, 6, 0.5


class Progressions(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        stride = torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (start + stride * torch.arange(SEQ)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class RecordGrads(transformers.TrainerCallback):
    """float64 sum of squares per layer (tied owners joined by "+") of the gradients about to be applied."""

    def __init__(self) -> None:
        self.refs: list[dict[str, float]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        holders: dict[int, tuple[torch.Tensor, list[str]]] = {}
        for path, module in model.named_modules():
            for _, p in module.named_parameters(recurse=False):
                holders.setdefault(id(p), (p, []))[1].append(path)
        ref: dict[str, float] = {}
        for p, paths in holders.values():
            if p.grad is not None:
                layer = "+".join(dict.fromkeys(paths))
                ref[layer] = ref.get(layer, 0.0) + float(p.grad.double().pow(2).sum())
        self.refs.append(ref)


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg)


def run_trainer(tmp_path: Path, callback: GradscopeTrainerCallback, *, extra: tuple = (), **args_kw):
    record = RecordGrads()
    kw = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": MAX_STEPS,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "gradient_accumulation_steps": 2,
        "learning_rate": 3e-3,
        "max_grad_norm": CLIP,
        "logging_steps": 1,
        "eval_strategy": "steps",
        "eval_steps": 3,
        "save_strategy": "no",
        "report_to": ["tensorboard"],
        "use_cpu": True,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 0,
        **args_kw,
    }
    trainer = transformers.Trainer(
        model=tiny_gpt2(),
        args=transformers.TrainingArguments(**kw),
        train_dataset=Progressions(64, seed=0),
        eval_dataset=Progressions(16, seed=1),
        callbacks=[callback, record, *extra],
    )
    trainer.train()
    return trainer, record


def logged(trainer, key: str) -> dict[int, float]:
    return {e["step"]: e[key] for e in trainer.state.log_history if key in e}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf")
    callback = GradscopeTrainerCallback(sample_every=2)
    trainer, record = run_trainer(tmp, callback)
    return trainer, record, callback


def test_one_step_per_optimizer_step_and_detached(trained):
    trainer, record, callback = trained
    report = callback.report
    assert callback.scope is None and report is not None
    assert trainer.state.global_step == report.steps == len(record.refs) == MAX_STEPS
    assert report.skipped_steps == []
    model = trainer.model
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_statistics_are_the_clipped_accumulated_gradients(trained):
    trainer, record, callback = trained
    df = callback.report.stats
    l2 = df[(df.stat == "l2_norm") & (df.param == "*")].set_index(["step", "layer"]).value
    bad = []
    for step, ref in enumerate(record.refs, start=1):
        for layer, v in {**ref, "*": sum(ref.values())}.items():
            if not math.isclose(l2[(step, layer)], math.sqrt(v), rel_tol=1e-5):
                bad.append(f"step {step} {layer}: {l2[(step, layer)]} vs {math.sqrt(v)}")
    assert not bad, "\n".join(bad)
    assert "transformer.wte+lm_head" in set(df.layer)
    # the Trainer logs the norm before clipping: gradscope sees it clipped to max_grad_norm
    pre_clip = logged(trainer, "grad_norm")
    assert sum(v > CLIP for v in pre_clip.values()) >= 2
    for step, norm in pre_clip.items():
        want = norm * min(1.0, CLIP / (norm + 1e-6))
        assert math.isclose(l2[(step, "*")], want, rel_tol=1e-4), (step, l2[(step, "*")], norm)


def test_logged_loss_lr_and_eval_loss_are_recorded(trained):
    trainer, _, callback = trained
    sc = callback.report.scalars
    loss = logged(trainer, "loss")
    assert sorted(loss) == list(range(1, MAX_STEPS + 1))
    np.testing.assert_allclose([sc.loc[s, "loss"] for s in loss], list(loss.values()))
    np.testing.assert_allclose([sc.loc[s, "lr"] for s in loss], list(logged(trainer, "learning_rate").values()))
    ev = logged(trainer, "eval_loss")
    assert sorted(ev) == [3, 6]
    assert sc["val_loss"].dropna().to_dict() == pytest.approx(ev)


def test_written_into_the_trainers_tensorboard_run(trained):
    trainer, _, callback = trained
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = Path(callback.log_dir)
    assert run_dir.parent == Path(trainer.args.output_dir) / "runs"
    assert trainer_tensorboard_dir(trainer.args) == str(run_dir)
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "eval/loss"} <= tags  # the Trainer's own scalars, same run
    model_l2 = {e.step: e.value for e in acc.Scalars("gradscope/l2_norm/_model")}
    df = callback.report.stats.query("stat == 'l2_norm' and layer == '*'")
    assert model_l2 == pytest.approx(dict(zip(df.step, df.value)), rel=1e-6)
    assert "gradscope/l2_norm/transformer.h.0.attn.c_attn" in tags


def test_healthy_trainer_run_has_no_findings(trained):
    report = trained[2].report
    assert report.findings == [], "\n".join(map(str, report.findings))


def test_without_tensorboard_reporting(tmp_path):
    callback = GradscopeTrainerCallback(every=2, sample_every=2)
    run_trainer(tmp_path, callback, report_to="none", eval_strategy="no", max_steps=4)
    assert callback.log_dir is None and not (tmp_path / "out" / "runs").exists()
    steps = sorted(set(callback.report.stats.step))
    assert callback.report.steps == 4 and steps == [1, 3]  # every=2


def test_options_are_validated_when_the_callback_is_built(tmp_path):
    with pytest.raises(gradscope.ConfigurationError, match="positive int"):
        GradscopeTrainerCallback(flush_every=0)
    with pytest.raises(gradscope.ConfigurationError, match="not both"):
        GradscopeTrainerCallback(log_dir=tmp_path, writer=object())
    with pytest.raises(gradscope.ConfigurationError, match="at least `flush_every`"):
        GradscopeTrainerCallback(history=100, flush_every=200)
    with pytest.raises(gradscope.ConfigurationError, match="histogram_weights"):
        GradscopeTrainerCallback(histogram_weights="yes")


def test_report_path_is_written_at_the_end_of_training(tmp_path):
    callback = GradscopeTrainerCallback(report_path=tmp_path / "gs.json", figure_every=None)
    run_trainer(tmp_path, callback, report_to="none", eval_strategy="no", max_steps=4)
    saved = gradscope.Report.from_json(tmp_path / "gs.json")
    assert saved.steps == callback.report.steps == 4
    ours = callback.report.stats.sort_values(["step", "layer", "param", "stat"]).reset_index(drop=True)
    back = saved.stats.sort_values(["step", "layer", "param", "stat"]).reset_index(drop=True)
    assert (ours[["step", "layer", "param", "stat"]] == back[["step", "layer", "param", "stat"]]).all().all()
    assert np.allclose(ours.value, back.value, rtol=1e-12, equal_nan=True)


def test_watch_unwraps_accelerates_optimizer():
    # accelerate's AcceleratedOptimizer never calls torch's step hooks itself: watch() must watch the
    # optimizer inside it (before the fix, watch raised AttributeError on `_optimizer_step_pre_hooks`).
    from accelerate import Accelerator

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    accelerator = Accelerator(cpu=True)
    model, opt = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert type(opt).__name__ == "AcceleratedOptimizer"
    g = torch.Generator().manual_seed(0)
    refs = []
    with gradscope.watch(model, optimizer=opt, sample_every=1) as scope:
        for _ in range(3):
            x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
            accelerator.backward(torch.nn.functional.cross_entropy(model(x), y))
            refs.append(math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters())))
            opt.step()
            scope.step()
            opt.zero_grad()
    report = scope.report()
    assert report.meta["optimizer"] == "SGD" and report.skipped_steps == []
    got = report.stats.query("stat == 'l2_norm' and layer == '*'").value.to_list()
    np.testing.assert_allclose(got, refs, rtol=1e-6)
    assert (report.stats.query("stat == 'update_ratio' and layer == '*'").value > 0).all()


# -- graceful stop on findings -------------------------------------------------------------------------


def _finding(kind: str, severity: str, step: int, *, provisional: bool = False) -> gradscope.Finding:
    return gradscope.Finding(
        kind, severity, step, "lm_head", "made up by the test.", "nothing.", provisional=provisional
    )


class Announces(transformers.TrainerCallback):
    """Hands findings to the scope's ``on_finding`` hook after chosen optimizer steps, as the scope would."""

    def __init__(self, gs: GradscopeTrainerCallback, at: dict[int, list[gradscope.Finding]]) -> None:
        self.gs, self.at = gs, at

    def on_step_end(self, args, state, control, **kwargs):
        for finding in self.at.get(state.global_step, []):
            self.gs.scope.options.on_finding(finding)


class PoisonGradients(transformers.TrainerCallback):
    """NaN in one gradient entry of the chosen optimizer step, right before the optimizer reads it."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            with torch.no_grad():
                model.lm_head.weight.grad[0, 0] = math.nan


def test_stop_training_on_ends_training_one_step_after_a_matching_finding(tmp_path):
    seen: list[gradscope.Finding] = []
    gs = GradscopeTrainerCallback(stop_training_on=["dead_units", "error"], on_finding=seen.append, rules="none")
    stop = _finding("nonfinite_gradients", "error", 4)
    ignored = [
        _finding("vanishing_gradients", "warning", 2),
        _finding("exploding_gradients", "error", 3, provisional=True),
    ]
    announce = Announces(gs, {2: ignored[:1], 3: ignored[1:], 4: [stop]})
    with pytest.warns(gradscope.GradscopeWarning, match=r"stopping training \(global step 4\).*nonfinite_gradients"):
        trainer, _ = run_trainer(tmp_path, gs, extra=(announce,), max_steps=12, report_to=[])
    # seen when step 5 begins (step 4's record closes then): the Trainer ends before step 5's update
    assert trainer.state.global_step == 4 and gs.report.steps == 4 and gs.scope is None
    assert gs.stopped_by is stop and seen == [*ignored, stop]
    assert gs.stop_training_on == frozenset({"dead_units", "error"})


def test_stop_on_in_the_trainer_callback_is_the_graceful_stop_and_checked():
    gs = GradscopeTrainerCallback(stop_on="nonfinite_gradients")
    assert gs.stop_training_on == gs.options.stop_on == frozenset({"nonfinite_gradients"})
    with pytest.raises(gradscope.ConfigurationError, match="pass `stop_training_on` only"):
        GradscopeTrainerCallback(stop_on="error", stop_training_on="error")
    with pytest.raises(gradscope.ConfigurationError, match="`stop_training_on` to name a severity"):
        GradscopeTrainerCallback(stop_training_on=["error", "fatal"])


def test_a_diverging_run_stops_after_the_first_error_and_the_report_on_disk_names_it(tmp_path):
    # flush_every=5 bounds the live cadence (measured from this machine's timings): step 3's finding is
    # confirmed by step 5, recorded when step 6 begins, and the Trainer stops before step 6's update
    gs = GradscopeTrainerCallback(stop_training_on="error", flush_every=5, report_path=tmp_path / "report.json")
    with pytest.warns(gradscope.GradscopeWarning, match="stopping training.*nonfinite_gradients"):
        trainer, _ = run_trainer(tmp_path, gs, extra=(PoisonGradients(3),), max_steps=12, report_to=[])
    # step 3's gradient holds a NaN (and AdamW spreads it to every later step through lm_head's weights)
    assert gs.stopped_by is not None and (gs.stopped_by.kind, gs.stopped_by.step) == ("nonfinite_gradients", 3)
    assert 3 <= trainer.state.global_step <= 5 < 12
    saved = gradscope.Report.from_json(tmp_path / "report.json")
    assert saved.steps == trainer.state.global_step
    assert [(f.step, f.provisional) for f in saved.findings if f.kind == "nonfinite_gradients"][:1] == [(3, False)]
