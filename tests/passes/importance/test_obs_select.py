"""Selection by reconstruction error: at each sink the refit re-chooses which units go, by their OBS cost,
with the plan's counts (per head block, per group); a channel the others rebuild exactly goes first even
when its energy is the largest; the result passes the mask oracle."""

from __future__ import annotations

import numpy as np
import torch

from passes.groups import removed_by_space
from passes.importance.obs_select import _Surgeon
from passes.importance.refit import RefitSettings, reconstruct
from passes.verify import oracle_diff

from .conftest import FF, HD, KV, keep_without, local, prepare
from .test_refit import _compressed, _removed


def test_a_loud_copy_of_a_kept_channel_is_removed_instead_of_a_quiet_unique_one(block):
    """FFN unit 7 is 3x unit 2 (same up row and bias, tripled): the largest energy in the layer, and yet
    the kept channel 2 rebuilds it exactly (W_down[:, 2] += 3 W_down[:, 7]). The plan removes unit 0; the
    re-chosen removal is the copy (or its source), and the refit model equals the dense one."""
    with torch.no_grad():
        block.up.weight[7] = 3 * block.up.weight[2]
        block.up.bias[7] = 3 * block.up.bias[2]
    inputs, groups, _ = prepare(block, n_batches=8)
    keep = keep_without(inputs, groups["ffn"], "up.weight", [0])
    settings = RefitSettings("self", damp=1e-9, intercept=False, select=True)
    refit = reconstruct(inputs, [groups["ffn"]], keep, settings)
    gone = [u for u in groups["ffn"].units if not refit.keep[u].any()]
    assert len(gone) == 1
    assert set(local(inputs.facts, gone[0], "up.weight")) <= {2, 7}
    out = _compressed(inputs, refit.keep, refit)
    with torch.no_grad():
        held_out = torch.randn(2, 6, block.up.in_features)
        assert torch.allclose(out(held_out), block(held_out), atol=1e-4)
    plain = reconstruct(inputs, [groups["ffn"]], keep, RefitSettings("self", damp=1e-9, intercept=False))
    assert np.array_equal(plain.keep, keep)  # without select the plan stands


def test_reselection_keeps_every_heads_count_and_passes_the_oracle(block):
    """Half of each group removed, then re-chosen: every V head and every O query-head block loses as many
    channels as before, the FFN as many units, and the compressed model matches its masked dense model."""
    inputs, groups, batches = prepare(block, n_batches=8)
    prunable = [groups["vo"], groups["ffn"], groups["qk"]]
    keep = np.ones(inputs.facts.n_channels, dtype=bool)
    for group in prunable:
        for unit in group.units[1::2]:
            keep[unit] = False
    refit = reconstruct(inputs, prunable, keep, RefitSettings("self", damp=1e-6, intercept=True, select=True))
    assert not np.array_equal(refit.keep, keep)  # something was re-chosen
    qk = groups["qk"].channels
    assert np.array_equal(refit.keep[qk], keep[qk])  # q.k is no refit sink: its plan stands
    for group in prunable:
        for sid, before in removed_by_space(group, inputs.facts, keep):
            after = dict(removed_by_space(group, inputs.facts, refit.keep))[sid]
            assert len(after) == len(before)
    removed = _removed(inputs.facts, [groups["vo"]], refit.keep)
    v_removed = next(idx for param, _, idx in removed if param == "v.weight")
    per_head = np.bincount(np.array(v_removed) // HD, minlength=KV)
    assert (per_head == HD // 2).all()  # every KV head keeps half its channels
    out = _compressed(inputs, refit.keep, refit)
    removed = _removed(inputs.facts, prunable, refit.keep)
    diff, scale = oracle_diff(refit.dense_model(inputs.gm), out, batches[0], removed)
    assert diff <= 1e-9 * max(scale, 1.0)
    assert out.get_parameter("down.weight").shape[1] == FF // 2


def test_the_obs_cost_is_the_least_squares_error_of_the_removal():
    """dE(S) = tr(W_S (P_SS)^{-1} W_S^T) equals the output error of removing S and refitting the rest by
    least squares (no damping but the floor)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g, dtype=torch.float64)
    x[:, 4] = x[:, 1] + 0.1 * x[:, 4]
    w = torch.randn(3, 6, generator=g, dtype=torch.float64)
    surgeon = _Surgeon(x.T @ x, w, damp=0.0)
    for cols in ([4], [1, 4], [0, 5]):
        kept = [c for c in range(6) if c not in cols]
        fit = torch.linalg.lstsq(x[:, kept], x @ w.T).solution
        err = float(((x[:, kept] @ fit - x @ w.T) ** 2).sum())
        assert abs(surgeon.cost([np.array(cols)])[0] - err) < 1e-3 * err  # the ridge floor: 1e-6 of the diagonal


def test_a_sink_that_saw_nothing_keeps_the_plan(block):
    """An all-zero Gram (no signal reached the sink) cannot rank anything: the plan's choice stands."""
    from passes.importance import obs_select
    from passes.importance.refit import refit_sites

    inputs, groups, _ = prepare(block)
    keep = keep_without(inputs, groups["ffn"], "up.weight", [0, 3])
    (site,) = refit_sites(inputs, [groups["ffn"]], keep, intercept=False)
    weight, zero = torch.randn(4, FF, dtype=torch.float64), torch.zeros(FF, FF, dtype=torch.float64)
    assert not obs_select._Surgeon(zero, weight, obs_select.DAMP).ok
    ffn, facts = [groups["ffn"]], inputs.facts
    assert np.array_equal(obs_select.select(zero, weight, ffn, facts, keep, site.ids), keep)
    moved = obs_select.select(torch.eye(FF, dtype=torch.float64), weight, ffn, facts, keep, site.ids)
    assert (~moved).sum() == (~keep).sum()  # with signal it runs (and keeps the counts)
