"""Compress checkpoints larger than memory: plan on a weightless model, stream the weights shard by shard.

1. ``plan_compression(model, example_inputs, config, weights=...)``: capture, discover and plan on a model
   whose parameters may live on the ``meta`` device; scores that need weights read them from ``weights``
   (``CheckpointTensors``: memory-mapped safetensors shards, one tensor at a time), and activation-aware
   scores run one decoder layer at a time (``passes.importance.layerwise``). The result carries
   ``slices``: ``{parameter: {dim: kept indices}}``, the rewrite's parameter plan as data
   (``passes.rewrite.parameter_plan``).
2. ``stream_apply(src, slices, out)``: read every tensor of every input shard (memory-mapped), apply its
   slices with the same ``index_select`` the rewrite uses, and write compressed safetensors shards of at most
   ``max_shard_bytes`` plus an index, never holding more than one input shard's pages and one output buffer.

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
from safetensors.torch import save_file

from ecospa_fx.config import CompressConfig
from ecospa_fx.errors import InputError
from ecospa_fx.report import Report
from passes.analyse import Analysis
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

    def __init__(self, src: str | Path, names: Mapping[str, str] | None = None,
                 extra: Mapping[str, torch.Tensor] | None = None):
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


def open_checkpoint(model: torch.nn.Module, src: str | Path, extra: Mapping[str, torch.Tensor] | None = None):
    """``CheckpointTensors`` over ``src`` addressed by ``model``'s parameter names (tied aliases resolved);
    real (non-meta) buffers of ``model`` are added so a weightless model's graph can run layer by layer."""
    index = tensor_index(src)
    buffers = {n: b for n, b in model.named_buffers(remove_duplicate=False) if not b.is_meta}
    buffers.update(extra or {})
    missing = [n for n, p in model.named_parameters() if n not in checkpoint_names(model, index)]
    if missing:
        raise InputError(f"{src} lacks {len(missing)} parameters of the model (e.g. {missing[0]})")
    return CheckpointTensors(src, checkpoint_names(model, index), buffers)


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
    graph's meta device arguments retargeted to the CPU.
    """
    from ecospa_fx.api import _capture, _checked, _plan, _reconcile, _resolved

    config = _resolved(config, calibration)
    if getattr(config, "compensate", False):
        raise InputError("compensate=True changes biases from calibration statistics: not supported when streaming")
    gm = _capture(model, _checked(model, example_inputs, allow_meta=True), None)
    analysis = analyse(gm)
    groups = build_groups(analysis.facts, config.granularity)
    params = weights if weights is not None else dict(gm.named_parameters(remove_duplicate=False))
    layerwise = weights is not None and config.importance == "activation"
    on_meta = any(p.is_meta for p in gm.parameters())
    run_gm = retarget_device(gm) if layerwise and on_meta else gm
    inputs = ScoreInputs(run_gm, analysis.facts, params, analysis.labels, calibration, seed=config.seed,
                         layerwise=layerwise)
    keep, report = _plan(groups, analysis.facts, params, config, inputs)
    keep = _reconcile(groups, analysis, keep, report)
    return CompressionPlan(analysis, keep, report, parameter_plan(analysis.facts, keep))


def retarget_device(gm: torch.fx.GraphModule, device: str = "cpu") -> torch.fx.GraphModule:
    """A copy of ``gm`` whose ``device=meta`` arguments (``arange``, ``zeros``, ``to``, metadata asserts,
    in every nested graph) name ``device`` instead, so a graph captured on meta runs on real tensors."""
    import copy

    out = copy.deepcopy(gm)
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
        tensor = tensor.index_select(int(dim), torch.as_tensor(np.asarray(kept), dtype=torch.long)).clone()
    return tensor


class ShardWriter:
    """Collects tensors and writes a safetensors shard whenever the buffer would pass ``max_bytes``; ``close``
    names the shards ``model-0000i-of-0000n.safetensors`` and writes the Hugging Face index."""

    def __init__(self, out: str | Path, max_bytes: int):
        self.out, self.max_bytes = Path(out), max_bytes
        self.out.mkdir(parents=True, exist_ok=True)
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffered = self.total = 0
        self.parts: list[tuple[Path, list[str]]] = []
        self.peak_buffer = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffered + size > self.max_bytes:
            self.flush()
        self.buffer[name] = tensor.contiguous()
        self.buffered += size
        self.total += size
        self.peak_buffer = max(self.peak_buffer, self.buffered)

    def flush(self) -> None:
        if not self.buffer:
            return
        path = self.out / f"part-{len(self.parts):05d}.tmp"
        save_file(self.buffer, str(path), metadata={"format": "pt"})
        self.parts.append((path, list(self.buffer)))
        self.buffer, self.buffered = {}, 0

    def close(self) -> list[Path]:
        self.flush()
        n, weight_map, files = len(self.parts), {}, []
        for i, (tmp, names) in enumerate(self.parts):
            final = self.out / (f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors")
            tmp.rename(final)
            files.append(final)
            weight_map.update(dict.fromkeys(names, final.name))
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            (self.out / INDEX).write_text(json.dumps(index, indent=1))
        return files


def stream_apply(src: str | Path, slices: Slices, out: str | Path, *, max_shard_bytes: int = 2**30) -> dict[str, Any]:
    """Write ``src``'s tensors to ``out`` as compressed safetensors shards, one input tensor at a time.

    ``slices``: ``{checkpoint tensor name: {dim: kept indices}}`` (``checkpoint_slices``). Input shards are
    memory-mapped; resident memory is bounded by one input shard's touched pages plus the output buffer
    (at most ``max_shard_bytes``, or one tensor if larger). Returns byte counts and the written files.
    """
    files = shard_files(src)
    unknown = sorted(set(slices) - set(tensor_index(src)))
    if unknown:
        raise InputError(f"the plan slices tensors the checkpoint lacks: {unknown[:3]}")
    writer = ShardWriter(out, max_shard_bytes)
    read = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                tensor = f.get_tensor(key)
                read += tensor.numel() * tensor.element_size()
                writer.add(key, slice_tensor(tensor, slices[key]) if key in slices else tensor)
                del tensor
    written = writer.close()
    return {"files": [str(p) for p in written], "bytes_in": read, "bytes_out": writer.total,
            "peak_output_buffer": writer.peak_buffer, "largest_input_shard": max(p.stat().st_size for p in files)}


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
