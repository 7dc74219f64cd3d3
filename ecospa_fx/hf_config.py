"""A ``config.json`` + weights that ``transformers`` loads, for compressed models that a config can describe.

A Hugging Face config holds one width per kind for all layers (``intermediate_size``, ``num_attention_heads``,
``num_key_value_heads``, ``head_dim``). So a compressed model has a Hugging Face equivalent only when

1. every layer kept the same width of each kind (uniform), and
2. the class built from the changed config computes the compressed function: its parameters take the
   compressed tensors, and its outputs match on random inputs of the example shape (checked numerically,
   never assumed). Rotary models fail this when head_dim channels were pruned (the kept channels keep their
   original rotary frequencies, a smaller ``head_dim`` recomputes others); BERT-like classes fail it for
   heads (their head size is ``hidden_size / num_attention_heads``). When only the attention scale differs
   (``head_dim ** -0.5`` of the new head_dim), the original scale is folded into the query weights.

``hf_equivalent(compressed)`` returns an ``HFEquivalent`` with the model to save, or the reason why not.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ecospa_fx.report import Group, Report

FFN_KEYS = ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "ffn_hidden_size")
HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads")
KV_KEYS = ("num_key_value_heads", "multi_query_group_num")
HEAD_DIM_KEYS = ("head_dim", "d_kv")
ATOL, RTOL = 1e-5, 1e-5  # outputs must agree to float32 rounding


@dataclass
class HFEquivalent:
    """``model`` (a transformers model holding the compressed weights) and the config ``changes``, or
    ``reason`` (why no config describes the compressed model)."""

    model: torch.nn.Module | None = None
    changes: dict[str, int] = field(default_factory=dict)
    reason: str = ""
    max_abs_diff: float | None = None
    scale_folded: bool = False

    def to_json(self, written: str | None) -> dict[str, Any]:
        return {
            "written": written,
            "config_changes": self.changes,
            "reason": self.reason or None,
            "max_abs_diff": self.max_abs_diff,
            "scale_folded_into_query": self.scale_folded,
        }


def hf_equivalent(compressed: torch.nn.Module, inputs: tuple) -> HFEquivalent:
    """The Hugging Face model equivalent to ``compressed`` (what ``ecospa_fx.compress`` returned from a
    transformers model), checked on ``inputs`` and a second random draw of the same shapes."""
    source = getattr(compressed, "ecospa_source", None) or {}
    report: Report = compressed.ecospa_report
    if not source.get("hf_class"):
        return HFEquivalent(reason="not a Hugging Face model")
    if getattr(compressed, "ecospa_compensated", ()):
        return HFEquivalent(reason="compensation added output biases that the Hugging Face class does not have")
    import transformers

    cls = getattr(transformers, source["hf_class"], None)
    if cls is None:
        return HFEquivalent(reason=f"transformers has no class {source['hf_class']}")
    config = cls.config_class.from_dict(source["hf_config"])
    layout = getattr(compressed, "ecospa_kv", None)
    if layout is not None:  # the KV form takes the compressed cache: probe with one of those widths
        inputs = layout.random_inputs(getattr(config, "vocab_size", 2), 2, inputs[0].shape[1], 2)
    reason = uniform_reason(report)
    if reason:
        return HFEquivalent(reason=reason)
    changes, reason = config_changes(report, config)
    if reason:
        return HFEquivalent(reason=reason)
    return _build_and_check(cls, config, changes, compressed, inputs, report)


def uniform_reason(report: Report) -> str:
    """Empty when every layer kept the same fraction of each kind (skipped groups keep all), else why not."""
    kinds: dict[str, dict[str, float]] = {}
    for g in report.groups:
        kinds.setdefault(g.kind, {})[g.layer] = _kept_fraction(g)
    for s in report.skipped:
        if s.kind in kinds:
            kinds[s.kind][s.params[0].rsplit(".", 2)[0] if s.params else "?"] = 1.0
    for kind, layers in kinds.items():
        if len(set(layers.values())) > 1:
            shown = ", ".join(f"{layer or '-'} {frac:.0%}" for layer, frac in list(layers.items())[:4])
            return f"kept widths are not uniform across layers ({kind} keeps {shown}...): no single config fits"
    return ""


def _kept_fraction(g: Group) -> float:
    return 1 - g.units_removed / g.units if g.units else 1.0


def _config_value(config, keys: tuple[str, ...]) -> tuple[str | None, int | None]:
    for key in keys:
        if hasattr(config, key):
            value = getattr(config, key)
            if value is None and key == "n_inner":
                value = 4 * config.n_embd
            if isinstance(value, int):
                return key, value
    return None, None


def config_changes(report: Report, config) -> tuple[dict[str, int], str]:
    """Config fields and their new values, from the first group of each pruned kind (uniform already
    checked); or an empty dict and the reason no config field holds the change."""
    first = {g.kind: g for g in reversed(report.groups) if g.units_removed}
    changes: dict[str, int] = {}
    heads_key, heads = _config_value(config, HEAD_KEYS)
    kv_key, kv = _config_value(config, KV_KEYS)
    dim_key, head_dim = _config_value(config, HEAD_DIM_KEYS)
    hidden = getattr(config, "hidden_size", None)
    if head_dim is None and heads and hidden:  # classes that read getattr(config, "head_dim", hidden // heads)
        dim_key, head_dim = "head_dim", hidden // heads
    if "latent" in first:
        return {}, "latent ranks were pruned (q/kv bottlenecks): no config field this tool knows holds them"
    if "ffn" in first:
        key, width = _config_value(config, FFN_KEYS)
        kept = _kept_of_size(first["ffn"], width)
        if kept is None:
            return {}, "the FFN width is not a config field this tool knows (intermediate_size, n_inner, ffn_dim, d_ff)"
        changes[key] = kept
    if "head" in first:
        if not (heads and head_dim):
            return {}, "the config has no number of attention heads"
        kept_q = _kept_of_size(first["head"], heads * head_dim)
        changes[heads_key] = kept_q // head_dim
        if kv_key and kv:
            kept_kv = _kept_of_size(first["head"], kv * head_dim)
            changes[kv_key] = (kept_kv if kept_kv is not None else kept_q) // head_dim
        if dim_key:
            changes[dim_key] = head_dim
    attn = [first[k] for k in ("qk", "vo") if k in first]
    if attn:
        if not dim_key or not heads:
            return {}, "head_dim channels were pruned but the config has no head count or head_dim"
        dims = {_kept_of_size(g, heads * head_dim) for g in attn}
        if None in dims:
            return {}, "the attention projections are fused or not heads x head_dim wide: no config field holds them"
        if "qk" not in first or "vo" not in first or len(dims) != 1:
            return {}, "Q/K and V/O keep different head_dim widths: one config head_dim cannot hold both"
        changes[dim_key] = dims.pop() // heads
    return changes, ""


def _kept_of_size(group: Group, size: int | None) -> int | None:
    return next((m.kept for m in group.members if m.size == size), None)


def _build_and_check(cls, config, changes: dict[str, int], compressed, inputs, report: Report) -> HFEquivalent:
    """Instantiate ``cls`` with the changed config, load the compressed tensors, compare outputs."""
    config = copy.deepcopy(config)
    old_dim = getattr(config, "head_dim", None)
    for key, value in changes.items():
        setattr(config, key, value)
    model = cls(config).eval()
    named = _named_like(compressed, model)
    state = compressed.state_dict()
    try:
        _, unexpected = named.load_state_dict(state, strict=False)
    except RuntimeError as err:
        line = next((x.strip() for x in str(err).splitlines() if "size mismatch" in x), str(err).splitlines()[0])
        return HFEquivalent(reason=f"{cls.__name__} with {changes} does not take the compressed tensors: {line}")
    if unexpected:
        return HFEquivalent(reason=f"{cls.__name__} has no parameters {unexpected[:3]}")
    redrawn = tuple(_redraw(x, config) for x in inputs[:1]) + tuple(inputs[1:] if named is not model else ())
    probes = [inputs, redrawn + tuple(_redraw(x, config) for x in inputs[len(redrawn) :])]
    diff = _max_diff(compressed, named, probes)
    folded = False
    new_dim = changes.get("head_dim")
    if not _close(diff) and old_dim and new_dim and new_dim != old_dim:
        _fold_query_scale(named, report, math.sqrt(new_dim / old_dim))
        diff, folded = _max_diff(compressed, named, probes), True
    if not _close(diff):
        return HFEquivalent(
            reason=f"{cls.__name__} with {changes} computes a different function (max abs diff "
            f"{diff[0]:.2e}; e.g. rotary frequencies or scales tied to the widths)"
        )
    return HFEquivalent(model=model, changes=changes, max_abs_diff=diff[0], scale_folded=folded)


def _named_like(compressed, model: torch.nn.Module) -> torch.nn.Module:
    """``model`` as the compressed module names and calls it: its KV form for a causal LM compressed with
    its cache (parameters under ``model.``, cache tensors in and out), else itself. A KV form's mask,
    positions and cache inputs are kept when probing (only the token ids are redrawn)."""
    if getattr(compressed, "ecospa_kv", None) is None:
        return model
    from ecospa_fx.generation.causal_lm import KVCacheLM

    model.config.get_text_config(decoder=True).use_cache = True
    return KVCacheLM(model).eval()


def _redraw(x: torch.Tensor | None, config) -> torch.Tensor | None:
    if not isinstance(x, torch.Tensor):
        return x
    generator = torch.Generator().manual_seed(1)
    if x.dtype.is_floating_point:
        return torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return torch.randint(0, getattr(config, "vocab_size", 2), x.shape, generator=generator, dtype=x.dtype)


def _max_diff(compressed, model, probes: list[tuple]) -> tuple[float, float]:
    """(max abs diff, max abs output) over every tensor output and probe."""
    diff, scale = 0.0, 0.0
    with torch.no_grad():
        for inputs in probes:
            ours = [t for t in pytree.tree_leaves(compressed(*inputs)) if isinstance(t, torch.Tensor)]
            theirs = [t for t in pytree.tree_leaves(model(*inputs)) if isinstance(t, torch.Tensor)]
            if len(ours) != len(theirs) or any(a.shape != b.shape for a, b in zip(ours, theirs, strict=False)):
                return math.inf, 0.0
            for a, b in zip(ours, theirs, strict=True):
                diff = max(diff, float((a.double() - b.double()).abs().max()))
                scale = max(scale, float(a.abs().max()))
    return diff, scale


def _close(diff: tuple[float, float]) -> bool:
    return diff[0] <= ATOL + RTOL * diff[1]


def _fold_query_scale(model: torch.nn.Module, report: Report, factor: float) -> None:
    """Multiply each qk group's query rows by ``factor`` (the old/new attention-scale ratio): q·k then
    carries the original scale; rotary is linear in q, so the fold commutes with it."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for g in report.groups:
            if g.kind != "qk":
                continue
            query = max((m for m in g.members if m.dim == 0), key=lambda m: m.size, default=None)
            if query is None:
                continue
            params[query.param].mul_(factor)
            bias = params.get(query.param.removesuffix("weight") + "bias")
            if bias is not None:
                bias.mul_(factor)
