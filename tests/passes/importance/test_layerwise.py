"""Layer-by-layer activation statistics equal the whole-model ones, with one layer's weights resident."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from passes.capture import capture
from passes.dataflow import analyse
from passes.groups import build_groups
from passes.importance import ScoreInputs, activation, layerwise, score_groups
from tests.zoo import case_by_name


def _setup(name: str, n_batches: int = 3):
    case = case_by_name(name)
    model, example = case.build(), case.inputs()
    gm = capture(model, example)
    analysis = analyse(gm)
    groups = [g for g in build_groups(analysis.facts, "channel") if g.prunable]
    gen = torch.Generator().manual_seed(0)
    batches = [tuple(_like(x, gen) for x in example) for _ in range(n_batches)]
    params = dict(gm.named_parameters(remove_duplicate=False))
    return gm, analysis, groups, batches, params


def _like(x, gen):
    if not isinstance(x, torch.Tensor):
        return x
    if x.is_floating_point():
        return torch.randn(x.shape, generator=gen, dtype=x.dtype)
    return torch.randint(0, 50, x.shape, generator=gen, dtype=x.dtype)


@pytest.mark.parametrize("name", ["hf_llama_gqa", "hf_gpt2", "hf_t5", "hf_mixtral", "hw_einsum"])
def test_layerwise_energy_equals_whole_model(name):
    gm, analysis, groups, batches, params = _setup(name)
    inputs = ScoreInputs(gm, analysis.facts, params, analysis.labels, batches)
    whole = activation.channel_energy(inputs, groups)
    stats: dict = {}
    layered = layerwise.channel_energy(gm, analysis.facts, groups, batches, params, stats)
    assert whole.any()
    np.testing.assert_allclose(layered, whole, rtol=1e-10, atol=0)
    assert stats["segments"] >= 3  # embedding, then one segment per decoder layer (2 in the tiny zoo)


def test_one_segment_per_decoder_layer_holds_one_layers_weights():
    gm, analysis, groups, batches, params = _setup("hf_llama_gqa")
    stats: dict = {}
    layerwise.channel_energy(gm, analysis.facts, groups, batches, params, stats)
    layers = {layerwise.layer_key(n) for n in gm.graph.nodes} - {None}
    assert stats["segments"] == len(layers) + 1
    total = sum(p.numel() * p.element_size() for p in gm.parameters())
    layer0 = sum(p.numel() * p.element_size() for n, p in gm.named_parameters() if ".layers.0." in n)
    assert 0 < stats["peak_weight_bytes"] <= total - layer0  # never every weight at once


def test_layerwise_scores_through_the_criterion():
    gm, analysis, groups, batches, params = _setup("hf_llama_gqa")
    whole = score_groups("activation", groups, ScoreInputs(gm, analysis.facts, params, analysis.labels, batches))
    inputs = ScoreInputs(gm, analysis.facts, params, analysis.labels, batches, layerwise=True)
    layered = score_groups("activation", groups, inputs)
    for a, b in zip(whole, layered, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-10, atol=0)
