"""Multi-head latent attention in miniature (issue 12, item 4): the key joins per-head channels of one weight
with a rotary part shared by every head from another weight; the joint space, the buffer-fill rewrite, the
complex-pair rules and the uneven-width plan make it exact. Each test checks counts, shapes and the oracle."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ecospa_fx
from passes.capture import capture
from passes.verify import masked_copy, max_abs_diff

H, NOPE, ROT, V, LATENT, S = 4, 4, 4, 4, 8, 5


class LatentAttention(nn.Module):
    """x + o(sdpa(cat(q_nope, rot(q_rot)), key, v)) with ``key = [k_nope | rot(k_rot) on every head]``:
    q per head from ``q``, k_nope and v per head from ``kv_b(latent)``, k_rot from ``kv_a`` shared by all
    heads. ``fill``: the key is written into ``new_empty`` through two slices (as DeepSeek does) instead of a
    cat; ``rotary``: ``"half"`` (cos/sin, rotate_half) or ``"complex"`` (view_as_complex pairs)."""

    def __init__(self, fill: bool = True, rotary: str = "half"):
        super().__init__()
        torch.manual_seed(0)
        self.q = nn.Linear(16, H * (NOPE + ROT))
        self.kv_a = nn.Linear(16, LATENT + ROT)
        self.kv_b = nn.Linear(LATENT, H * (NOPE + V), bias=False)
        self.o = nn.Linear(H * V, 16)
        self.fill, self.rotary = fill, rotary
        angles = torch.outer(torch.arange(S, dtype=torch.float32), torch.tensor([1.0, 0.1]))
        self.register_buffer("cos", torch.cat([angles, angles], -1).cos())
        self.register_buffer("sin", torch.cat([angles, angles], -1).sin())
        self.register_buffer("freqs", torch.polar(torch.ones_like(angles), angles))

    def rotate(self, t: torch.Tensor) -> torch.Tensor:
        if self.rotary == "complex":
            z = torch.view_as_complex(t.reshape(*t.shape[:-1], -1, 2)) * self.freqs
            return torch.view_as_real(z).flatten(3)
        half = torch.cat([-t[..., ROT // 2 :], t[..., : ROT // 2]], -1)
        return t * self.cos + half * self.sin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q_nope, q_rot = self.q(x).view(b, s, H, NOPE + ROT).transpose(1, 2).split([NOPE, ROT], -1)
        latent, k_rot = self.kv_a(x).split([LATENT, ROT], -1)
        kv = self.kv_b(latent).view(b, s, H, NOPE + V).transpose(1, 2)
        k_nope, v = kv.split([NOPE, V], -1)
        k_rot = self.rotate(k_rot.view(b, 1, s, ROT)).expand(-1, H, -1, -1)
        if self.fill:
            key = kv.new_empty(b, H, s, NOPE + ROT)
            key[..., :NOPE].copy_(k_nope)
            key[..., NOPE:].copy_(k_rot)
        else:
            key = torch.cat([k_nope, k_rot], -1)
        query = torch.cat([q_nope, self.rotate(q_rot)], -1)
        a = F.scaled_dot_product_attention(query, key, v, scale=0.3)
        return x + self.o(a.transpose(1, 2).reshape(b, s, H * V))


def _compress(model: nn.Module, granularity: str):
    x = torch.randn(2, S, 16, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = ecospa_fx.compress(model.eval(), (x,), 0.5, granularity=granularity, round_to=1, verify=False)
    removed = [(n, d, i) for (n, d), i in out.ecospa_report.removed.items()]
    with torch.no_grad():
        diff = max_abs_diff(out(x), masked_copy(model, removed)(x))
    return out, diff


def test_buffer_fill_is_captured_as_the_cat_it_computes():
    model = LatentAttention(fill=True).eval()
    x = torch.randn(2, S, 16)
    gm = capture(model, (x,))
    targets = {str(n.target) for n in gm.graph.nodes}
    assert not any("copy_" in t or "new_empty" in t for t in targets)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


class PartialFill(nn.Module):
    """Only the first half of the buffer is written: the rest keeps new_zeros' contents, no cat can say so."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 8), nn.Linear(16, 8)

    def forward(self, x):
        buf = x.new_zeros(*x.shape[:-1], 16)
        buf[..., :8].copy_(F.gelu(self.up(x)))
        return self.down(buf)


def test_partial_fill_is_left_alone_and_fails_closed():
    model = PartialFill().eval()
    x = torch.randn(2, 3, 8)
    gm = capture(model, (x,))
    assert any("copy_" in str(n.target) for n in gm.graph.nodes)
    report = ecospa_fx.discover(model, (x,))
    assert report.count("ffn") == 0
    assert any("copy_" in r or "new_zeros" in r for s in report.skipped for r in s.reasons), report.summary()


@pytest.mark.parametrize("rotary", ["half", "complex"])
@pytest.mark.parametrize("fill", [True, False])
def test_latent_attention_channels_are_exact(fill, rotary):
    """Per head: 2 of 4 nope channels (q rows with kv_b's k_nope rows) and 1 of 2 rotary pairs (the same
    pair in every head and in kv_a's shared k_rot rows: a broadcast key ties heads); v with o."""
    out, diff = _compress(LatentAttention(fill, rotary), "channel")
    report = out.ecospa_report
    assert report.count("qk") == 1 and report.count("vo") == 1
    assert out.get_parameter("q.weight").shape[0] == H * (NOPE + ROT) // 2
    assert out.get_parameter("kv_a.weight").shape[0] == LATENT // 2 + ROT // 2  # latent (ffn) and one pair
    assert out.get_parameter("kv_b.weight").shape[0] == H * (NOPE + V) // 2
    assert diff < 1e-5


@pytest.mark.parametrize("rotary", ["half", "complex"])
def test_latent_attention_heads_are_exact(rotary):
    """Whole heads: q, k_nope, v rows and o columns of a head go; the shared k_rot stays (gathered per head)."""
    out, diff = _compress(LatentAttention(True, rotary), "head")
    assert out.ecospa_report.count("head") == 1
    assert out.get_parameter("q.weight").shape[0] == (H // 2) * (NOPE + ROT)
    assert out.get_parameter("o.weight").shape[1] == (H // 2) * V
    assert diff < 1e-5


class ForeignOffAxis(nn.Module):
    """cat([a ⊗ b, c broadcast], -1): the first piece carries another space (a) off the joined axis, so the
    joined positions are not whole pieces of one space each: blocked, never guessed."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(8, 4)
        self.down = nn.Linear(8, 8)

    def forward(self, x):
        outer = self.a(x)[..., :, None] * self.b(x)[..., None, :]
        joined = torch.cat([outer, self.c(x)[..., None, :].expand_as(outer)], -1)
        return x + self.down(F.gelu(joined).sum(-2))


def test_cat_of_spaces_with_a_foreign_off_axis_fails_closed():
    report = ecospa_fx.discover(ForeignOffAxis().eval(), (torch.randn(2, 3, 8),))
    reasons = [r for s in report.skipped for r in s.reasons]
    assert any("cat joins different channel spaces on one axis" in r for r in reasons), report.summary()
    pruned = {m.param for g in report.groups for m in g.members}
    assert not pruned & {"b.weight", "c.weight"}


def test_compensation_skips_a_sink_whose_output_rows_are_pruned():
    """FLAP compensation of the latent (W_kv_a rows -> W_kv_b columns) would add a bias to W_kv_b, whose rows
    (k_nope, v) lose channels too: it is left out, the rest compensated, and the result stays exact (it used
    to fail verification with a bias of the dense width)."""
    model = LatentAttention(True, "half").eval()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, S, 16, generator=gen)
    calibration = [(torch.randn(2, S, 16, generator=gen),) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = ecospa_fx.compress(
            model, (x,), 0.5, calibration=calibration, compensate=True, round_to=1, refit="none"
        )  # FLAP's means
        refit = ecospa_fx.compress(
            model, (x,), 0.5, calibration=calibration, refit_bias=True, refit_damp=0.01, round_to=1
        )  # the refit's intercept: same rule
    for result in (out, refit):
        assert result.ecospa_report.max_abs_diff < 1e-5
        graph = result.graph.nodes
        kv_b = [n for n in graph if len(n.args) > 1 and getattr(n.args[1], "target", "") == "kv_b.weight"]
        assert kv_b and all(len(n.args) < 3 or n.args[2] is None for n in kv_b)  # no bias added
    assert any(name.startswith("_ecospa_bias") for name, _ in out.named_parameters())  # o was compensated
    assert "kv_b.weight" in refit.ecospa_report.refit  # refit without a new bias


def test_shared_rotary_key_says_why_it_stays_at_head_granularity():
    """At head granularity the k_rot rows of W_kv_a belong to no head: reported with that reason (not as an
    unselected kind)."""
    x = torch.randn(2, S, 16)
    report = ecospa_fx.discover(LatentAttention(True, "half").eval(), (x,), granularity="head")
    reasons = [r for s in report.skipped if "kv_a.weight" in s.params for r in s.reasons]
    assert any("shared by every head" in r for r in reasons), report.summary()
