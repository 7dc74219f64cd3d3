"""ONNX export of a compressed (or any) model, checked twice: ``onnx.checker`` and onnxruntime parity.

``export_onnx(compressed, example_inputs, path)`` takes what ``ecospa_fx.compress`` returns (a
``torch.fx.GraphModule``) or any ``nn.Module`` and

1. captures it with ``torch.export.export(strict=False)``, batch (axis 0) and sequence (axis 1 of token
   ids and of ``[B, S, H]`` float inputs) marked ``Dim.AUTO``; axes the module pins to a literal come out
   static and the result says which and why;
2. translates the program with ``torch.onnx.export(..., dynamo=True)`` (its onnxscript optimizer on:
   constant folding, dead code), names the dynamic axes ``batch``/``seq`` and the outputs after the
   model's output fields (``logits``);
3. runs ``onnx.checker.check_model(full_check=True)`` and onnxruntime (CPU) on the example inputs (and on
   any ``parity_inputs``), comparing every output with PyTorch's (max abs diff, raises above ``atol``).

Dynamic shapes and compressed modules: ``compress(model, x, dynamic_shapes=...)`` captures with symbolic
batch/seq and the rewrite patches only the channel-axis literals (symbolic sizes are kept), so the
compressed module re-exports with dynamic axes. A module compressed with static shapes holds literal batch
and sequence sizes (``view(linear, [2, 8, -1, 32])``): it exports statically and ``ExportResult.notes``
says so. ``token_dynamic_shapes(inputs)`` builds the ``dynamic_shapes`` argument for ``compress``.

Opset (measured with torch 2.13 / onnxscript 0.7 / onnxruntime 1.32 here, and torch 2.11 / onnxruntime 1.30
on the benchmark host; see benchmarks/README.md "Speed"): the default is 24. At opsets >= 23 the exporter
emits SDPA as one ONNX ``Attention`` node, which onnxruntime runs. At opset 23 it also fuses HF's rotary
(mul/slice/cat) into ONNX ``RotaryEmbedding``, and onnxruntime rejects that node at batch > 1 ("Inputs
'cos_cache' and 'sin_cache' are expected to have the same shape as input 'x', got 1 and 16": HF's cos/sin
have batch 1); at opset 24 no ``RotaryEmbedding`` is emitted and every zoo model passes parity. The
opset >= 23 SDPA translation rejects SDPA that broadcasts K/V heads without ``enable_gqa`` (Falcon's
multi-query attention up to transformers 5.24; 5.25 repeats K/V first: "SDPA (MHA) requires q_num_heads =
kv_num_heads"); with ``opset=None`` such models are re-translated at opset 18 (SDPA decomposed into
MatMul/Softmax) and the result notes it.

Graph simplification: ``torch.onnx.export`` already runs onnxscript's optimizer (constant folding, dead
code, CSE). onnxscript's ``optimize_for_ort`` is not applied: its contrib ``RotaryEmbedding`` fusion fails
in onnxruntime at batch > 1 ("position_ids dimension 0 should be of size batch_size, got 1"), and its
RMSNorm fusions alone were not measured to help (``benchmarks/speed.py --ort-fusions`` tries them).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.utils import _pytree as pytree

from ecospa_fx.errors import EcospaError
from ecospa_fx.onnx_translations import translation_table
from passes.capture import preserved_modes

DEFAULT_OPSET = 24  # ONNX Attention (one node per SDPA), runs in onnxruntime >= 1.23
FALLBACK_OPSET = 18  # torchlib's native opset: SDPA decomposed; used when the opset-24 translation fails

__all__ = [
    "DEFAULT_OPSET",
    "FALLBACK_OPSET",
    "ExportError",
    "ExportResult",
    "ParityError",
    "check_writable",
    "export_onnx",
    "token_dynamic_shapes",
]


class ExportError(EcospaError):
    """The model could not be exported to ONNX, written, or checked; the message says where and why."""


class ParityError(ExportError):
    """onnxruntime's output differs from PyTorch's by more than ``atol``."""

    def __init__(self, message: str, output: str, diff: float, atol: float):
        super().__init__(message)
        self.output = output
        self.diff = diff
        self.atol = atol


@dataclass(frozen=True)
class ExportResult:
    """What was written and how it was checked.

    dynamic_axes: ONNX input name -> {axis: dim name} for the axes that are symbolic in the file.
    max_abs_diff: output name -> max |onnxruntime - PyTorch| over the example (and parity) inputs.
    notes: everything that did not go as asked (static re-export, opset fallback), in words.
    """

    path: Path
    opset: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    checked: bool = False
    notes: tuple[str, ...] = ()
    op_counts: dict[str, int] = field(default_factory=dict)

    @property
    def dynamic(self) -> bool:
        return any(self.dynamic_axes.values())

    @property
    def max_diff(self) -> float:
        return max(self.max_abs_diff.values(), default=0.0)

    def summary(self) -> str:
        shapes = (
            ", ".join(
                f"{k}: " + ", ".join(f"axis {a} = {d}" for a, d in sorted(v.items()))
                for k, v in self.dynamic_axes.items()
                if v
            )
            or "none (static shapes)"
        )
        lines = [
            f"wrote {self.path} (opset {self.opset}, {sum(self.op_counts.values())} nodes)",
            f"dynamic axes: {shapes}",
        ]
        if self.checked:
            lines.append("onnx.checker: ok")
        if self.max_abs_diff:
            diffs = ", ".join(f"{k} {v:.2e}" for k, v in self.max_abs_diff.items())
            lines.append(f"onnxruntime vs PyTorch max abs diff: {diffs}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def token_dynamic_shapes(example_inputs: Any) -> tuple:
    """``dynamic_shapes`` for ``compress``/``torch.export``: batch on axis 0 of every tensor input,
    sequence on axis 1 of integer ``[B, S]`` and float ``[B, S, H]`` inputs, as ``Dim.AUTO`` (an axis the
    model pins stays static instead of failing). Axes of size 0 or 1 are left static: torch.export
    specializes them, so use batch >= 2 and seq >= 2 in the example inputs for dynamic axes."""
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    return tuple(_axes_spec(x, torch.export.Dim.AUTO) for x in inputs)


def export_onnx(
    compressed: torch.nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    opset: int | None = None,
    dynamic: bool = True,
    check: bool = True,
    atol: float = 1e-4,
    parity_inputs: Sequence[Any] = (),
) -> ExportResult:
    """Export ``compressed`` to ONNX at ``path``; check it and compare onnxruntime with PyTorch.

    compressed: what ``ecospa_fx.compress`` returns, or any ``nn.Module`` called positionally.
    example_inputs: a tensor or a tuple of positional inputs (``None`` entries are allowed).
    opset: ONNX opset; ``None`` means ``DEFAULT_OPSET`` with a fallback to ``FALLBACK_OPSET`` when the
        translation fails there (an explicit opset never falls back).
    dynamic: mark batch/seq axes dynamic (see ``token_dynamic_shapes``); pinned axes come out static and
        are listed in ``notes``.
    check: run ``onnx.checker`` and onnxruntime parity on ``example_inputs`` and every ``parity_inputs``
        tuple (other batch/sequence sizes, for a dynamic export).
    Raises ``ExportError`` (unwritable path, exporter failure with the failing node, checker failure) and
    ``ParityError`` (names the output and the difference).
    """
    if not isinstance(compressed, torch.nn.Module):
        raise ExportError(f"expected a torch.nn.Module (e.g. what compress returns), got {type(compressed).__name__}")
    inputs = _as_tuple(example_inputs)
    path = check_writable(path)
    with preserved_modes(compressed):  # exported in eval mode; every submodule's own mode restored after
        for module in compressed.modules():  # attributes: unlifted torch.export modules refuse eval()
            module.training = False
        return _export_checked(compressed, inputs, path, opset, dynamic, check, atol, parity_inputs)


def _export_checked(
    compressed: torch.nn.Module,
    inputs: tuple,
    path: Path,
    opset: int | None,
    dynamic: bool,
    check: bool,
    atol: float,
    parity_inputs: Sequence[Any],
) -> ExportResult:
    """``export_onnx`` once the module is in eval mode: capture, translate, write, check."""
    with torch.no_grad():
        reference = compressed(*inputs)
    output_names = _output_names(reference)

    notes: list[str] = []
    with quiet_exporter():
        program, requested = _capture(compressed, inputs, dynamic, notes)
        onnx_program, used_opset = _translate(program, opset, notes)
    with quiet_exporter():
        onnx_program = _finish(onnx_program, inputs, requested, output_names)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            onnx_program.save(str(path))
    except OSError as err:
        raise ExportError(f"cannot write {path}: {err.strerror or err}") from err

    result = ExportResult(
        path=path,
        opset=used_opset,
        input_names=tuple(v.name for v in onnx_program.model.graph.inputs),
        output_names=tuple(v.name for v in onnx_program.model.graph.outputs),
        dynamic_axes=_dynamic_axes(onnx_program),
        notes=tuple(notes),
        op_counts=dict(Counter(n.op_type for n in onnx_program.model.graph.all_nodes())),
    )
    if not check:
        return result
    _check_model(path)
    probes = []
    for probe in (_as_tuple(x) for x in parity_inputs):
        fixed = _static_mismatch(inputs, probe, result)
        if fixed:
            notes.append(f"parity on other shapes skipped: {fixed} is static in the ONNX model")
        else:
            probes.append(probe)
    result = ExportResult(**{**result.__dict__, "notes": tuple(notes)})
    diffs = _parity(path, compressed, [inputs, *probes], reference, result.output_names, atol)
    return ExportResult(**{**result.__dict__, "max_abs_diff": diffs, "checked": True})


# ------------------------------------------------------------------------------------------ helpers
@contextlib.contextmanager
def quiet_exporter():
    """Hide the exporter's progress prints, its registry warnings (torchvision ops) and the pytree
    FutureWarnings of deep-copied graph modules; errors still propagate."""
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


QUIET_LOGGERS = (  # set explicitly: torch configures some child loggers' levels itself
    "torch.onnx",
    "torch.onnx._internal.exporter._registration",  # "torchvision is not installed. Skipping ..."
    "onnxscript",
    "onnxscript.optimizer._constant_folding",  # "Evaluation failed: ..." while folding constants
)


def _as_tuple(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs:
        return tuple(example_inputs)
    raise ExportError(
        f"example_inputs must be a tensor or a non-empty tuple of positional inputs, got "
        f"{type(example_inputs).__name__}"
    )


def check_writable(path: str | os.PathLike) -> Path:
    """Fail fast (before a slow export) when ``path`` cannot be written; create missing parent folders.
    Returns the absolute path."""
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"cannot write {path}: it is a directory; give a file name such as {path / 'model.onnx'}")
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ExportError(f"cannot write {path}: {blocker} is a file, not a folder")
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab"):
            pass
    except OSError as err:
        raise ExportError(f"cannot write {path}: {err.strerror or err}") from err
    if not existed:
        path.unlink()
    return path.resolve()


def _axes_spec(x: Any, dim: Any) -> dict[int, Any] | None:
    if not isinstance(x, torch.Tensor) or x.ndim == 0:
        return None
    axes = [0]
    if (x.ndim == 2 and not x.dtype.is_floating_point) or (x.ndim == 3 and x.dtype.is_floating_point):
        axes.append(1)
    spec = {a: dim for a in axes if x.shape[a] >= 2}
    return spec or None


def _capture(model, inputs: tuple, dynamic: bool, notes: list[str]):
    """torch.export with batch/seq ``Dim.AUTO``; returns the program and the requested (input, axis)s."""
    spec = tuple(_axes_spec(x, torch.export.Dim.AUTO) for x in inputs) if dynamic else None
    requested = []
    if dynamic:
        for i, x in enumerate(inputs):
            if isinstance(x, torch.Tensor) and x.ndim:
                if x.shape[0] < 2:
                    notes.append(
                        f"input {i} has batch {x.shape[0]}: its batch axis is static (torch.export "
                        "specializes sizes 0 and 1; use batch >= 2 in the example inputs)"
                    )
                requested += [(i, a) for a in (spec[i] or {})]
    try:
        program = torch.export.export(model, inputs, dynamic_shapes=spec, strict=False)
    except Exception as err:
        raise ExportError(
            f"torch.export could not capture {type(model).__name__} for ONNX: {type(err).__name__}: {_first_lines(err)}"
        ) from err
    if dynamic:
        shapes = _placeholder_shapes(program, inputs)
        pinned = [(i, a) for i, a in requested if isinstance(shapes[i][a], int)]
        if pinned:
            where = ", ".join(f"input {i} axis {a} = {shapes[i][a]}" for i, a in pinned)
            hint = (
                " (this module was compressed with static shapes: its graph holds literal batch/sequence "
                "sizes; pass dynamic_shapes=ecospa_fx.export.token_dynamic_shapes(x) to compress for "
                "dynamic axes)"
                if isinstance(model, torch.fx.GraphModule)
                else ""
            )
            notes.append(f"exported with static sizes where the module pins them: {where}{hint}")
            requested = [r for r in requested if r not in pinned]
            if not requested:  # a clean static capture (no constant SymInts left on the inputs)
                return _capture(model, inputs, False, notes)
    return program, requested


def _placeholder_shapes(program, inputs: tuple) -> list[list[int | str]]:
    """Per example input, its captured shape (int, or the symbol's name for a dynamic axis)."""
    users = [
        s
        for s in program.graph_signature.input_specs
        if s.kind.name == "USER_INPUT" and isinstance(s.arg, torch.export.graph_signature.TensorArgument)
    ]
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    captured = iter(users)
    shapes: list[list[int | str]] = []
    for x in inputs:
        if not isinstance(x, torch.Tensor):
            shapes.append([])
            continue
        spec = next(captured)
        val = nodes[spec.arg.name].meta["val"]
        shapes.append([int(s) if is_concrete_int(s) else str(s) for s in val.shape])
    return shapes


def _translate(program, opset: int | None, notes: list[str]):
    tries = [opset] if opset is not None else [DEFAULT_OPSET, FALLBACK_OPSET]
    errors: list[Exception] = []
    for version in tries:
        try:
            onnx_program = torch.onnx.export(
                program,
                dynamo=True,
                opset_version=version,
                verbose=False,
                custom_translation_table=translation_table(),
            )
            return onnx_program, version
        except Exception as err:
            errors.append(err)
            if version != tries[-1]:
                notes.append(f"opset {version} translation failed ({_describe(err)}); used opset {tries[-1]}")
    also = f" (and at opset {tries[-1]}: {_describe(errors[-1])})" if len(errors) > 1 else ""
    raise ExportError(f"torch.onnx.export failed at opset {tries[0]}: {_describe(errors[0])}{also}") from errors[0]


_NODE = re.compile(r"Error when translating node %(\S+) : .*?target=([^\]]+)\]")


def _describe(err: BaseException) -> str:
    """The failing node (if the exporter names one) and the root cause's first lines."""
    node, chain, seen = None, [], set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        chain.append(cur)
        match = _NODE.search(str(cur))
        if match and node is None:
            node = f"node {match.group(1)} ({match.group(2)})"
        cur = cur.__cause__ or cur.__context__
    root = chain[-1]
    text = f"{type(root).__name__}: {_first_lines(root)}"
    return f"{node}: {text}" if node else text


def _first_lines(err: BaseException, n: int = 3) -> str:
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(err)).splitlines() if ln.strip()]
    return " | ".join(lines[:n]) if lines else "(no message)"


def _output_names(reference: Any) -> list[str]:
    leaves = [(p, v) for p, v in pytree.tree_flatten_with_path(reference)[0] if isinstance(v, torch.Tensor)]
    if len(leaves) == 1 and not leaves[0][0]:
        return ["output"]
    names = []
    for keypath, _ in leaves:
        name = re.sub(r"[^0-9A-Za-z_]+", "_", pytree.keystr(keypath)).strip("_") or "output"
        names.append(name if not name[0].isdigit() else f"output_{name}")
    return names


def _finish(onnx_program, inputs: tuple, requested, output_names: list[str]):
    """Name dynamic axes batch/seq (seq_2, ... for unrelated sequence axes) and outputs by field."""
    import onnx_ir as ir

    graph = onnx_program.model.graph
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    onnx_inputs = list(graph.inputs)
    mapping: dict[str, str] = {}
    used: set[str] = set()
    if len(onnx_inputs) == len(tensors):
        index = {id(x): k for k, x in enumerate(tensors)}
        for i, axis in requested:
            value = onnx_inputs[index[id(inputs[i])]]
            dim = value.shape[axis] if value.shape is not None else None
            if not isinstance(dim, ir.SymbolicDim) or not isinstance(dim.value, str) or dim.value in mapping:
                continue
            base = "batch" if axis == 0 else "seq"
            name, k = base, 2
            while name in used:
                name, k = f"{base}_{k}", k + 1
            mapping[dim.value] = name
            used.add(name)
    if mapping:
        onnx_program.rename_axes(mapping)
    if len(graph.outputs) == len(output_names) and len(set(output_names)) == len(output_names):
        taken = {v.name for v in graph.inputs} | {v.name for node in graph.all_nodes() for v in node.outputs}
        for value, name in zip(graph.outputs, output_names, strict=True):
            if name not in taken:
                value.name = name
    return onnx_program


def _dynamic_axes(onnx_program) -> dict[str, dict[int, str]]:
    import onnx_ir as ir

    out = {}
    for value in onnx_program.model.graph.inputs:
        dims = value.shape or ()
        out[value.name] = {a: str(d.value) for a, d in enumerate(dims) if isinstance(d, ir.SymbolicDim)}
    return out


def _static_mismatch(inputs: tuple, probe: tuple, result: ExportResult) -> str | None:
    """The first (input, axis) where ``probe`` differs from the example on an axis the file fixes."""
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    others = [x for x in probe if isinstance(x, torch.Tensor)]
    for name, x, y in zip(result.input_names, tensors, others, strict=False):
        for axis, (a, b) in enumerate(zip(x.shape, y.shape, strict=False)):
            if a != b and axis not in result.dynamic_axes.get(name, {}):
                return f"{name} axis {axis}"
    return None


def _check_model(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as err:
        raise ExportError(f"onnx.checker rejected {path}: {_first_lines(err)}") from err


def _parity(path: Path, model, input_sets: list[tuple], reference, output_names, atol: float):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # failures are raised below with onnxruntime's message
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:
        raise ExportError(f"onnxruntime cannot load {path}: {_first_lines(err)}") from err
    names = [i.name for i in session.get_inputs()]
    diffs: dict[str, float] = dict.fromkeys(output_names, 0.0)
    for k, inputs in enumerate(input_sets):
        if k:
            with torch.no_grad():
                reference = model(*inputs)
        expected = [v for v in pytree.tree_leaves(reference) if isinstance(v, torch.Tensor)]
        feed_values = [x for x in inputs if isinstance(x, torch.Tensor)]
        if len(feed_values) != len(names):
            raise ExportError(f"the ONNX model takes {len(names)} inputs {names}, got {len(feed_values)} tensors")
        feed = {n: x.detach().cpu().numpy() for n, x in zip(names, feed_values, strict=True)}
        shapes = "x".join(str(s) for s in feed_values[0].shape)
        try:
            got = session.run(None, feed)
        except Exception as err:
            raise ExportError(f"onnxruntime failed on inputs of shape {shapes}: {_first_lines(err)}") from err
        if len(got) != len(expected):
            raise ExportError(f"onnxruntime returned {len(got)} outputs, PyTorch {len(expected)}")
        for name, ours, theirs in zip(output_names, got, expected, strict=True):
            theirs = theirs.detach().cpu().float().numpy() if theirs.is_floating_point() else theirs.cpu().numpy()
            if ours.shape != theirs.shape:
                raise ParityError(
                    f"output {name!r}: onnxruntime shape {ours.shape} != PyTorch {theirs.shape} (inputs {shapes})",
                    name,
                    float("inf"),
                    atol,
                )
            diff = float(np.max(np.abs(ours.astype(np.float64) - theirs.astype(np.float64)), initial=0.0))
            diffs[name] = max(diffs[name], diff)
            if not diff <= atol:
                raise ParityError(
                    f"output {name!r}: onnxruntime differs from PyTorch by {diff:.3e} "
                    f"(> atol {atol:g}) on inputs of shape {shapes}",
                    name,
                    diff,
                    atol,
                )
    return diffs
