"""Minimal regression tests for bugs the fuzzer (tests/fuzz) found.

Each test states the expected behaviour; a bug not yet fixed is marked ``xfail(strict=True)`` so that the
fix turns it into an XPASS failure: then remove the mark (and the matching entry in
``tests/fuzz/properties.py::KNOWN_BUGS``, if any).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

import ecospa_fx
from ecospa_fx import CaptureError, InputError
from passes.verify import masked_copy, max_abs_diff

D, H, HD, FF, M = 16, 2, 8, 32, 3


def _heads(t, n=H):
    b, s, _ = t.shape
    return t.view(b, s, n, -1).transpose(1, 2)


def _merge(t):
    b, n, s, hd = t.shape
    return t.transpose(1, 2).reshape(b, s, n * hd)


def _x(b=2, s=5, d=D):
    return torch.randn(b, s, d, generator=torch.Generator().manual_seed(0))


def _compress(model, inputs, sparsity=0.5, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ecospa_fx.compress(model, inputs, sparsity, round_to=1, **kw)


# ------------------------------------------------------------------------------------------------- 1


class LatentCrossAttention(nn.Module):
    """Cross-attention to a learned memory (Perceiver latents / learned prompts): k and v are projections
    of a Parameter, not of an input. V rows still meet O columns exactly as in self-attention."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.memory = nn.Parameter(torch.randn(M, D))
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x):
        mem = self.memory.unsqueeze(0).expand(x.shape[0], -1, -1)
        a = F.scaled_dot_product_attention(_heads(self.q(x)), _heads(self.k(mem)), _heads(self.v(mem)))
        return x + self.o(_merge(a))


def test_learned_memory_cross_attention_vo_group():
    report = ecospa_fx.discover(LatentCrossAttention().eval(), (_x(),))
    assert report.count("qk") == 1
    vo_params = {"v.weight", "o.weight"}
    listed = any(vo_params <= set(g.params) for g in report.groups if g.kind == "vo") or any(
        vo_params & set(s.params) and s.kind == "vo" for s in report.skipped
    )
    assert listed, f"v/o are in no group and no skipped entry:\n{report.summary()}"
    memory = [s for s in report.skipped if "memory" in s.params]
    assert memory and any("softmax" in r for r in memory[0].reasons), report.summary()  # keys sit under softmax


def test_learned_memory_cross_attention_head_group():
    report = ecospa_fx.discover(LatentCrossAttention().eval(), (_x(),), granularity="head")
    assert report.count("head") == 1, report.summary()


# ------------------------------------------------------------------------------------------------- 2


class SharedBlockTwice(nn.Module):
    """One FFN block reachable under two names (``nn.ModuleList([block, block])``, ALBERT-style sharing)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        block = nn.Sequential(nn.Linear(D, FF), nn.GELU(), nn.Linear(FF, D))
        self.layers = nn.ModuleList([block, block])

    def forward(self, x):
        for blk in self.layers:
            x = x + blk(x)
        return x


def test_shared_block_output_is_exact():
    """Held before the fix too: the function is right (the mask oracle holds)."""
    model = SharedBlockTwice().eval()
    compressed = _compress(model, (_x(),), verify=False)
    removed = [(n, d, i) for (n, d), i in compressed.ecospa_report.removed.items()]
    assert removed
    with torch.no_grad():
        assert max_abs_diff(compressed(_x()), masked_copy(model, removed)(_x())) < 1e-4


def test_shared_block_stays_tied_and_shrinks():
    model = SharedBlockTwice().eval()
    compressed = _compress(model, (_x(),))
    report = compressed.ecospa_report
    assert report.params_after < report.params_before, (report.params_before, report.params_after)
    params = dict(compressed.named_parameters(remove_duplicate=False))
    for suffix in ("0.weight", "0.bias", "2.weight"):
        a, b = params[f"layers.0.{suffix}"], params[f"layers.1.{suffix}"]
        assert a is b, f"layers.0.{suffix} {tuple(a.shape)} vs layers.1.{suffix} {tuple(b.shape)}"
    dense = sum(v.numel() for v in model.state_dict().values())
    assert sum(v.numel() for v in compressed.state_dict().values()) < dense


# ------------------------------------------------------------------------------------------------- 3


class BufferDownProjection(nn.Module):
    """An FFN whose down projection is a frozen buffer (not a Parameter)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(D, FF)
        self.register_buffer("down_t", torch.randn(FF, D) / 4)

    def forward(self, x):
        return x + F.gelu(self.up(x)) @ self.down_t


def test_buffer_down_projection_is_an_ffn_group():
    report = ecospa_fx.discover(BufferDownProjection().eval(), (_x(),))
    assert [g.kind for g in report.groups] == ["ffn"], report.summary()


def test_buffer_down_projection_output_is_exact():
    """Held before the fix too: whatever its kind, the pruned model is right."""
    model = BufferDownProjection().eval()
    compressed = _compress(model, (_x(),), verify=False)
    removed = [(n, d, i) for (n, d), i in compressed.ecospa_report.removed.items()]
    with torch.no_grad():
        assert max_abs_diff(compressed(_x()), masked_copy(model, removed)(_x())) < 1e-4


# ------------------------------------------------------------------------------------------------- 4


class KeywordNamedChild(nn.Module):
    """A child registered under a Python keyword (legal for nn.Module: ``add_module("if", ...)``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.add_module("if", nn.Linear(D, FF))
        self.down = nn.Linear(FF, D)

    def forward(self, x):
        return self.down(F.gelu(getattr(self, "if")(x)))


def test_keyword_named_submodule_gives_capture_error_or_works():
    try:
        compressed = _compress(KeywordNamedChild().eval(), (_x(),))
    except CaptureError:
        return
    assert compressed.ecospa_report.max_abs_diff < 1e-4


# ------------------------------------------------------------------------------------------------- 5


class OptionalSecondInput(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = nn.Linear(D, FF), nn.Linear(FF, D)

    def forward(self, x, scale=None):
        h = F.gelu(self.up(x))
        return self.down(h if scale is None else h * scale)


# found while writing the fuzzer (compress raised InputError('save() supports tensor example inputs only')
# for a None input); fixed in 7aefa5e
def test_none_positional_input_works_or_is_a_clear_input_error():
    """``(x, None)`` is a valid torch.export input. Either compress handles it, or it refuses with an
    InputError about compress's own inputs (not about ``save()``, which the user did not call)."""
    try:
        compressed = _compress(OptionalSecondInput().eval(), (_x(), None))
    except InputError as err:
        assert "save()" not in str(err), err
        return
    assert compressed.ecospa_report.max_abs_diff < 1e-4


# ------------------------------------------------------------------------------------------------- 6


class FusedMqaBmm(nn.Module):
    """2 query heads and 1 KV head of head_dim 8 from one fused projection split by slicing; the KV head
    is repeated (expand + reshape) and attention runs on [B * heads, S, head_dim] with torch.bmm."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(D, 2 * HD + HD + HD, bias=False)
        self.o = nn.Linear(2 * HD, D, bias=False)

    def forward(self, x):
        b, s, _ = x.shape
        y = self.qkv(x)
        q, k, v = y[..., : 2 * HD], y[..., 2 * HD : 3 * HD], y[..., 3 * HD :]
        q = q.view(b, s, 2, HD).transpose(1, 2).reshape(b * 2, s, HD)
        k = k.view(b, s, 1, HD).transpose(1, 2).expand(b, 2, s, HD).reshape(b * 2, s, HD)
        v = v.view(b, s, 1, HD).transpose(1, 2).expand(b, 2, s, HD).reshape(b * 2, s, HD)
        p = (torch.bmm(q, k.transpose(1, 2)) * HD**-0.5).softmax(-1)
        y = torch.bmm(p, v).view(b, 2, s, HD)  # <- this literal HD is not patched when v's head_dim shrinks
        return x + self.o(y.transpose(1, 2).reshape(b, s, 2 * HD))


def test_fused_qkv_mqa_bmm_runs():
    model = FusedMqaBmm().eval()
    x = _x(b=1, s=4)
    compressed = _compress(model, (x,), verify=False)
    removed = [(n, d, i) for (n, d), i in compressed.ecospa_report.removed.items()]
    with torch.no_grad():
        assert max_abs_diff(compressed(x), masked_copy(model, removed)(x)) < 1e-4


# ------------------------------------------------------------------------------------------------- 7


class MqaRotaryEnableGqa(nn.Module):
    """2 query heads, 1 KV head, head_dim 8, rotate_half rotary on q and k, SDPA with enable_gqa=True."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = nn.Linear(D, 2 * HD), nn.Linear(D, HD), nn.Linear(D, HD)
        self.o = nn.Linear(2 * HD, D)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, HD, 2).float() / HD), persistent=False)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, 2, HD).transpose(1, 2)
        k = self.k(x).view(b, s, 1, HD).transpose(1, 2)
        v = self.v(x).view(b, s, 1, HD).transpose(1, 2)
        ang = torch.outer(torch.arange(s, dtype=torch.float32), self.inv_freq)
        cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()

        def rot(t):
            return torch.cat((-t[..., HD // 2 :], t[..., : HD // 2]), -1)

        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return x + self.o(y.transpose(1, 2).reshape(b, s, 2 * HD))


def test_mqa_rotary_enable_gqa_head_granularity():
    model = MqaRotaryEnableGqa().eval()
    x = _x()
    compressed = _compress(model, (x,), granularity="head", verify=False)
    report = compressed.ecospa_report
    for g in report.groups:
        if g.kind == "head":
            assert {"q.weight", "o.weight"} <= set(g.params), g
    removed = [(n, d, i) for (n, d), i in report.removed.items()]
    with torch.no_grad():
        assert max_abs_diff(compressed(x), masked_copy(model, removed)(x)) < 1e-4
