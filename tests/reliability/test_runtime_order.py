"""Modules used functionally (no forward hook fires) are placed by their parent (issue 16, item 5).

``nn.MultiheadAttention`` applies its ``out_proj`` weights inside ``F.multi_head_attention_forward``:
``out_proj.forward`` never runs. Its layer belongs right after the attention block, not after the head.
"""

from __future__ import annotations

import torch
import torch.nn as nn

import gradscope


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 3)  # registered first: registration order is not the forward order
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x):
        return self.head(self.encoder(x).mean(dim=1))


def test_out_proj_sits_right_after_its_attention_block():
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.watch(model, optimizer=opt, rules="none") as scope:
        for _ in range(2):
            model(torch.randn(4, 5, 8)).sum().backward()
            opt.step()
            scope.step()
            opt.zero_grad()
    order = scope.report().meta["layers_by_depth"]
    expected = []
    for i in range(2):
        p = f"encoder.layers.{i}"
        expected += [f"{p}.self_attn", f"{p}.self_attn.out_proj", f"{p}.norm1", f"{p}.linear1", f"{p}.linear2"]
        expected += [f"{p}.norm2"]
    assert order == [*expected, "head"]
