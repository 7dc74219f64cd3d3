"""Bias compensation: removed channels with a constant activation are folded back exactly, the mean of
the output is preserved in general, and biases are created where a linear had none."""

from __future__ import annotations

import copy

import torch

from passes.dataflow import analyse
from passes.importance.base import wanted_mask
from passes.importance.compensate import add_output_biases, bias_deltas, sink_means
from passes.rewrite import apply_plan

from .conftest import FF, keep_without, prepare


def _compressed(inputs, keep, deltas):
    out = copy.deepcopy(inputs.gm)
    apply_plan(out, analyse(inputs.gm), keep)
    return add_output_biases(out, deltas)


def test_constant_channels_are_folded_back_exactly(block):
    """FFN units 3 and 7 read no input (zero rows) and fire a constant relu(bias): removing them with
    compensation changes nothing; without it the output moves by W_down[:, R] @ relu(b_R)."""
    with torch.no_grad():
        for i in (3, 7):
            block.up.weight[i] = 0.0
            block.up.bias[i] = 0.5 + i
    inputs, groups, batches = prepare(block)
    keep = keep_without(inputs, groups["ffn"], "up.weight", [3, 7])
    stats = sink_means(inputs, wanted_mask(inputs.facts, [groups["ffn"]]))
    deltas = bias_deltas(inputs.gm, stats, keep)
    assert len(deltas) == 1  # only W_down lost input columns
    out = _compressed(inputs, keep, deltas)
    plain = _compressed(inputs, keep, {})
    with torch.no_grad():
        dense = block(batches[1][0])
        assert torch.allclose(out(*batches[1]), dense, atol=1e-5)
        assert (plain(*batches[1]) - dense).abs().max() > 0.1
    assert out.get_parameter("down.weight").shape[1] == FF - 2


def test_compensation_preserves_the_output_mean_on_calibration(block):
    inputs, groups, batches = prepare(block)
    keep = keep_without(inputs, groups["ffn"], "up.weight", list(range(0, FF, 2)))
    deltas = bias_deltas(inputs.gm, sink_means(inputs, wanted_mask(inputs.facts, [groups["ffn"]])), keep)
    out, plain = _compressed(inputs, keep, deltas), _compressed(inputs, keep, {})
    with torch.no_grad():
        assert _mean_gap(out, block, batches) < 1e-5 < _mean_gap(plain, block, batches)


def _mean_gap(model, dense, batches) -> float:
    """max over output features of |mean over calibration tokens of (model - dense)|."""
    return torch.stack([(model(*b) - dense(*b)).mean((0, 1)) for b in batches]).mean(0).abs().max().item()


def test_a_linear_without_bias_gets_one(block):
    block.down = torch.nn.Linear(FF, block.down.out_features, bias=False)
    inputs, groups, _ = prepare(block)
    keep = keep_without(inputs, groups["ffn"], "up.weight", [1])
    deltas = bias_deltas(inputs.gm, sink_means(inputs, wanted_mask(inputs.facts, [groups["ffn"]])), keep)
    out = _compressed(inputs, keep, deltas)
    (name,) = deltas
    assert out.get_parameter(f"_ecospa_bias_{name}").shape == (block.down.out_features,)
