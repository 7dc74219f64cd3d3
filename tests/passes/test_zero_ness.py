"""Zero-ness (issue 13): a sum over channels is exact only where the removed entries are 0 in the masked
model. Every family of the adversarial review comes out exact on inputs other than the example (a lucky
``t = 0``), or dense with the reason; with ``verify`` on and off; and the probes in ``passes.verify`` catch
an error that the example hides."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ecospa_fx
from ecospa_fx.training import EcoSpaPruner, PruneSchedule
from passes.verify import masked_copy, max_abs_diff, oracle_diff, probe_inputs

D, H, FF = 16, 2, 32
REASON = "removed entries are not zero"


def _heads(t):
    b, s, _ = t.shape
    return t.view(b, s, H, -1).transpose(1, 2)


def _merge(t):
    b, n, s, hd = t.shape
    return t.transpose(1, 2).reshape(b, s, n * hd)


class VSum(nn.Module):
    """``v = V x + t`` feeds attention, and ``v.sum(-1)`` (an offset sum) is also added to the output."""

    def __init__(self, offset: str = "input"):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.offset = offset

    def forward(self, x, t):
        v = self.v(x) + (t if self.offset == "input" else 1.0)
        a = F.scaled_dot_product_attention(_heads(self.q(x)), _heads(self.k(x)), _heads(v))
        return x + self.o(_merge(a)) + v.sum(-1, keepdim=True)


class FfnReduce(nn.Module):
    """An FFN with an extra reduction over its hidden channels: ``how(act(up(x) + t))``."""

    def __init__(self, act, how, down_buffer: bool = False, aux: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(D, FF)
        if down_buffer:
            self.register_buffer("down_w", torch.randn(FF, D) / FF**0.5)
        else:
            self.down = nn.Linear(FF, D)
        self.act, self.how, self.aux = act, how, aux

    def forward(self, x, t):
        h = self.act(self.up(x) + t) if t is not None else self.act(self.up(x))
        y = h @ self.down_w if hasattr(self, "down_w") else self.down(h)
        extra = self.how(h) if self.how is not None else None
        if extra is None:
            return x + y
        return (x + y, extra) if self.aux else x + y + extra


def _sum(h):
    return h.sum(-1, keepdim=True)


def _einsum_sum(h):
    return torch.einsum("bsf->bs", h).unsqueeze(-1)


FAMILIES = {
    "v_plus_t_sum": (lambda: VSum("input"), (1, 5, D), 1),
    "v_plus_const_sum": (lambda: VSum("const"), (1, 5, D), 1),
    "gelu_up_plus_t_buffer_down": (lambda: FfnReduce(F.gelu, None, down_buffer=True), (1, 5, 1), 1),
    "sigmoid_sum_aux_output": (lambda: FfnReduce(torch.sigmoid, _sum, aux=True), (1, 5, 1), 0),
    "exp_sum": (lambda: FfnReduce(torch.exp, _sum), (1, 5, 1), 0),
    "cos_sum": (lambda: FfnReduce(torch.cos, _sum), (1, 5, 1), 0),
    "softplus_sum": (lambda: FfnReduce(F.softplus, _sum), (1, 5, 1), 0),
    "gelu_plus_t_einsum_sum": (lambda: FfnReduce(F.gelu, _einsum_sum), (1, 5, 1), 1),
    "clamp_min_sum": (lambda: FfnReduce(lambda z: z.clamp(min=0.5), _sum), (1, 5, 1), 0),
}


def _inputs(t_shape, t_value):
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(1))
    t = torch.full((2, *t_shape[1:]), float(t_value))
    return x, t


def _compress(model, inputs, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ecospa_fx.compress(model, inputs, 0.5, round_to=1, **kw)


@pytest.mark.parametrize("verify", [False, True])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_reduction_over_nonzero_removed_channels_is_exact_or_dense(family, verify):
    make, t_shape, lucky = FAMILIES[family]
    model = make().eval()
    example = _inputs(t_shape, 0.0 if lucky else 1.0)  # t = 0 makes the offset families look exact
    compressed = _compress(model, example, verify=verify)
    report = compressed.ecospa_report
    removed = [(n, d, i) for (n, d), i in report.removed.items()]
    reference = masked_copy(model, removed)
    for t_value in (0.0, 1.0, -2.5):
        other = (_inputs(t_shape, t_value)[0] * 3.0, _inputs(t_shape, t_value)[1])
        with torch.no_grad():
            assert max_abs_diff(compressed(*other), reference(*other)) < 1e-4, report.summary()
    assert any(REASON in r for s in report.skipped for r in s.reasons), report.summary()


def test_zero_preserving_reduction_still_prunes():
    """Control: with removed entries really 0 (``gelu(up(x))``, bias zeroed too) the sum is exact and the
    ffn group is pruned; tracking zero-ness must block only what is inexact."""
    model = FfnReduce(F.gelu, _sum).eval()
    x, _ = _inputs((1, 5, 1), 0.0)

    class NoOffset(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(x, None)

    compressed = _compress(NoOffset().eval(), (x,))
    assert compressed.ecospa_report.count("ffn") == 1
    assert any(g.units_removed for g in compressed.ecospa_report.groups)


def test_pruner_does_not_prune_an_offset_sum():
    """EcoSpaPruner shares discovery with compress: the same group stays dense, so training can't go wrong."""
    model = FfnReduce(torch.sigmoid, _sum)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    pruner = EcoSpaPruner(model, _inputs((1, 5, 1), 0.0), opt, PruneSchedule(0, 1, 0.5), importance="magnitude")
    pruner.prune(0.5)
    assert sum(p.numel() for p in pruner.module.parameters()) == sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------- probes
class _Offset(nn.Module):
    def __init__(self, use_t: bool):
        super().__init__()
        self.w = nn.Parameter(torch.ones(D))
        self.use_t = use_t

    def forward(self, x, t):
        return x * self.w + (t if self.use_t else 0.0)


def test_probes_catch_what_a_lucky_example_hides():
    x, t = _inputs((1, 5, 1), 0.0)
    diff, _ = oracle_diff(_Offset(True), _Offset(False), (x, t), removed=[], probes=0)
    assert diff == 0.0  # the example alone is lucky
    diff, _ = oracle_diff(_Offset(True), _Offset(False), (x, t), removed=[])
    assert diff > 0.1


def test_probe_inputs_keep_shapes_dtypes_ranges_and_masks():
    ids = torch.tensor([[5, 9, 7, 6]])
    mask = torch.tensor([[0, 1, 1, 1]])
    flags = torch.tensor([[True, False, True, True]])
    x = torch.zeros(1, 4, 3)
    probes = probe_inputs((ids, mask, flags, x, None), n=3, seed=7)
    assert len(probes) == 3
    for p_ids, p_mask, p_flags, p_x, none in probes:
        assert p_ids.dtype == ids.dtype and p_ids.shape == ids.shape
        assert int(p_ids.min()) >= 5 and int(p_ids.max()) <= 9
        assert torch.equal(p_mask, mask) and torch.equal(p_flags, flags) and none is None
        assert p_x.shape == x.shape and p_x.dtype == x.dtype and float(p_x.abs().max()) > 0
    again = probe_inputs((ids, mask, flags, x, None), n=3, seed=7)
    assert all(torch.equal(a[3], b[3]) for a, b in zip(probes, again, strict=True))


# ------------------------------------------------------------- operands broadcast along the channels
class HeadView(nn.Module):
    """``h = gelu(up(x))`` viewed as [B, S, 4, 8]; ``mix(h, self)`` builds a tensor that is then both fed
    to the down projection and summed over its channels."""

    def __init__(self, mix):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = nn.Linear(D, FF), nn.Linear(FF, D)
        self.alpha = nn.Parameter(torch.ones(1) * 0.7)
        self.mix = mix

    def forward(self, x):
        b, n, _ = x.shape
        h = F.gelu(self.up(x)).view(b, n, 4, FF // 4)
        u = self.mix(h, self)
        return x + self.down(u.reshape(b, n, FF)) + u.sum((-2, -1)).unsqueeze(-1)


BROADCAST_FAMILIES = {
    "centred_by_head_sum": lambda h, m: h - h.sum(-1, keepdim=True),  # 0 - s != 0 at removed channels
    "plus_scalar_parameter": lambda h, m: h + m.alpha,  # a size-1 Parameter is not zeroed by the mask
    "cat_zero_and_offset_pieces": lambda h, m: torch.cat((h[..., :4], h[..., 4:] + 1.0), dim=-1),
}


@pytest.mark.parametrize("family", sorted(BROADCAST_FAMILIES))
def test_operand_broadcast_along_channels_is_not_zero(family):
    model = HeadView(BROADCAST_FAMILIES[family]).eval()
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(2))
    compressed = _compress(model, (x,), verify=False)
    report = compressed.ecospa_report
    removed = [(n, d, i) for (n, d), i in report.removed.items()]
    with torch.no_grad():
        assert max_abs_diff(compressed(x), masked_copy(model, removed)(x)) < 1e-4, report.summary()
    assert report.count("ffn") == 0, report.summary()


def test_product_with_head_sum_still_prunes():
    """Control: ``h * h.sum(-1)`` is 0 where h is, so the sum over it stays exact and the group prunes."""
    model = HeadView(lambda h, m: h * h.sum(-1, keepdim=True)).eval()
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(2))
    report = _compress(model, (x,)).ecospa_report
    assert report.count("ffn") == 1 and report.groups[0].units_removed > 0, report.summary()
