"""Up-front checks of what ``compress`` is given beyond the example inputs: the model has something to
compress, and calibration batches can be fed to the captured graph (same inputs, dtypes and static sizes).

Each failure is an ``InputError`` that names the batch, the input and the mismatch, raised before any
scoring runs (the captured graph's own guards would fail mid-way with a bare ``AssertionError``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from ecospa_fx.errors import InputError


def calibration_list(calibration: Any) -> list | None:
    """``calibration`` as a list of batches (an iterable is read once, here); ``None`` stays ``None``.
    An empty collection is refused: it would otherwise fall back to data-free scoring silently."""
    if calibration is None:
        return None
    if isinstance(calibration, (str, bytes)) or not hasattr(calibration, "__iter__"):
        raise InputError(
            f"calibration must be a list of batches (tuples of positional inputs), got {type(calibration).__name__}"
        )
    batches = list(calibration)
    if not batches:
        raise InputError("calibration is empty; pass None for data-free scoring")
    return batches


def require_parameters(model: torch.nn.Module) -> None:
    """``compress`` removes parameter channels: a model without parameters has nothing to remove."""
    if next(model.parameters(), None) is None:
        raise InputError(f"model has no parameters to compress ({type(model).__name__} holds no nn.Parameter)")


def check_batches(gm: fx.GraphModule, inputs: tuple, batches: list[tuple]) -> None:
    """Every calibration batch must look like ``inputs``: as many inputs, the same structure and dtypes,
    and the same size on every axis the capture kept static (dynamic axes within their range)."""
    placeholders = _placeholder_vals(gm, inputs)
    for b, batch in enumerate(batches):
        if len(batch) != len(inputs):
            raise InputError(
                f"calibration[{b}] has {len(batch)} inputs but example_inputs has {len(inputs)}: every batch "
                "is a tuple of positional inputs like example_inputs"
            )
        offset = 0
        for i, (x, y) in enumerate(zip(inputs, batch, strict=True)):
            offset = _check_input(f"calibration[{b}][{i}]", i, x, y, placeholders, offset)


def _check_input(where: str, i: int, x: Any, y: Any, placeholders: list | None, offset: int) -> int:
    """Check one input ``y`` of a batch against example input ``x``; returns the next leaf offset."""
    xs, x_spec = _flatten(x)
    ys, y_spec = _flatten(y)
    if x_spec != y_spec:
        raise InputError(f"{where} is {_describe(y)} where example_inputs[{i}] is {_describe(x)}")
    for k, (ex, got) in enumerate(zip(xs, ys, strict=True)):
        val = placeholders[offset + k] if placeholders is not None else None
        problem = _leaf_mismatch(ex, got, val)
        if problem:
            raise InputError(f"{where}{f' (leaf {k})' if len(xs) > 1 else ''} {problem}")
    return offset + len(xs)


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    if isinstance(x, (tuple, list, dict)):
        return f"a {type(x).__name__} of {len(x)}"
    return f"a {type(x).__name__}"


def _flatten(x: Any) -> tuple[list, Any]:
    return pytree.tree_flatten(x, is_leaf=lambda v: v is None)


def _placeholder_vals(gm: fx.GraphModule, inputs: tuple) -> list | None:
    """The captured value (fake tensor with symbolic sizes, or constant) of every input leaf, in order;
    None when the graph's inputs do not line up with the leaves (then only exact shapes are accepted)."""
    vals = [n.meta.get("val") for n in gm.graph.find_nodes(op="placeholder")]
    n_leaves = sum(len(_flatten(x)[0]) for x in inputs)
    return vals if len(vals) == n_leaves else None


def _leaf_mismatch(example: Any, got: Any, val: Any) -> str | None:
    """What is wrong with ``got`` where the example has ``example`` (captured as ``val``), or None."""
    if not isinstance(example, torch.Tensor):
        return None
    if not isinstance(got, torch.Tensor):
        return f"is a {type(got).__name__}, example_inputs has a tensor there"
    if got.dtype != example.dtype:
        return f"has dtype {got.dtype}, example_inputs has {example.dtype}"
    if got.ndim != example.ndim:
        return f"has shape {tuple(got.shape)}, example_inputs has {tuple(example.shape)} (a different rank)"
    sizes = val.shape if isinstance(val, torch.Tensor) and val.ndim == example.ndim else example.shape
    for axis, (size, n) in enumerate(zip(sizes, got.shape, strict=True)):
        problem = _axis_mismatch(size, int(n))
        if problem:
            return f"has shape {tuple(got.shape)}, example_inputs has {tuple(example.shape)}: axis {axis} {problem}"
    return None


def _axis_mismatch(size: Any, n: int) -> str | None:
    """``size`` is the captured size of an axis: an int (static) or a SymInt (dynamic, with a range)."""
    if not isinstance(size, torch.SymInt):
        if n == int(size):
            return None
        return (
            f"is {n}, the capture fixed it to {int(size)} (pass dynamic_shapes to compress for axes that "
            "vary, e.g. ecospa_fx.export.token_dynamic_shapes(example_inputs))"
        )
    lower, upper = _axis_range(size)
    if n < lower or (upper is not None and n > upper):
        return f"is {n}, outside the dynamic range [{lower}, {upper if upper is not None else 'inf'}]"
    return None


def _axis_range(size: torch.SymInt) -> tuple[int, int | None]:
    """The value range torch.export allows a dynamic axis (lower, upper; None for unbounded)."""
    try:
        node = size.node
        bounds = node.shape_env.var_to_range[node.expr]
        lower = int(bounds.lower)
        upper = None if not bounds.upper.is_finite else int(bounds.upper)
        return lower, upper
    except (AttributeError, KeyError, TypeError):
        return 0, None
