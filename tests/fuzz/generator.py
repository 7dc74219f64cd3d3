"""Random but valid tiny transformers, described by a ``Spec``, with the ground truth of what was built.

``build(spec)`` returns a ``Built`` (model in eval mode, fp32; positional example inputs; ``Truth``).
Every choice is a field of the frozen ``Spec``, so a failing example prints as code:

    from tests.fuzz.generator import Spec, build
    b = build(Spec(...))            # b.model, b.inputs, b.truth

``specs()`` is the hypothesis strategy; it only draws combinations that are valid (e.g. ``chunk(3)`` needs
equal q/k/v widths, ``enable_gqa`` needs SDPA, rotary needs an even head_dim). Choices vary independently:

* q/k/v: separate projections, or one fused projection split by slicing, ``chunk(3)``, ``split([..])``,
  or per head (GPT-NeoX: ``view(b, s, heads, 3 * hd).chunk(3, -1)``);
* attention: SDPA (default or explicit ``scale``), ``matmul`` + softmax, ``einsum`` (on a [B, S, H, D]
  layout), ``bmm`` (on [B * H, S, D]);
* heads: MHA, GQA (any proper divisor) or MQA; the KV repeat by ``expand`` + ``reshape`` (HF
  ``repeat_kv``), ``repeat_interleave`` or SDPA's ``enable_gqa``;
* rotary: none, rotate_half (Llama) or interleaved (GPT-J), on the full head_dim or a leading part of it
  (NeoX/Phi partial rotary); cos/sin computed once and shared by every layer, or per attention module;
* optional norm on q and k (``qk_norm``), over head_dim (Qwen3, Gemma3) or over the whole projection
  (OLMo2), in one of three styles: RMS (exact when the mean keeps its original divisor), L2
  (``F.normalize``, exact) or a centring LayerNorm (Cohere: not exact over pruned channels, so the
  generator marks those q/k channels as protected: they must not be pruned);
* FFN: GELU / ReLU / SiLU two-layer, SwiGLU / GeGLU with separate gate and up, or a fused gate_up split
  by ``chunk(2)``;
* projections: ``nn.Linear``, raw Parameters with ``F.linear``, or [in, out] weights applied with
  ``addmm`` (with bias) / ``matmul`` (without) like GPT-2's Conv1D; biases on or off;
* pre- or post-norm, LayerNorm or RMSNorm, parallel (GPT-J) or sequential attention and MLP;
* optional cross-attention to a second input or to a learned memory Parameter;
* no mask, ``is_causal``, a boolean mask or an additive float mask;
* token (int64) or float inputs; every submodule gets a random name (some are decoys like ``q_proj`` on
  the wrong projection);
* adversarial to zero-ness (issue 13): an offset added to v or to the FFN pre-activation (a per-token input
  ``t`` of shape [B, S, 1] whose *example* value is 0, or a literal constant), a sum or mean over v's or
  the FFN hidden channels (added to the stream or returned as an auxiliary output), an FFN down
  projection held in a buffer, and a sigmoid FFN (f(0) != 0). A removed channel then is not 0 in the
  masked model, and any sum over it must leave the group dense; the truth says which;
* GPT-OSS attention sinks (a per-head logit appended to the scores, matmul attention) and a routed-experts
  FFN (3-D weights gathered by data-dependent top-1 router ids).
"""

from __future__ import annotations

import dataclasses
import keyword
import math
import random
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

QKV = ("separate", "fused_slice", "fused_chunk", "fused_split", "fused_headwise")
ATTENTION = ("sdpa", "sdpa_scale", "matmul", "einsum", "bmm")
GQA = ("expand_reshape", "repeat_interleave", "enable_gqa")
ROTARY = ("none", "rotate_half", "interleaved")
FFN = ("gelu", "relu", "silu", "swiglu", "geglu", "fused_gate_up", "sigmoid")
GLU = ("swiglu", "geglu", "fused_gate_up")  # act(gate) * up: zero where up's row is, whatever the gate
OFFSETS = ("none", "input", "const")  # t [B, S, 1] (example 0) or a literal added before v / the activation
OFFSET_AT = ("v", "ffn")
QK_NORMS = ("rms", "l2", "layer")
QK_NORM_OVER = ("head", "proj")
REDUCE = ("none", "v_sum", "v_mean", "ffn_sum", "ffn_mean")  # a reduction over channels, extra to the model
NORMS = ("layer", "rms")
PROJ = ("linear", "flinear", "inout")
CROSS = ("none", "input", "memory")
MASKS = ("none", "causal", "bool", "additive")

VOCAB = 32

# Names real models use, handed out to the wrong roles on purpose: discovery must not read names.
DECOYS = (
    "q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "dense", "c_attn", "c_proj",
    "up_proj", "down_proj", "gate_proj", "fc1", "fc2", "mlp", "attn", "self_attn", "ln_1", "norm",
    "wi", "wo", "lm_head", "embed_tokens", "layers", "h", "blocks",
)  # fmt: skip


@dataclass(frozen=True)
class Spec:
    """One generated architecture. ``repr(spec)`` is valid Python that rebuilds it."""

    seed: int = 0
    layers: int = 1
    hidden: int = 16
    heads: int = 1
    kv_heads: int = 1
    head_dim: int = 8
    ffn_dim: int = 16
    batch: int = 1
    seq: int = 4
    token_input: bool = True
    qkv: str = "separate"
    attention: str = "sdpa"
    gqa: str = "expand_reshape"
    rotary: str = "none"
    rotary_dim: int = 0  # 0: full head_dim; else a leading part (partial rotary)
    rotary_shared: bool = True
    qk_norm: bool = False
    qk_norm_style: str = "rms"  # rms | l2 | layer (centring)
    qk_norm_over: str = "head"  # head (head_dim) | proj (the whole q / k projection)
    ffn: str = "gelu"
    proj: str = "linear"
    attn_bias: bool = True
    ffn_bias: bool = True
    norm: str = "layer"
    pre_norm: bool = True
    parallel: bool = False
    cross: str = "none"
    mem_len: int = 3
    mem_dim: int = 16
    mask: str = "none"
    offset: str = "none"
    offset_at: str = "v"
    reduce: str = "none"
    aux_output: bool = False  # the reduction is returned as a second output instead of added to the stream
    down_buffer: bool = False  # the FFN down projection is a buffer (x @ B), not a Parameter
    sinks: bool = False  # per-head sink logits appended to the scores (matmul attention only)
    experts: int = 0  # > 0: a routed-experts FFN (3-D weights gathered by top-1 router ids), not a dense one
    name_seed: int = 0

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError(f"invalid Spec: {'; '.join(problems)}")

    def problems(self) -> list[str]:
        out = []
        if self.heads % self.kv_heads:
            out.append("kv_heads must divide heads")
        if self.qkv in ("fused_chunk", "fused_headwise") and self.kv_heads != self.heads:
            out.append(f"{self.qkv} needs equal q/k/v widths (MHA)")
        if self.gqa == "enable_gqa" and not self.attention.startswith("sdpa"):
            out.append("enable_gqa needs SDPA")
        if self.rotary != "none":
            r = self.rot_dim
            if r % 2 or r > self.head_dim or r <= 0:
                out.append("rotary dim must be even, positive and <= head_dim")
        for name, value, options in (
            ("qkv", self.qkv, QKV),
            ("attention", self.attention, ATTENTION),
            ("gqa", self.gqa, GQA),
            ("rotary", self.rotary, ROTARY),
            ("ffn", self.ffn, FFN),
            ("norm", self.norm, NORMS),
            ("proj", self.proj, PROJ),
            ("cross", self.cross, CROSS),
            ("mask", self.mask, MASKS),
            ("offset", self.offset, OFFSETS),
            ("offset_at", self.offset_at, OFFSET_AT),
            ("reduce", self.reduce, REDUCE),
            ("qk_norm_style", self.qk_norm_style, QK_NORMS),
            ("qk_norm_over", self.qk_norm_over, QK_NORM_OVER),
        ):
            if value not in options:
                out.append(f"{name}={value!r} not in {options}")
        return out

    @property
    def rot_dim(self) -> int:
        return self.rotary_dim or self.head_dim

    @property
    def v_zero(self) -> bool:
        """Removed v channels are 0 in the masked model (no offset added to v)."""
        return not (self.offset != "none" and self.offset_at == "v")

    @property
    def ffn_zero(self) -> bool:
        """Removed FFN hidden channels are 0 after the activation in the masked model."""
        if self.ffn in GLU or self.experts:  # the expert FFN takes no offset, reduction or buffer
            return True
        return self.ffn != "sigmoid" and not (self.offset != "none" and self.offset_at == "ffn")

    @property
    def vo_blocked(self) -> bool:
        """The self-attention vo (and head) group must stay dense: a sum or mean over v's channels whose
        removed entries are not 0 (a mean over zeros is exact: the rewrite keeps its original divisor)."""
        return self.reduce in ("v_sum", "v_mean") and not self.v_zero

    @property
    def ffn_blocked(self) -> bool:
        return not self.experts and not self.ffn_zero and (self.reduce in ("ffn_sum", "ffn_mean") or self.down_buffer)

    def summary(self) -> str:
        """One line for humans (hypothesis events, logs)."""
        heads = f"{self.heads}q/{self.kv_heads}kv" + (f" ({self.gqa})" if self.kv_heads != self.heads else "")
        rot = "no-rope"
        if self.rotary != "none":
            rot = f"rope={self.rotary}[{self.rot_dim}/{self.head_dim}]{'shared' if self.rotary_shared else ''}"
        qk_norm = f" qk_norm={self.qk_norm_style}/{self.qk_norm_over}" if self.qk_norm else ""
        return (
            f"{self.layers}L d{self.hidden} {heads} hd{self.head_dim} {self.qkv} {self.attention} {rot}"
            f"{qk_norm} ffn={self.ffn}[{self.ffn_dim}] {self.proj} "
            f"{'pre' if self.pre_norm else 'post'}-{self.norm}{' parallel' if self.parallel else ''} "
            f"cross={self.cross} mask={self.mask} {'ids' if self.token_input else 'float'} "
            f"B{self.batch} S{self.seq}{self._zero_summary()}"
        )

    def _zero_summary(self) -> str:
        parts = []
        if self.offset != "none":
            parts.append(f"offset={self.offset}@{self.offset_at}")
        if self.reduce != "none":
            parts.append(f"reduce={self.reduce}{'(aux)' if self.aux_output else ''}")
        if self.down_buffer:
            parts.append("down=buffer")
        if self.sinks:
            parts.append("sinks")
        if self.experts:
            parts.append(f"experts={self.experts}")
        return (" " + " ".join(parts)) if parts else ""

    def code(self) -> str:
        """Python that rebuilds the model: ``build(<this>)``."""
        fields = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != f.default
        )
        return f"from tests.fuzz.generator import Spec, build; built = build(Spec({fields}))"


@dataclass
class Protected:
    """Indices of a parameter axis that must never be pruned (channel granularity)."""

    param: str
    dim: int
    indices: frozenset[int]
    why: str


@dataclass
class Truth:
    """What the generator built, in the terms of the report."""

    attention_modules: int  # self + cross attention modules whose vo group is prunable
    qk_prunable: int  # attention modules whose head-dim qk channels may be pruned exactly
    qk_skipped: int  # attention modules whose qk group must be skipped (norm over head_dim)
    ffn_modules: int  # FFNs whose group is prunable
    head_groups: int  # at head granularity: one per attention module with more than one KV head
    protected: list[Protected] = field(default_factory=list)

    def expected_counts(self, granularity: str = "channel") -> dict[str, int]:
        """Groups per kind that discovery must report as prunable at ``granularity``."""
        if granularity == "head":
            return {"head": self.head_groups, "ffn": self.ffn_modules}
        return {"qk": self.qk_prunable, "vo": self.attention_modules, "ffn": self.ffn_modules}


@dataclass
class Built:
    spec: Spec
    model: nn.Module
    inputs: tuple
    truth: Truth


# ------------------------------------------------------------------------------------------ naming


class _Names:
    """Deterministic, distinct attribute names from ``name_seed``: decoys and random identifiers."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.used: set[str] = set()
        self.seed = seed

    def __call__(self, role: str) -> str:
        if self.seed == 0:  # readable names for the shrunk example
            base = role
        elif self.rng.random() < 0.3:
            base = self.rng.choice(DECOYS)
        else:
            letters = "abcdefghijklmnopqrstuvwxyz"
            base = self.rng.choice(letters) + "".join(
                self.rng.choice(letters + "0123456789") for _ in range(self.rng.randint(0, 5))
            )
        name = base
        k = 0
        while name in self.used or not self._allowed(name):
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name

    @staticmethod
    def _allowed(name: str) -> bool:
        """Not an nn.Module attribute, not a Python keyword (torch's codegen would emit ``self.if``: see
        test_regressions.py), and not shaped like the keys ``tests.zoo.rename.renamed`` hands out
        (``m0``, ``p1``, ``b2``: its name translation cannot tell an original ``b0`` from a new one)."""
        return not (
            hasattr(nn.Module, name)
            or keyword.iskeyword(name)
            or name.startswith("_")
            or re.fullmatch(r"[mpb]\d+", name)
        )


class _Roles(nn.Module):
    """A module whose children/parameters live under random names; ``self.get(role)`` finds them."""

    def __init__(self, names: _Names):
        super().__init__()
        self._names = names
        self._roles: dict[str, str] = {}

    def put(self, role: str, value):
        name = self._names(role)
        self._roles[role] = name
        setattr(self, name, value)
        return value

    def get(self, role: str):
        name = self._roles.get(role)
        return None if name is None else getattr(self, name)


def _init_param(*shape: int, scale: float = 1.0) -> nn.Parameter:
    fan_in = shape[-1] if len(shape) > 1 else 1
    return nn.Parameter(torch.randn(*shape) * scale / math.sqrt(fan_in))


# ------------------------------------------------------------------------------------- projections


class RawLinear(_Roles):
    """Raw [out, in] Parameters applied with ``F.linear``."""

    def __init__(self, names, i, o, bias):
        super().__init__(names)
        self.put("w", _init_param(o, i))
        if bias:
            self.put("b", nn.Parameter(torch.randn(o) * 0.1))

    def forward(self, x):
        return F.linear(x, self.get("w"), self.get("b"))


class InOut(_Roles):
    """GPT-2 Conv1D: weight [in, out]; ``addmm(bias, x2d, W)`` with a bias, ``x @ W`` without."""

    def __init__(self, names, i, o, bias):
        super().__init__(names)
        self.put("w", nn.Parameter(torch.randn(i, o) / math.sqrt(i)))
        if bias:
            self.put("b", nn.Parameter(torch.randn(o) * 0.1))

    def forward(self, x):
        w, b = self.get("w"), self.get("b")
        if b is None:
            return x @ w
        lead = x.shape[:-1]
        return torch.addmm(b, x.reshape(-1, x.shape[-1]), w).view(*lead, w.shape[1])


def make_proj(spec: Spec, names: _Names, i: int, o: int, bias: bool) -> nn.Module:
    if spec.proj == "linear":
        m = nn.Linear(i, o, bias=bias)
        if bias:
            with torch.no_grad():
                m.bias.normal_(0, 0.1)
        return m
    if spec.proj == "flinear":
        return RawLinear(names, i, o, bias)
    return InOut(names, i, o, bias)


def out_weight(proj: nn.Module) -> tuple[nn.Parameter, int, nn.Parameter | None]:
    """(weight, output axis, bias) of a projection made by ``make_proj``."""
    if isinstance(proj, nn.Linear):
        return proj.weight, 0, proj.bias
    if isinstance(proj, RawLinear):
        return proj.get("w"), 0, proj.get("b")
    return proj.get("w"), 1, proj.get("b")


# ------------------------------------------------------------------------------------------- norms


class RMSNorm(_Roles):
    def __init__(self, names, d, eps=1e-6):
        super().__init__(names)
        self.put("scale", nn.Parameter(1.0 + 0.1 * torch.randn(d)))
        self._eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self._eps) * self.get("scale")


class QkNorm(_Roles):
    """A norm over the last axis of q or k: RMS (``x * rsqrt(mean(x^2) + eps) * w``), L2
    (``F.normalize(x) * w``) or a centring LayerNorm written out by hand (Cohere)."""

    def __init__(self, names, d, style: str, eps=1e-6):
        super().__init__(names)
        self.put("scale", nn.Parameter(1.0 + 0.1 * torch.randn(d)))
        if style == "layer":
            self.put("shift", nn.Parameter(0.1 * torch.randn(d)))
        self._style, self._eps = style, eps

    def forward(self, x):
        w = self.get("scale")
        if self._style == "rms":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self._eps) * w
        if self._style == "l2":
            return F.normalize(x, dim=-1) * w
        centred = x - x.mean(-1, keepdim=True)
        return centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + self._eps) * w + self.get("shift")


def make_norm(spec: Spec, names: _Names, d: int) -> nn.Module:
    if spec.norm == "rms":
        return RMSNorm(names, d)
    m = nn.LayerNorm(d)
    with torch.no_grad():
        m.weight.add_(0.1 * torch.randn(d))
        m.bias.normal_(0, 0.1)
    return m


# ----------------------------------------------------------------------------------------- rotary


def rotary_tables(inv_freq: torch.Tensor, seq: int, style: str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [S, r] for ``style`` (rotate_half: [f, f]; interleaved: f0 f0 f1 f1 ...)."""
    pos = torch.arange(seq, device=inv_freq.device, dtype=torch.float32)
    ang = torch.outer(pos, inv_freq)
    emb = torch.cat((ang, ang), dim=-1) if style == "rotate_half" else ang.repeat_interleave(2, dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _rotate_pairs(x):
    ev, od = x[..., ::2], x[..., 1::2]
    return torch.stack((-od, ev), dim=-1).flatten(-2)


def apply_rotary(x, cos, sin, style: str, r: int):
    """Rotate the first ``r`` channels of the last axis; cos/sin already broadcast against x[..., :r]."""
    rot = _rotate_half if style == "rotate_half" else _rotate_pairs
    if r == x.shape[-1]:
        return x * cos + rot(x) * sin
    xr, xp = x[..., :r], x[..., r:]
    return torch.cat((xr * cos + rot(xr) * sin, xp), dim=-1)


def inv_freq(r: int) -> torch.Tensor:
    return 1.0 / (10000 ** (torch.arange(0, r, 2, dtype=torch.float32) / r))


# -------------------------------------------------------------------------------------- attention


class Attention(_Roles):
    """Self- (``cross=False``) or cross-attention with every variant of the spec."""

    def __init__(self, spec: Spec, names: _Names, cross: bool):
        super().__init__(names)
        self._spec = spec
        self._cross = cross
        d, hd, nh, kv = spec.hidden, spec.head_dim, spec.heads, spec.kv_heads
        kd = spec.mem_dim if cross else d
        qw, kw = nh * hd, kv * hd
        self._qkv = "separate" if cross else spec.qkv
        self._rotary = "none" if cross else spec.rotary
        self._mask = "none" if cross else spec.mask
        b = spec.attn_bias
        if self._qkv == "separate":
            self.put("q", make_proj(spec, names, d, qw, b))
            self.put("k", make_proj(spec, names, kd, kw, b))
            self.put("v", make_proj(spec, names, kd, kw, b))
        else:
            self.put("qkv", make_proj(spec, names, d, qw + 2 * kw, b))
        self.put("o", make_proj(spec, names, qw, d, b))
        if spec.sinks and spec.attention == "matmul" and not cross:
            self.put("sinks", nn.Parameter(torch.randn(nh)))
        if spec.qk_norm:
            whole = spec.qk_norm_over == "proj"
            self.put("qn", QkNorm(names, qw if whole else hd, spec.qk_norm_style))
            self.put("kn", QkNorm(names, kw if whole else hd, spec.qk_norm_style))
        if self._rotary != "none" and not spec.rotary_shared:
            self.register_buffer(names("inv_freq"), inv_freq(spec.rot_dim), persistent=False)
            self._inv_freq_name = next(n for n in self._buffers)

    # ---- the index sets of q and k output channels in their projection (ground truth)
    def qk_channels(self) -> list[tuple[nn.Parameter, int, frozenset[int], str]]:
        s = self._spec
        qw, kw, hd = s.heads * s.head_dim, s.kv_heads * s.head_dim, s.head_dim
        out = []
        if self._qkv == "separate":
            for role in ("q", "k"):
                w, dim, bias = out_weight(self.get(role))
                n = w.shape[dim]
                out.append((w, dim, frozenset(range(n)), role))
                if bias is not None:
                    out.append((bias, 0, frozenset(range(n)), role + ".bias"))
        else:
            w, dim, bias = out_weight(self.get("qkv"))
            if self._qkv == "fused_headwise":
                idx = frozenset(h * 3 * hd + j for h in range(s.heads) for j in range(2 * hd))
            else:
                idx = frozenset(range(qw + kw))
            out.append((w, dim, idx, "qkv[q|k]"))
            if bias is not None:
                out.append((bias, 0, idx, "qkv.bias[q|k]"))
        if s.qk_norm:
            for role in ("qn", "kn"):
                for p in self.get(role).parameters():
                    out.append((p, 0, frozenset(range(p.shape[0])), role))
        return out

    def _project(self, x, mem):
        s = self._spec
        b, n = x.shape[0], x.shape[1]
        hd, nh, kv = s.head_dim, s.heads, s.kv_heads
        qw, kw = nh * hd, kv * hd
        if self._qkv == "separate":
            src = mem if self._cross else x
            q, k, v = self.get("q")(x), self.get("k")(src), self.get("v")(src)
        else:
            y = self.get("qkv")(x)
            if self._qkv == "fused_slice":
                q, k, v = y[..., :qw], y[..., qw : qw + kw], y[..., qw + kw :]
            elif self._qkv == "fused_chunk":
                q, k, v = y.chunk(3, dim=-1)
            elif self._qkv == "fused_split":
                q, k, v = y.split([qw, kw, kw], dim=-1)
            else:  # GPT-NeoX: per head [q | k | v]
                q, k, v = y.view(b, n, nh, 3 * hd).chunk(3, dim=-1)
                if s.reduce.startswith("v_") or (s.offset != "none" and s.offset_at == "v"):
                    v = v.reshape(b, n, nh * hd)  # [B, S, H*D] like the other layouts: t is [B, S, 1]
        if not self._cross and s.offset_at == "v":
            v = add_offset(v, s.offset, self._t)
        if not self._cross and s.reduce in ("v_sum", "v_mean"):
            self._aux = channel_reduction(v, s.reduce)
        m = k.shape[1]
        if s.qk_norm and s.qk_norm_over == "proj":  # OLMo2: over the whole projection, before the heads
            q, k = self.get("qn")(q.reshape(b, n, qw)), self.get("kn")(k.reshape(b, m, kw))
        # [B, S, H, D]
        q = q.reshape(b, n, nh, hd)
        k = k.reshape(b, m, kv, hd)
        v = v.reshape(b, m, kv, hd)
        if s.qk_norm and s.qk_norm_over == "head":
            q, k = self.get("qn")(q), self.get("kn")(k)
        return q, k, v

    def _repeat(self, t, dim):
        """Repeat KV heads (axis ``dim``) to the number of query heads."""
        s = self._spec
        rep = s.heads // s.kv_heads
        if rep == 1:
            return t
        if s.gqa == "repeat_interleave":
            return t.repeat_interleave(rep, dim=dim)
        # HF repeat_kv: insert an axis after the kv axis, expand, merge
        shape = list(t.shape)
        t = t.unsqueeze(dim + 1)
        exp = [*shape[: dim + 1], rep, *shape[dim + 1 :]]
        t = t.expand(*exp)
        return t.reshape(*shape[:dim], shape[dim] * rep, *shape[dim + 1 :])

    def _mask_tensor(self, n, m, device):
        if self._mask in ("none", "causal"):
            return None
        keep = torch.ones(n, m, dtype=torch.bool, device=device).tril()
        if self._mask == "bool":
            return keep
        return torch.zeros(n, m, device=device).masked_fill(~keep, -1e9)

    def forward(self, x, mem=None, rope=None, t=None):
        """(output, auxiliary reduction or None)."""
        self._t, self._aux = t, None
        y = self._attend(x, mem, rope)
        aux, self._t, self._aux = self._aux, None, None
        return y, aux

    def _attend(self, x, mem, rope):
        s = self._spec
        b, n = x.shape[0], x.shape[1]
        hd, nh = s.head_dim, s.heads
        q, k, v = self._project(x, mem)  # [B, S, H, D]
        m = k.shape[1]
        if self._rotary != "none":
            if rope is None:
                cos, sin = rotary_tables(getattr(self, self._inv_freq_name), n, s.rotary)
            else:
                cos, sin = rope
        scale = hd**-0.5
        mask = self._mask_tensor(n, m, x.device)
        if s.attention == "einsum":  # stays in [B, S, H, D]
            if self._rotary != "none":
                c, si = cos[:, None, :], sin[:, None, :]
                q = apply_rotary(q, c, si, s.rotary, s.rot_dim)
                k = apply_rotary(k, c, si, s.rotary, s.rot_dim)
            k, v = self._repeat(k, 2), self._repeat(v, 2)
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
            scores = self._masked(scores, mask, n, m)
            y = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
            return self.get("o")(y.reshape(b, n, nh * hd))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, D]
        if self._rotary != "none":
            q = apply_rotary(q, cos, sin, s.rotary, s.rot_dim)
            k = apply_rotary(k, cos, sin, s.rotary, s.rot_dim)
        if s.attention.startswith("sdpa"):
            kw = {}
            if s.attention == "sdpa_scale":
                kw["scale"] = scale
            if s.gqa == "enable_gqa":
                kw["enable_gqa"] = True
            else:
                k, v = self._repeat(k, 1), self._repeat(v, 1)
            if self._mask == "causal":
                kw["is_causal"] = True
            elif mask is not None:
                kw["attn_mask"] = mask
            y = F.scaled_dot_product_attention(q, k, v, **kw)
        else:
            k, v = self._repeat(k, 1), self._repeat(v, 1)
            if s.attention == "matmul":
                scores = self._masked(torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(hd), mask, n, m)
                y = torch.matmul(self._with_sinks(scores).softmax(-1)[..., :m], v)
            else:  # bmm on [B*H, S, D]
                qf = q.reshape(b * nh, n, hd)
                kf = k.reshape(b * nh, m, hd)
                vf = v.reshape(b * nh, m, hd)
                scores = torch.bmm(qf, kf.transpose(1, 2)) * scale
                p = self._masked(scores.view(b, nh, n, m), mask, n, m).softmax(-1)
                y = torch.bmm(p.reshape(b * nh, n, m), vf).view(b, nh, n, hd)
        y = y.transpose(1, 2).reshape(b, n, nh * hd)
        return self.get("o")(y)

    def _with_sinks(self, scores):
        """GPT-OSS attention sinks: a learned per-head logit appended to every row of the scores (its
        softmax share is dropped afterwards)."""
        sinks = self.get("sinks")
        if sinks is None:
            return scores
        b, h, n, _ = scores.shape
        return torch.cat([scores, sinks.reshape(1, h, 1, 1).expand(b, h, n, 1)], dim=-1)

    def _masked(self, scores, mask, n, m):
        if self._mask == "causal":
            upper = torch.ones(n, m, dtype=torch.bool, device=scores.device).triu(1)
            return scores.masked_fill(upper, float("-inf"))
        if mask is None:
            return scores
        if mask.dtype == torch.bool:
            return scores.masked_fill(~mask, float("-inf"))
        return scores + mask


# -------------------------------------------------------------------------------------------- FFN


class RoutedExperts(_Roles):
    """A routed-experts FFN (Mixtral / GPT-OSS shape): 3-D expert weights gathered per token by top-1 router
    ids (``W[ids]``, data-dependent), bmm, gelu, bmm back, scaled by the router's probability."""

    def __init__(self, spec: Spec, names: _Names):
        super().__init__(names)
        d, f, e = spec.hidden, spec.ffn_dim, spec.experts
        self.put("router", nn.Linear(d, e))
        self.put("w_in", nn.Parameter(torch.randn(e, f, d) / math.sqrt(d)))
        self.put("w_out", nn.Parameter(torch.randn(e, d, f) / math.sqrt(f)))

    def forward(self, x, t=None):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        logits = self.get("router")(x2)
        weight, ids = logits.softmax(-1).max(-1)
        h = F.gelu(torch.bmm(self.get("w_in")[ids], x2.unsqueeze(-1)).squeeze(-1))
        y = torch.bmm(self.get("w_out")[ids], h.unsqueeze(-1)).squeeze(-1) * weight.unsqueeze(-1)
        return y.reshape(shape), None


def make_ffn(spec: Spec, names: _Names) -> nn.Module:
    return RoutedExperts(spec, names) if spec.experts else FeedForward(spec, names)


class FeedForward(_Roles):
    def __init__(self, spec: Spec, names: _Names):
        super().__init__(names)
        self._kind = spec.ffn
        d, f, b = spec.hidden, spec.ffn_dim, spec.ffn_bias
        if self._kind in ("gelu", "relu", "silu", "sigmoid"):
            self.put("up", make_proj(spec, names, d, f, b))
        elif self._kind in ("swiglu", "geglu"):
            self.put("gate", make_proj(spec, names, d, f, b))
            self.put("up", make_proj(spec, names, d, f, b))
        else:
            self.put("gate_up", make_proj(spec, names, d, 2 * f, b))
        self._spec = spec
        if spec.down_buffer:
            self.register_buffer(names("down"), torch.randn(f, d) / math.sqrt(f))
            self._down_name = next(iter(self._buffers))
        else:
            self.put("down", make_proj(spec, names, f, d, b))

    def forward(self, x, t=None):
        """(output, auxiliary reduction or None)."""
        k, s = self._kind, self._spec
        off = (lambda z: add_offset(z, s.offset, t)) if s.offset_at == "ffn" else (lambda z: z)
        if k in ("gelu", "relu", "silu", "sigmoid"):
            act = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "sigmoid": torch.sigmoid}[k]
            h = act(off(self.get("up")(x)))
        elif k in ("swiglu", "geglu"):
            act = F.silu if k == "swiglu" else F.gelu
            h = act(off(self.get("gate")(x))) * self.get("up")(x)
        else:
            gate, up = self.get("gate_up")(x).chunk(2, dim=-1)
            h = F.silu(off(gate)) * up
        aux = channel_reduction(h, s.reduce) if s.reduce in ("ffn_sum", "ffn_mean") else None
        if s.down_buffer:
            return h @ getattr(self, self._down_name), aux
        return self.get("down")(h), aux


def add_offset(z: torch.Tensor, offset: str, t: torch.Tensor | None) -> torch.Tensor:
    """``z + t`` (a per-token input [B, S, 1]) or ``z + 0.25``: not zeroed by the mask oracle."""
    if offset == "input":
        return z + t
    if offset == "const":
        return z + 0.25
    return z


def channel_reduction(z: torch.Tensor, how: str) -> torch.Tensor:
    """A sum or mean over the last (channel) axis, kept as [B, S, 1]."""
    return z.sum(-1, keepdim=True) if how.endswith("_sum") else z.mean(-1, keepdim=True)


def _plus(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


# ------------------------------------------------------------------------------------------ block


class Block(_Roles):
    def __init__(self, spec: Spec, names: _Names):
        super().__init__(names)
        self._spec = spec
        d = spec.hidden
        self.put("n1", make_norm(spec, names, d))
        self.put("attn", Attention(spec, names, cross=False))
        if not spec.parallel:
            self.put("n2", make_norm(spec, names, d))
        if spec.cross != "none":
            self.put("nc", make_norm(spec, names, d))
            self.put("xattn", Attention(spec, names, cross=True))
        self.put("ffn", make_ffn(spec, names))

    def forward(self, x, mem=None, rope=None, t=None):
        """(hidden, auxiliary reductions or None); without ``aux_output`` they are added to the stream."""
        s = self._spec
        aux: list[torch.Tensor | None] = [None]

        def attn(z):
            y, a = self.get("attn")(z, rope=rope, t=t)
            return self._fold(y, a, aux)

        def ffn(z):
            y, a = self.get("ffn")(z, t=t)
            return self._fold(y, a, aux)

        n1 = self.get("n1")
        if s.parallel:
            if s.pre_norm:
                h = n1(x)
                x = x + attn(h) + ffn(h)
            else:
                x = n1(x + attn(x) + ffn(x))
        elif s.pre_norm:
            x = x + attn(n1(x))
        else:
            x = n1(x + attn(x))
        if s.cross != "none":
            nc, xattn = self.get("nc"), self.get("xattn")
            x = x + xattn(nc(x), mem=mem)[0] if s.pre_norm else nc(x + xattn(x, mem=mem)[0])
        if not s.parallel:
            n2 = self.get("n2")
            x = x + ffn(n2(x)) if s.pre_norm else n2(x + ffn(x))
        return x, aux[0]

    def _fold(self, y, a, aux):
        if a is None:
            return y
        if self._spec.aux_output:
            aux[0] = _plus(aux[0], a)
            return y
        return y + a


class Net(_Roles):
    def __init__(self, spec: Spec, names: _Names):
        super().__init__(names)
        self._spec = spec
        d = spec.hidden
        if spec.token_input:
            self.put("embed", nn.Embedding(VOCAB, d))
        stack = nn.ModuleList([Block(spec, names) for _ in range(spec.layers)])
        self.put("stack", stack)
        if spec.cross == "memory":
            self.put("memory", nn.Parameter(torch.randn(spec.mem_len, spec.mem_dim)))
        if spec.rotary != "none" and spec.rotary_shared:
            self.register_buffer(names("inv_freq"), inv_freq(spec.rot_dim), persistent=False)
            self._inv_freq_name = next(n for n in self._buffers)
        self.put("final", make_norm(spec, names, d))
        self.put("head", make_proj(spec, names, d, VOCAB, True))

    def forward(self, x, *extra):
        s = self._spec
        mem = extra[0] if s.cross == "input" else None
        t = extra[-1] if s.offset == "input" else None
        if s.token_input:
            x = self.get("embed")(x)
        if s.cross == "memory":
            mem = self.get("memory").unsqueeze(0).expand(x.shape[0], -1, -1)
        rope = None
        if s.rotary != "none" and s.rotary_shared:
            rope = rotary_tables(getattr(self, self._inv_freq_name), x.shape[1], s.rotary)
        aux = None
        for blk in self.get("stack"):
            x, a = blk(x, mem=mem, rope=rope, t=t)
            aux = _plus(aux, a)
        logits = self.get("head")(self.get("final")(x))
        return (logits, aux) if aux is not None else logits


# ------------------------------------------------------------------------------------------ build


def build(spec: Spec) -> Built:
    """The model (eval, fp32), its positional example inputs and the ground truth."""
    torch.manual_seed(spec.seed)
    names = _Names(spec.name_seed)
    model = Net(spec, names).float().eval()
    g = torch.Generator().manual_seed(spec.seed + 1)
    if spec.token_input:
        x = torch.randint(0, VOCAB, (spec.batch, spec.seq), generator=g)
    else:
        x = torch.randn(spec.batch, spec.seq, spec.hidden, generator=g)
    inputs: tuple = (x,)
    if spec.cross == "input":
        inputs = (x, torch.randn(spec.batch, spec.mem_len, spec.mem_dim, generator=g))
    if spec.offset == "input":
        inputs = (*inputs, torch.zeros(spec.batch, spec.seq, 1))  # a lucky example: the offset is 0
    return Built(spec, model, inputs, _truth(spec, model))


def _truth(spec: Spec, model: nn.Module) -> Truth:
    fqn = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    protected = []
    centred = spec.qk_norm and spec.qk_norm_style == "layer"
    if centred:
        for a in attns:
            for p, dim, idx, role in a.qk_channels():
                protected.append(Protected(fqn[id(p)], dim, idx, f"{role} feeds a centring norm"))
    n_attn = len(attns)
    vo = n_attn - (spec.layers if spec.vo_blocked else 0)  # the reduction sits in self-attention only
    # a centring norm over the whole projection also pins whole heads (it mixes every head's channels)
    heads = 0 if centred and spec.qk_norm_over == "proj" else vo
    return Truth(
        attention_modules=vo,
        qk_prunable=0 if centred else n_attn,
        qk_skipped=n_attn if centred else 0,
        ffn_modules=0 if spec.ffn_blocked else spec.layers,
        head_groups=heads if spec.kv_heads > 1 else 0,
        protected=protected,
    )


# ------------------------------------------------------------------------------------- strategies


@st.composite
def specs(draw) -> Spec:
    """Valid random ``Spec``s; each field is drawn so that it shrinks toward the simplest model."""
    heads = draw(st.sampled_from([1, 2, 4, 6, 8, 3]))
    divisors = [k for k in range(1, heads + 1) if heads % k == 0]
    grouped = [k for k in divisors if 1 < k < heads]  # real GQA: several KV heads, each shared
    sharing = draw(st.sampled_from(["mha", "gqa", "gqa", "mqa"]))  # GQA about half the time it can be
    if sharing == "gqa" and grouped:
        kv_heads = draw(st.sampled_from(grouped))
    elif sharing == "mqa":
        kv_heads = 1
    else:
        kv_heads = heads
    head_dim = draw(st.sampled_from([8, 4, 6, 12, 16]))
    hidden = draw(st.sampled_from([16, 24, 32, 40, 48]))
    attention = draw(st.sampled_from(ATTENTION))
    gqa_options = [g for g in GQA if g != "enable_gqa" or attention.startswith("sdpa")]
    gqa = draw(st.sampled_from(gqa_options)) if kv_heads != heads else "expand_reshape"
    qkv_options = [q for q in QKV if kv_heads == heads or q not in ("fused_chunk", "fused_headwise")]
    qkv = draw(st.sampled_from(qkv_options))
    rotary = draw(st.sampled_from(ROTARY))
    rotary_dim = 0
    if rotary != "none":
        partial = list(range(2, head_dim, 2))
        if partial and draw(st.booleans()):
            rotary_dim = draw(st.sampled_from(partial))
    cross = draw(st.sampled_from(CROSS))
    return Spec(
        seed=draw(st.integers(0, 2**16)),
        layers=draw(st.integers(1, 3)),
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        ffn_dim=draw(st.sampled_from([16, 8, 12, 24, 32, 48, 64])),
        batch=draw(st.integers(1, 2)),
        seq=draw(st.integers(4, 8)),
        token_input=draw(st.booleans()),
        qkv=qkv,
        attention=attention,
        gqa=gqa,
        rotary=rotary,
        rotary_dim=rotary_dim,
        rotary_shared=draw(st.booleans()) if rotary != "none" else True,
        qk_norm=draw(st.booleans()),
        qk_norm_style=draw(st.sampled_from(QK_NORMS)),
        qk_norm_over=draw(st.sampled_from(QK_NORM_OVER)),
        ffn=draw(st.sampled_from(FFN)),
        proj=draw(st.sampled_from(PROJ)),
        attn_bias=draw(st.booleans()),
        ffn_bias=draw(st.booleans()),
        norm=draw(st.sampled_from(NORMS)),
        pre_norm=draw(st.booleans()),
        parallel=draw(st.booleans()),
        cross=cross,
        mem_len=draw(st.integers(2, 6)) if cross != "none" else 3,
        mem_dim=draw(st.sampled_from([16, hidden, 12, 20])) if cross != "none" else 16,
        mask=draw(st.sampled_from(MASKS)),
        **draw(zero_adversary()),
        sinks=attention == "matmul" and draw(st.booleans()),
        experts=draw(st.sampled_from([0, 0, 0, 2, 4])),
        name_seed=draw(st.integers(0, 2**16)),
    )


@st.composite
def zero_adversary(draw) -> dict:
    """The issue-13 patterns, each on about a third of the examples (shrinking to none of them)."""
    adversarial = draw(st.sampled_from([False, True, False]))
    if not adversarial:
        return {}
    return {
        "offset": draw(st.sampled_from(OFFSETS)),
        "offset_at": draw(st.sampled_from(OFFSET_AT)),
        "reduce": draw(st.sampled_from(REDUCE)),
        "aux_output": draw(st.booleans()),
        "down_buffer": draw(st.booleans()),
    }
