"""Gradual pruning in a plain PyTorch loop: state slicing exactness, shrinking shapes, decreasing loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ecospa_fx
from ecospa_fx.training import EcoSpaPruner, PruneSchedule, causal_lm_loss, logits_of

from .tiny import batches, tiny_llama

SCHEDULE = PruneSchedule(4, 16, 0.5, every=4)


def _snapshot(pruner, opt):
    params = dict(pruner.module.named_parameters())
    state = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in params.items()}
    return {n: p.detach().clone() for n, p in params.items()}, state, pruner.origin


def _kept(before: dict, after: dict, key, size: int) -> torch.Tensor:
    old = before.get(key, np.arange(size))
    return torch.as_tensor(np.flatnonzero(np.isin(old, after[key])))


def _check_restricted(snapshot, pruner, opt) -> int:
    """Every parameter and its Adam state equal the pre-prune ones restricted to the kept indices."""
    params_before, state_before, origin_before = snapshot
    origin, checked = pruner.origin, 0
    for name, p in pruner.module.named_parameters():
        expect_p, expect_s = params_before[name], dict(state_before[name])
        for dim in range(p.dim()):
            if p.shape[dim] != expect_p.shape[dim]:
                idx = _kept(origin_before, origin, (name, dim), expect_p.shape[dim])
                expect_p = expect_p.index_select(dim, idx)
                expect_s = {k: v if v.dim() == 0 else v.index_select(dim, idx) for k, v in expect_s.items()}
                checked += 1
        assert torch.equal(p.detach(), expect_p), name
        assert opt.state[p].keys() == expect_s.keys()
        for key, value in expect_s.items():
            assert torch.equal(opt.state[p][key], value), (name, key)
    return checked


def _train(pruner, opt, data, steps, check=None):
    losses = []
    for i in range(steps):
        x = data[i % len(data)]
        loss = causal_lm_loss(logits_of(pruner.model(x)), x)
        loss.backward()
        pruner.observe()
        opt.step()
        opt.zero_grad(set_to_none=True)
        snap = (
            _snapshot(pruner, opt)
            if check is not None and pruner.schedule.is_prune_step(pruner.step_count + 1)
            else None
        )
        if pruner.step() and snap is not None:
            check.append(_check_restricted(snap, pruner, opt))
        losses.append(loss.item())
    return losses


def test_adamw_state_follows_every_prune_and_loss_keeps_falling():
    model, data = tiny_llama(), batches(8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    pruner = EcoSpaPruner(model, (data[0],), opt, SCHEDULE, round_to=2, verify=True)
    gm, checks = pruner.module, []
    losses = _train(pruner, opt, data, 40, check=checks)
    assert pruner.module is gm and pruner.model is gm  # the loop's reference stays valid
    assert [e.step for e in pruner.history] == [8, 12, 16] and len(checks) == 3 and min(checks) > 0
    assert pruner.history[-1].params_after < pruner.history[0].params_before
    shapes = {n: tuple(p.shape) for n, p in gm.named_parameters() if "layers.0." in n}
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (16, 32)  # head_dim 8 -> 4
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (32, 16)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (32, 32)  # ffn 64 -> 32
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3
    assert np.mean(losses[-5:]) < np.mean(losses[16:21])  # still learning after the last prune


def test_pruned_model_saves_and_reloads(tmp_path):
    model, data = tiny_llama(), batches(4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    pruner = EcoSpaPruner(model, (data[0],), opt, PruneSchedule(0, 2, 0.5, every=1), round_to=2)
    _train(pruner, opt, data, 3)
    ecospa_fx.save(pruner.module, tmp_path / "pruned")
    reloaded = ecospa_fx.load(tmp_path / "pruned")
    with torch.no_grad():
        assert torch.allclose(logits_of(reloaded(data[1])), logits_of(pruner.module(data[1])), atol=1e-5)


@pytest.mark.parametrize("granularity", ["channel", "head"])
def test_taylor_scores_with_sgd_momentum(granularity):
    model, data = tiny_llama(), batches(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = EcoSpaPruner(model, (data[0],), opt, PruneSchedule(1, 3, 0.5), granularity=granularity, round_to=1)
    assert pruner.importance == "taylor"
    _train(pruner, opt, data, 5)
    q = pruner.module.get_parameter("model.layers.1.self_attn.q_proj.weight")
    assert q.shape == (16, 32)  # half the channels (or half the heads) of 32
    assert all(len(opt.state[p]["momentum_buffer"]) == len(p) for p in pruner.module.parameters())


def test_capture_keeps_every_submodule_mode_of_the_source():
    """The pruner captures in eval mode; the user's model keeps each submodule's own flag (a frozen
    submodule inside a training model stays frozen)."""
    model = tiny_llama().train()
    model.model.layers[0].eval()
    before = [m.training for m in model.modules()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    EcoSpaPruner(model, (batches(1)[0],), opt, SCHEDULE, verify=False)
    assert [m.training for m in model.modules()] == before
