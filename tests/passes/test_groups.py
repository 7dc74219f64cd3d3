"""Group discovery (``passes.groups``): units, kinds, blocked groups, head granularity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from passes.capture import capture
from passes.dataflow import analyse
from passes.groups import build_groups


def discover(model: nn.Module, *inputs: torch.Tensor, granularity: str = "channel"):
    gm = capture(model, inputs)
    analysis = analyse(gm)
    return analysis.facts, build_groups(analysis.facts, granularity)


def space(facts, param: str, dim: int):
    return next(s for s in facts.spaces if s.param == param and s.dim == dim)


def members(facts, group) -> set[tuple[str, int]]:
    spaces = [facts.spaces[s] for s in group.spaces]
    return {(sp.param, sp.dim) for sp in spaces if not sp.is_virtual}


def local(facts, unit: np.ndarray, param: str, dim: int) -> list[int]:
    sp = space(facts, param, dim)
    return sorted((unit[(unit >= sp.offset) & (unit < sp.offset + sp.size)] - sp.offset).tolist())


class ThreeLinear(nn.Module):
    """Linear(8->16) - GELU - Linear(16->12) - GELU - Linear(12->4)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 12)
        self.c = nn.Linear(12, 4)

    def forward(self, x):
        return self.c(F.gelu(self.b(F.gelu(self.a(x)))))


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    return discover(ThreeLinear(), torch.randn(2, 8))


def test_mlp_has_exactly_the_two_hidden_ffn_groups(mlp):
    facts, groups = mlp
    prunable = [g for g in groups if g.prunable]
    assert [g.kind for g in prunable] == ["ffn", "ffn"]
    first, second = prunable
    assert members(facts, first) == {("a.weight", 0), ("a.bias", 0), ("b.weight", 1)}
    assert members(facts, second) == {("b.weight", 0), ("b.bias", 0), ("c.weight", 1)}
    assert len(first.units) == 16 and len(second.units) == 12


def test_mlp_ffn_unit_is_row_bias_and_column_of_one_channel(mlp):
    facts, groups = mlp
    first, second = [g for g in groups if g.prunable]
    for unit in first.units:
        (i,) = local(facts, unit, "a.weight", 0)
        assert local(facts, unit, "a.bias", 0) == [i]
        assert local(facts, unit, "b.weight", 1) == [i]
        assert len(unit) == 3
    assert sorted(local(facts, np.concatenate(first.units), "a.weight", 0)) == list(range(16))
    for unit in second.units:
        (i,) = local(facts, unit, "b.weight", 0)
        assert local(facts, unit, "c.weight", 1) == [i]


def test_mlp_output_projection_is_blocked_by_the_output(mlp):
    facts, groups = mlp
    (last,) = [g for g in groups if space(facts, "c.weight", 0).id in g.spaces]
    assert not last.prunable
    assert any("reaches a model output" in r for r in last.reasons)


class TwoBlocksLeakingActivation(nn.Module):
    """Two residual FFN blocks; the first block's hidden activation is also returned."""

    def __init__(self):
        super().__init__()
        self.up1, self.down1 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.up2, self.down2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        h = F.gelu(self.up1(x))
        y = x + self.down1(h)
        return y + self.down2(F.gelu(self.up2(y))), h


def test_ffn_activation_returned_as_output_stays_blocked():
    torch.manual_seed(0)
    facts, groups = discover(TwoBlocksLeakingActivation(), torch.randn(2, 3, 8))
    ffn = {next(facts.spaces[s].param for s in g.spaces): g for g in groups if g.kind == "ffn"}
    assert set(ffn) == {"up1.weight", "up2.weight"}
    assert not ffn["up1.weight"].prunable
    assert any("reaches a model output" in r for r in ffn["up1.weight"].reasons)
    assert ffn["up2.weight"].prunable


def test_residual_stream_is_a_blocked_hidden_group():
    torch.manual_seed(0)
    facts, groups = discover(TwoBlocksLeakingActivation(), torch.randn(2, 3, 8))
    (hidden,) = [g for g in groups if g.kind == "hidden"]
    assert not hidden.prunable
    assert {("down1.weight", 0), ("down2.weight", 0)} <= members(facts, hidden)


def test_unknown_granularity_raises(mlp):
    facts, _ = mlp
    with pytest.raises(ValueError, match="granularity"):
        build_groups(facts, "row")


# ---------------------------------------------------------------------------------- heads
H, KV, HD, E = 4, 2, 4, 16


class SdpaGqa(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(E, H * HD, bias=False)
        self.k = nn.Linear(E, KV * HD, bias=False)
        self.v = nn.Linear(E, KV * HD, bias=False)
        self.o = nn.Linear(H * HD, E, bias=False)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, H, HD).transpose(1, 2)
        k = self.k(x).view(b, n, KV, HD).transpose(1, 2)
        v = self.v(x).view(b, n, KV, HD).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return x + self.o(y.transpose(1, 2).reshape(b, n, H * HD))


def test_head_granularity_units_are_whole_kv_groups():
    torch.manual_seed(0)
    facts, groups = discover(SdpaGqa(), torch.randn(2, 5, E), granularity="head")
    prunable = [g for g in groups if g.prunable]
    assert [g.kind for g in prunable] == ["head"]
    (heads,) = prunable
    assert members(facts, heads) == {("q.weight", 0), ("k.weight", 0), ("v.weight", 0), ("o.weight", 1)}
    assert len(heads.units) == KV
    rep = H // KV
    for unit in heads.units:
        (g,) = {c // HD for c in local(facts, unit, "k.weight", 0)}
        query = list(range(g * rep * HD, (g + 1) * rep * HD))
        assert local(facts, unit, "k.weight", 0) == list(range(g * HD, (g + 1) * HD))
        assert local(facts, unit, "v.weight", 0) == list(range(g * HD, (g + 1) * HD))
        assert local(facts, unit, "q.weight", 0) == query
        assert local(facts, unit, "o.weight", 1) == query


def test_channel_granularity_splits_the_same_attention_into_qk_and_vo():
    torch.manual_seed(0)
    facts, groups = discover(SdpaGqa(), torch.randn(2, 5, E), granularity="channel")
    by_kind = {g.kind: g for g in groups if g.prunable}
    assert set(by_kind) == {"qk", "vo"}
    assert len(by_kind["qk"].units) == KV * HD  # one unit per (KV head, channel)
    q, k = space(facts, "q.weight", 0), space(facts, "k.weight", 0)
    assert by_kind["qk"].blocks == {q.id: HD, k.id: HD}


def test_graph_without_coupled_channels_has_no_groups():
    """Only convolutions (not modelled): no channel is tied or produced, so no group (was a zip() error)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    _, groups = discover(model, torch.randn(1, 3, 8, 8))
    assert groups == []
    _, groups = discover(nn.ReLU(), torch.randn(2, 4))
    assert groups == []


class Bottleneck(nn.Module):
    """``x + up(rms(down(x)))`` and ``x + w2(gelu(w1(x)))``: channels an RMS norm rescales between two weights
    (a latent rank) and ordinary FFN channels."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.down, self.up = nn.Linear(16, 8, bias=False), nn.Linear(8, 16, bias=False)
        self.w1, self.w2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        z = self.down(x)
        z = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6)
        x = x + self.up(z)
        return x + self.w2(F.gelu(self.w1(x)))


def test_a_normalised_bottleneck_is_kind_latent_and_kinds_can_leave_it_dense():
    """Issue 12: a low-rank latent (rows of one weight through an RMS norm into another's columns) is its own
    kind; the mean of squares keeps its divisor, so it is exact; ``kinds`` without it leaves it whole."""
    import ecospa_fx

    x = torch.randn(2, 5, 16)
    _, groups = discover(Bottleneck(), x)
    assert sorted(g.kind for g in groups if g.prunable) == ["ffn", "latent"]
    both = ecospa_fx.compress(Bottleneck(), (x,), 0.5, round_to=1)
    assert both.ecospa_report.count("latent") == 1 and both.ecospa_report.max_abs_diff < 1e-6
    assert both.get_parameter("down.weight").shape == (4, 16)
    ffn_only = ecospa_fx.compress(Bottleneck(), (x,), 0.5, round_to=1, kinds=("ffn",))
    assert ffn_only.get_parameter("down.weight").shape == (8, 16)
    assert ffn_only.get_parameter("w1.weight").shape == (16, 16)
    assert any("kind 'latent' not selected" in r for s in ffn_only.ecospa_report.skipped for r in s.reasons)


def test_pruned_latent_ranks_have_no_transformers_config_field():
    import ecospa_fx
    from ecospa_fx.hf_config import config_changes
    from tests.zoo import case_by_name

    case = case_by_name("hf_minicpm3")
    model = case.build()
    report = ecospa_fx.compress(model, case.inputs(), 0.5).ecospa_report
    assert report.count("latent") == 4
    changes, reason = config_changes(report, model.config)
    assert changes == {} and "latent" in reason
