"""Seeded synthetic tasks: every batch is a pure function of (seed, step), so every run is repeatable."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["ImageTask", "RandomLabels", "RegressionTask", "SequenceTask", "TeacherTask", "TokenTask"]


class TeacherTask:
    """Classification by a random two-layer tanh teacher: learnable, unlimited fresh data."""

    def __init__(self, d_in: int = 32, classes: int = 10, seed: int = 0, scale: float = 1.0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.randn(d_in, 64, generator=g) / d_in**0.5
        self.w2 = torch.randn(64, classes, generator=g) / 8.0
        self.d_in, self.classes, self.seed, self.scale = d_in, classes, seed, scale

    def _x(self, n: int, g: torch.Generator) -> torch.Tensor:
        return torch.randn(n, self.d_in, generator=g) * self.scale

    def label(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(x / self.scale @ self.w1) @ self.w2).argmax(dim=1)

    def batch(self, step: int, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + step)
        x = self._x(n, g)
        return x, self.label(x)

    def fixed(self, n: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 7919 + offset)
        x = self._x(n, g)
        return x, self.label(x)


class RandomLabels:
    """A fixed set of inputs with random labels (memorisation), and held-out inputs with their own."""

    def __init__(self, n_train: int = 128, n_val: int = 256, d_in: int = 32, classes: int = 10, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n_train, d_in, generator=g)
        self.y = torch.randint(0, classes, (n_train,), generator=g)
        self.xv = torch.randn(n_val, d_in, generator=g)
        self.yv = torch.randint(0, classes, (n_val,), generator=g)
        self.seed = seed

    def batch(self, step: int, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 31 + step)
        idx = torch.randint(0, len(self.x), (n,), generator=g)
        return self.x[idx], self.y[idx]


class RegressionTask:
    """Noise-free linear regression: a model can drive the loss towards zero (gradients shrink a lot)."""

    def __init__(self, d_in: int = 16, d_out: int = 4, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(d_in, d_out, generator=g) / d_in**0.5
        self.x = torch.randn(256, d_in, generator=g)
        self.y = self.x @ self.w

    def batch(self, step: int, n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.y


class ImageTask:
    """3x16x16 images: a class template plus noise."""

    def __init__(self, classes: int = 10, seed: int = 0, noise: float = 1.0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.templates = torch.randn(classes, 3, 16, 16, generator=g)
        self.classes, self.seed, self.noise = classes, seed, noise

    def batch(self, step: int, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + step)
        y = torch.randint(0, self.classes, (n,), generator=g)
        x = 0.5 * self.templates[y] + self.noise * torch.randn(n, 3, 16, 16, generator=g)
        return x, y


class SequenceTask:
    """Sequences of vectors; the class is which prototype is mixed into the sequence."""

    def __init__(self, d_in: int = 8, length: int = 12, classes: int = 4, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.protos = torch.randn(classes, d_in, generator=g)
        self.d_in, self.length, self.classes, self.seed = d_in, length, classes, seed

    def batch(self, step: int, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + step)
        y = torch.randint(0, self.classes, (n,), generator=g)
        x = torch.randn(n, self.length, self.d_in, generator=g) + 0.8 * self.protos[y][:, None, :]
        return x, y


class TokenTask:
    """Next-token prediction on sequences that follow x[t+1] = (x[t] + x[t-1]) mod vocab."""

    def __init__(self, vocab: int = 64, length: int = 16, seed: int = 0) -> None:
        self.vocab, self.length, self.seed = vocab, length, seed

    def batch(self, step: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + step)
        seq = torch.zeros(n, self.length + 1, dtype=torch.long)
        seq[:, :2] = torch.randint(0, self.vocab, (n, 2), generator=g)
        for t in range(2, self.length + 1):
            seq[:, t] = (seq[:, t - 1] + seq[:, t - 2]) % self.vocab
        return seq[:, :-1], seq[:, 1:]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
