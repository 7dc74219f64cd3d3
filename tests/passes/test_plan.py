"""Planning (``passes.plan``): keep counts, whole rotary pairs, equal per-head counts, GQA families."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from passes.capture import capture
from passes.coupling_state import CouplingFacts
from passes.dataflow import analyse
from passes.groups import CoupledUnits, build_groups
from passes.plan import PlanSettings, keep_count, plan_group


# ---------------------------------------------------------------------------------- keep_count
@pytest.mark.parametrize(
    ("n", "sparsity", "round_to", "expected"),
    [
        (64, 0.5, 8, 32),
        (64, 0.3, 8, 48),  # 44.8 -> nearest multiple of 8
        (64, 0.2, 8, 48),  # 51.2 -> 48
        (12, 0.5, 8, 6),  # width not a multiple of 8: plain rounding
        (8, 0.5, 8, 4),  # width equal to round_to: plain rounding (8 would keep everything)
        (10, 0.99, 8, 1),  # never 0
        (1, 0.9, 8, 1),
        (64, 0.0, 8, 64),
        (12, 0.0, 8, 12),
    ],
)
def test_keep_count(n, sparsity, round_to, expected):
    assert keep_count(n, sparsity, round_to) == expected


def test_keep_count_bounds_over_a_grid():
    for n in range(1, 70):
        for sparsity in np.linspace(0.0, 0.99, 34):
            for round_to in (1, 8):
                kept = keep_count(n, float(sparsity), round_to)
                assert 1 <= kept <= n
                if sparsity == 0.0:
                    assert kept == n


def test_keep_count_stays_a_multiple_when_the_width_allows():
    assert keep_count(64, 0.95, 8) == 8


# ---------------------------------------------------------------------------------- synthetic groups
def rotary_gqa_group(n_heads: int = 4, n_kv: int = 2, head_dim: int = 8):
    """A Q/K group as discovery builds it for rotate-half rotary under GQA (per-KV-head families): unit
    (g, c) holds channels c and c + D/2 of every query head of KV group g and of KV head g."""
    facts = CouplingFacts()
    q = facts.new_space(n_heads * head_dim, param="q.weight", dim=0)
    k = facts.new_space(n_kv * head_dim, param="k.weight", dim=0)
    rep = n_heads // n_kv
    units = []
    for g in range(n_kv):
        for c in range(head_dim // 2):
            pair = (c, c + head_dim // 2)
            chans = [q.offset + h * head_dim + d for h in range(g * rep, (g + 1) * rep) for d in pair]
            chans += [k.offset + g * head_dim + d for d in pair]
            units.append(np.array(sorted(chans), dtype=np.int64))
    group = CoupledUnits("qk", units, [q.id, k.id], {q.id: head_dim, k.id: head_dim})
    return facts, group, q, k


def kept_positions(facts, group, unit_keep, space, head_dim) -> list[set[int]]:
    keep = np.zeros(facts.n_channels, dtype=bool)
    for unit, kept in zip(group.units, unit_keep, strict=True):
        keep[unit] = kept
    local = keep[space.offset : space.offset + space.size].reshape(-1, head_dim)
    return [set(np.flatnonzero(row).tolist()) for row in local]


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_rotary_gqa_plan_keeps_whole_pairs_and_equal_head_counts(sparsity):
    facts, group, q, k = rotary_gqa_group()
    scores = np.random.default_rng(0).random(len(group.units))
    unit_keep = plan_group(group, scores, facts, PlanSettings(sparsity))
    target = keep_count(8, sparsity, 8)
    q_heads = kept_positions(facts, group, unit_keep, q, 8)
    k_heads = kept_positions(facts, group, unit_keep, k, 8)
    for positions in q_heads + k_heads:
        assert len(positions) == target
        assert all((c + 4) % 8 in positions for c in positions)  # rotate-half partners together
    for h, positions in enumerate(q_heads):  # query heads read their KV head's channels
        assert positions == k_heads[h // 2]


def test_rotary_plan_steps_down_to_an_even_count():
    """Target 5 channels per head cannot be met with pairs: every head keeps 4."""
    facts, group, q, k = rotary_gqa_group()
    assert keep_count(8, 0.375, 8) == 5
    scores = np.arange(len(group.units), dtype=float)
    unit_keep = plan_group(group, scores, facts, PlanSettings(0.375))
    heads = kept_positions(facts, group, unit_keep, q, 8) + kept_positions(facts, group, unit_keep, k, 8)
    for positions in heads:
        assert len(positions) == 4


def test_gqa_families_each_reach_the_target():
    """KV group 0's units all outscore group 1's: a global top-k would starve group 1; the plan must not."""
    facts, group, q, k = rotary_gqa_group()
    scores = np.array([10.0 + i if unit.min() < 8 else float(i) for i, unit in enumerate(group.units)])
    unit_keep = plan_group(group, scores, facts, PlanSettings(0.5))
    assert [len(p) for p in kept_positions(facts, group, unit_keep, k, 8)] == [4, 4]
    assert [len(p) for p in kept_positions(facts, group, unit_keep, q, 8)] == [4, 4, 4, 4]


def test_planted_lowest_unit_is_dropped_first():
    facts, group, _, _ = rotary_gqa_group()
    scores = np.ones(len(group.units))
    scores[2] = 0.0  # KV group 0, pair (2, 6)
    scores[5] = 0.5  # KV group 1, pair (1, 5)
    unit_keep = plan_group(group, scores, facts, PlanSettings(0.25))  # 3 of 4 pairs per head
    assert np.flatnonzero(~unit_keep).tolist() == [2, 5]


def test_zero_sparsity_keeps_every_unit():
    facts, group, _, _ = rotary_gqa_group()
    unit_keep = plan_group(group, np.zeros(len(group.units)), facts, PlanSettings(0.0))
    assert unit_keep.all()


def test_rotary_plan_at_high_sparsity_keeps_one_pair():
    facts, group, q, k = rotary_gqa_group()
    unit_keep = plan_group(group, np.arange(len(group.units), dtype=float), facts, PlanSettings(0.9))
    heads = kept_positions(facts, group, unit_keep, q, 8) + kept_positions(facts, group, unit_keep, k, 8)
    for positions in heads:
        assert len(positions) == 2


def test_flat_group_keeps_top_scored_units():
    facts = CouplingFacts()
    up = facts.new_space(16, param="up.weight", dim=0)
    group = CoupledUnits("ffn", [np.array([up.offset + i]) for i in range(16)], [up.id], {})
    scores = np.random.default_rng(1).permutation(16).astype(float)
    unit_keep = plan_group(group, scores, facts, PlanSettings(0.5))
    assert unit_keep.sum() == 8
    assert set(np.flatnonzero(unit_keep)) == set(np.argsort(-scores)[:8])
    scores[11] = -1.0
    unit_keep = plan_group(group, scores, facts, PlanSettings(1 / 16, round_to=1))
    assert np.flatnonzero(~unit_keep).tolist() == [11]


def test_head_group_ignores_round_to():
    facts = CouplingFacts()
    q = facts.new_space(32, param="q.weight", dim=0)
    units = [np.arange(q.offset + 8 * h, q.offset + 8 * h + 8) for h in range(4)]
    group = CoupledUnits("head", units, [q.id], {q.id: 8})
    scores = np.array([0.3, 0.9, 0.1, 0.5])
    unit_keep = plan_group(group, scores, facts, PlanSettings(0.5, granularity="head"))
    assert unit_keep.tolist() == [False, True, False, True]


# ---------------------------------------------------------------------------------- from a real graph
class GqaAttention(nn.Module):
    def __init__(self, n_heads: int = 4, n_kv: int = 2, head_dim: int = 8, width: int = 16):
        super().__init__()
        self.h, self.kv, self.d = n_heads, n_kv, head_dim
        self.q = nn.Linear(width, n_heads * head_dim, bias=False)
        self.k = nn.Linear(width, n_kv * head_dim, bias=False)
        self.v = nn.Linear(width, n_kv * head_dim, bias=False)
        self.o = nn.Linear(n_heads * head_dim, width, bias=False)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.h, self.d).transpose(1, 2)
        k = self.k(x).view(b, n, self.kv, self.d).transpose(1, 2)
        v = self.v(x).view(b, n, self.kv, self.d).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return x + self.o(y.transpose(1, 2).reshape(b, n, self.h * self.d))


def test_plan_on_discovered_gqa_group_gives_one_channel_set_per_kv_head():
    torch.manual_seed(0)
    gm = capture(GqaAttention(), (torch.randn(2, 5, 16),))
    facts = analyse(gm).facts
    (group,) = [g for g in build_groups(facts, "channel") if g.kind == "qk"]
    q = next(s for s in facts.spaces if s.param == "q.weight" and s.dim == 0)
    k = next(s for s in facts.spaces if s.param == "k.weight" and s.dim == 0)
    scores = np.random.default_rng(3).random(len(group.units))
    unit_keep = plan_group(group, scores, facts, PlanSettings(0.5, round_to=1))
    q_heads = kept_positions(facts, group, unit_keep, q, 8)
    k_heads = kept_positions(facts, group, unit_keep, k, 8)
    assert [len(p) for p in q_heads + k_heads] == [4] * 6
    assert q_heads == [k_heads[0], k_heads[0], k_heads[1], k_heads[1]]


@pytest.mark.parametrize("round_to", [1, 8])
def test_partial_rotary_half_head_dim_prunes_qk(round_to):
    """Issue 12: with rotary on half of head_dim (GPT-NeoX / Phi), a rotary pair spans every head while a
    pass-through channel spans one; planning each of those families to the per-head target on its own kept
    everything (0 units removed at sparsity 0.5). One joint fill removes half, exactly."""
    import warnings

    import ecospa_fx
    from tests.zoo import hf

    case = next(c for c in hf._all() if c.name == "hf_gpt_neox")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compressed = ecospa_fx.compress(case.build(), case.inputs(), 0.5, round_to=round_to)
    report = compressed.ecospa_report
    qk = [g for g in report.groups if g.kind == "qk"]
    assert len(qk) == 2 and all(g.units_removed for g in qk), report.summary()
    for g in qk:
        q_rows = next(m for m in g.members if m.dim == 0 and m.param.endswith("weight"))
        assert len(q_rows.removed) > 0
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-6
