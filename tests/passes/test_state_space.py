"""A selective state-space layer (Mamba's algebra, tiny and hand-written): a depthwise causal convolution,
a zero initial state ``new_zeros(B, D, N)`` that meets two channel spaces, a scan along time padded and
split with ``F.pad`` / ``tensor_split``, and the state read out through ``C``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import ecospa_fx
from passes.capture import capture
from passes.dataflow import analyse
from passes.groups import build_groups


class TinySSM(nn.Module):
    """``y_t = C_t . s_t`` with ``s_t = exp(A) * s_{t-1} + x_t B_t`` per inner channel d and state n;
    ``out(y * silu(z))``. Inner channels d: in_proj's x and z rows, the conv filters, A's rows, x_proj's
    columns, out_proj's columns. State channels n: x_proj's B and C rows and A's columns."""

    def __init__(self, width: int = 8, inner: int = 12, state: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(width, 2 * inner, bias=False)
        self.conv = nn.Conv1d(inner, inner, 3, groups=inner, padding=2)
        self.x_proj = nn.Linear(inner, 2 * state, bias=False)
        self.A_log = nn.Parameter(torch.randn(inner, state) / 2)
        self.out = nn.Linear(inner, width, bias=False)
        self.state = state

    def forward(self, h):
        steps = h.shape[1]
        x, z = self.inp(h).transpose(1, 2).chunk(2, dim=1)
        x = F.silu(self.conv(x)[..., :steps])
        b, c = self.x_proj(x.transpose(1, 2)).split(self.state, dim=-1)
        decay = torch.exp(-torch.exp(self.A_log))
        s = x.new_zeros(x.shape[0], x.shape[1], self.state)
        head, tail = torch.tensor_split(F.pad(x, (0, 1)), [steps], dim=2)  # the padded step is dropped
        ys = []
        for t in range(steps):
            s = decay * s + head[:, :, t, None] * b[:, t, None, :]
            ys.append((s @ c[:, t, :, None]).squeeze(-1))
        y = torch.stack(ys, dim=-1) * F.silu(z) + torch.zeros_like(z)
        return h + self.out(y.transpose(1, 2)) + tail.sum() * 0


def test_state_space_layer_prunes_inner_and_state_channels_exactly():
    h = torch.randn(2, 5, 8)
    compressed = ecospa_fx.compress(TinySSM().eval(), (h,), 0.5, round_to=1)
    report = compressed.ecospa_report
    assert report.max_abs_diff < 1e-5
    assert compressed.get_parameter("conv.weight").shape == (6, 1, 3)
    assert compressed.get_parameter("inp.weight").shape == (12, 8)
    assert compressed.get_parameter("A_log").shape == (6, 2)
    assert compressed.get_parameter("x_proj.weight").shape == (4, 6)
    assert compressed.get_parameter("out.weight").shape == (8, 6)
    reasons = [r for s in report.skipped for r in s.reasons]
    assert not any("unknown op" in r or "more than one axis" in r for r in reasons), reasons


class OuterProduct(nn.Module):
    """``einsum('bi,bj->bij', x, u)`` of two row sets of one projection, then contracted with a weight:
    no single label says which channel each entry of the product is."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(8, 10, bias=False)
        self.mix = nn.Parameter(torch.randn(6, 4, 8) / 5)

    def forward(self, h):
        x, u = self.inp(h).split([6, 4], dim=-1)
        product = torch.einsum("bi,bj->bij", F.gelu(x), F.gelu(u))
        return h + torch.einsum("bij,ijk->bk", product, self.mix)


def test_outer_product_of_one_weights_rows_keeps_one_side_and_blocks_the_other():
    """The side carried on more axes keeps its labels; the other side's channels are blocked with a reason;
    the result is exact."""
    h = torch.randn(3, 8)
    _, groups = discover_groups(OuterProduct(), h)
    reasons = [r for g in groups for r in g.reasons]
    assert any("an outer product of two channel sets of one weight" in r for r in reasons), reasons
    compressed = ecospa_fx.compress(OuterProduct().eval(), (h,), 0.5, round_to=1)
    assert compressed.ecospa_report.max_abs_diff < 1e-5


def discover_groups(model: nn.Module, *inputs: torch.Tensor):
    analysis = analyse(capture(model, inputs))
    return analysis, build_groups(analysis.facts, "channel")
