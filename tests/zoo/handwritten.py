"""Hand-written tiny transformers in plain ``torch.nn`` with deliberately odd names.

Every token model: ``nn.Embedding(96, 32)`` -> 2 pre-norm residual blocks ->
final LayerNorm -> Linear(32 -> 96) readout.  4 heads of head_dim 8 unless
stated otherwise, FFN width 64.  Inputs are int64 token ids of shape (2, 8).

Nothing here is named q_proj / k_proj / mlp / attn / layers etc. on purpose:
discovery must work from the graph, not from names.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .case import ZooCase, float_inputs, seeded, token_inputs

D = 32  # hidden
NH = 4  # heads
HD = D // NH  # head dim
FF = 64  # ffn width
NL = 2  # layers
VOCAB = 96
SEQ = 8
BATCH = 2


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """[B, S, n*hd] -> [B, n, S, hd]."""
    b, s, _ = x.shape
    return x.view(b, s, n, -1).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """[B, n, S, hd] -> [B, S, n*hd]."""
    b, n, s, hd = x.shape
    return x.transpose(1, 2).reshape(b, s, n * hd)


class _Tower(nn.Module):
    """Shared skeleton: embedding, a ModuleList of blocks, final norm, readout."""

    def __init__(self, block_fn):
        super().__init__()
        self.lexicon = nn.Embedding(VOCAB, D)
        self.strata = nn.ModuleList([block_fn() for _ in range(NL)])
        self.coda = nn.LayerNorm(D)
        self.oracle = nn.Linear(D, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.lexicon(ids)
        for blk in self.strata:
            x = blk(x)
        return self.oracle(self.coda(x))


class _GeluTwoLinear(nn.Module):
    """A plain up -> gelu -> down FFN with odd names."""

    def __init__(self, d=D, f=FF):
        super().__init__()
        self.sigma = nn.Linear(d, f)
        self.tau = nn.Linear(f, d)

    def forward(self, x):
        return self.tau(F.gelu(self.sigma(x)))


# --------------------------------------------------------------------------- (1) fused qkv + chunk


class FusedChunkBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.rho = nn.LayerNorm(D)
        self.omega = nn.Linear(D, 3 * D)  # fused q|k|v (q block first)
        self.psi = nn.Linear(D, D)
        self.kappa = nn.LayerNorm(D)
        self.chi = _GeluTwoLinear()

    def forward(self, x):
        a, b, c = self.omega(self.rho(x)).chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(_heads(a, NH), _heads(b, NH), _heads(c, NH), is_causal=True)
        x = x + self.psi(_merge(y))
        return x + self.chi(self.kappa(x))


# --------------------------------------------------------------------------- (2) einsum attention


class EinsumBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.rho = nn.LayerNorm(D)
        self.alpha = nn.Linear(D, D)
        self.beta = nn.Linear(D, D)
        self.gamma = nn.Linear(D, D)
        self.delta = nn.Linear(D, D)
        self.kappa = nn.LayerNorm(D)
        self.chi = _GeluTwoLinear()

    def forward(self, x):
        h = self.rho(x)
        a = _heads(self.alpha(h), NH)
        b = _heads(self.beta(h), NH)
        c = _heads(self.gamma(h), NH)
        s = torch.einsum("bhqd,bhkd->bhqk", a, b) * (HD**-0.5)
        p = s.softmax(dim=-1)
        y = torch.einsum("bhqk,bhkd->bhqd", p, c)
        x = x + self.delta(_merge(y))
        return x + self.chi(self.kappa(x))


# --------------------------------------------------------------------------- (3) raw Parameters + F.linear


class RawParamBlock(nn.Module):
    def __init__(self):
        super().__init__()

        def w(o, i):
            t = torch.empty(o, i)
            nn.init.kaiming_uniform_(t, a=math.sqrt(5))
            return nn.Parameter(t)

        self.ln_w = nn.Parameter(torch.ones(D))
        self.ln_b = nn.Parameter(torch.zeros(D))
        self.w_x = w(D, D)
        self.b_x = nn.Parameter(torch.randn(D) * 0.1)
        self.w_y = w(D, D)
        self.b_y = nn.Parameter(torch.randn(D) * 0.1)
        self.w_z = w(D, D)
        self.b_z = nn.Parameter(torch.randn(D) * 0.1)
        self.w_o = w(D, D)
        self.ln2_w = nn.Parameter(torch.ones(D))
        self.ln2_b = nn.Parameter(torch.zeros(D))
        self.w_in = w(FF, D)
        self.b_in = nn.Parameter(torch.randn(FF) * 0.1)
        self.w_out = w(D, FF)

    def forward(self, x):
        h = F.layer_norm(x, (D,), self.ln_w, self.ln_b)
        a = _heads(F.linear(h, self.w_x, self.b_x), NH)
        b = _heads(F.linear(h, self.w_y, self.b_y), NH)
        c = _heads(F.linear(h, self.w_z, self.b_z), NH)
        y = F.scaled_dot_product_attention(a, b, c, is_causal=True)
        x = x + F.linear(_merge(y), self.w_o)
        h = F.layer_norm(x, (D,), self.ln2_w, self.ln2_b)
        return x + F.linear(F.relu(F.linear(h, self.w_in, self.b_in)), self.w_out)


# --------------------------------------------------------------------------- (4) multi-query attention


class MultiQueryBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.rho = nn.LayerNorm(D)
        self.alpha = nn.Linear(D, D)  # 4 query heads
        self.beta = nn.Linear(D, HD)  # 1 key head
        self.gamma = nn.Linear(D, HD)  # 1 value head
        self.delta = nn.Linear(D, D)
        self.kappa = nn.LayerNorm(D)
        self.chi = _GeluTwoLinear()

    def forward(self, x):
        h = self.rho(x)
        a = _heads(self.alpha(h), NH)  # [B,4,S,hd]
        b = _heads(self.beta(h), 1).repeat_interleave(NH, dim=1)  # [B,4,S,hd]
        c = _heads(self.gamma(h), 1).expand(-1, NH, -1, -1)  # [B,4,S,hd]
        s = torch.matmul(a, b.transpose(-2, -1)) * (HD**-0.5)
        y = torch.matmul(s.softmax(-1), c)
        x = x + self.delta(_merge(y))
        return x + self.chi(self.kappa(x))


# --------------------------------------------------------------------------- (5) parallel attn + MLP


class ParallelBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.rho = nn.LayerNorm(D)  # ONE norm feeding both branches
        self.alpha = nn.Linear(D, D, bias=False)
        self.beta = nn.Linear(D, D, bias=False)
        self.gamma = nn.Linear(D, D, bias=False)
        self.delta = nn.Linear(D, D)
        self.chi = _GeluTwoLinear()

    def forward(self, x):
        h = self.rho(x)
        a, b, c = (_heads(m(h), NH) for m in (self.alpha, self.beta, self.gamma))
        y = F.scaled_dot_product_attention(a, b, c, is_causal=True)
        return x + self.delta(_merge(y)) + self.chi(h)


# --------------------------------------------------------------------------- (6) [in,out] weights + addmm


class _InOut(nn.Module):
    """Conv1D-like: weight stored [in, out], applied with addmm on flattened tokens."""

    def __init__(self, i, o):
        super().__init__()
        self.mass = nn.Parameter(torch.randn(i, o) / math.sqrt(i))
        self.shift = nn.Parameter(torch.randn(o) * 0.1)

    def forward(self, x):
        lead = x.shape[:-1]
        y = torch.addmm(self.shift, x.reshape(-1, x.shape[-1]), self.mass)
        return y.view(*lead, -1)


class AddmmBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.rho = nn.LayerNorm(D)
        self.alpha = _InOut(D, D)
        self.beta = _InOut(D, D)
        self.gamma = _InOut(D, D)
        self.delta = _InOut(D, D)
        self.kappa = nn.LayerNorm(D)
        self.sigma = _InOut(D, FF)
        self.tau = _InOut(FF, D)

    def forward(self, x):
        h = self.rho(x)
        a, b, c = (_heads(m(h), NH) for m in (self.alpha, self.beta, self.gamma))
        y = F.scaled_dot_product_attention(a, b, c, is_causal=True)
        x = x + self.delta(_merge(y))
        return x + self.tau(F.gelu(self.sigma(self.kappa(x)), approximate="tanh"))


# --------------------------------------------------------------------------- (7) interleaved rotary + SDPA


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """GPT-J style: pairs (2i, 2i+1) -> (-x_{2i+1}, x_{2i})."""
    ev = x[..., ::2]
    od = x[..., 1::2]
    return torch.stack((-od, ev), dim=-1).flatten(-2)


class InterleavedRotaryBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.rho = nn.LayerNorm(D)
        self.alpha = nn.Linear(D, D, bias=False)
        self.beta = nn.Linear(D, D, bias=False)
        self.gamma = nn.Linear(D, D, bias=False)
        self.delta = nn.Linear(D, D, bias=False)
        self.kappa = nn.LayerNorm(D)
        self.chi = _GeluTwoLinear()
        freq = 1.0 / (10000 ** (torch.arange(0, HD, 2, dtype=torch.float32) / HD))
        self.register_buffer("phase", freq, persistent=False)

    def forward(self, x):
        s = x.shape[1]
        pos = torch.arange(s, device=x.device, dtype=torch.float32)
        ang = torch.outer(pos, self.phase)  # [S, hd/2]
        cos = ang.cos().repeat_interleave(2, dim=-1)  # [S, hd]: c0 c0 c1 c1 ...
        sin = ang.sin().repeat_interleave(2, dim=-1)
        h = self.rho(x)
        a, b, c = (_heads(m(h), NH) for m in (self.alpha, self.beta, self.gamma))
        a = a * cos + _rotate_pairs(a) * sin
        b = b * cos + _rotate_pairs(b) * sin
        y = F.scaled_dot_product_attention(a, b, c, is_causal=True)
        x = x + self.delta(_merge(y))
        return x + self.chi(self.kappa(x))


# --------------------------------------------------------------------------- (8) GQA via enable_gqa

KV = 2


class GqaBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.rho = nn.LayerNorm(D)
        self.alpha = nn.Linear(D, NH * HD)
        self.beta = nn.Linear(D, KV * HD)
        self.gamma = nn.Linear(D, KV * HD)
        self.delta = nn.Linear(NH * HD, D)
        self.kappa = nn.LayerNorm(D)
        self.chi = _GeluTwoLinear()

    def forward(self, x):
        h = self.rho(x)
        a = _heads(self.alpha(h), NH)
        b = _heads(self.beta(h), KV)
        c = _heads(self.gamma(h), KV)
        y = F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=True)
        x = x + self.delta(_merge(y))
        return x + self.chi(self.kappa(x))


# --------------------------------------------------------------------------- (9) GeGLU FFN


class GegluBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.rho = nn.LayerNorm(D)
        self.alpha = nn.Linear(D, D)
        self.beta = nn.Linear(D, D)
        self.gamma = nn.Linear(D, D)
        self.delta = nn.Linear(D, D)
        self.kappa = nn.LayerNorm(D)
        self.lam = nn.Linear(D, 2 * FF)  # fused [value | gate]
        self.mu = nn.Linear(FF, D)

    def forward(self, x):
        h = self.rho(x)
        a, b, c = (_heads(m(h), NH) for m in (self.alpha, self.beta, self.gamma))
        y = F.scaled_dot_product_attention(a, b, c, is_causal=True)
        x = x + self.delta(_merge(y))
        u = self.lam(self.kappa(x))
        val, gate = u[..., :FF], u[..., FF:]
        return x + self.mu(val * F.gelu(gate))


# --------------------------------------------------------------------------- (10) plain MLP, no attention


class PlainMlp(nn.Module):
    """LayerNorm(16) -> Linear(16,64) -> GELU -> Linear(64,48) -> ReLU -> Linear(48,10)."""

    def __init__(self):
        super().__init__()
        self.prelude = nn.LayerNorm(16)
        self.one = nn.Linear(16, 64)
        self.two = nn.Linear(64, 48)
        self.three = nn.Linear(48, 10)

    def forward(self, x):
        x = self.prelude(x)
        return self.three(F.relu(self.two(F.gelu(self.one(x)))))


# ------------------------------------------------------------------ (11) matmul + softmax + causal mask


class MaskedMatmulBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.rho = nn.LayerNorm(D)
        self.alpha = nn.Linear(D, D)
        self.beta = nn.Linear(D, D)
        self.gamma = nn.Linear(D, D)
        self.delta = nn.Linear(D, D)
        self.kappa = nn.LayerNorm(D)
        self.chi = _GeluTwoLinear()

    def forward(self, x):
        s = x.shape[1]
        h = self.rho(x)
        q, k, v = (_heads(m(h), NH) for m in (self.alpha, self.beta, self.gamma))
        scores = q @ k.transpose(-2, -1) / math.sqrt(HD)
        mask = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
        y = torch.softmax(scores, dim=-1) @ v
        x = x + self.delta(_merge(y))
        return x + self.chi(self.kappa(x))


# --------------------------------------------------------------------------- registry


def _tok():
    return token_inputs(VOCAB, BATCH, SEQ)


def _mlp_inputs():
    return float_inputs(BATCH, SEQ, 16)


def _tower_case(name, block_cls, seed, expect, notes, **meta) -> ZooCase:
    m = {"layers": NL, "heads": NH, "kv_heads": NH, "head_dim": HD, "hidden": D, "ffn": FF, "rotary": None}
    m.update(meta)
    shape = (
        f"L={m['layers']} H={m['heads']} KV={m['kv_heads']} head_dim={m['head_dim']} "
        f"hidden={m['hidden']} ffn={m['ffn']} rotary={m['rotary']}. "
    )
    return ZooCase(
        name=name,
        build=lambda: seeded(seed, lambda: _Tower(block_cls)),
        inputs=_tok,
        expect=expect,
        notes=shape + notes,
        family="handwritten",
        meta=m,
    )


MHA = {"qk": NL, "vo": NL, "ffn": NL}  # one qk group per attention module
_MHA_WHY = "No rotary, MHA -> qk one per head = 2*4 = 8; vo 1/layer = 2; ffn 1/layer = 2. "


def _all() -> list[ZooCase]:
    return [
        _tower_case(
            "hw_fused_chunk",
            FusedChunkBlock,
            101,
            dict(MHA),
            _MHA_WHY + "Fused omega Linear(32 -> 96) split by .chunk(3, -1) into q|k|v blocks; SDPA causal; "
            "names rho/omega/psi/kappa/chi.sigma/chi.tau.",
        ),
        _tower_case(
            "hw_einsum",
            EinsumBlock,
            102,
            dict(MHA),
            _MHA_WHY + "Scores via einsum('bhqd,bhkd->bhqk') (exported as bmm/mm with views & permutes), "
            "softmax, einsum('bhqk,bhkd->bhqd') with v.",
        ),
        _tower_case(
            "hw_raw_param",
            RawParamBlock,
            103,
            dict(MHA),
            _MHA_WHY + "All weights are bare nn.Parameters (w_x/w_y/w_z/w_o/w_in/w_out) applied with "
            "F.linear; F.layer_norm with raw params; o-proj and FFN-down have no bias; relu FFN.",
        ),
        _tower_case(
            "hw_mqa",
            MultiQueryBlock,
            104,
            {"qk": NL * 1, "vo": NL, "ffn": NL},
            "Multi-query: 4 query heads, 1 KV head (beta/gamma Linear(32 -> 8)). k broadcast with "
            "repeat_interleave(4, dim=1), v with expand(-1, 4, -1, -1); matmul attention. qk: one per "
            "(layer, KV head) = 2*1 = 2 (all 4 q heads couple to the single k head); vo 1/layer (the "
            "8 v channels couple to the same channel in each of the 4 head-blocks of delta's input "
            "columns); ffn 1/layer.",
            kv_heads=1,
        ),
        _tower_case(
            "hw_parallel",
            ParallelBlock,
            105,
            dict(MHA),
            _MHA_WHY + "GPT-J/Falcon-style parallel block: x + delta(attn(rho x)) + chi(rho x), one shared "
            "norm; bias-free q/k/v.",
        ),
        _tower_case(
            "hw_addmm_inout",
            AddmmBlock,
            106,
            dict(MHA),
            _MHA_WHY + "Every projection is a [in,out] weight applied with "
            "torch.addmm(bias, x.reshape(-1,in), W) "
            "then .view(B,S,out) (like HF Conv1D): prune COLUMNS of the producer, ROWS of the consumer. "
            "FFN uses gelu(approximate='tanh').",
        ),
        _tower_case(
            "hw_interleaved_rope",
            InterleavedRotaryBlock,
            107,
            {"qk": NL, "vo": NL, "ffn": NL},
            "Interleaved (GPT-J style) rotary over the full head_dim: pairs (2i, 2i+1) via x[..., ::2], "
            "x[..., 1::2], stack((-odd, even), -1).flatten(-2); cos/sin [S, hd] computed in forward from "
            "arange + outer + repeat_interleave(2) and broadcast over all heads -> one qk group per layer "
            "= 2, and head-dim channels must be kept in (2i, 2i+1) pairs. SDPA causal. "
            "vo 1/layer, ffn 1/layer.",
            rotary="interleaved pairs, full head_dim",
        ),
        _tower_case(
            "hw_gqa_sdpa",
            GqaBlock,
            108,
            {"qk": NL, "vo": NL, "ffn": NL},
            "GQA 4 q heads / 2 kv heads, no rotary, F.scaled_dot_product_attention(..., enable_gqa=True) "
            "(the repeat is implicit inside SDPA: q heads 2g, 2g+1 attend with kv head g). qk one per "
            "(layer, KV head) = 2*2 = 4; vo 1/layer; ffn 1/layer.",
            kv_heads=KV,
        ),
        _tower_case(
            "hw_geglu",
            GegluBlock,
            109,
            dict(MHA),
            _MHA_WHY + "GeGLU FFN: lam Linear(32 -> 128) sliced u[..., :64] (value) and u[..., 64:] (gate), "
            "value * gelu(gate) -> mu Linear(64 -> 32): rows j and 64+j of lam pruned together with "
            "column j of mu. ffn 1/layer.",
        ),
        ZooCase(
            name="hw_plain_mlp",
            build=lambda: seeded(110, PlainMlp),
            inputs=_mlp_inputs,
            expect={"ffn": 2},
            notes=(
                "No attention. Float input (2, 8, 16) -> LayerNorm(16) -> one Linear(16,64) -> GELU -> "
                "two Linear(64,48) -> ReLU -> three Linear(48,10). Two hidden widths (64 and 48), each "
                "produced by a Linear+elementwise activation and consumed only by the next Linear -> "
                "ffn = 2 (the 64-group: one rows <-> two cols; the 48-group: two rows <-> three cols; "
                "'two' is down of the first group AND up of the second). The 16 input and 10 output "
                "widths are model boundaries: not groups. No qk/vo."
            ),
            family="handwritten",
            meta={
                "layers": 2,
                "heads": 0,
                "kv_heads": 0,
                "head_dim": 0,
                "hidden": 16,
                "ffn": [64, 48],
                "rotary": None,
            },
        ),
        _tower_case(
            "hw_masked_matmul",
            MaskedMatmulBlock,
            111,
            dict(MHA),
            _MHA_WHY + "Explicit q @ k.transpose(-2,-1) / math.sqrt(8), causal mask = ones(S,S,bool).triu(1) "
            "with masked_fill(-inf), torch.softmax, @ v.",
        ),
    ]


HANDWRITTEN_CASES: list[ZooCase] = _all()
