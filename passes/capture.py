"""Capture: ``torch.export`` (non-strict) of an ``nn.Module`` with positional example inputs.

The unlifted graph module (``ExportedProgram.module()``) keeps every parameter under its original fully
qualified name as a ``get_attr`` target, which is the placeholder <-> parameter map the later stages use.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from passes.normalise import fills_to_cat
from passes.op_rules import schema_name


class CaptureInputError(ValueError):
    """The model or its example inputs cannot be captured as given."""


class CaptureFailed(RuntimeError):
    """torch.export raised; the message carries its error and advice."""


def check_inputs(model: Any, example_inputs: Any, allow_meta: bool = False, what: str = "example_inputs") -> tuple:
    """Validate the model and example inputs; return the inputs as a tuple. ``what`` names the inputs in
    messages (``calibration[3]`` for a calibration batch)."""
    if not isinstance(model, torch.nn.Module):
        raise CaptureInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, Mapping):
        raise CaptureInputError(
            "example_inputs is a dict: pass positional inputs as a tuple, e.g. (input_ids,); "
            "keyword inputs are not supported (wrap the model in a module whose forward takes them positionally)"
        )
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise CaptureInputError(f"{what} must be a non-empty tuple of tensors, got {type(example_inputs).__name__}")
    for i, x in enumerate(example_inputs):
        if isinstance(x, Mapping):
            raise CaptureInputError(f"{what}[{i}] is a dict: pass tensors positionally")
        if isinstance(x, torch.Tensor) and x.is_meta and not allow_meta:
            raise CaptureInputError(f"{what}[{i}] is on the meta device: pass real tensors")
        _check_finite(x, f"{what}[{i}]")
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta and not allow_meta:
        raise CaptureInputError(
            f"model has {len(meta)} parameters on the meta device (e.g. {meta[0]}): compress needs real "
            "weights; load them first (discovery alone works on meta models via ecospa_fx.discover)"
        )
    return tuple(example_inputs)


def _check_finite(x: Any, where: str) -> None:
    """Refuse NaN/inf in floating (and complex) tensors, nested ones included (meta tensors have no values)."""
    for leaf in pytree.tree_leaves(x):
        if not isinstance(leaf, torch.Tensor) or leaf.is_meta:
            continue
        if (leaf.is_floating_point() or leaf.is_complex()) and not bool(torch.isfinite(leaf).all()):
            nan = bool(torch.isnan(leaf).any())
            raise CaptureInputError(
                f"{where} contains {'NaN' if nan else 'infinite'} values: pass finite inputs "
                "(shapes and dtypes matter; random finite values such as torch.randn(...) are fine)"
            )


@contextlib.contextmanager
def preserved_modes(model: torch.nn.Module) -> Iterator[None]:
    """Restore every submodule's ``training`` flag exactly as it was on exit (errors included).

    ``model.train(flag)`` would set one flag on every submodule, losing a frozen BatchNorm in a training
    model or a dropout left on for MC-dropout; the flags are written back one by one instead (as attributes:
    unlifted ``torch.export`` modules refuse ``train()``/``eval()``)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for module, flag in modes:
            module.training = flag


_MODE_DEPENDENT = (
    torch.nn.modules.dropout._DropoutNd,
    torch.nn.modules.batchnorm._BatchNorm,
    torch.nn.modules.instancenorm._InstanceNorm,
)


def train_mode_modules(model: torch.nn.Module) -> list[str]:
    """``name (Type)`` of the submodules in training mode whose output depends on the mode (dropout with p > 0,
    batch norm, instance norm tracking running statistics): the ones an eval-mode capture changes."""
    out = []
    for name, m in model.named_modules():
        if not m.training or not isinstance(m, _MODE_DEPENDENT):
            continue
        if isinstance(m, torch.nn.modules.dropout._DropoutNd) and not m.p:
            continue
        if isinstance(m, torch.nn.modules.instancenorm._InstanceNorm) and not m.track_running_stats:
            continue
        out.append(f"{name or '(root)'} ({type(m).__name__})")
    return out


def capture(
    model: torch.nn.Module, example_inputs: tuple, dynamic_shapes: Any = None, guards: bool = True
) -> fx.GraphModule:
    """Export ``model`` in eval mode and return the unlifted graph module (parameters as ``get_attr``),
    with full buffer fills rewritten as ``cat`` (``passes.normalise``), marked ``training=False`` (it
    computes the eval-mode function). Every submodule of ``model`` keeps its own ``training`` flag.
    ``guards=False`` checks inputs against the placeholders' example values instead of export's
    generated guard function (for graphs whose inputs the rewrite narrows: a KV cache)."""
    with preserved_modes(model):
        model.eval()
        gm = _export(model, example_inputs, dynamic_shapes, guards)
    fills_to_cat(gm)  # buffers written through slices -> cat (passes.normalise)
    for module in gm.modules():
        module.training = False
    mismatch = dtype_mismatch(gm)
    if mismatch:
        raise CaptureInputError(mismatch)
    return gm


def _export(model: torch.nn.Module, example_inputs: tuple, dynamic_shapes: Any, guards: bool) -> fx.GraphModule:
    try:
        program = torch.export.export(model, example_inputs, strict=False, dynamic_shapes=dynamic_shapes)
    except Exception as err:  # surface the exporter's error with advice
        raise CaptureFailed(
            f"torch.export could not trace {type(model).__name__}: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}\n"
            "advice: make forward traceable (no data-dependent Python control flow on tensor values, no "
            "unsupported outputs)" + _experts_advice(model, err)
        ) from err
    try:
        return program.module(check_guards=guards)
    except Exception as err:  # e.g. a submodule named like a Python keyword
        raise CaptureFailed(
            f"torch.export traced {type(model).__name__} but could not rebuild it as a module: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from err


def _experts_advice(model: torch.nn.Module, err: Exception) -> str:
    """transformers' "eager" experts loop over the experts a batch happens to hit (a data-dependent loop
    that torch.export cannot trace); its grouped and batched experts trace and are pruned exactly. Said only
    when export failed on a data-dependent expression."""
    if "data-dependent" not in f"{type(err).__name__} {err}".lower().replace("datadependent", "data-dependent"):
        return ""
    for module in model.modules():  # experts classes that transformers can switch carry `is_concatenated`
        config = getattr(module, "config", None)
        switchable = hasattr(module, "is_concatenated") and hasattr(module, "has_gate")
        if switchable and getattr(config, "_experts_implementation", None) == "eager":
            return (
                f"; {type(module).__name__} runs its routed experts with experts_implementation='eager': "
                "call model.set_experts_implementation('grouped_mm') (or 'batched_mm') before compressing, "
                "or load it with experts_implementation='grouped_mm'"
            )
    return ""


_SAME_DTYPE_OPS = {
    "aten::linear",
    "aten::mm",
    "aten::bmm",
    "aten::matmul",
    "aten::addmm",
    "aten::baddbmm",
    "aten::addbmm",
    "aten::conv1d",
    "aten::conv2d",
    "aten::conv3d",
    "aten::convolution",
    "aten::conv_transpose1d",
    "aten::conv_transpose2d",
    "aten::conv_transpose3d",
}  # ops that fail at run time on mixed dtypes (norms may mix on purpose, masks and indices differ in dtype)


def dtype_mismatch(gm: fx.GraphModule) -> str | None:
    """Where an example input of one dtype meets weights of another in an op that needs one dtype (int64
    token ids fed to a model that starts with a Linear): the message for the user, else None. The
    exporter traces such a graph without complaint; it only fails when run."""
    inputs = {n.name: k for k, n in enumerate(gm.graph.find_nodes(op="placeholder"))}
    for node in gm.graph.nodes:
        if node.op != "call_function" or schema_name(node.target) not in _SAME_DTYPE_OPS:
            continue
        vals = [(a, a.meta.get("val")) for a in node.args if isinstance(a, fx.Node)]
        dtypes = {v.dtype for _, v in vals if isinstance(v, torch.Tensor)}
        if len(dtypes) < 2:
            continue
        fed = [n for n in _input_ancestors(node) if n.name in inputs]
        which = (
            ", ".join(
                f"input {inputs[n.name]} is {n.meta['val'].dtype}"
                for n in fed
                if isinstance(n.meta.get("val"), torch.Tensor)
            )
            or "the inputs"
        )
        return (
            f"dtype mismatch: {schema_name(node.target)} (node {node.name}) gets tensors of dtypes "
            f"{sorted(str(d) for d in dtypes)}; {which}. Pass example inputs of the dtype the model expects "
            "(e.g. x.float() for a model whose first op is a Linear; integer token ids only for models that "
            "start with an embedding)"
        )
    return None


def _input_ancestors(node: fx.Node) -> list[fx.Node]:
    """The placeholders ``node`` depends on, in graph order."""
    seen, stack, found = set(), [node], []
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            found.append(n)
        stack.extend(n.all_input_nodes)
    order = {n: k for k, n in enumerate(node.graph.nodes)}
    return sorted(found, key=order.__getitem__)


def copy_module(module: torch.nn.Module) -> torch.nn.Module:
    """``copy.deepcopy`` that keeps which buffers are non-persistent: a deep-copied GraphModule forgets
    ``_non_persistent_buffers_set`` (its ``state_dict`` would then list them, and a saved artifact would
    not match the module rebuilt on load)."""
    out = copy.deepcopy(module)
    originals = dict(module.named_modules(remove_duplicate=False))
    for name, sub in out.named_modules(remove_duplicate=False):
        source = originals.get(name)
        if source is not None:
            sub._non_persistent_buffers_set = set(source._non_persistent_buffers_set)
    return out
