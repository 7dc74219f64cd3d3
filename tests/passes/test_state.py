"""Carried state (``passes.state``): a cache input adopts the channels it is concatenated with, shrinks with
them and is checked by the oracle with its removed channels random; anything else reading it, or an output
that does not carry back what came in, keeps those channels dense."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ecospa_fx
from ecospa_fx.errors import InputError
from passes.capture import capture
from passes.dataflow import analyse
from passes.labels import AxisLabel
from passes.state import gather_kept


class CachedAttention(torch.nn.Module):
    """One attention layer with a KV cache: ``(x, past_k, past_v) -> (y, present_k, present_v)``."""

    def __init__(self, extra: str = ""):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(16, 16) for _ in range(4))
        self.up, self.down = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)
        self.extra = extra

    def forward(self, x, past_k, past_v):
        b, s, _ = x.shape
        q, k, v = (f(x).view(b, s, 2, 8).transpose(1, 2) for f in (self.q, self.k, self.v))
        k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, 16)
        y = self.o(a) + self.down(torch.relu(self.up(x)))
        if self.extra == "reads_past":
            y = y + past_k.sum()
        if self.extra == "returns_other":
            return y, k.transpose(2, 3), v
        return y, k, v


def _inputs(past: int = 3):
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 16, generator=gen), *(torch.randn(2, 2, past, 8, generator=gen) for _ in range(2)))


STATE = [(1, 1), (2, 2)]


def _kinds_pruned(model, **kw) -> set[str]:
    small = ecospa_fx.compress(model, _inputs(), 0.5, **kw)
    return {g.kind for g in small.report.groups if g.units_removed}


def test_without_declared_state_the_cache_keeps_k_and_v_dense():
    assert _kinds_pruned(CachedAttention()) == {"ffn"}


def test_declared_state_prunes_qk_and_vo_and_narrows_the_cache():
    small = ecospa_fx.compress(CachedAttention(), _inputs(), 0.5, state=STATE)
    assert {g.kind for g in small.report.groups if g.units_removed} == {"qk", "vo", "ffn"}
    assert small.report.max_abs_diff < 1e-9  # the oracle ran with random values at removed cache channels
    assert {i: (shape[1], shape[3]) for i, shape in small.ecospa_state.items()} == {1: (2, 4), 2: (2, 4)}
    x, pk, pv = _inputs(past=5)
    _, k, v = small(x, pk[..., :4], pv[..., :4])
    assert k.shape == (2, 2, 9, 4) and v.shape == (2, 2, 9, 4)


@pytest.mark.parametrize("extra", ["reads_past", "returns_other"])
def test_state_used_otherwise_stays_dense(extra):
    kinds = _kinds_pruned(CachedAttention(extra), state=STATE)
    assert "qk" not in kinds and "ffn" in kinds


def test_state_pairs_are_checked():
    with pytest.raises(InputError, match="out of range"):
        ecospa_fx.compress(CachedAttention(), _inputs(), 0.5, state=[(1, 7)])
    with pytest.raises(InputError, match="repeat"):
        ecospa_fx.compress(CachedAttention(), _inputs(), 0.5, state=[(1, 1), (1, 2)])


def test_adopted_labels_are_not_zero():
    gm = capture(CachedAttention(), _inputs())
    analysis = analyse(gm, STATE)
    assert len(analysis.state_labels) == 2
    for labels in analysis.state_labels.values():
        assert labels[2] is None and all(not lab.zero_ok for lab in labels if lab is not None)


def test_gather_kept_takes_each_head_own_channels():
    """Heads keep different head_dim channels (a box of 2 x 2 that is no per-axis product)."""
    labels = (None, AxisLabel(0, np.array([0, 4])), None, AxisLabel(0, np.arange(4)))
    keep = np.array([1, 0, 1, 0, 0, 1, 0, 1], dtype=bool)
    x = torch.arange(2 * 2 * 3 * 4.0).view(2, 2, 3, 4)

    class S:
        offset = 0

    got = gather_kept(x, labels, keep, [S()])
    assert torch.equal(got[:, 0], x[:, 0][..., [0, 2]]) and torch.equal(got[:, 1], x[:, 1][..., [1, 3]])
