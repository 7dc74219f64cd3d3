"""Latency-aware granularity: the planner follows the injected cost model (no timing in these tests)."""

from __future__ import annotations

import pytest
import torch

import ecospa_fx
from ecospa_fx import InputError
from ecospa_fx.latency import Candidate, choose_among, choose_granularity, flop_cost
from tests.zoo import case_by_name


@pytest.fixture(scope="module")
def setup():
    case = case_by_name("hf_llama_gqa")
    model, inputs = case.build(), case.inputs()
    choice = choose_granularity(model, inputs, 0.5, cost_model=lambda c: 0.0)
    return model, inputs, choice


def attention_table(slow_below: int):
    """A GPU-like attention cost table: time per head, 3x slower once head_dim < ``slow_below`` (the
    measured 3B 1x128 case), plus one unit per million parameters for the GEMMs."""

    def cost(c: Candidate) -> float:
        attention = sum(h * d * (3.0 if d < slow_below else 1.0) for h, d in c.attention)
        return attention + c.params / 1e6

    return cost


def test_candidates_report_their_attention_shapes(setup):
    _, _, choice = setup
    channel, head = choice.candidates["channel"], choice.candidates["head"]
    (h0, d0), *_ = channel.attention
    (h1, d1), *_ = head.attention
    assert len(channel.attention) == len(head.attention) > 0
    assert h0 == 2 * h1 and d1 == 2 * d0  # channel halves head_dim, head halves the heads
    assert choice.granularity == "channel"  # ties go to the first candidate
    assert channel.model.ecospa_report.max_abs_diff < 1e-4  # candidates are verified compressions
    assert head.model.ecospa_report.granularity == "head"


def test_choice_follows_the_cost_model(setup):
    _, _, choice = setup
    cands = list(choice.candidates.values())
    d_full = choice.candidates["head"].attention[0][1]
    slow_narrow = choose_among(cands, attention_table(slow_below=d_full))
    assert slow_narrow.granularity == "head"
    assert slow_narrow.model is choice.candidates["head"].model
    assert slow_narrow.costs["head"] < slow_narrow.costs["channel"]
    assert choose_among(cands, attention_table(slow_below=1)).granularity == "channel"  # fewer params win


def test_flop_cost_is_equal_for_equal_widths(setup):
    model, inputs, choice = setup
    costs = choose_among(list(choice.candidates.values()), flop_cost(inputs)).costs
    dense = flop_cost(inputs)(Candidate("dense", model))
    assert costs["channel"] < dense and costs["head"] < dense
    assert costs["channel"] == pytest.approx(costs["head"], rel=0.05)


def test_measured_costs_are_positive(setup):
    _, inputs, choice = setup
    other = (torch.randint(0, 96, inputs[0].shape),)
    costs = choose_among(list(choice.candidates.values()), None, other, repeats=1).costs
    assert set(costs) == {"channel", "head"} and all(v > 0 for v in costs.values())


def test_auto_granularity_in_compress(setup):
    model, inputs, _ = setup
    out = ecospa_fx.compress(model, inputs, 0.5, granularity="auto")
    assert set(out.ecospa_granularity_costs) == {"channel", "head"}
    best = min(out.ecospa_granularity_costs, key=out.ecospa_granularity_costs.get)
    assert out.ecospa_report.granularity == best
    with pytest.raises(InputError, match="auto"):
        ecospa_fx.discover(model, inputs, granularity="auto")
