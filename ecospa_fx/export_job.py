"""Model directory or artifact in, checked ``.onnx`` out: what ``ecospa-fx export`` and
``tools/export_onnx.py`` run.

A model directory is loaded with transformers (offline), compressed first when ``sparsity > 0`` (dynamic
batch/seq unless ``static``; static when the model pins them), and exported. An artifact (written by
``ecospa_fx.save`` / ``ecospa-fx compress``) is rebuilt with dynamic batch/seq where the model allows it.
Example inputs are random token ids ``batch x seq``; onnxruntime is compared with PyTorch on them and, for a
dynamic export, on a second shape (batch + 1, seq + 5).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ecospa_fx.errors import CaptureError, InputError
from ecospa_fx.export import ExportResult, check_writable, export_onnx, token_dynamic_shapes
from ecospa_fx.loading import artifact_plan, is_artifact, load_artifact, load_model

ATOL, RTOL = 1e-4, 1e-5  # default parity tolerance: float32 rounding grows with the output's magnitude
Step = Callable[[str], None]  # called with a description as each stage starts


@dataclass(frozen=True)
class ExportJob:
    source: Path
    out: Path
    gguf_file: str | None = None
    sparsity: float = 0.0
    granularity: str = "channel"
    round_to: int = 8
    batch: int = 2
    seq: int = 16
    opset: int | None = None
    static: bool = False
    verify: bool = True
    atol: float | None = None  # None: ATOL + RTOL * max|PyTorch output| on the example inputs
    kv: bool = False  # a causal LM for generation: past/present KV inputs and outputs
    int8: bool = False  # also write <out>.int8.onnx (onnxruntime dynamic int8), with its token agreement
    genai: Path | None = None  # also write an onnxruntime-genai folder here (uniform cache widths only)

    def __post_init__(self) -> None:
        if self.batch < 1 or self.seq < 1:
            raise InputError(f"--batch and --seq must be positive, got {self.batch} and {self.seq}")


@dataclass
class ExportOutcome:
    result: ExportResult
    params: int
    atol: float = 0.0
    notes: list[str] = field(default_factory=list)
    compress: dict[str, Any] | None = None


def run_export(job: ExportJob, step: Step = lambda _: None) -> ExportOutcome:
    """Load (and compress) ``job.source``, export it to ``job.out``, check it; raises ``ParityError``
    when onnxruntime and PyTorch differ by more than ``job.atol``."""
    check_writable(job.out)
    notes: list[str] = []
    step(f"loading {job.source}")
    if is_artifact(job.source):
        model, inputs, dynamic = _artifact(job, notes)
        info, limit = None, (artifact_plan(job.source).get("hf_config") or {}).get("max_position_embeddings")
    else:
        model, config = load_model(job.source, job.gguf_file)
        limit = getattr(config, "max_position_embeddings", None)
        inputs = _token_inputs(config, job.batch, job.seq, job.source)
        dynamic, info = not job.static, None
        if job.sparsity > 0:
            step(f"compressing at sparsity {job.sparsity:g}")
            model, dynamic = _compress(model, inputs, job, dynamic, notes)
            info = _compress_info(model.ecospa_report, job)
    step(f"exporting to ONNX (opset {job.opset or 'default'}) and checking parity in onnxruntime")
    atol = job.atol if job.atol is not None else _tolerance(model, inputs)
    result = export_onnx(
        model,
        inputs,
        job.out,
        opset=job.opset,
        dynamic=dynamic,
        atol=atol,
        parity_inputs=_probes(inputs, limit) if dynamic else (),
    )
    return ExportOutcome(result, sum(p.numel() for p in model.parameters()), atol, notes, info)


def _tolerance(model, inputs: tuple) -> float:
    """``ATOL + RTOL * max|output|``: logits of a 30-layer LM (|x| ~ 30) differ by ~2e-4 between
    onnxruntime and PyTorch in float32, which a fixed 1e-4 would call a failure."""
    from torch.utils import _pytree as pytree

    with torch.no_grad():
        leaves = [t for t in pytree.tree_leaves(model(*inputs)) if isinstance(t, torch.Tensor)]
    scale = max((float(t.abs().max()) for t in leaves if t.is_floating_point() and t.numel()), default=0.0)
    return ATOL + RTOL * scale


def _artifact(job: ExportJob, notes: list[str]) -> tuple[Any, tuple, bool]:
    plan = artifact_plan(job.source)
    vocab = (plan.get("hf_config") or {}).get("vocab_size", 2)
    saved = [tuple(s["shape"]) for s in plan["inputs"]]
    from ecospa_fx.artifact import random_inputs

    specs = [dict(s, shape=_widened(s["shape"], job)) for s in plan["inputs"]] if not job.static else plan["inputs"]
    inputs = random_inputs(specs, vocab)
    model = load_artifact(job.source, inputs, dynamic=not job.static)
    dynamic = not job.static and any(_is_symbolic(model))
    if not job.static and not dynamic:
        notes.append(f"the artifact could not be captured with dynamic shapes: exported for shapes {saved}")
    return model, inputs, dynamic


def _widened(shape: list[int], job: ExportJob) -> list[int]:
    """Example shape for a dynamic capture: batch and seq of the job (>= 2, which torch.export needs)."""
    out = list(shape)
    if out:
        out[0] = max(2, job.batch)
    if len(out) >= 2:
        out[1] = max(2, job.seq)
    return out


def _is_symbolic(model) -> list[bool]:
    graph = getattr(model, "graph", None)
    nodes = [n for n in graph.nodes if n.op == "placeholder"] if graph is not None else []
    vals = [n.meta.get("val") for n in nodes]
    return [isinstance(v, torch.Tensor) and any(not isinstance(d, int) for d in v.shape) for v in vals]


def _token_inputs(config, batch: int, seq: int, source: Path) -> tuple[torch.Tensor]:
    vocab = getattr(config, "vocab_size", None)
    if not vocab:
        raise InputError(f"{source}: the config has no vocab_size; export feeds token ids")
    generator = torch.Generator().manual_seed(0)
    return (torch.randint(0, vocab, (batch, seq), generator=generator),)


def _compress(model, inputs: tuple, job: ExportJob, dynamic: bool, notes: list[str]):
    import ecospa_fx

    options = {"granularity": job.granularity, "round_to": job.round_to, "verify": job.verify}
    if dynamic:
        try:
            return ecospa_fx.compress(
                model, inputs, job.sparsity, dynamic_shapes=token_dynamic_shapes(inputs), **options
            ), True
        except CaptureError as err:
            notes.append(f"dynamic capture failed ({str(err).splitlines()[0]}); compressed with static shapes")
    return ecospa_fx.compress(model, inputs, job.sparsity, **options), False


def _compress_info(report, job: ExportJob) -> dict[str, Any]:
    return {
        "sparsity": job.sparsity,
        "granularity": job.granularity,
        "params_before": report.params_before,
        "params_after": report.params_after,
        "max_abs_diff": report.max_abs_diff,
    }


def _probes(inputs: tuple, limit: int | None) -> list[tuple]:
    """A second shape for the parity check of a dynamic export: batch + 1, seq + 5 (within ``limit``
    positions)."""
    x = inputs[0]
    if len(inputs) != 1 or x.ndim < 2 or x.dtype.is_floating_point:
        return []
    seq = x.shape[1] + 5 if not limit else min(limit, x.shape[1] + 5)
    generator = torch.Generator().manual_seed(1)
    return [(torch.randint(0, int(x.max()) + 1, (x.shape[0] + 1, seq), generator=generator),)]


@dataclass
class KVExportOutcome:
    path: Path
    opset: int
    max_abs_diff: dict[str, float]
    params: int
    layout: dict[str, Any]
    int8: dict[str, Any] | None = None
    compress: dict[str, Any] | None = None
    genai: str | None = None  # the folder written, or why none was


def run_kv_export(job: ExportJob, step: Step = lambda _: None) -> KVExportOutcome:
    """A causal LM (model directory, compressed first at ``sparsity``, or artifact) to an ONNX file with
    past/present KV tensors, checked on prefill and decode; with ``int8`` also its int8 copy."""
    from ecospa_fx.generation.onnx_kv import export_kv_onnx, quantize_int8, token_agreement
    from ecospa_fx.generation.target import embedding_name

    check_writable(job.out)
    step(f"loading {job.source}")
    info = None
    if is_artifact(job.source):
        from ecospa_fx.loading import artifact_config

        model, config = load_artifact(job.source, kv=True), artifact_config(job.source)
    else:
        import ecospa_fx

        dense, config = load_model(job.source, job.gguf_file, cache=True)
        inputs = _token_inputs(config, job.batch, job.seq, job.source)
        step(f"capturing with the KV cache, compressing at sparsity {job.sparsity:g}")
        options = {"granularity": job.granularity, "round_to": job.round_to, "verify": job.verify and job.sparsity > 0}
        model = ecospa_fx.compress(dense, inputs, job.sparsity, **options)
        info = _compress_info(model.ecospa_report, job)
    if getattr(model, "ecospa_kv", None) is None:
        raise InputError(f"{job.source} is not a causal LM that generates: --kv needs one")
    step("exporting to ONNX with past/present KV and checking prefill and decode in onnxruntime")
    result = export_kv_onnx(model, job.out, opset=job.opset, atol=job.atol)
    int8 = None
    if job.int8:
        step("quantizing to int8 and measuring token agreement with fp32")
        path = quantize_int8(job.out, job.out.with_suffix(".int8.onnx"))
        vocab = model.get_parameter(embedding_name(model)).shape[0]
        int8 = {
            "path": str(path),
            "bytes": path.stat().st_size,
            "top1_agreement": token_agreement(job.out, path, vocab),
        }
    params = sum(p.numel() for p in model.parameters())
    layout = model.ecospa_kv.to_json()
    genai = _genai(job, model, config) if job.genai is not None else None
    return KVExportOutcome(result.path, result.opset, result.max_abs_diff, params, layout, int8, info, genai)


def _genai(job: ExportJob, model, config) -> str:
    """Write the onnxruntime-genai folder; the folder, or the reason there is none."""
    from ecospa_fx.generation.onnx_kv import genai_problem, write_genai_folder
    from ecospa_fx.loading import load_tokenizer

    problem = genai_problem(model.ecospa_kv)
    if problem:
        return f"not written: {problem}"
    tokenizer = load_tokenizer(job.source, None if is_artifact(job.source) else job.gguf_file)
    return str(write_genai_folder(model, job.out, job.genai, config, tokenizer))
