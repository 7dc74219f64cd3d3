"""Planning across groups (``passes.plan.plan_groups``): uniform == per-group plans, global allocation
moves pruning to low-scored groups, caps each group, and keeps rounding, rotary pairs and GQA families."""

from __future__ import annotations

import numpy as np
import pytest

from passes.coupling_state import CouplingFacts
from passes.groups import CoupledUnits
from passes.plan import PlanSettings, plan_group, plan_groups, unit_costs
from tests.passes.test_plan import kept_positions, rotary_gqa_group


def ffn_group(facts: CouplingFacts, width: int, name: str) -> CoupledUnits:
    up = facts.new_space(width, param=f"{name}.up", dim=0)
    return CoupledUnits("ffn", [np.array([up.offset + i]) for i in range(width)], [up.id], {})


def test_uniform_channels_is_plan_group_per_group():
    facts, group, _, _ = rotary_gqa_group()
    other = ffn_group(facts, 32, "a")
    rng = np.random.default_rng(0)
    scores = [rng.random(len(group.units)), rng.random(len(other.units))]
    settings = PlanSettings(0.5)
    got = plan_groups([group, other], scores, facts, settings)
    for g, s, keep in zip([group, other], scores, got, strict=True):
        np.testing.assert_array_equal(keep, plan_group(g, s, facts, settings))


def test_global_prunes_the_low_scored_layer_more_and_respects_the_cap():
    facts = CouplingFacts()
    loud, quiet = ffn_group(facts, 64, "loud"), ffn_group(facts, 64, "quiet")
    rng = np.random.default_rng(1)
    scores = [10 + rng.random(64), rng.random(64)]
    costs = unit_costs([loud, quiet], facts, {}, "channels")
    settings = PlanSettings(0.5, round_to=8, allocation="global", max_sparsity=0.75)
    keep_loud, keep_quiet = plan_groups([loud, quiet], scores, facts, settings, costs)
    assert (~keep_quiet).sum() == 48  # capped at 75 %
    assert (~keep_loud).sum() + (~keep_quiet).sum() == 64  # the budget is met exactly
    assert (~keep_loud).sum() % 8 == 0 and (~keep_quiet).sum() % 8 == 0  # rounding kept
    assert set(np.flatnonzero(~keep_quiet)) == set(np.argsort(scores[1])[:48])


@pytest.mark.parametrize("sparsity", [0.25, 0.5])
def test_global_keeps_rotary_pairs_and_gqa_families(sparsity):
    facts, group, q, k = rotary_gqa_group()
    group2, q2, k2 = rotary_gqa_second(facts)
    rng = np.random.default_rng(2)
    scores = [rng.random(len(group.units)), 0.01 * rng.random(len(group2.units))]
    costs = unit_costs([group, group2], facts, {}, "channels")
    settings = PlanSettings(sparsity, round_to=1, allocation="global", max_sparsity=0.75)
    keeps = plan_groups([group, group2], scores, facts, settings, costs)
    for g, keep, qs, ks in ((group, keeps[0], q, k), (group2, keeps[1], q2, k2)):
        q_heads = kept_positions(facts, g, keep, qs, 8)
        k_heads = kept_positions(facts, g, keep, ks, 8)
        counts = {len(p) for p in q_heads + k_heads}
        assert len(counts) == 1 and counts.pop() % 2 == 0  # equal per head, whole pairs
        for positions in q_heads + k_heads:
            assert all((c + 4) % 8 in positions for c in positions)
        for h, positions in enumerate(q_heads):
            assert positions == k_heads[h // 2]
    removed = [int((~kp).sum()) for kp in keeps]
    assert removed[1] >= removed[0]  # the low-scored group gives more


def rotary_gqa_second(facts: CouplingFacts):
    """A second rotary GQA Q/K group in the same facts (another layer)."""
    q = facts.new_space(32, param="q2.weight", dim=0)
    k = facts.new_space(16, param="k2.weight", dim=0)
    units = []
    for g in range(2):
        for c in range(4):
            pair = (c, c + 4)
            chans = [q.offset + h * 8 + d for h in range(2 * g, 2 * g + 2) for d in pair]
            chans += [k.offset + g * 8 + d for d in pair]
            units.append(np.array(sorted(chans), dtype=np.int64))
    return CoupledUnits("qk", units, [q.id, k.id], {q.id: 8, k.id: 8}), q, k


def test_params_budget_counts_parameters():
    import torch

    facts = CouplingFacts()
    a, b = ffn_group(facts, 16, "a"), ffn_group(facts, 16, "b")
    params = {"a.up": torch.zeros(16, 4), "b.up": torch.zeros(16, 12)}  # b's units cost 3x
    costs = unit_costs([a, b], facts, params, "params")
    assert costs[0].tolist() == [4.0] * 16 and costs[1].tolist() == [12.0] * 16
    scores = [np.ones(16), np.ones(16)]
    settings = PlanSettings(0.25, round_to=1, budget="params")
    keeps = plan_groups([a, b], scores, facts, settings, costs)  # uniform: one ratio hits 25 % of params
    removed = sum(float(c[~k].sum()) for c, k in zip(costs, keeps, strict=True))
    assert removed == pytest.approx(0.25 * 16 * 16, abs=16)
    settings = PlanSettings(0.25, round_to=1, budget="params", allocation="global", max_sparsity=0.9)
    keeps = plan_groups([a, b], [np.ones(16), np.ones(16)], facts, settings, costs)
    # equal scores: the cheaper score per parameter is in b (each unit saves 3x the parameters)
    assert (~keeps[1]).sum() > (~keeps[0]).sum()


def test_global_across_kinds_normalises_each_kind():
    facts = CouplingFacts()
    a = ffn_group(facts, 16, "a")
    b = ffn_group(facts, 16, "b")
    b.kind = "vo"
    scores = [1000 * np.linspace(1, 2, 16), np.linspace(1, 2, 16)]  # same shape, different scale
    costs = unit_costs([a, b], facts, {}, "channels")
    settings = PlanSettings(0.5, round_to=1, allocation="global", across_kinds=True)
    keeps = plan_groups([a, b], scores, facts, settings, costs)
    assert abs(int((~keeps[0]).sum()) - int((~keeps[1]).sum())) <= 1


def test_global_across_kinds_with_shared_units_takes_the_cheap_kind():
    """kind_scale=False (scores in one unit, as Fisher's loss changes): the kind whose units cost 1000x
    less loses (almost) all the budget, where per-kind normalisation would split it evenly."""
    facts = CouplingFacts()
    a = ffn_group(facts, 16, "a")
    b = ffn_group(facts, 16, "b")
    b.kind = "qk"
    scores = [np.linspace(1, 2, 16), 1000 * np.linspace(1, 2, 16)]
    costs = unit_costs([a, b], facts, {}, "channels")
    settings = PlanSettings(0.4, round_to=1, allocation="global", across_kinds=True, kind_scale=False)
    keeps = plan_groups([a, b], scores, facts, settings, costs)
    assert int((~keeps[0]).sum()) == 13 and keeps[1].all()  # 40% of 32 units, all from the cheap kind


def test_flop_cost_of_an_ffn_channel_is_its_two_matrix_products(block):
    from .conftest import E, prepare

    inputs, groups, batches = prepare(block)
    (costs,) = unit_costs([groups["ffn"]], inputs.facts, inputs.params, "flops")
    b, n, _ = batches[0][0].shape
    assert costs.tolist() == [2.0 * 2 * b * n * E] * len(costs)  # one up row + one down column per token


def test_relative_to_median_ignores_layer_scale():
    """Raw activation energies grow with depth: a layer 1e6x louder is barely touched and the quiet one is
    cut to the cap. Relative to each group's median, the plan does not depend on the layers' scales."""
    from passes.importance import CRITERIA
    from passes.importance.base import relative_to_median

    facts = CouplingFacts()
    early, late = ffn_group(facts, 64, "early"), ffn_group(facts, 64, "late")
    rng = np.random.default_rng(2)
    base = [rng.lognormal(0, 1, 64), rng.lognormal(0, 2, 64)]
    settings = PlanSettings(0.5, round_to=8, allocation="global", max_sparsity=0.9)
    costs = unit_costs([early, late], facts, {}, "channels")

    def plan(scores):
        return plan_groups([early, late], scores, facts, settings, costs)

    raw_early, raw_late = plan([base[0], base[1] * 1e6])
    assert (~raw_early).sum() == 56 and (~raw_late).sum() == 8  # the quiet layer is cut to the 90% cap
    reference = plan(relative_to_median(base))
    for scale in ((1e6, 1.0), (1.0, 1e6)):
        got = plan(relative_to_median([b * c for b, c in zip(base, scale, strict=True)]))
        for a, b in zip(reference, got, strict=True):
            np.testing.assert_array_equal(a, b)
    assert 0 < (~reference[1]).sum() < 64 and 0 < (~reference[0]).sum() < 64
    assert not CRITERIA["activation"].comparable and CRITERIA["fisher"].comparable
