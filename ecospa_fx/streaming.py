"""Compress checkpoints larger than memory: plan on a weightless model, stream the weights shard by shard.

1. ``plan_compression(model, example_inputs, config, weights=...)``: capture, discover and plan on a model
   whose parameters may live on the ``meta`` device; scores that need weights read them from ``weights``
   (``CheckpointTensors``: memory-mapped safetensors shards, one tensor at a time), and activation-aware
   scores run one decoder layer at a time (``passes.importance.layerwise``). The result carries
   ``slices``: ``{parameter: {dim: kept indices}}``, the rewrite's parameter plan as data
   (``passes.rewrite.parameter_plan``).
2. ``stream_apply(src, slices, out)``: lay the output shards out from the input headers alone, then read
   every tensor (memory-mapped), apply its slices with the same ``index_select`` the rewrite uses and write it
   straight into its output shard (safetensors format, at most ``max_shard_bytes`` each, plus an index):
   resident memory is one input shard's touched pages plus one tensor and its slice.

Checkpoint names are the model's parameter names (Hugging Face ``save_pretrained`` layout); a tied parameter
absent from the checkpoint (``lm_head.weight`` tied to ``model.embed_tokens.weight``) maps to its stored alias.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from ecospa_fx.config import CompressConfig
from ecospa_fx.errors import InputError
from ecospa_fx.report import Report
from passes.analyse import Analysis
from passes.capture import copy_module
from passes.dataflow import analyse
from passes.groups import build_groups
from passes.importance import ScoreInputs
from passes.rewrite import parameter_plan

INDEX = "model.safetensors.index.json"
PLAN = "ecospa_stream.json"
Slices = dict[str, dict[int, np.ndarray]]


@dataclass
class CompressionPlan:
    """Discovery and planning results: the keep mask over all channels, the report, and the parameter
    slices ``{fx parameter name: {dim: kept indices}}``."""

    analysis: Analysis
    keep: np.ndarray
    report: Report
    slices: Slices


# ---------------------------------------------------------------------------------- checkpoint reading
def shard_files(src: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (or the one file given), in name order."""
    path = Path(src)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        raise InputError(f"{src} holds no .safetensors files")
    return files


def tensor_index(src: str | Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the shard holding it (reads only the shards' headers)."""
    out: dict[str, Path] = {}
    for file in shard_files(src):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                out[key] = file
    return out


def parameter_aliases(model: torch.nn.Module) -> dict[str, list[str]]:
    """Parameter name -> every name of the same tensor (tied weights), the first registered name first."""
    by_tensor: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), []).append(name)
    return {name: names for names in by_tensor.values() for name in names}


def checkpoint_names(model: torch.nn.Module, stored: set[str] | Mapping[str, Any]) -> dict[str, str]:
    """Model parameter name -> the checkpoint tensor that holds it (itself, or a tied alias that is stored)."""
    out = {}
    for name, aliases in parameter_aliases(model).items():
        hit = next((a for a in [name, *aliases] if a in stored), None)
        if hit is not None:
            out[name] = hit
    return out


class CheckpointTensors(Mapping):
    """Name -> tensor, read on access from memory-mapped safetensors shards (nothing is cached here: the
    caller holds a tensor as long as it needs it). ``names`` maps the names callers use (model parameter
    names) to checkpoint names; ``extra`` adds in-memory tensors (e.g. buffers rebuilt from the config)."""

    def __init__(
        self, src: str | Path, names: Mapping[str, str] | None = None, extra: Mapping[str, torch.Tensor] | None = None
    ):
        self.index = tensor_index(src)
        self.names = dict(names) if names is not None else {k: k for k in self.index}
        self.extra = dict(extra or {})
        self.loads = 0  # how many tensors were read

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.extra:
            return self.extra[name]
        stored = self.names.get(name)
        if stored is None or stored not in self.index:
            raise KeyError(name)
        self.loads += 1
        with safe_open(str(self.index[stored]), framework="pt") as f:
            return f.get_tensor(stored)

    def __iter__(self) -> Iterator[str]:
        yield from self.extra
        yield from (k for k in self.names if k not in self.extra)

    def __len__(self) -> int:
        return len(set(self.names) | set(self.extra))

    def __contains__(self, name: object) -> bool:
        return name in self.extra or self.names.get(name) in self.index  # type: ignore[call-overload]


def open_checkpoint(
    model: torch.nn.Module, src: str | Path, extra: Mapping[str, torch.Tensor] | None = None
) -> CheckpointTensors:
    """``CheckpointTensors`` over ``src`` addressed by ``model``'s parameter names (tied aliases resolved).
    Real (non-meta) buffers of ``model`` and ``extra`` (e.g. the buffers of a model built under
    ``accelerate.init_empty_weights()``) are added so a weightless model's graph can run layer by layer."""
    names = checkpoint_names(model, tensor_index(src))
    missing = [n for n, _ in model.named_parameters() if n not in names]
    if missing:
        raise InputError(f"{src} lacks {len(missing)} parameters of the model (e.g. {missing[0]})")
    buffers = {n: b for n, b in model.named_buffers(remove_duplicate=False) if not b.is_meta}
    buffers.update(extra or {})
    return CheckpointTensors(src, names, buffers)


# ---------------------------------------------------------------------------------- planning
def plan_compression(
    model: torch.nn.Module,
    example_inputs: Any,
    config: CompressConfig,
    *,
    weights: Mapping[str, torch.Tensor] | None = None,
    calibration: list[tuple] | None = None,
) -> CompressionPlan:
    """Discover and plan as ``ecospa_fx.compress`` does, without touching the model's weights.

    ``model`` may be on the ``meta`` device (then ``example_inputs`` may be too). ``weights``: where scores
    read weights (default: the model's own parameters); with ``importance="activation"`` and ``weights``
    given, statistics are collected one decoder layer at a time on ``calibration`` (real tensors), the
    graph's meta device arguments retargeted to the CPU. Kept weights are not refit here (``refit="auto"``
    streams without one; an explicit refit is refused).
    """
    from ecospa_fx.api import _capture, _checked, _plan, _reconcile, _resolved

    config = _resolved(config, calibration)
    if getattr(config, "compensate", False):
        raise InputError("compensate=True changes biases from calibration statistics: not supported when streaming")
    if config.refit in ("dense", "self"):
        raise InputError(
            f"refit={config.refit!r} refits kept weights on calibration data: not supported when streaming (the "
            "plan keeps the weights as stored; refit='auto' streams without a refit)"
        )
    gm = _capture(model, _checked(model, example_inputs, allow_meta=True), None)
    analysis = analyse(gm)
    groups = build_groups(analysis.facts, config.granularity)
    params = weights if weights is not None else dict(gm.named_parameters(remove_duplicate=False))
    layerwise = weights is not None and config.importance == "activation"
    on_meta = any(p.is_meta for p in gm.parameters())
    run_gm = retarget_device(gm) if layerwise and on_meta else gm
    inputs = ScoreInputs(
        run_gm, analysis.facts, params, analysis.labels, calibration, seed=config.seed, layerwise=layerwise
    )
    keep, report = _plan(groups, analysis.facts, params, config, inputs)
    keep = _reconcile(groups, analysis, keep, report)
    return CompressionPlan(analysis, keep, report, parameter_plan(analysis.facts, keep))


def retarget_device(gm: torch.fx.GraphModule, device: str = "cpu") -> torch.fx.GraphModule:
    """A copy of ``gm`` whose ``device=meta`` arguments (``arange``, ``zeros``, ``to``, metadata asserts,
    in every nested graph) name ``device`` instead, so a graph captured on meta runs on real tensors."""

    out = copy_module(gm)
    target = torch.device(device)
    swap = lambda v: target if isinstance(v, torch.device) and v.type == "meta" else v  # noqa: E731
    for module in out.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            node.args = torch.fx.node.map_aggregate(node.args, swap)
            node.kwargs = torch.fx.node.map_aggregate(node.kwargs, swap)
        module.recompile()
    return out


def checkpoint_slices(model: torch.nn.Module, slices: Slices, stored: set[str] | Mapping[str, Any]) -> Slices:
    """``slices`` keyed by checkpoint tensor names (tied parameters resolved to the stored alias)."""
    names = checkpoint_names(model, stored)
    out: Slices = {}
    for param, dims in slices.items():
        if param not in names:
            raise InputError(f"the checkpoint has no tensor for parameter {param}")
        out[names[param]] = dims
    return out


# ---------------------------------------------------------------------------------- streaming apply
def slice_tensor(tensor: torch.Tensor, dims: Mapping[int, np.ndarray]) -> torch.Tensor:
    """``index_select`` along every planned dim, in plan order (exactly what the rewrite does)."""
    for dim, kept in dims.items():
        tensor = tensor.index_select(int(dim), torch.as_tensor(np.asarray(kept), dtype=torch.long))
    return tensor


ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}


@dataclass
class _Entry:
    """One output tensor: where it comes from, its dtype code, shape after slicing, and byte size."""

    name: str
    source: Path
    dtype: str
    shape: list[int]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * ITEMSIZE[self.dtype]


def output_layout(src: str | Path, slices: Slices, max_shard_bytes: int) -> list[list[_Entry]]:
    """Output shards from the input headers alone: every tensor in input order with its sliced shape, a new
    shard started when the next tensor would take the current one past ``max_shard_bytes``."""
    shards: list[list[_Entry]] = [[]]
    size = 0
    for file in shard_files(src):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                info = f.get_slice(key)
                shape = list(info.get_shape())
                for dim, kept in slices.get(key, {}).items():
                    shape[int(dim)] = len(kept)
                entry = _Entry(key, file, info.get_dtype(), shape)
                if shards[-1] and size + entry.nbytes > max_shard_bytes:
                    shards.append([])
                    size = 0
                shards[-1].append(entry)
                size += entry.nbytes
    return [s for s in shards if s]


def _header(entries: list[_Entry]) -> bytes:
    """The safetensors header: 8-byte little-endian length, then JSON padded with spaces to 8 bytes."""
    meta: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        meta[e.name] = {"dtype": e.dtype, "shape": e.shape, "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    body = json.dumps(meta, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return len(body).to_bytes(8, "little") + body


def _write_shard(path: Path, entries: list[_Entry], slices: Slices, handles: dict) -> None:
    """Write one output shard tensor by tensor, straight from the (memory-mapped) input to the file."""
    with open(path, "wb") as out:
        out.write(_header(entries))
        for e in entries:
            if e.source not in handles:
                handles.clear()  # inputs are read in order: one input shard open at a time
                handles[e.source] = safe_open(str(e.source), framework="pt")
            tensor = slice_tensor(handles[e.source].get_tensor(e.name), slices.get(e.name, {})).contiguous()
            if list(tensor.shape) != e.shape:
                raise InputError(f"{e.name}: sliced shape {list(tensor.shape)} != planned {e.shape}")
            out.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
            del tensor


def stream_apply(src: str | Path, slices: Slices, out: str | Path, *, max_shard_bytes: int = 2**30) -> dict[str, Any]:
    """Write ``src``'s tensors to ``out`` as compressed safetensors shards, one tensor at a time.

    ``slices``: ``{checkpoint tensor name: {dim: kept indices}}`` (``checkpoint_slices``). The output layout
    comes from the input headers, so every tensor is read (memory-mapped), sliced and written straight to its
    shard: resident memory is one input shard's touched pages plus one tensor and its slice, never an output
    buffer. Shards are ``model-0000i-of-0000n.safetensors`` of at most ``max_shard_bytes`` (or one tensor)
    with a Hugging Face index. Returns byte counts and the written files.
    """
    unknown = sorted(set(slices) - set(tensor_index(src)))
    if unknown:
        raise InputError(f"the plan slices tensors the checkpoint lacks: {unknown[:3]}")
    layout = output_layout(src, slices, max_shard_bytes)
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    n, files, handles, weight_map = len(layout), [], {}, {}
    for i, entries in enumerate(layout):
        path = target / (f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors")
        _write_shard(path, entries, slices, handles)
        files.append(path)
        weight_map.update(dict.fromkeys((e.name for e in entries), path.name))
    handles.clear()
    total = sum(e.nbytes for entries in layout for e in entries)
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (target / INDEX).write_text(json.dumps(index, indent=1))
    inputs = shard_files(src)
    return {
        "files": [str(p) for p in files],
        "bytes_in": sum(p.stat().st_size for p in inputs),
        "bytes_out": total,
        "largest_output_shard": max(sum(e.nbytes for e in entries) for entries in layout),
        "largest_tensor": max(e.nbytes for entries in layout for e in entries),
        "largest_input_shard": max(p.stat().st_size for p in inputs),
    }


def write_plan(out: str | Path, plan: CompressionPlan, slices: Slices) -> Path:
    """``out/ecospa_stream.json``: the report's removed indices (the ``ecospa_fx.save`` plan format) and the
    kept indices per checkpoint tensor, so the compressed shards can be matched to a rebuilt graph."""
    path = Path(out) / PLAN
    body = {
        "format": 1,
        "granularity": plan.report.granularity,
        "sparsity": plan.report.sparsity,
        "removed": [[name, dim, list(idx)] for (name, dim), idx in sorted(plan.report.removed.items())],
        "kept": {name: {str(d): np.asarray(k).tolist() for d, k in dims.items()} for name, dims in slices.items()},
    }
    path.write_text(json.dumps(body))
    return path
