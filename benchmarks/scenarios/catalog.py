"""The detection scenarios: healthy runs that must stay silent, and faults built several ways each.

Every scenario is seeded and small (CPU, a few seconds). ``expected`` lists the faults a scenario
objectively has, with the step where each starts (the injection step, or for faults that develop, the
step the independent observer in the harness sees them) and, where it is objective, the layer(s) it
originates from. ``allowed`` lists kinds that are a physical consequence of the fault (a dead layer
leaves every earlier layer with a zero gradient, so its gradients did vanish): reporting them is
neither required nor counted as a false alarm.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import ImageTask, RandomLabels, RegressionTask, SequenceTask, TeacherTask, TokenTask, lm_loss
from .harness import Expect, Scenario, Setup
from .models import GPT, MLP, LSTMClassifier, ResidualMLP, RNNClassifier, SmallCNN, TwoHeadMLP, scale_init

__all__ = ["SCENARIOS", "by_name"]

CE = F.cross_entropy


def _val_ce(task: TeacherTask, n: int = 512) -> callable:
    x, y = task.fixed(n, 1)
    return lambda m: CE(m(x), y)


# -- healthy -------------------------------------------------------------------------------------------


def healthy_mlp() -> Setup:
    task = TeacherTask(seed=1)
    model = MLP(32, [128, 128, 128], 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return Setup(model, opt, task.batch, CE, val=_val_ce(task))


def healthy_cnn() -> Setup:
    task = ImageTask(seed=2)
    model = SmallCNN(width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return Setup(model, opt, task.batch, CE)


def healthy_transformer() -> Setup:
    task = TokenTask(vocab=64, length=16, seed=3)
    model = GPT(vocab=64, ctx=16, d=64, layers=2, heads=4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    return Setup(model, opt, task.batch, lm_loss)


def healthy_lstm() -> Setup:
    task = SequenceTask(seed=4)
    model = LSTMClassifier(8, 32, 4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    return Setup(model, opt, task.batch, CE)


def healthy_accumulation() -> Setup:
    task = TeacherTask(seed=5)
    model = MLP(32, [64, 64], 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return Setup(model, opt, lambda s: task.batch(s, 16), CE, accum=4, val=_val_ce(task))


def healthy_frozen_backbone() -> Setup:
    task = TeacherTask(seed=6)
    model = MLP(32, [128, 128], 10)
    for p in list(model.fc0.parameters()) + list(model.fc1.parameters()):
        p.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    return Setup(model, opt, task.batch, CE, val=_val_ce(task))


def healthy_warmup() -> Setup:
    task = TokenTask(vocab=64, length=16, seed=7)
    model = GPT(vocab=64, ctx=16, d=64, layers=2, heads=4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    warm = 100
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    return Setup(model, opt, task.batch, lm_loss, scheduler=sched)


def healthy_shrinking() -> Setup:
    task = RegressionTask(seed=8)
    model = MLP(16, [64], 4, act="tanh")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return Setup(model, opt, task.batch, F.mse_loss)


def healthy_underfitting() -> Setup:
    task = TeacherTask(seed=9)
    model = MLP(32, [4], 10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return Setup(model, opt, task.batch, CE, val=_val_ce(task))


def healthy_tanh_mlp() -> Setup:
    task = TeacherTask(seed=10)
    model = MLP(32, [64, 64, 64], 10, act="tanh")
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            nn.init.zeros_(m.bias)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return Setup(model, opt, task.batch, CE)


def healthy_sigmoid_classifier() -> Setup:
    task = TeacherTask(d_in=16, classes=2, seed=11)
    model = MLP(16, [64], 1, act="relu", out_act="sigmoid")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def batch(s: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = task.batch(s)
        return x, y.float()[:, None]

    return Setup(model, opt, batch, F.binary_cross_entropy)


def healthy_residual_deep() -> Setup:
    task = TeacherTask(seed=12)
    model = ResidualMLP(32, 64, depth=12, d_out=10)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return Setup(model, opt, task.batch, CE, val=_val_ce(task))


def healthy_gradscaler() -> Setup:
    task = TeacherTask(seed=13)
    model = MLP(32, [64, 64], 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=20)
    overflow = {1, 2, 3, 60, 61, 140}

    def fp16_overflow(step: int) -> None:
        # What an fp16 overflow of the scaled gradients looks like: the scaler skips these steps.
        if step in overflow:
            with torch.no_grad():
                model.fc1.weight.grad[0, 0] = math.inf

    return Setup(model, opt, task.batch, CE, scaler=scaler, backward_hook=fp16_overflow)


def healthy_alternating_branch() -> Setup:
    task = TeacherTask(seed=14)
    model = TwoHeadMLP(32, 64, 10, use_aux="alternate")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    return Setup(model, opt, task.batch, CE)


class _EmbedLSTM(nn.Module):
    def __init__(self, vocab: int, d: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.lstm = nn.LSTM(d, d, batch_first=True)
        self.out = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(self.lstm(self.emb(idx))[0])


def healthy_sparse_embedding() -> Setup:
    vocab = 2000
    model = _EmbedLSTM(vocab, 32)  # untied embedding: about 2% of its rows get a gradient per batch
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Zipf-like start tokens, then x[t+1] = (x[t] + 7) mod vocab: frequent tokens are learnt first.
        g = torch.Generator().manual_seed(15 * 100_003 + step)
        start = (torch.rand(4, 1, generator=g).pow(4) * vocab).long()
        seq = (start + 7 * torch.arange(13)[None, :]) % vocab
        return seq[:, :-1], seq[:, 1:]

    return Setup(model, opt, batch, lm_loss)


# -- vanishing -------------------------------------------------------------------------------------------


def deep_sigmoid() -> Setup:
    task = TeacherTask(seed=20)
    model = MLP(32, [64] * 10, 10, act="sigmoid")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return Setup(model, opt, task.batch, CE)


def deep_tanh_small_init() -> Setup:
    task = TeacherTask(seed=21)
    model = MLP(32, [64] * 8, 10, act="tanh")
    scale_init(model, std=0.03)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return Setup(model, opt, task.batch, CE)


def deep_sigmoid_small_init_adam() -> Setup:
    task = TeacherTask(seed=22)
    model = MLP(32, [48] * 8, 10, act="sigmoid")
    scale_init(model, std=0.02)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return Setup(model, opt, task.batch, CE)


class _TanhBottleneck(nn.Module):
    """A ReLU MLP with one tanh stage in the middle."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0, self.fc1, self.fc2 = nn.Linear(32, 128), nn.Linear(128, 128), nn.Linear(128, 128)
        self.squash = nn.Tanh()
        self.fc3, self.head = nn.Linear(128, 128), nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(torch.relu(self.fc0(x))))
        h = self.squash(self.fc2(h))
        return self.head(torch.relu(self.fc3(h)))


def saturated_bottleneck_midrun() -> Setup:
    task = TeacherTask(seed=23)
    model = _TanhBottleneck()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def before(step: int, m: nn.Module, o: torch.optim.Optimizer) -> None:
        if step == 60:
            # a bad update: fc2's pre-activations jump to +-8, pinning the tanh; gradients below it die
            with torch.no_grad():
                g = torch.Generator().manual_seed(0)
                sign = torch.randint(0, 2, (128,), generator=g) * 2 - 1
                m.fc2.bias.copy_(8.0 * sign)
            for st in o.state.values():
                st.pop("momentum_buffer", None)

    return Setup(model, opt, task.batch, CE, before_step=before)


# -- exploding -------------------------------------------------------------------------------------------


def lr_far_too_high() -> Setup:
    task = RegressionTask(seed=30)
    model = MLP(16, [64, 64], 4, act="tanh")
    opt = torch.optim.SGD(model.parameters(), lr=2.0)  # converges at 0.5, diverges above ~1.2
    return Setup(model, opt, task.batch, F.mse_loss)


def lr_far_too_high_relu_dies() -> Setup:
    task = TeacherTask(seed=30)
    model = MLP(32, [128, 128], 10)
    opt = torch.optim.SGD(model.parameters(), lr=3.0, momentum=0.9)
    return Setup(model, opt, task.batch, CE)


def large_init_no_norm() -> Setup:
    task = TeacherTask(seed=31)
    model = MLP(32, [128] * 6, 10)
    scale_init(model, gain=4.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return Setup(model, opt, task.batch, CE)


def rnn_large_recurrent() -> Setup:
    task = SequenceTask(length=20, seed=32)
    model = RNNClassifier(8, 32, 4, nonlinearity="relu")
    with torch.no_grad():
        model.rnn.weight_hh_l0.copy_(1.3 * torch.eye(32))  # identity-initialised RNN, but with gain > 1
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return Setup(model, opt, task.batch, CE)


def lr_jump_midrun() -> Setup:
    task = TeacherTask(seed=33)
    model = MLP(32, [128, 128], 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)

    def before(step: int, m: nn.Module, o: torch.optim.Optimizer) -> None:
        if step == 100:
            for g in o.param_groups:
                g["lr"] = 20.0

    return Setup(model, opt, task.batch, CE, before_step=before)


# -- non-finite ------------------------------------------------------------------------------------------


def log_zero_loss() -> Setup:
    task = TeacherTask(seed=40)
    model = MLP(32, [64, 64], 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)

    def naive_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # softmax then log: once a wrong-class probability underflows to 0, log(0) = -inf
        p = torch.softmax(logits * 30.0, dim=1)
        return -torch.log(p[torch.arange(len(y)), y]).mean()

    return Setup(model, opt, task.batch, naive_ce)


class _WhereSqrtMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc0 = nn.Linear(32, 64)
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc0(x))
        z = self.fc1(h)
        # The forward value is finite (negative entries are masked), but sqrt's derivative at z < 0 is
        # NaN and 0 * NaN = NaN: the classic torch.where gradient trap.
        h = torch.where(z > 0, torch.sqrt(z), torch.zeros_like(z))
        h = torch.relu(self.fc2(h))
        return self.head(h)


def where_sqrt_nan() -> Setup:
    task = TeacherTask(seed=41)
    model = _WhereSqrtMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return Setup(model, opt, task.batch, CE)


def nan_injected_midrun() -> Setup:
    task = TeacherTask(seed=42)
    model = MLP(32, [64, 64, 64], 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    state = {"step": 0}

    def before(step: int, m: nn.Module, o: torch.optim.Optimizer) -> None:
        state["step"] = step

    def poison(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if state["step"] >= 120:
            # a corrupted intermediate value: NaN enters the backward pass at act1
            out = out.clone()
            out.register_hook(lambda g: torch.where(torch.arange(g.shape[1]) == 0, torch.nan, g))
        return out

    model.act1.register_forward_hook(poison)
    return Setup(model, opt, task.batch, CE, before_step=before)


# -- dead units ------------------------------------------------------------------------------------------


def negative_bias_dead_relu() -> Setup:
    task = TeacherTask(seed=50)
    model = MLP(32, [128, 128], 10)
    with torch.no_grad():
        model.fc1.bias[: int(0.8 * 128)] = -8.0
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return Setup(model, opt, task.batch, CE)


def relu_killed_midrun() -> Setup:
    task = TeacherTask(seed=51)
    model = MLP(32, [128, 128], 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def before(step: int, m: nn.Module, o: torch.optim.Optimizer) -> None:
        if step == 80:
            with torch.no_grad():
                m.fc0.bias[:100] -= 20.0  # a bad update pushes most units of act0 far negative

    return Setup(model, opt, task.batch, CE, before_step=before)


def dead_cnn_channels() -> Setup:
    task = ImageTask(seed=52)
    model = SmallCNN(width=16)
    with torch.no_grad():
        model.c2[1].bias[:24] = -10.0  # BatchNorm shift: 24 of 32 channels land far below zero
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return Setup(model, opt, task.batch, CE)


# -- saturated activations -------------------------------------------------------------------------------


def saturated_tanh() -> Setup:
    task = TeacherTask(seed=60)
    model = MLP(32, [128, 128], 10, act="tanh")
    scale_init(model, std=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return Setup(model, opt, task.batch, CE)


def saturated_sigmoid_unscaled_inputs() -> Setup:
    task = TeacherTask(seed=61, scale=40.0)  # raw features in the tens: first sigmoid layer pinned at 0/1
    model = MLP(32, [64, 64], 10, act="sigmoid")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return Setup(model, opt, task.batch, CE)


# -- no gradient -----------------------------------------------------------------------------------------


def unused_branch() -> Setup:
    task = TeacherTask(seed=70)
    model = TwoHeadMLP(32, 64, 10, use_aux=False)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    return Setup(model, opt, task.batch, CE)


def detached_trunk() -> Setup:
    task = TeacherTask(seed=71)
    model = TwoHeadMLP(32, 64, 10, use_aux=True, detach_trunk=True)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    return Setup(model, opt, task.batch, CE)


# -- loss not decreasing ---------------------------------------------------------------------------------


def lr_zero() -> Setup:
    task = TeacherTask(seed=80)
    model = MLP(32, [128, 128], 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    return Setup(model, opt, task.batch, CE)


def lr_tiny_adam() -> Setup:
    task = ImageTask(seed=81)
    model = SmallCNN(width=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-7)
    return Setup(model, opt, task.batch, CE)


def labels_shuffled() -> Setup:
    task = TeacherTask(seed=82)
    model = MLP(32, [64, 64], 10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def batch(s: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = task.batch(s)
        g = torch.Generator().manual_seed(s)
        return x, torch.randint(0, 10, y.shape, generator=g)  # a data bug: labels unrelated to inputs

    return Setup(model, opt, batch, CE)


# -- overfitting -----------------------------------------------------------------------------------------


def memorise_random_labels() -> Setup:
    data = RandomLabels(n_train=128, seed=90)
    model = MLP(32, [256, 256], 10)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    return Setup(model, opt, data.batch, CE, val=lambda m: CE(m(data.xv), data.yv))


def small_train_set_noisy() -> Setup:
    task = TeacherTask(seed=91)
    x, y = task.fixed(96, 5)
    g = torch.Generator().manual_seed(91)
    flip = torch.rand(len(y), generator=g) < 0.3
    y = torch.where(flip, torch.randint(0, 10, y.shape, generator=g), y)
    model = MLP(32, [256, 256], 10)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)

    def batch(s: int) -> tuple[torch.Tensor, torch.Tensor]:
        gg = torch.Generator().manual_seed(s)
        idx = torch.randint(0, len(x), (32,), generator=gg)
        return x[idx], y[idx]

    return Setup(model, opt, batch, CE, val=_val_ce(task))


def _healthy(name: str, fn: callable, desc: str, steps: int = 200) -> Scenario:
    return Scenario(name, "healthy", desc, fn, steps=steps)


def _fault(
    name: str,
    group: str,
    desc: str,
    fn: callable,
    expected: dict[str, Expect],
    allowed: tuple[str, ...] = (),
    steps: int = 200,
) -> Scenario:
    return Scenario(name, group, desc, fn, expected, frozenset(allowed), steps=steps)


def _at(onset: int | None, *origin: str) -> Expect:
    """An expected fault: onset step (None: measured by the harness's observer), origin layer(s) if objective."""
    return Expect(onset, frozenset(origin) if origin else None)


V, E, N = "vanishing_gradients", "exploding_gradients", "nonfinite_gradients"
D, S, G, L, OF = "dead_units", "saturated_activations", "no_gradient", "loss_not_decreasing", "overfitting"

SCENARIOS: list[Scenario] = [
    # healthy: nothing may fire
    _healthy("healthy_mlp", healthy_mlp, "ReLU MLP 32-128x3-10, SGD momentum, fresh data, val loss every 10 steps"),
    _healthy("healthy_cnn", healthy_cnn, "conv-BN-ReLU x3 CNN on 3x16x16 images, SGD momentum"),
    _healthy("healthy_transformer", healthy_transformer, "2-block GPT (d=64, tied embeddings), AdamW, next-token task"),
    _healthy("healthy_lstm", healthy_lstm, "LSTM classifier over 12-step sequences, Adam (loss falls to 0.003)"),
    _healthy("healthy_accumulation", healthy_accumulation, "MLP, gradient accumulation over 4 micro-batches"),
    _healthy("healthy_frozen_backbone", healthy_frozen_backbone, "first two layers frozen, head trained with Adam"),
    _healthy("healthy_warmup", healthy_warmup, "GPT with linear learning-rate warm-up from ~0 over 100 steps", 250),
    _healthy(
        "healthy_shrinking",
        healthy_shrinking,
        "noise-free regression driven towards zero loss: gradients shrink 600x",
        300,
    ),
    _healthy("healthy_underfitting", healthy_underfitting, "4-unit bottleneck MLP: loss plateaus high early"),
    _healthy("healthy_tanh_mlp", healthy_tanh_mlp, "tanh MLP with Xavier init"),
    _healthy(
        "healthy_sigmoid_classifier",
        healthy_sigmoid_classifier,
        "binary classifier whose sigmoid output grows confident (saturates by design)",
    ),
    _healthy(
        "healthy_residual_deep", healthy_residual_deep, "12 pre-LayerNorm residual blocks: deep but gradients flow"
    ),
    _healthy("healthy_gradscaler", healthy_gradscaler, "GradScaler skips 6 steps whose scaled gradients overflowed"),
    _healthy("healthy_alternating_branch", healthy_alternating_branch, "auxiliary head used every other step"),
    _healthy(
        "healthy_sparse_embedding",
        healthy_sparse_embedding,
        "LSTM language model, untied 2000-row embedding: ~2% of rows get a gradient per batch",
    ),
    # vanishing
    _fault("deep_sigmoid", V, "10 sigmoid layers, default init, SGD", deep_sigmoid, {V: _at(1)}, (L,)),
    _fault("deep_tanh_small_init", V, "8 tanh layers, weights N(0, 0.03^2)", deep_tanh_small_init, {V: _at(1)}, (L,)),
    _fault(
        "deep_sigmoid_small_init_adam",
        V,
        "8 sigmoid layers, weights N(0, 0.02^2), Adam",
        deep_sigmoid_small_init_adam,
        {V: _at(1)},
        (L,),
    ),
    _fault(
        "saturated_bottleneck_midrun",
        V,
        "ReLU MLP with a tanh stage; at step 60 its inputs jump to +-8: no gradient reaches fc0-fc2",
        saturated_bottleneck_midrun,
        {V: _at(60, "fc2"), S: _at(60, "squash")},
        (L,),
    ),
    # exploding
    _fault(
        "lr_far_too_high",
        E,
        "tanh MLP regression, SGD lr=2 (stable up to ~1.2): diverges to overflow",
        lr_far_too_high,
        {E: _at(1), N: _at(None)},
        (L, S, "learning_rate_too_high", "loss_spike"),  # the learning rate is the fault; its loss spikes
    ),
    _fault(
        "large_init_no_norm",
        E,
        "6 ReLU layers, weights 4/sqrt(fan_in), no normalization: NaN by step 5",
        large_init_no_norm,
        {E: _at(1), N: _at(None)},
        (L, D, "learning_rate_too_high"),  # true by the counterfactual: at lr / 10 it trains (ends at 2.29, not NaN)
    ),
    _fault(
        "rnn_large_recurrent",
        E,
        "ReLU Elman RNN, recurrent weights 1.3 x identity over 20 time steps, Adam",
        rnn_large_recurrent,
        {E: _at(1, "rnn")},
        (L, N),
    ),
    _fault(
        "lr_jump_midrun",
        E,
        "healthy ReLU MLP until step 100, then SGD lr x1000",
        lr_jump_midrun,
        {E: _at(100)},
        (N, L, D, V, "learning_rate_too_high", "loss_spike"),
    ),
    # non-finite
    _fault(
        "log_zero_loss",
        N,
        "log(softmax(30 * logits)): log(0) once a probability underflows",
        log_zero_loss,
        {N: _at(None, "head")},
        (E, L),
    ),
    _fault(
        "where_sqrt_nan",
        N,
        "torch.where(z > 0, sqrt(z), 0) after fc1: finite forward, NaN backward",
        where_sqrt_nan,
        {N: _at(None, "fc1")},
        (L,),
    ),
    _fault(
        "nan_injected_midrun",
        N,
        "from step 120 a NaN enters the backward pass at act1",
        nan_injected_midrun,
        {N: _at(120, "fc1")},
        (L,),
    ),
    # dead units
    _fault(
        "negative_bias_dead_relu",
        D,
        "80% of fc1's biases at -8: those ReLU units never fire",
        negative_bias_dead_relu,
        {D: _at(1, "act1")},
    ),
    _fault(
        "relu_killed_midrun",
        D,
        "at step 80 a bad update drives 100 of act0's 128 units negative",
        relu_killed_midrun,
        {D: _at(80, "act0")},
        (L,),
    ),
    _fault(
        "dead_cnn_channels",
        D,
        "CNN whose BatchNorm shift puts 24 of 32 channels of c2 at -10",
        dead_cnn_channels,
        {D: _at(1, "c2.2")},
    ),
    _fault(
        "lr_far_too_high_relu_dies",
        D,
        "ReLU MLP, SGD lr=3: one loss spike, then act1 dies",
        lr_far_too_high_relu_dies,
        {D: _at(None, "act1")},
        (E, V, L, "learning_rate_too_high", "loss_spike"),
    ),
    # saturated activations
    _fault(
        "saturated_tanh",
        S,
        "tanh MLP with N(0,1) weights: pre-activations ~ +-10",
        saturated_tanh,
        {S: _at(1, "act0", "act1")},
        (V, L),
    ),
    _fault(
        "saturated_sigmoid_unscaled_inputs",
        S,
        "sigmoid MLP on raw features of scale 40",
        saturated_sigmoid_unscaled_inputs,
        {S: _at(1, "act0")},
        (V, L),
    ),
    # no gradient
    _fault(
        "unused_branch",
        G,
        "an auxiliary head defined but never used in forward",
        unused_branch,
        {G: _at(1, "aux")},
    ),
    _fault(
        "detached_trunk",
        G,
        "the trunk's output is detached before the heads",
        detached_trunk,
        {G: _at(1, "trunk.0", "trunk.2")},
        (L,),
    ),
    # loss not decreasing
    _fault("lr_zero", L, "SGD with lr=0", lr_zero, {L: _at(1)}),
    _fault("lr_tiny_adam", L, "CNN with Adam lr=1e-7", lr_tiny_adam, {L: _at(1)}),
    _fault("labels_shuffled", L, "labels drawn at random for every batch (a data bug)", labels_shuffled, {L: _at(1)}),
    # overfitting
    _fault(
        "memorise_random_labels",
        OF,
        "128 samples with random labels, 256-wide MLP, Adam; held-out random labels",
        memorise_random_labels,
        {OF: _at(None)},
        steps=300,
    ),
    _fault(
        "small_train_set_noisy",
        OF,
        "96 samples with 30% label noise, 256-wide MLP, Adam",
        small_train_set_noisy,
        {OF: _at(None)},
        steps=300,
    ),
]


def by_name(name: str) -> Scenario:
    for sc in SCENARIOS:
        if sc.name == name:
            return sc
    raise KeyError(name)
