"""A causal LM with its KV cache as plain tensors: the form that is captured, compressed and exported.

``KVCacheLM(model)(input_ids, attention_mask, position_ids, *past) -> (logits, *present)`` where
``past``/``present`` are ``k_0, v_0, k_1, v_1, ...`` shaped ``[batch, kv_heads, length, head_dim]`` and
``present_i = cat([past_i, new_i], length axis)``. Prefill passes empty past tensors (length 0), a decode
step passes the previous step's present. The cache is state that enters and leaves the graph: input
``3 + i`` is carried to output ``1 + i`` (``state_pairs``), which is all the pass needs to shrink it with
the channels (``passes.state``).

Capture notes (torch 2.13, transformers 5.2x), both measured:

* Hugging Face's SDPA attention evaluates ``query_length > 1`` before it looks at the mask, which pins a
  dynamic sequence length to >= 2 (a graph that cannot decode one token). During capture the model's
  ``"sdpa"`` attention is swapped for the same computation (``_export_sdpa``: repeat KV heads, SDPA with
  the explicit mask) and restored after.
* Export specialises sizes 0 and 1 unless ``backed_size_oblivious`` is on; with it one graph serves
  prefill (past length 0) and decode (sequence length 1) at any batch size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

LEADING_INPUTS = 3  # input_ids, attention_mask, position_ids
KV_PREFIX = "model."  # the KV form's parameter names: the causal LM's, under its ``model`` attribute


def is_cached_causal_lm(model: Any) -> bool:
    """A Hugging Face decoder-only LM that returns a KV cache by default (``use_cache``)."""
    config = getattr(model, "config", None)
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    if not isinstance(model, PreTrainedModel) or config is None:
        return False
    if getattr(config, "is_encoder_decoder", False) or not _can_generate(model):
        return False
    if recurrent_cache_layers(model):
        return False  # conv / state-space caches: not keys and values (compressed without a cache)
    return bool(getattr(config.get_text_config(decoder=True), "use_cache", False))


def recurrent_cache_layers(model: Any) -> list[str]:
    """The layer types whose cache holds recurrent state (a conv window, a state-space or linear-attention
    state) instead of only keys and values, read from the config as transformers' ``DynamicCache`` reads
    it (Mamba, LFM2's conv layers, Qwen3-Next's linear attention). The KV form carries keys and values."""
    try:
        from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, DynamicLayer, get_layer_types_and_kwargs

        layer_types, _ = get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))
    except Exception:  # older transformers, or a config without layer types: plain KV layers
        return []
    try:
        from transformers.cache_utils import LinearAttentionCacheLayerMixin as Recurrent
    except ImportError:  # pragma: no cover - older transformers
        Recurrent = ()
    recurrent = set()
    for layer_type in layer_types:
        cls = DYNAMIC_LAYER_TYPE_MAPPING.get(layer_type, DynamicLayer)
        if not issubclass(cls, DynamicLayer) or (Recurrent and issubclass(cls, Recurrent)):
            recurrent.add(layer_type)
    return sorted(recurrent)


def _can_generate(model) -> bool:
    try:
        return bool(model.can_generate())
    except Exception:
        return False


class KVCacheLM(torch.nn.Module):
    """``model`` with its KV cache flattened to positional tensors (see the module docstring)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.n_layers = _cache_layers(model)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        if len(past) != 2 * self.n_layers:
            raise ValueError(f"expected {2 * self.n_layers} past tensors (k, v per layer), got {len(past)}")
        cache = DynamicCache()
        cache.layers = []
        for i in range(0, len(past), 2):
            layer = DynamicLayer()
            layer.lazy_initialization(past[i], past[i + 1])
            layer.keys, layer.values = past[i], past[i + 1]
            cache.layers.append(layer)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{_cache_keyword(self.model): cache},
        )
        present = [t for layer in _returned_cache(out).layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)

    def state_pairs(self) -> list[tuple[int, int]]:
        return [(LEADING_INPUTS + i, 1 + i) for i in range(2 * self.n_layers)]


def _returned_cache(out):
    """The cache a forward returned: ``out.cache`` in newer transformers (``past_key_values`` is then a
    deprecated alias that logs a warning), ``out.past_key_values`` before."""
    return out["cache"] if "cache" in out else out.past_key_values  # noqa: SIM401 (.get would read the alias)


def _cache_layers(model) -> int:
    config = model.config.get_text_config(decoder=True)
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"{type(model).__name__}: its config does not say how many layers it has")
    return n


def _cache_keyword(model) -> str:
    """``cache`` in newer transformers, ``past_key_values`` before (both accepted by 5.2x)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_shapes(model) -> list[tuple[int, int]]:
    """(kv_heads, head_dim) of every past tensor, read from the cache a one-token forward returns (no
    config field names: multi-query, grouped and per-layer widths come out as the model makes them)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, **{_cache_keyword(model): DynamicCache()})
    layers = _returned_cache(out).layers
    if len(layers) != _cache_layers(model):
        raise ValueError(f"{type(model).__name__}: {len(layers)} cache layers for {_cache_layers(model)} layers")
    return [(int(t.shape[1]), int(t.shape[3])) for layer in layers for t in (layer.keys, layer.values)]


def random_past(shapes, batch: int, dtype: torch.dtype, device="cpu", length: int = 0) -> list[torch.Tensor]:
    """Past tensors ``[batch, heads, length, dim]`` for every (heads, dim) of ``shapes``, seeded random
    (empty when ``length`` is 0)."""
    gen = torch.Generator().manual_seed(0)
    return [
        torch.randn((batch, heads, length, dim), generator=gen).to(dtype=dtype, device=device) for heads, dim in shapes
    ]


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: real tokens count from 0 (``cumsum(mask) - 1``), padding gets 0."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def prefill(inputs: tuple, past: list[torch.Tensor]) -> tuple:
    """``(input_ids[, attention_mask])`` as a KV-form prefill over ``past`` (usually length 0): the mask
    (all ones when absent) and the positions from it."""
    ids = inputs[0]
    mask = inputs[1] if len(inputs) > 1 and inputs[1] is not None else torch.ones_like(ids, dtype=torch.long)
    return (ids, mask, positions_of(mask), *past)


def kv_example(input_ids: torch.Tensor, shapes, dtype: torch.dtype, past_length: int = 2) -> tuple:
    """The KV form of ``(input_ids,)``: a full attention mask, positions after ``past_length`` past tokens
    and random past tensors of ``shapes`` (so capture and the oracle see a non-empty cache)."""
    batch, seq = input_ids.shape
    mask = torch.ones(batch, past_length + seq, dtype=torch.long, device=input_ids.device)
    positions = torch.arange(past_length, past_length + seq, device=input_ids.device).expand(batch, seq)
    return (input_ids, mask, positions, *random_past(shapes, batch, dtype, input_ids.device, past_length))


def kv_dynamic_shapes(example: tuple) -> tuple:
    """Batch, sequence and past length dynamic (``Dim.AUTO``: export decides what can vary); the past
    tensors are ``forward``'s ``*past``, one nested entry."""
    auto = torch.export.Dim.AUTO
    past = example[LEADING_INPUTS:]
    return ({0: auto, 1: auto}, {0: auto, 1: auto}, {0: auto, 1: auto}, tuple({0: auto, 2: auto} for _ in past))


@contextlib.contextmanager
def capture_context(model) -> Iterator[None]:
    """Export-friendly ``"sdpa"`` attention for the capture (restored after) and no 0/1 size
    specialisation. The swap is of the function registered under ``"sdpa"``: a model that dispatches
    through transformers' attention registry gets ``_export_sdpa``; one with its own SDPA code (or its
    own local registry entry) keeps it, and its masks keep their format."""
    import torch.fx.experimental._config as fx_config
    from transformers import AttentionInterface

    registry = AttentionInterface._global_mapping
    original = registry.get("sdpa")
    registry["sdpa"] = _export_sdpa
    try:
        with fx_config.patch(backed_size_oblivious=True), torch.no_grad():
            yield
    finally:
        registry["sdpa"] = original


def _export_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' SDPA attention without its ``query_length > 1`` test when a mask is given (the only
    case under export): KV heads repeated to the query heads, the mask (with any position bias) applied.
    Anything else goes to transformers' own function."""
    from transformers.integrations.sdpa_attention import create_position_bias_mask, sdpa_attention_forward

    if attention_mask is None or kwargs.get("softcap") is not None or kwargs.get("output_attentions"):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if attention_mask.dim() == 4:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    if kwargs.get("position_bias") is not None:
        attention_mask = create_position_bias_mask(kwargs["position_bias"], attention_mask, False, query, key)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None
