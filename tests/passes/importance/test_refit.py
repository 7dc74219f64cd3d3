"""Reconstruction: a removed channel that copies a kept one is refit away exactly, the own-output target is
the OBS closed form, the refit lowers the calibration error, the mask oracle holds with the refit weights,
and weights that are shared or read elsewhere are left alone."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from passes.dataflow import analyse
from passes.groups import removed_by_space
from passes.importance.compensate import add_output_biases
from passes.importance.refit import RefitSettings, reconstruct, refit_sites
from passes.rewrite import apply_plan
from passes.verify import oracle_diff

from .conftest import FF, keep_without, prepare


def _compressed(inputs, keep, refit=None):
    out = copy.deepcopy(inputs.gm)
    if refit is not None:
        refit.apply_weights(out)
    apply_plan(out, analyse(inputs.gm), keep)
    return add_output_biases(out, refit.new_biases) if refit is not None else out


def _calibration_error(model, dense, batches) -> float:
    with torch.no_grad():
        return float(sum((model(*b) - dense(*b)).pow(2).mean() for b in batches))


def test_a_removed_copy_of_a_kept_channel_is_folded_back_exactly(block):
    """FFN unit 5 duplicates unit 2 (same up row and bias): removing 5 and refitting moves W_down[:, 5]
    onto column 2, so the output is the dense one; without the refit it is not."""
    with torch.no_grad():
        block.up.weight[5] = block.up.weight[2]
        block.up.bias[5] = block.up.bias[2]
    inputs, groups, _ = prepare(block, n_batches=8)
    keep = keep_without(inputs, groups["ffn"], "up.weight", [5])
    for target in ("dense", "self"):
        refit = reconstruct(inputs, [groups["ffn"]], keep, RefitSettings(target, damp=1e-9, intercept=False))
        assert refit.sites == ["down.weight"]
        out, plain = _compressed(inputs, keep, refit), _compressed(inputs, keep)
        with torch.no_grad():
            held_out = torch.randn(2, 6, block.up.in_features)
            assert torch.allclose(out(held_out), block(held_out), atol=1e-4)
            assert (plain(held_out) - block(held_out)).abs().max() > 1e-2
        assert out.get_parameter("down.weight").shape[1] == FF - 1


def test_own_output_target_is_the_obs_update(block):
    """refit "self" on one sink: new W_K = W_K + W_R G_RK G_KK^{-1} (G = sum x^T x of W_down's input)."""
    inputs, groups, batches = prepare(block, n_batches=6)
    drop = list(range(0, FF, 3))
    keep = keep_without(inputs, groups["ffn"], "up.weight", drop)
    refit = reconstruct(inputs, [groups["ffn"]], keep, RefitSettings("self", damp=0.0, intercept=False))
    seen = []
    hook = block.down.register_forward_hook(lambda _m, args, _out: seen.append(args[0].reshape(-1, FF)))
    with torch.no_grad():
        for b in batches:
            block(*b)
    hook.remove()
    x = torch.cat(seen).double()
    g = x.T @ x
    kept = [c for c in range(FF) if c not in drop]
    w = block.down.weight.detach().double()
    expected = w[:, kept] + w[:, drop] @ g[drop][:, kept] @ torch.linalg.inv(g[kept][:, kept])
    got = refit.weights["down.weight"].double()
    assert torch.allclose(got[:, kept], expected, atol=1e-4)
    assert got[:, drop].abs().max() == 0


@pytest.mark.parametrize("target", ["dense", "self"])
@pytest.mark.parametrize("intercept", [False, True])
def test_refit_lowers_the_calibration_error_and_passes_the_oracle(block, target, intercept):
    inputs, groups, batches = prepare(block, n_batches=8)
    prunable = [groups["vo"], groups["ffn"], groups["qk"]]
    keep = np.ones(inputs.facts.n_channels, dtype=bool)
    for group in prunable:
        for unit in group.units[::2]:
            keep[unit] = False
    refit = reconstruct(inputs, prunable, keep, RefitSettings(target, damp=1e-6, intercept=intercept))
    assert sorted(refit.sites) == ["down.weight", "o.weight"]  # q.k has no weight sink: Q/K is not refit
    out, plain = _compressed(inputs, keep, refit), _compressed(inputs, keep)
    assert _calibration_error(out, block, batches) < 0.9 * _calibration_error(plain, block, batches)
    diff, scale = oracle_diff(refit.dense_model(inputs.gm), out, batches[0], _removed(inputs.facts, prunable, keep))
    assert diff <= 1e-9 * max(scale, 1.0)


def _removed(facts, groups, keep) -> list[tuple[str, int, tuple[int, ...]]]:
    """(param, dim, indices) the mask oracle zeroes."""
    spaces = [(facts.spaces[s], idx) for group in groups for s, idx in removed_by_space(group, facts, keep)]
    return [(space.param, space.dim, idx) for space, idx in spaces if not space.is_virtual]


def test_a_weight_read_twice_is_not_refit(block):
    """A sink whose weight another node also reads (tied, shared) keeps its values: the refit of one use
    would change the other."""

    class Shared(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            h = torch.relu(self.inner.up(x))
            return x + self.inner.down(h) + 0.1 * torch.nn.functional.linear(h, self.inner.down.weight)

    inputs, groups, _ = prepare(Shared(block))
    keep = keep_without(inputs, groups["ffn"], "inner.up.weight", [0, 1])
    assert refit_sites(inputs, [groups["ffn"]], keep, intercept=False) == []
