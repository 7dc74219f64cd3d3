"""Tiny models shared by the importance tests (seeded, fp32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from passes.capture import capture
from passes.dataflow import analyse
from passes.groups import build_groups
from passes.importance import ScoreInputs

H, KV, HD, E, FF = 4, 2, 8, 16, 32


class Block(nn.Module):
    """GQA attention (4 query heads, 2 KV heads, head_dim 8) and a ReLU FFN, residual, no names that
    discovery could key on beyond the graph itself."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(E, H * HD)
        self.k = nn.Linear(E, KV * HD)
        self.v = nn.Linear(E, KV * HD)
        self.o = nn.Linear(H * HD, E)
        self.up = nn.Linear(E, FF)
        self.down = nn.Linear(FF, E)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, H, HD).transpose(1, 2)
        k = self.k(x).view(b, n, KV, HD).transpose(1, 2)
        v = self.v(x).view(b, n, KV, HD).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        x = x + self.o(y.transpose(1, 2).reshape(b, n, H * HD))
        return x + self.down(F.relu(self.up(x)))


def mse_loss(out, batch):
    return (out - batch[0].roll(1, dims=1)).pow(2).mean()


def prepare(model: nn.Module, n_batches: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(2, 6, E, generator=g),) for _ in range(n_batches)]
    gm = capture(model, batches[0])
    analysis = analyse(gm)
    groups = [grp for grp in build_groups(analysis.facts, "channel") if not grp.reasons]
    params = dict(gm.named_parameters(remove_duplicate=False))
    inputs = ScoreInputs(gm, analysis.facts, params, analysis.labels, batches, mse_loss, 0)
    return inputs, {grp.kind: grp for grp in groups}, batches


def local(facts, unit: np.ndarray, param: str, dim: int = 0) -> list[int]:
    s = next(sp for sp in facts.spaces if sp.param == param and sp.dim == dim)
    return sorted((unit[(unit >= s.offset) & (unit < s.offset + s.size)] - s.offset).tolist())


@pytest.fixture
def block():
    torch.manual_seed(0)
    return Block().eval()


def keep_without(inputs, group, param: str, drop: list[int]) -> np.ndarray:
    """A keep mask that removes every unit of ``group`` holding one of ``drop`` (indices of ``param``)."""
    keep = np.ones(inputs.facts.n_channels, dtype=bool)
    for unit in group.units:
        if set(local(inputs.facts, unit, param)) & set(drop):
            keep[unit] = False
    return keep
