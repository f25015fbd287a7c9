"""Shared pieces of the CI-check tests: a tiny rule, small factories, and how to reach the plugin and command.

Copied next to the throwaway test files that pytester writes, so subprocesses can import it too.
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from gradscope.rules.base import Rule, RuleContext

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
EXAMPLES = REPO / "examples" / "ci"


class BigGradient(Rule):
    """Test rule: a layer whose gradient L2 norm exceeds `limit` at some step, at severity `level`.

    Not registered (pass an instance: rules=[BigGradient()]), so it never leaks into other tests' "all".
    """

    name = "ci_big_gradient"
    severity = "error"
    requires = ("l2_norm",)
    defaults: ClassVar[dict[str, Any]] = {"limit": 1e3, "level": "error"}

    def check(self, ctx: RuleContext) -> list:
        values = ctx.frame.layer_values("l2_norm")
        out = []
        for li, layer in enumerate(ctx.layers):
            hit = np.nonzero(values[:, li] > self.thresholds["limit"])[0]
            if len(hit):
                v = float(values[hit[0], li])
                out.append(
                    self.finding(
                        step=int(ctx.steps[hit[0]]),
                        layer=layer,
                        message=f"gradient norm {v:.3g} is above {self.thresholds['limit']:g}.",
                        suggestion="scale the inputs down.",
                        evidence={"stat": "l2_norm", "value": v, "threshold": self.thresholds["limit"]},
                        severity=self.thresholds["level"],
                    )
                )
        return out


def make_mlp(scale: float = 1.0, dropout: float = 0.0):
    """(model, batch, loss_fn): a 8-16-4 MLP; inputs multiplied by `scale` (1e6 trips BigGradient)."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 4))
    batch = (torch.randn(32, 8) * scale, torch.randint(0, 4, (32,)))
    return model, batch, F.cross_entropy


def _entry_point_visible(paths: list[str]) -> bool:
    # Whatever the distribution is called (gradscope-torch on the package index): the entry point decides.
    for dist in importlib.metadata.distributions(path=paths):
        if any(ep.group == "pytest11" and ep.value == "gradscope.pytest_plugin" for ep in dist.entry_points):
            return True
    return False


def plugin_installed() -> bool:
    """Whether gradscope is installed with its entry point, apart from this checkout's own folder.

    (An editable install leaves ``gradscope.egg-info`` in the checkout, which makes the entry point
    visible to any process with the checkout on ``sys.path``; that is not an installation.)
    """
    return _entry_point_visible([p for p in sys.path if Path(p or ".").resolve() != REPO])


def plugin_args(extra_paths: tuple[str, ...] = ()) -> tuple[str, ...]:
    """What makes a pytest run load the plugin: nothing when pytest finds its entry point by itself, else
    ``-p gradscope.pytest_plugin`` (both at once would register the plugin twice, which pytest refuses)."""
    return () if _entry_point_visible([*extra_paths, *sys.path]) else ("-p", "gradscope.pytest_plugin")


def installed_command() -> list[str] | None:
    """The installed `gradscope` console script of this Python's environment, or None."""
    script = Path(sys.executable).with_name("gradscope")
    return [str(script)] if script.is_file() and plugin_installed() else None


def gradscope_command() -> tuple[list[str], dict[str, str]]:
    """How to run the command: the installed script, else this checkout's module (argv, extra environment)."""
    installed = installed_command()
    if installed is not None:
        return installed, {}
    return [sys.executable, "-m", "gradscope.cli"], {"PYTHONPATH": str(REPO)}


#: Registers BigGradient by name, for factory files run in a subprocess (command lines select rules by name).
REGISTER_SOURCE = """
import gradscope
from ci_helpers import BigGradient

gradscope.register_rule("ci_big_gradient", overwrite=True)(BigGradient)
"""

#: Factory file for command-line tests.
FACTORY_SOURCE = """
import torch, torch.nn as nn, torch.nn.functional as F
from ci_helpers import make_mlp


def healthy():
    return make_mlp()


def exploding():
    return make_mlp(scale=1e6)


def with_sgd():
    model, batch, loss_fn = make_mlp()
    return model, batch, loss_fn, torch.optim.SGD(model.parameters(), lr=0.1)


def raises():
    raise RuntimeError("no data today")


def wrong_shape():
    model, batch, loss_fn = make_mlp()
    return model, batch


def not_a_model():
    return "model", (torch.zeros(1), torch.zeros(1)), F.mse_loss


def vector_loss():
    model, batch, _ = make_mlp()
    return model, batch, lambda out, y: F.cross_entropy(out, y, reduction="none")


def nan_batch():
    model, (x, y), loss_fn = make_mlp()
    x[0, 0] = float("nan")
    return model, (x, y), loss_fn


def forward_fails():
    model, (x, y), loss_fn = make_mlp()
    return model, (x[:, :3], y), loss_fn
"""
