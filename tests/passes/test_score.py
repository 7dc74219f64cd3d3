"""Scoring (``passes.score``): coupled magnitude is the product of the unit's per-matrix L2 norms."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from passes.capture import capture
from passes.dataflow import analyse
from passes.groups import build_groups
from passes.plan import PlanSettings, plan_group
from passes.score import channel_norms, coupled_magnitude


def prepare(model: nn.Module, *inputs: torch.Tensor):
    gm = capture(model, inputs)
    facts = analyse(gm).facts
    params = dict(gm.named_parameters(remove_duplicate=False))
    return facts, build_groups(facts, "channel"), params


def space(facts, param: str, dim: int):
    return next(s for s in facts.spaces if s.param == param and s.dim == dim)


def index_in(facts, unit: np.ndarray, param: str, dim: int) -> list[int]:
    sp = space(facts, param, dim)
    return sorted((unit[(unit >= sp.offset) & (unit < sp.offset + sp.size)] - sp.offset).tolist())


class FFN(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(6, 16)
        self.down = nn.Linear(16, 6)

    def forward(self, x):
        return x + self.down(F.relu(self.up(x)))


def test_ffn_score_is_product_of_row_and_column_norms():
    torch.manual_seed(0)
    model = FFN()
    facts, groups, params = prepare(model, torch.randn(2, 6))
    (group,) = [g for g in groups if g.kind == "ffn"]
    scores = coupled_magnitude(group, facts, params)
    w_up, w_down = model.up.weight.detach(), model.down.weight.detach()
    for unit, score in zip(group.units, scores, strict=True):
        (i,) = index_in(facts, unit, "up.weight", 0)
        expected = torch.linalg.norm(w_up[i]) * torch.linalg.norm(w_down[:, i])  # biases do not enter
        assert np.isclose(score, expected.item(), rtol=1e-5)


def test_zeroed_unit_ranks_lowest_and_is_dropped_first():
    torch.manual_seed(0)
    model = FFN()
    with torch.no_grad():
        model.up.weight[5].zero_()
        model.down.weight[:, 5].zero_()
        model.down.weight[:, 9].mul_(1e-3)  # small but not zero: second lowest
    facts, groups, params = prepare(model, torch.randn(2, 6))
    (group,) = [g for g in groups if g.kind == "ffn"]
    scores = coupled_magnitude(group, facts, params)
    order = [index_in(facts, group.units[u], "up.weight", 0)[0] for u in np.argsort(scores)]
    assert order[:2] == [5, 9]
    assert scores.min() == 0.0
    keep = plan_group(group, scores, facts, PlanSettings(1 / 16, round_to=1))
    (dropped,) = np.flatnonzero(~keep)
    assert index_in(facts, group.units[dropped], "up.weight", 0) == [5]


def test_channel_norms_are_squared_and_skip_vectors():
    torch.manual_seed(0)
    model = FFN()
    facts, _, params = prepare(model, torch.randn(2, 6))
    up, bias, down = space(facts, "up.weight", 0), space(facts, "up.bias", 0), space(facts, "down.weight", 1)
    sq = channel_norms(facts, params, [up.id, bias.id, down.id])
    np.testing.assert_allclose(
        sq[up.offset : up.offset + up.size], (model.up.weight.detach() ** 2).sum(1).numpy(), rtol=1e-5
    )
    np.testing.assert_allclose(
        sq[down.offset : down.offset + down.size], (model.down.weight.detach() ** 2).sum(0).numpy(), rtol=1e-5
    )
    assert np.isnan(sq[bias.offset : bias.offset + bias.size]).all()


H, KV, HD, E = 4, 2, 4, 8


class SdpaGqa(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(E, H * HD)
        self.k = nn.Linear(E, KV * HD)
        self.v = nn.Linear(E, KV * HD)
        self.o = nn.Linear(H * HD, E)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, H, HD).transpose(1, 2)
        k = self.k(x).view(b, n, KV, HD).transpose(1, 2)
        v = self.v(x).view(b, n, KV, HD).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.o(y.transpose(1, 2).reshape(b, n, H * HD))


def test_gqa_qk_score_pools_the_query_heads_of_one_kv_head():
    """Unit (g, d): ||[W_q[h, d] for h in group g]|| * ||W_k[g, d]||, the norm taken over all query rows."""
    torch.manual_seed(0)
    model = SdpaGqa()
    facts, groups, params = prepare(model, torch.randn(2, 3, E))
    (group,) = [g for g in groups if g.kind == "qk"]
    scores = coupled_magnitude(group, facts, params)
    w_q, w_k = model.q.weight.detach(), model.k.weight.detach()
    assert len(scores) == KV * HD
    for unit, score in zip(group.units, scores, strict=True):
        q_rows = index_in(facts, unit, "q.weight", 0)
        (k_row,) = index_in(facts, unit, "k.weight", 0)
        assert len(q_rows) == H // KV
        expected = torch.linalg.norm(w_q[q_rows]) * torch.linalg.norm(w_k[k_row])
        assert np.isclose(score, expected.item(), rtol=1e-5)
