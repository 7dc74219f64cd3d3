"""Each criterion ranks a planted unimportant unit last, and the activation energy is what it says."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from passes.importance import CRITERIA, score_groups
from passes.importance.activation import channel_energy

from .conftest import FF, HD, local, prepare

RANKED = ("magnitude", "activation", "fisher", "uncoupled")


def lowest(facts, group, scores, param: str) -> list[int]:
    return local(facts, group.units[int(np.argmin(scores))], param)


@pytest.mark.parametrize("criterion", RANKED)
def test_planted_ffn_channel_ranks_last(block, criterion):
    with torch.no_grad():
        block.up.weight[5].mul_(1e-3)
        block.up.bias[5] = 0.0
        block.down.weight[:, 5].mul_(1e-3)
    inputs, groups, _ = prepare(block)
    (scores,) = score_groups(criterion, [groups["ffn"]], inputs)
    assert lowest(inputs.facts, groups["ffn"], scores, "up.weight") == [5]


@pytest.mark.parametrize("criterion", RANKED)
def test_planted_qk_channel_ranks_last(block, criterion):
    """Channel 3 of every query head and of both KV heads is nearly silent."""
    with torch.no_grad():
        for w, b, heads in ((block.q.weight, block.q.bias, 4), (block.k.weight, block.k.bias, 2)):
            for h in range(heads):
                w[h * HD + 3].mul_(1e-3)
                b[h * HD + 3] = 0.0
    inputs, groups, _ = prepare(block)
    group = groups["qk"]
    (scores,) = score_groups(criterion, [group], inputs)
    last_two = {tuple(local(inputs.facts, group.units[u], "k.weight")) for u in np.argsort(scores)[:2]}
    assert last_two == {(3,), (HD + 3,)}  # channel 3 of KV head 0 and of KV head 1


@pytest.mark.parametrize("criterion", RANKED)
def test_planted_vo_channel_ranks_last(block, criterion):
    with torch.no_grad():
        block.v.weight[HD + 6].mul_(1e-3)  # KV head 1, channel 6
        block.v.bias[HD + 6] = 0.0
    inputs, groups, _ = prepare(block)
    group = groups["vo"]
    (scores,) = score_groups(criterion, [group], inputs)
    assert lowest(inputs.facts, group, scores, "v.weight") == [HD + 6]


def test_dead_relu_channel_is_last_for_data_aware_criteria_only(block):
    """Large weights, but the ReLU never fires: magnitude keeps it, activation and Fisher drop it."""
    with torch.no_grad():
        block.up.weight[7].mul_(5.0)
        block.down.weight[:, 7].mul_(5.0)
        block.up.bias[7] = -1e4
    inputs, groups, _ = prepare(block)
    group = groups["ffn"]
    for criterion in ("activation", "fisher"):
        (scores,) = score_groups(criterion, [group], inputs)
        assert lowest(inputs.facts, group, scores, "up.weight") == [7]
        assert scores.min() == 0.0
    (mag,) = score_groups("magnitude", [group], inputs)
    assert lowest(inputs.facts, group, mag, "up.weight") != [7]


def test_ffn_energy_is_mean_square_activation_times_column_norm(block):
    inputs, groups, batches = prepare(block)
    energy = channel_energy(inputs, [groups["ffn"]])
    with torch.no_grad():
        hs = []
        for (x,) in batches:
            b, n, _ = x.shape
            q = block.q(x).view(b, n, 4, HD).transpose(1, 2)
            k = block.k(x).view(b, n, 2, HD).transpose(1, 2)
            v = block.v(x).view(b, n, 2, HD).transpose(1, 2)
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            x = x + block.o(y.transpose(1, 2).reshape(b, n, 4 * HD))
            hs.append(torch.relu(block.up(x)).double().pow(2).mean((0, 1)))
        expected = torch.stack(hs).mean(0) * block.down.weight.double().pow(2).sum(0)
    facts = inputs.facts
    up = next(s for s in facts.spaces if s.param == "up.weight" and s.dim == 0)
    down = next(s for s in facts.spaces if s.param == "down.weight" and s.dim == 1)
    got = energy[up.offset : up.offset + FF] + energy[down.offset : down.offset + FF]  # scattered on one side
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-6)


def test_qk_energy_pairs_each_query_head_with_its_kv_head(block):
    inputs, groups, batches = prepare(block, n_batches=1)
    energy = channel_energy(inputs, [groups["qk"]])
    (x,) = batches[0]
    with torch.no_grad():
        b, n, _ = x.shape
        q = block.q(x).view(b, n, 4, HD).transpose(1, 2).double()
        k = block.k(x).view(b, n, 2, HD).transpose(1, 2).double()
    qe = q.pow(2).mean((0, 2))  # [H, D]
    ke = k.pow(2).mean((0, 2)).repeat_interleave(2, 0)  # KV head of each query head
    facts = inputs.facts
    qs = next(s for s in facts.spaces if s.param == "q.weight" and s.dim == 0)
    ks = next(s for s in facts.spaces if s.param == "k.weight" and s.dim == 0)
    assert not energy[ks.offset : ks.offset + ks.size].any()  # scattered on the query side only
    np.testing.assert_allclose(energy[qs.offset : qs.offset + qs.size], (qe * ke).reshape(-1).numpy(), rtol=1e-6)


def test_random_is_seeded_and_uncoupled_reads_one_side(block):
    inputs, groups, _ = prepare(block)
    group = groups["ffn"]
    (a,) = score_groups("random", [group], inputs)
    (b,) = score_groups("random", [group], inputs)
    np.testing.assert_array_equal(a, b)
    with torch.no_grad():
        block.down.weight[:, 2].zero_()  # the consuming side is ignored by "uncoupled"
    inputs, groups, _ = prepare(block)
    (unc,) = score_groups("uncoupled", [groups["ffn"]], inputs)
    (mag,) = score_groups("magnitude", [groups["ffn"]], inputs)
    assert lowest(inputs.facts, groups["ffn"], mag, "up.weight") == [2]
    assert unc[[local(inputs.facts, u, "up.weight") == [2] for u in groups["ffn"].units].index(True)] > 0


def test_data_criteria_refuse_missing_inputs(block):
    inputs, groups, _ = prepare(block)
    inputs.calibration = None
    with pytest.raises(ValueError, match="calibration"):
        score_groups("activation", [groups["ffn"]], inputs)
    assert set(CRITERIA) == {"magnitude", "activation", "fisher", "uncoupled", "random"}


def test_fisher_leaves_no_gradients_behind(block):
    inputs, groups, _ = prepare(block)
    flags = {n: p.requires_grad for n, p in inputs.gm.named_parameters()}
    score_groups("fisher", list(groups.values()), inputs)
    assert all(p.grad is None for p in inputs.gm.parameters())
    assert flags == {n: p.requires_grad for n, p in inputs.gm.named_parameters()}


def test_calibration_stops_after_the_last_sink(block):
    """Nothing after the last sink runs (for an LM: final norm, LM head, logits); energies unchanged."""
    from passes.importance import activation
    from passes.importance.base import wanted_mask

    inputs, groups, batches = prepare(block)
    plans = activation.plan_sinks(inputs.facts, wanted_mask(inputs.facts, list(groups.values())))
    seen: list[str] = []

    class Counting(activation._Collector):
        def run_node(self, n):
            seen.append(n.name)
            return super().run_node(n)

    collector = Counting(inputs.gm, plans, np.zeros(inputs.facts.n_channels))
    collector.run_until(*batches[0])
    order = [n.name for n in inputs.gm.graph.nodes]
    assert seen[-1] == collector.last == max(plans, key=order.index)
    assert "output" not in seen and len(seen) < len(order)
    assert not collector.env  # nothing held between batches


def test_fisher_takes_each_sequence_of_a_batch_as_its_own_sample(block):
    """F_u = sum over sequences s of (sum over W_down[:, u] of grad_s * w)^2, each sequence's loss on its
    own, whatever the batching: checked against the eager block run one sequence at a time."""
    from .conftest import mse_loss

    inputs, groups, batches = prepare(block, n_batches=2)
    (got,) = score_groups("fisher", [groups["ffn"]], inputs)
    want = np.zeros(FF)
    for (x,) in batches:
        for s in range(x.shape[0]):
            block.zero_grad(set_to_none=True)
            mse_loss(block(x[s : s + 1]), (x[s : s + 1],)).backward()
            gw = (block.down.weight.grad * block.down.weight).sum(0).detach().double().numpy()
            want += gw**2
    block.zero_grad(set_to_none=True)
    order = [local(inputs.facts, u, "up.weight")[0] for u in groups["ffn"].units]
    assert np.allclose(got, want[order], rtol=1e-4, atol=1e-12)
    assert not np.allclose(got, _batch_as_one_sample(block, batches)[order], rtol=1e-2)


def _batch_as_one_sample(block, batches) -> np.ndarray:
    from .conftest import mse_loss

    out = np.zeros(FF)
    for (x,) in batches:
        block.zero_grad(set_to_none=True)
        mse_loss(block(x), (x,)).backward()
        out += ((block.down.weight.grad * block.down.weight).sum(0).detach().double().numpy()) ** 2
    block.zero_grad(set_to_none=True)
    return out
