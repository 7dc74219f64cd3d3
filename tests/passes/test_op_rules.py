"""Op rules (``passes.op_rules``) on tiny exported graphs: what couples, what blocks, and that unknown ops
fail closed."""

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
    torch.manual_seed(0)
    gm = capture(model, inputs)
    analysis = analyse(gm)
    return analysis, build_groups(analysis.facts, granularity)


def space(facts, param: str, dim: int):
    return next(s for s in facts.spaces if s.param == param and s.dim == dim)


def members(facts, group) -> set[tuple[str, int]]:
    spaces = [facts.spaces[s] for s in group.spaces]
    return {(sp.param, sp.dim) for sp in spaces if not sp.is_virtual}


def groups_touching(facts, groups, param: str, dim: int = 0):
    sp = space(facts, param, dim)
    return [g for g in groups if sp.id in g.spaces]


class FFN(nn.Module):
    """x + down(mid(up(x))) with a pluggable ``mid`` between the two projections."""

    def __init__(self, mid, width: int = 8, hidden: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)
        self.mid = mid

    def forward(self, x):
        return x + self.down(self.mid(self.up(x)))


X = torch.randn(2, 3, 8)


# ---------------------------------------------------------------------------------- fail closed
def test_control_elementwise_activation_gives_a_prunable_ffn_group():
    analysis, groups = discover(FFN(F.gelu), X)
    (ffn,) = [g for g in groups if g.kind == "ffn"]
    assert ffn.prunable
    assert members(analysis.facts, ffn) == {("up.weight", 0), ("up.bias", 0), ("down.weight", 1)}


@pytest.mark.parametrize(
    ("mid", "op"),
    [
        (lambda h: torch.cummax(h, -1).values, "aten::cummax"),  # cumsum has a rule (a scan over tokens)
        (lambda h: torch.sort(h, -1).values, "aten::sort"),
        (lambda h: torch.flip(h, [-1]), "aten::flip"),
    ],
    ids=["cummax", "sort", "flip"],
)
def test_unknown_op_between_projections_fails_closed(mid, op):
    analysis, groups = discover(FFN(mid), X)
    assert not [g for g in groups if g.kind == "ffn" and g.prunable]
    up_groups = groups_touching(analysis.facts, groups, "up.weight")
    assert up_groups, "the up projection's channels must still be reported (as skipped)"
    for group in up_groups:
        assert not group.prunable
        assert any(op in reason and "unknown op" in reason for reason in group.reasons), group.reasons


def _centred_layer_norm(h):
    """LayerNorm written out: the variance is a mean over ``h - mean(h)``, which is not 0 where removed."""
    c = h - h.mean(-1, keepdim=True)
    return c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + 1e-5)


@pytest.mark.parametrize(
    ("mid", "reason"),
    [
        (lambda h: torch.softmax(h, -1), "softmax over a channel axis"),
        (_centred_layer_norm, "aten::mean over a channel axis"),
        (lambda h: h / h.var(-1, keepdim=True), "aten::var over a channel axis"),
    ],
    ids=["softmax", "centred_variance", "var"],
)
def test_normalising_over_channel_axis_blocks(mid, reason):
    analysis, groups = discover(FFN(mid), X)
    up_groups = groups_touching(analysis.facts, groups, "up.weight")
    assert up_groups
    for group in up_groups:
        assert not group.prunable
        assert any(reason in r for r in group.reasons), group.reasons


@pytest.mark.parametrize(
    ("mid", "kind"),
    [
        (lambda h: h - h.mean(-1, keepdim=True), "ffn"),  # the mean keeps its divisor; removed entries meet 0s
        (lambda h: h / h.norm(dim=-1, keepdim=True), "ffn"),  # the norm of zeros adds nothing
        # an RMS norm between two weights: a normalised bottleneck, reported as kind latent
        (lambda h: h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6), "latent"),
    ],
    ids=["mean_offset", "l2_scale", "rms"],
)
def test_mean_and_norm_over_zero_channels_are_exact(mid, kind):
    import warnings

    import ecospa_fx
    from passes.verify import masked_copy, max_abs_diff

    model = FFN(mid).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compressed = ecospa_fx.compress(model, (X,), 0.5, round_to=1)
    report = compressed.ecospa_report
    assert report.count(kind) == 1 and report.groups[0].units_removed == 8, report.summary()
    removed = [(n, d, i) for (n, d), i in report.removed.items()]
    probe = torch.randn(X.shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert max_abs_diff(compressed(probe), masked_copy(model, removed)(probe)) < 1e-5


def test_sum_over_channel_axis_is_a_sink_not_a_blocker():
    """Summing channels is exact (removed channels contribute 0): the group stays prunable."""

    class SumHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(8, 16)

        def forward(self, x):
            return x + F.relu(self.up(x)).sum(-1, keepdim=True)

    analysis, groups = discover(SumHead(), X)
    (group,) = groups_touching(analysis.facts, groups, "up.weight")
    assert group.kind == "ffn" and group.prunable


class InPlace(nn.Module):
    def __init__(self, other_reader: bool):
        super().__init__()
        self.other_reader = other_reader
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)

    def forward(self, x):
        h = F.relu(self.up(x))
        if self.other_reader:
            g = h * 2
            h.add_(1.0)
            return self.down(h) + self.down(g)
        h.mul_(2.0)
        return self.down(h)


def test_inplace_op_with_another_reader_blocks():
    analysis, groups = discover(InPlace(other_reader=True), X)
    (group,) = groups_touching(analysis.facts, groups, "up.weight")
    assert not group.prunable
    assert any("in-place op on a tensor that has other readers" in r for r in group.reasons)


def test_inplace_op_with_single_reader_is_exact():
    analysis, groups = discover(InPlace(other_reader=False), X)
    (group,) = groups_touching(analysis.facts, groups, "up.weight")
    assert group.kind == "ffn" and group.prunable


def test_reshape_that_mixes_channels_blocks():
    """view [2, 3] -> transpose -> view [2, 3]: no per-axis label can describe the result."""

    class Scramble(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(8, 6)
            self.down = nn.Linear(6, 8)

        def forward(self, x):
            b, n, _ = x.shape
            h = self.up(x).view(b, n, 2, 3).transpose(-1, -2).reshape(b, n, 2, 3).reshape(b, n, 6)
            return self.down(h)

    analysis, groups = discover(Scramble(), X)
    up_groups = groups_touching(analysis.facts, groups, "up.weight")
    assert up_groups and not any(g.prunable for g in up_groups)
    assert any("reshape mixes channels" in r for g in up_groups for r in g.reasons)


# ---------------------------------------------------------------------------------- layout
def test_view_into_heads_labels_head_and_channel_axes():
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(8, 12)

        def forward(self, x):
            b, n, _ = x.shape
            return self.q(x).view(b, n, 3, 4).sum(-1)

    analysis, _ = discover(Heads(), X)
    q = space(analysis.facts, "q.weight", 0)
    (view,) = [n for n in analysis.graph_module.graph.nodes if n.target == torch.ops.aten.view.default]
    labels = analysis.labels[view.name]
    assert labels[0] is None and labels[1] is None
    assert labels[2].space == q.id and labels[3].space == q.id
    np.testing.assert_array_equal(labels[2].arr, [0, 4, 8])
    np.testing.assert_array_equal(labels[3].arr, [0, 1, 2, 3])
    assert analysis.facts.block_size[q.id] == 4


# ---------------------------------------------------------------------------------- attention
H, KV, HD, E = 4, 2, 4, 16


class EinsumAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(E, H * HD)
        self.k = nn.Linear(E, H * HD)
        self.v = nn.Linear(E, H * HD)
        self.o = nn.Linear(H * HD, E)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, H, HD)
        k = self.k(x).view(b, n, H, HD)
        v = self.v(x).view(b, n, H, HD)
        probs = torch.einsum("bqhd,bkhd->bhqk", q, k).softmax(-1)
        y = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, H * HD)
        return x + self.o(y)


def test_einsum_attention_gives_qk_and_vo_groups():
    analysis, groups = discover(EinsumAttention(), torch.randn(2, 5, E))
    facts = analysis.facts
    by_kind = {g.kind: g for g in groups if g.prunable}
    assert set(by_kind) == {"qk", "vo"}
    qk, vo = by_kind["qk"], by_kind["vo"]
    assert members(facts, qk) == {("q.weight", 0), ("q.bias", 0), ("k.weight", 0), ("k.bias", 0)}
    assert members(facts, vo) == {("v.weight", 0), ("v.bias", 0), ("o.weight", 1)}
    assert len(qk.units) == H * HD and len(vo.units) == H * HD
    q, k = space(facts, "q.weight", 0), space(facts, "k.weight", 0)
    v, o = space(facts, "v.weight", 0), space(facts, "o.weight", 1)
    for unit in qk.units:  # q channel (h, d) goes with k channel (h, d)
        q_ids = unit[(unit >= q.offset) & (unit < q.offset + q.size)] - q.offset
        k_ids = unit[(unit >= k.offset) & (unit < k.offset + k.size)] - k.offset
        assert len(q_ids) == 1 and q_ids.tolist() == k_ids.tolist()
    for unit in vo.units:  # v row i goes with o column i
        v_ids = unit[(unit >= v.offset) & (unit < v.offset + v.size)] - v.offset
        o_ids = unit[(unit >= o.offset) & (unit < o.offset + o.size)] - o.offset
        assert len(v_ids) == 1 and v_ids.tolist() == o_ids.tolist()


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


def test_sdpa_enable_gqa_ties_query_head_to_its_kv_head():
    analysis, _ = discover(SdpaGqa(), torch.randn(2, 5, E))
    facts = analysis.facts
    q, k = space(facts, "q.weight", 0), space(facts, "k.weight", 0)
    rep = H // KV
    found = set()
    for a, b in facts.ties["aligned"]:
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            if q.offset <= y < q.offset + q.size:
                x, y = y, x
            if q.offset <= x < q.offset + q.size and k.offset <= y < k.offset + k.size:
                found.add((x - q.offset, y - k.offset))
    expected = {(h * HD + d, (h // rep) * HD + d) for h in range(H) for d in range(HD)}
    assert found == expected


def test_sdpa_enable_gqa_vo_units_span_the_query_heads_of_one_kv_head():
    analysis, groups = discover(SdpaGqa(), torch.randn(2, 5, E))
    facts = analysis.facts
    (vo,) = [g for g in groups if g.kind == "vo"]
    assert vo.prunable
    v, o = space(facts, "v.weight", 0), space(facts, "o.weight", 1)
    rep = H // KV
    expected = sorted(
        sorted([v.offset + g * HD + d] + [o.offset + h * HD + d for h in range(g * rep, (g + 1) * rep)])
        for g in range(KV)
        for d in range(HD)
    )
    assert sorted(sorted(u.tolist()) for u in vo.units) == expected


class _SigmoidScores(nn.Module):
    """scores = sigmoid(q) @ sigmoid(k)^T with no softmax: sigmoid(0) != 0 on both sides, so removing a
    channel is not the same as zeroing it upstream (the f(0) == 0 rule must block the qk group)."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(16, 16)
        self.k = nn.Linear(16, 16)

    def forward(self, x):
        return torch.sigmoid(self.q(x)) @ torch.sigmoid(self.k(x)).transpose(-2, -1)


def test_contraction_of_non_zero_preserving_sides_blocks():

    x = torch.randn(2, 5, 16)
    groups = build_groups(analyse(capture(_SigmoidScores().eval(), (x,))).facts, "channel")
    qk = [g for g in groups if g.kind == "qk"]
    assert qk and all(not g.prunable for g in qk)
    assert any("f(0) != 0" in r for g in qk for r in g.reasons)


class PerHeadScaled(nn.Module):
    """q and k scaled by a per-head weight [H, D] (Cohere's qk LayerNorm weight) before q . k."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))
        self.wq = nn.Parameter(torch.randn(4, 4))
        self.wk = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, 4, 4) * self.wq
        k = self.k(x).view(b, s, 4, 4) * self.wk
        v = self.v(x).view(b, s, 4, 4)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return x + self.o(a.transpose(1, 2).reshape(b, s, 16))


def test_per_head_weight_goes_with_its_head():
    """A weight [H, D] meets q on the head axis: at head granularity its row h is removed with head h (it
    used to stay whole and the compressed model failed to run); at channel granularity it is sliced along D."""
    import warnings

    import ecospa_fx

    x = torch.randn(2, 5, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        heads = ecospa_fx.compress(PerHeadScaled().eval(), (x,), 0.5, granularity="head")
        channels = ecospa_fx.compress(PerHeadScaled().eval(), (x,), 0.5, round_to=1)
    assert heads.ecospa_report.count("head") == 1
    assert heads.get_parameter("wq").shape == (2, 4) and heads.get_parameter("wk").shape == (2, 4)
    assert heads.ecospa_report.max_abs_diff < 1e-6
    assert channels.get_parameter("wq").shape == (4, 2)
    assert channels.ecospa_report.max_abs_diff < 1e-6


class SinkAttention(nn.Module):
    """Attention with a learned per-head sink logit concatenated to the scores (GPT-OSS style)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))
        self.sinks = nn.Parameter(torch.randn(4))

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, 4, 4).transpose(1, 2) for p in (self.q, self.k, self.v))
        scores = q @ k.transpose(-1, -2) * 0.5
        sinks = self.sinks.reshape(1, -1, 1, 1).expand(b, -1, s, 1)
        probs = torch.cat([scores, sinks], dim=-1).softmax(-1)[..., :-1]
        return x + self.o((probs @ v).transpose(1, 2).reshape(b, s, 16))


def test_attention_sink_logits_go_with_their_heads():
    """Issue 12: the sink logit of head h is removed with head h (head granularity); channel pruning
    inside the heads leaves it whole. Both exact (verify runs the oracle with probes)."""
    import warnings

    import ecospa_fx

    x = torch.randn(2, 5, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        heads = ecospa_fx.compress(SinkAttention().eval(), (x,), 0.5, granularity="head")
        channels = ecospa_fx.compress(SinkAttention().eval(), (x,), 0.5, round_to=1)
    assert heads.ecospa_report.count("head") == 1 and heads.get_parameter("sinks").shape == (2,)
    assert channels.ecospa_report.count("qk") == 1 and channels.get_parameter("sinks").shape == (4,)
    assert heads.ecospa_report.max_abs_diff < 1e-6 and channels.ecospa_report.max_abs_diff < 1e-6


class TokenGather(nn.Module):
    """``h[:, ids]`` gathers tokens (an unlabelled axis) by data-dependent ids; ``h[..., ids]`` would gather
    channels."""

    def __init__(self, on_channels: bool):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)
        self.on_channels = on_channels

    def forward(self, x, ids):
        h = F.gelu(self.up(x))
        h = h[..., ids] if self.on_channels else h[:, ids]
        return self.down(h) if not self.on_channels else h.sum(-1)


def test_data_dependent_gather_of_tokens_keeps_channels_and_of_channels_blocks():
    import warnings

    import ecospa_fx

    x = torch.randn(2, 5, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokens = ecospa_fx.compress(TokenGather(False).eval(), (x, torch.tensor([4, 0, 2])), 0.5, round_to=1)
        channels = ecospa_fx.discover(TokenGather(True).eval(), (x, torch.tensor([3, 1])))
    assert tokens.ecospa_report.count("ffn") == 1 and tokens.ecospa_report.max_abs_diff < 1e-6
    assert channels.count("ffn") == 0
    assert any("data-dependent" in r for s in channels.skipped for r in s.reasons), channels.summary()


class GroupedExperts(nn.Module):
    """A routed expert FFN through transformers' grouped matmul: rows sorted by their top-1 expert,
    ``offs`` the cumulative row counts, ``x + down_e(gelu(up_e(x)))`` per row's expert ``e``."""

    def __init__(self, experts: int = 3, width: int = 8, hidden: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.router = nn.Linear(width, experts, bias=False)
        self.up = nn.Parameter(torch.randn(experts, width, hidden) / 3)
        self.down = nn.Parameter(torch.randn(experts, hidden, width) / 4)

    def forward(self, x):
        import transformers.integrations.moe  # noqa: F401  (registers transformers::grouped_mm_fallback)

        grouped_mm = torch.ops.transformers.grouped_mm_fallback
        experts = self.up.shape[0]
        ids = self.router(x).argmax(-1)
        order = ids.argsort()
        offs = torch.histc(ids.float(), bins=experts, min=0, max=experts - 1).cumsum(0).to(torch.int32)
        y = grouped_mm(F.gelu(grouped_mm(x[order], self.up, offs)), self.down, offs)
        return x + y[order.argsort()]


def test_grouped_matmul_experts_lose_the_same_channels_and_keep_whole_experts():
    """Issue 12: ``out[s] = x[s] @ W[e(s)]`` contracts x's channels with W's axis 1 and carries W's axis 2;
    the expert axis is chosen per row by routing, so experts stay whole (with a reason). Exact (compress
    verifies against the masked dense model)."""
    import ecospa_fx

    x = torch.randn(10, 8)
    compressed = ecospa_fx.compress(GroupedExperts().eval(), (x,), 0.5, round_to=1)
    report = compressed.ecospa_report
    assert report.count("ffn") == 1 and report.max_abs_diff < 1e-6
    assert compressed.get_parameter("up").shape == (3, 8, 8)
    assert compressed.get_parameter("down").shape == (3, 8, 8)
    reasons = [r for s in report.skipped for r in s.reasons]
    assert any("whole experts stay" in r for r in reasons), report.summary()


class RuntimeSplit(nn.Module):
    """``h.split(sizes)`` with sizes computed at run time (tokens per expert, as JetMoE splits its rows):
    along the token axis (unbacked sizes), or along the channel axis."""

    def __init__(self, on_channels: bool):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)
        self.on_channels = on_channels

    def forward(self, x):
        h = F.gelu(self.up(x))
        d = -1 if self.on_channels else 0
        n = (x[:, 0] > 0).sum()
        sizes = torch.stack([n, h.shape[d] - n]).tolist()
        for s in sizes:
            torch._check_is_size(s)
        a, b = h.split(sizes, d)
        return x + self.down(torch.cat([a * 2, b], d))


def test_data_dependent_split_of_tokens_keeps_channels_and_of_channels_blocks():
    """Sizes known only at run time once crashed the analysis; the token split is exact, the channel
    split is left dense with its reason."""
    import ecospa_fx

    x = torch.randn(6, 8)
    tokens = ecospa_fx.compress(RuntimeSplit(False).eval(), (x,), 0.5, round_to=1)
    assert tokens.ecospa_report.count("ffn") == 1 and tokens.ecospa_report.max_abs_diff < 1e-6
    channels = ecospa_fx.discover(RuntimeSplit(True).eval(), (x,))
    assert channels.count("ffn") == 0
    reasons = [r for s in channels.skipped for r in s.reasons]
    assert any("split with data-dependent sizes along a channel axis" in r for r in reasons), reasons


class LoopedExperts(nn.Module):
    """A dense mixture written as a loop over a 3-D bank: ``x + sum_e g_e * down[e](gelu(up[e] x))``, each
    expert's matrices read with a constant index ``W[e]`` (aten.select on the bank's expert axis)."""

    def __init__(self, experts: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.gate = nn.Linear(8, experts)
        self.up = nn.Parameter(torch.randn(experts, 8, 16) / 3)
        self.down = nn.Parameter(torch.randn(experts, 16, 8) / 4)

    def forward(self, x):
        g = self.gate(x).softmax(-1)
        out = x
        for e in range(self.up.shape[0]):
            out = out + g[..., e : e + 1] * (F.gelu(x @ self.up[e]) @ self.down[e])
        return out


def test_one_expert_read_out_of_a_bank_blocks_only_the_expert_axis():
    """``W[e]`` picks one position of the bank's own expert axis: that axis cannot be renumbered (blocked,
    with its reason), but the FFN channels on the other axes are not mixed and stay prunable (one index set
    for all experts). It once blocked every axis of the bank."""
    import ecospa_fx

    x = torch.randn(2, 5, 8)
    compressed = ecospa_fx.compress(LoopedExperts().eval(), (x,), 0.5, round_to=1)
    report = compressed.ecospa_report
    assert report.count("ffn") == 1 and report.max_abs_diff < 1e-6
    assert compressed.get_parameter("up").shape == (3, 8, 8)
    assert compressed.get_parameter("down").shape == (3, 8, 8)
    reasons = [r for s in report.skipped for r in s.reasons]
    assert any("a single channel is selected out of its space" in r for r in reasons), reasons


class RoutedExpertModules(nn.Module):
    """Routed experts as modules (transformers 4.x Mixtral): each expert takes the tokens routed to it
    (``torch.where`` on the one-hot routing, data-dependent counts), and scatters its output back with
    ``index_add_`` along the token axis."""

    def __init__(self, d: int = 8, f: int = 16, experts: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.gate = nn.Linear(d, experts, bias=False)
        self.up = nn.ModuleList(nn.Linear(d, f, bias=False) for _ in range(experts))
        self.down = nn.ModuleList(nn.Linear(f, d, bias=False) for _ in range(experts))

    def forward(self, x):
        h = x.reshape(-1, x.shape[-1])
        weights, chosen = torch.topk(self.gate(h).softmax(-1), 2, dim=-1)
        out = torch.zeros_like(h)
        mask = F.one_hot(chosen, num_classes=len(self.up)).permute(2, 1, 0)
        for e, (up, down) in enumerate(zip(self.up, self.down, strict=True)):
            slot, tokens = torch.where(mask[e])
            y = down(F.gelu(up(h[tokens]))) * weights[tokens, slot, None]
            out.index_add_(0, tokens, y)
        return x + out.reshape(x.shape)


def test_index_add_of_routed_tokens_keeps_each_experts_channels():
    """``index_add_`` along the token axis meets self and source channel by channel: each expert module
    keeps its own FFN channel set (one group per expert), exactly, and the residual stream through the
    scatter is reported as the hidden dimension instead of an unknown op."""
    import ecospa_fx

    x = torch.randn(2, 5, 8)
    compressed = ecospa_fx.compress(RoutedExpertModules().eval(), (x,), 0.5, round_to=1)
    report = compressed.ecospa_report
    assert report.count("ffn") == 3 and report.max_abs_diff < 1e-6
    assert [compressed.get_parameter(f"up.{e}.weight").shape for e in range(3)] == [(8, 8)] * 3
    reasons = [r for s in report.skipped for r in s.reasons]
    assert not any("index_add" in r for r in reasons), reasons
    assert any(s.kind == "hidden" for s in report.skipped)


def test_index_add_along_a_channel_axis_blocks():
    """Rows matched by a run-time index along a channel axis cannot be renumbered: the FFN stays dense."""

    class ScatterChannels(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x):
            h = F.gelu(self.up(x))
            picked = torch.argsort(x[0, :2]).repeat(8)  # 16 run-time positions on the channel axis
            h = torch.zeros_like(h).index_add(-1, picked, h)
            return self.down(h)

    _, groups = discover(ScatterChannels(), torch.randn(3, 8))
    assert not any(g.kind == "ffn" and g.prunable for g in groups)
    assert any("index_add along a channel axis" in r for g in groups for r in g.reasons)


class ShortConv(nn.Module):
    """A gated short causal convolution (LFM2, Hyena, Mamba's conv): ``out(C * conv(B * x))`` with
    ``B, C, x = in(h).chunk(3)`` and a depthwise ``conv`` (one filter per channel, groups == channels)."""

    def __init__(self, width: int = 8, channels: int = 12, kernel: int = 3, groups: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(width, 3 * channels)
        self.conv = nn.Conv1d(channels, channels, kernel, groups=groups or channels, padding=kernel - 1)
        self.out = nn.Linear(channels, width)

    def forward(self, h):
        b, c, x = self.inp(h).transpose(-1, -2).chunk(3, dim=-2)
        y = self.conv(b * x)[..., : h.shape[1]]
        return h + self.out((c * y).transpose(-1, -2))


def test_depthwise_convolution_carries_channels_and_prunes_with_its_projections():
    """Channel c of a depthwise convolution reads only channel c (of x, the filter and the bias): the three
    chunks of the in-projection, the filters and the out-projection's columns lose the same channels, the
    compressed conv has groups == kept channels, and it is exact."""
    import ecospa_fx

    h = torch.randn(2, 6, 8)
    compressed = ecospa_fx.compress(ShortConv().eval(), (h,), 0.5, round_to=1)
    report = compressed.ecospa_report
    assert report.count("ffn") == 1 and report.max_abs_diff < 1e-6
    assert compressed.get_parameter("conv.weight").shape == (6, 1, 3)
    assert compressed.get_parameter("conv.bias").shape == (6,)
    assert compressed.get_parameter("inp.weight").shape == (18, 8)
    assert compressed.get_parameter("out.weight").shape == (8, 6)
    assert compressed(h).shape == h.shape


def test_grouped_but_not_depthwise_convolution_still_blocks():
    """A grouped convolution mixes the channels of a group: only the gate C's channels (a product after
    the convolution) stay prunable; B and x, read by the convolution, are not removed."""
    _, groups = discover(ShortConv(groups=4), torch.randn(2, 6, 8))
    reasons = [r for g in groups for r in g.reasons]
    assert any("aten::conv1d consumes channel-carrying input" in r for r in reasons), reasons


def test_running_sum_over_tokens_keeps_channels_and_over_channels_blocks():
    """``cumsum`` along the token axis is channelwise (a scan of zeros is 0): the FFN stays prunable and
    exact; along the FFN's channel axis it mixes channels and blocks with its reason."""
    _, over_tokens = discover(FFN(lambda h: F.gelu(h).cumsum(1)), X)
    assert any(g.kind == "ffn" and g.prunable for g in over_tokens)
    _, over_channels = discover(FFN(lambda h: F.gelu(h).cumsum(-1)), X)
    assert not any(g.kind == "ffn" and g.prunable for g in over_channels)
    reasons = [r for g in over_channels for r in g.reasons]
    assert any("aten::cumsum along a channel axis" in r for r in reasons), reasons


@pytest.mark.parametrize(
    ("mid", "reason"),
    [
        (lambda h: F.pad(F.gelu(h), (0, 2))[..., :16], "constant padding of an axis that carries channels"),
        (lambda h: torch.cat(torch.tensor_split(F.gelu(h), [5], dim=-1), -1), "tensor_split along a channel axis"),
        (lambda h: F.pad(F.gelu(h), (0, 0, 1, 0), value=1.0)[:, 1:], None),  # token axis: prunable
    ],
    ids=["pad_channels", "tensor_split_channels", "pad_tokens"],
)
def test_time_axis_ops_keep_channels_only_off_the_channel_axis(mid, reason):
    """``F.pad`` and ``tensor_split`` along the token axis keep the FFN prunable (and exact: a padded
    position is sliced away before it meets a channel sum); along the channel axis they block, naming why."""
    _, groups = discover(FFN(mid), X)
    prunable = any(g.kind == "ffn" and g.prunable for g in groups)
    reasons = [r for g in groups for r in g.reasons]
    if reason is None:
        assert prunable, reasons
        import ecospa_fx

        assert ecospa_fx.compress(FFN(mid).eval(), (X,), 0.5, round_to=1).ecospa_report.max_abs_diff < 1e-6
    else:
        assert not prunable and any(reason in r for r in reasons), reasons
