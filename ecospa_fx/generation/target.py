"""What ``compress`` captures: the model as given, or a cached causal LM in its KV form.

A Hugging Face causal LM loaded with ``use_cache=True`` (the default) is captured as ``KVCacheLM``: the
user's ``(input_ids,)`` example becomes ``(input_ids, attention_mask, position_ids, *past)``, calibration
batches get an empty past, and the KV tensors are declared carried state. The compressed module then
takes and returns a cache of the compressed widths (``KVLayout``), which ``ecospa_fx.generate`` uses.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ecospa_fx.errors import CaptureError, InputError
from ecospa_fx.generation.causal_lm import (
    LEADING_INPUTS,
    KVCacheLM,
    cache_shapes,
    capture_context,
    is_cached_causal_lm,
    kv_dynamic_shapes,
    kv_example,
    prefill,
    random_past,
    recurrent_cache_layers,
)
from passes.state import state_shapes
from passes.verify import max_abs_diff, max_abs_value


@dataclass
class CaptureTarget:
    """The module to capture, its example inputs and calibration batches, and its carried state."""

    module: torch.nn.Module
    inputs: tuple
    batches: list[tuple] | None
    dynamic_shapes: Any
    state: list[tuple[int, int]] = field(default_factory=list)
    source: torch.nn.Module | None = None
    auto_dynamic: bool = False  # dynamic_shapes="auto": batch/seq dynamic, static if that capture fails
    without_cache: bool = False  # a recurrent cache (conv, state space): captured with use_cache=False

    @classmethod
    def of(cls, model, inputs: tuple, batches, dynamic_shapes, state=None) -> CaptureTarget:
        auto = isinstance(dynamic_shapes, str) and dynamic_shapes == "auto"
        if isinstance(dynamic_shapes, str) and not auto:
            raise InputError(f"dynamic_shapes must be 'auto', None or torch.export's argument, got {dynamic_shapes!r}")
        if state is not None:
            shapes = _token_axes(inputs) if auto else dynamic_shapes
            return cls(model, inputs, batches, shapes, _state_pairs(state, len(inputs)), auto_dynamic=auto)
        if not is_cached_causal_lm(model):
            shapes = _token_axes(inputs) if auto else dynamic_shapes
            return cls(model, inputs, batches, shapes, auto_dynamic=auto, without_cache=_warn_if_recurrent_cache(model))
        _check_token_inputs(inputs, "example_inputs")
        for b, batch in enumerate(batches or []):
            _check_token_inputs(batch, f"calibration[{b}]")
        wrapper = KVCacheLM(model)
        widths, dtype = cache_shapes(model), next(model.parameters()).dtype  # one probing forward
        example = kv_example(inputs[0], widths, dtype)
        empty = lambda b: random_past(widths, b[0].shape[0], dtype, b[0].device)  # noqa: E731
        converted = [prefill(b, empty(b)) for b in batches] if batches is not None else None
        shapes = kv_dynamic_shapes(example) if auto or dynamic_shapes is None else dynamic_shapes
        return cls(wrapper, example, converted, shapes, wrapper.state_pairs(), model)

    def context(self):
        if self.without_cache:
            return _use_cache_off(self.module)
        return capture_context(self.source) if self.source is not None else contextlib.nullcontext()

    def check_capture(self, gm) -> None:
        """The captured KV graph computes what the eager model does on the example (the attention swap
        and the cache plumbing are ours, so they are checked here; the mask oracle compares graphs)."""
        if not self.state:
            return
        with torch.no_grad():
            eager, graph = self.module(*self.inputs), gm(*self.inputs)
        diff = max_abs_diff(graph, eager)
        scale = max_abs_value(eager)
        if not diff <= 1e-4 * max(1.0, scale):
            raise CaptureError(
                f"the captured KV-cache graph of {type(self.source).__name__} differs from the model by {diff:.3e} "
                "on the example; this is a bug in ecospa_fx: please report it (load the model with "
                "use_cache=False to compress it without a cache meanwhile)"
            )


@contextlib.contextmanager
def _use_cache_off(model):
    """``config.use_cache = False`` for the capture (the forward then returns logits only), restored after."""
    config = model.config.get_text_config(decoder=True)
    before = config.use_cache
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = before


def _warn_if_recurrent_cache(model) -> bool:
    """A causal LM that caches recurrent state (Mamba, LFM2's conv layers) is compressed without its cache:
    the KV form carries keys and values only. Said once per compress, not silently; True when so."""
    config = getattr(model, "config", None)
    if config is None or not getattr(config.get_text_config(decoder=True), "use_cache", False):
        return False
    layers = recurrent_cache_layers(model)
    if layers:
        warnings.warn(
            f"{type(model).__name__} caches recurrent state ({', '.join(layers)} layers), which the KV form does "
            "not carry: it is compressed without a cache (whole-sequence logits; ecospa_fx.generate needs a KV "
            "cache and does not run it)",
            stacklevel=4,
        )
    return bool(layers)


def _token_axes(inputs: tuple):
    """``token_dynamic_shapes`` of the inputs, or None (static) when no axis can be dynamic."""
    from ecospa_fx.export import token_dynamic_shapes

    spec = token_dynamic_shapes(inputs)
    return spec if any(s for s in spec) else None


def _state_pairs(state, n_inputs: int) -> list[tuple[int, int]]:
    """``state`` as a list of (input position, output position) int pairs, checked."""
    try:
        pairs = [(int(i), int(j)) for i, j in state]
    except (TypeError, ValueError):
        raise InputError(f"state must be [(input position, output position), ...], got {state!r}") from None
    for i, j in pairs:
        if not 0 <= i < n_inputs or j < 0:
            raise InputError(f"state pair ({i}, {j}): input position must be in [0, {n_inputs}), output >= 0")
    if len({i for i, _ in pairs}) != len(pairs) or len({j for _, j in pairs}) != len(pairs):
        raise InputError(f"state pairs must not repeat an input or an output: {pairs}")
    return pairs


def _check_token_inputs(inputs: tuple, what: str) -> None:
    """A cached causal LM is compressed from ``(input_ids,)`` or ``(input_ids, attention_mask)``."""
    ids = inputs[0]
    if len(inputs) > 2 or not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
        raise InputError(
            f"{what}: a causal LM with a KV cache (use_cache=True) is compressed from (input_ids,) or "
            "(input_ids, attention_mask), input_ids an integer tensor [batch, seq]; for other inputs load "
            "it with use_cache=False (then the result has no cache and cannot generate)"
        )


@dataclass(frozen=True)
class KVLayout:
    """How the compressed module's cache looks: ``forward(input_ids, attention_mask, position_ids,
    *past) -> (logits, *present)`` with ``past[i]`` shaped ``[batch, shapes[i][0], length, shapes[i][1]]``."""

    n_layers: int
    shapes: tuple[tuple[int, int], ...]  # (kv_heads, head_dim) per past tensor, compressed
    dense_shapes: tuple[tuple[int, int], ...]
    dtype: torch.dtype
    eos_token_id: tuple[int, ...] = ()  # the source model's generation config (``generate``'s default)
    leading_inputs: int = LEADING_INPUTS

    def empty_past(self, batch: int, device="cpu", dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        return [torch.zeros(batch, h, 0, d, dtype=dtype or self.dtype, device=device) for h, d in self.shapes]

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> KVLayout:
        return cls(
            int(record["n_layers"]),
            tuple((int(h), int(d)) for h, d in record["shapes"]),
            tuple((int(h), int(d)) for h, d in record["dense_shapes"]),
            getattr(torch, record["dtype"]),
            tuple(int(t) for t in record.get("eos_token_id", [])),
        )

    def random_inputs(self, vocab: int, batch: int, seq: int, past: int, seed: int = 0) -> tuple:
        """Seeded KV-form inputs at the compressed widths: ids below ``vocab``, a full mask, positions
        after ``past`` random cached tokens."""
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        mask = torch.ones(batch, past + seq, dtype=torch.long)
        positions = torch.arange(past, past + seq).expand(batch, seq).contiguous()
        cache = [torch.randn(batch, h, past, d, generator=gen).to(self.dtype) for h, d in self.shapes]
        return (ids, mask, positions, *cache)

    def to_json(self) -> dict[str, Any]:
        return {
            "n_layers": self.n_layers,
            "shapes": [list(s) for s in self.shapes],
            "dense_shapes": [list(s) for s in self.dense_shapes],
            "dtype": str(self.dtype).removeprefix("torch."),
            "eos_token_id": list(self.eos_token_id),
        }


def embedding_name(gm) -> str:
    """The parameter an ``embedding`` of ``gm`` reads: the token table (its rows are the vocabulary)."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and "embedding" in str(node.target) and node.args[0].op == "get_attr":
            return str(node.args[0].target)
    raise InputError("cannot find the token embedding of this model")


def prefill_inputs(model, inputs: tuple) -> tuple:
    """``inputs`` as ``model`` takes them: a compressed KV module gets ``(input_ids[, attention_mask])``
    turned into a prefill (positions from the mask, an empty cache at its own widths); others as given."""
    layout = getattr(model, "ecospa_kv", None)
    if layout is None or len(inputs) > 2:
        return inputs
    return prefill(inputs, layout.empty_past(inputs[0].shape[0], inputs[0].device))


def kv_layout(analysis, keep: np.ndarray, target: CaptureTarget) -> KVLayout:
    """The compressed cache widths from the state inputs' adopted labels and the keep mask."""
    narrow = state_shapes(analysis, keep)
    past = target.inputs[LEADING_INPUTS:]
    shapes, dense = [], []
    for k, x in enumerate(past):
        dense.append((int(x.shape[1]), int(x.shape[3])))
        new = narrow.get(LEADING_INPUTS + k)
        shapes.append((int(new[1]), int(new[3])) if new is not None else dense[-1])
    return KVLayout(target.module.n_layers, tuple(shapes), tuple(dense), past[0].dtype, _eos(target.source))


def _eos(model) -> tuple[int, ...]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return ()
    return (int(eos),) if isinstance(eos, int) else tuple(int(t) for t in eos)
