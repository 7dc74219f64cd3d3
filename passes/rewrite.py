"""Rewrite the graph module for a keep mask: the only stage that touches parameters.

1. slice every parameter dimension that lost channels (``index_select`` in increasing order);
2. gather every virtual site (rotary cos/sin, masks) with the kept positions it meets;
3. patch literal sizes in view/reshape/expand/split/chunk/slice/narrow/select from the new axis sizes
   (``passes.compaction``), keeping ``-1`` and symbolic sizes as they are;
4. pin ``scaled_dot_product_attention``'s scale to its original value wherever head_dim shrank (its
   default, 1/sqrt(E), would otherwise follow the new E);
5. lint, dead-code-eliminate, recompile.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.fx as fx

from passes.analyse import Analysis, arg_at, concrete
from passes.compaction import CompactionError, new_sizes, remap_index, remap_slice
from passes.labels import Labels, of_space
from passes.op_rules import arg, conv_groups, norm_dim, reduced_axes, schema_name
from passes.state import narrow_placeholders

aten = torch.ops.aten


class RewriteError(Exception):
    """The plan cannot be applied exactly to this graph."""


SYMBOLIC_REASON = "dynamic shapes:"  # how ``preflight`` reasons about symbolic sizes begin


def apply_plan(gm: fx.GraphModule, analysis: Analysis, keep: np.ndarray) -> fx.GraphModule:
    """Rewrite ``gm`` in place so that it computes the model with only ``keep`` channels."""
    facts = analysis.facts
    _slice_parameters(gm, facts, keep)
    for node in list(gm.graph.nodes):
        try:
            _patch_node(gm, analysis, node, keep)
        except CompactionError as err:
            raise RewriteError(f"node {node.name} ({node.target}): {err}") from err
    _gather_sites(gm, facts, keep)
    narrow_placeholders(gm, analysis, keep)
    gm.graph.lint()
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def preflight(analysis: Analysis, keep: np.ndarray) -> dict[int, str]:
    """Spaces whose kept channels would not compact on some tensor (space id -> reason), without
    touching the graph. A plan is rewritable exactly iff this is empty."""
    bad: dict[int, str] = {}
    spaces = analysis.facts.spaces
    for node in analysis.graph_module.graph.nodes:
        value = analysis.labels.get(node.name)
        for labels in value if isinstance(value, list) else [value]:
            if not isinstance(labels, tuple) or not any(labels):
                continue
            shape = [len(lab.arr) if lab is not None else 1 for lab in labels]
            for space in {lab.space for lab in labels if lab is not None}:
                only = of_space(labels, space)
                try:
                    new_sizes(only, shape, keep, spaces)
                    for axis, lab in enumerate(only):
                        if lab is not None and len(lab.arr) > 1:
                            remap_slice(only, axis, (0, len(lab.arr), 1), keep, spaces)
                except CompactionError as err:
                    bad.setdefault(space, f"{err} at node {node.name}")
    for node in analysis.graph_module.graph.nodes:
        for space, reason in _symbolic_conflicts(analysis, node, keep).items():
            bad.setdefault(space, reason)
    return bad


def _symbolic_conflicts(analysis: Analysis, node: fx.Node, keep: np.ndarray) -> dict[int, str]:
    """Spaces whose kept channels would change an axis that a shape-taking op (view, reshape, expand,
    unflatten) sizes with a symbolic expression, e.g. ``view(x, [seq, batch * heads, head_dim])`` under a
    dynamic batch when heads are removed: the rewrite patches literal sizes only (space id -> reason)."""
    if node.op != "call_function" or PATCHES.get(schema_name(node.target)) not in (_patch_view, _patch_unflatten):
        return {}
    labels = _labels(analysis, node)
    try:
        sizes = _sizes_after(analysis, node, keep)
    except CompactionError:
        return {}  # reported by the label pass of ``preflight``
    if sizes is None:
        return {}
    out: dict[int, str] = {}
    for axis in _symbolic_changed_axes(node, sizes):
        lab = labels[axis]
        if lab is not None:
            out.setdefault(
                lab.space,
                (
                    f"{SYMBOLIC_REASON} axis {axis} of node {node.name} ({schema_name(node.target)}) is sized by "
                    f"a symbolic expression that would change from {_shape(node)[axis]} to {sizes[axis]}; the "
                    "rewrite patches literal sizes only (use static shapes, or granularity='channel')"
                ),
            )
    return out


def _symbolic_changed_axes(node: fx.Node, sizes: list[int]) -> list[int]:
    """Output axes of a view/reshape/expand/unflatten node whose size changes and whose literal is symbolic."""
    shape = _shape(node)
    if schema_name(node.target) == "aten::unflatten":
        d = norm_dim(node.args[1], len(_shape(node.args[0])))
        pairs = [(d + k, lit) for k, lit in enumerate(node.args[2])]
    else:
        old = list(node.args[1])
        lead = len(shape) - len(old)
        pairs = [(lead + k, lit) for k, lit in enumerate(old)]
    return [a for a, lit in pairs if not isinstance(lit, int) and sizes[a] != shape[a]]


def _kept(space, keep: np.ndarray) -> np.ndarray:
    return np.flatnonzero(keep[space.offset : space.offset + space.size])


def _slice_parameters(gm: fx.GraphModule, facts, keep: np.ndarray) -> None:
    """``W <- index_select(W, dim, kept)`` for every sliced space; every alias of a shared parameter
    (one tensor under two names, e.g. ``ModuleList([block, block])``) gets the same new tensor."""
    aliases = _parameter_aliases(gm)
    for param, dims in parameter_plan(facts, keep).items():
        for dim, kept in dims.items():
            _slice_one(gm, aliases, param, dim, kept)


def parameter_plan(facts, keep: np.ndarray) -> dict[str, dict[int, np.ndarray]]:
    """What the rewrite slices, as data: parameter name (the graph's ``get_attr`` target) -> {dim: kept
    indices, ascending} for every parameter dimension that loses channels, in slicing order. Applying
    ``index_select(W, dim, kept)`` per entry to the original weights gives the compressed parameters."""
    plan: dict[str, dict[int, np.ndarray]] = {}
    for space in facts.spaces:
        if space.is_virtual or keep[space.offset : space.offset + space.size].all():
            continue
        plan.setdefault(space.param, {})[space.dim] = _kept(space, keep)
    return plan


def _slice_one(gm: fx.GraphModule, aliases: dict[str, list[str]], param: str, dim: int, kept: np.ndarray) -> None:
    old = gm.get_parameter(param)
    index = torch.as_tensor(kept, device=old.device)
    new = torch.nn.Parameter(old.detach().index_select(dim, index).clone(), requires_grad=old.requires_grad)
    for name in aliases.get(param, [param]):
        owner_name, _, leaf = name.rpartition(".")
        setattr(gm.get_submodule(owner_name) if owner_name else gm, leaf, new)


def _parameter_aliases(gm: fx.GraphModule) -> dict[str, list[str]]:
    """Parameter name -> every name under which the same tensor is registered."""
    by_tensor: dict[int, list[str]] = {}
    for name, param in gm.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), []).append(name)
    return {name: names for names in by_tensor.values() for name in names}


def _gather_sites(gm: fx.GraphModule, facts, keep: np.ndarray) -> None:
    nodes = {n.name: n for n in gm.graph.nodes}
    for space in facts.spaces:
        if not space.is_site or keep[space.offset : space.offset + space.size].all():
            continue
        node_name, path, axis = space.site
        node = nodes[node_name]
        operand = arg_at(node, path)
        kept = _kept(space, keep)
        with gm.graph.inserting_before(node):
            if len(kept) and np.array_equal(kept, np.arange(kept[0], kept[0] + len(kept))):
                gathered = gm.graph.call_function(
                    aten.slice.Tensor, (operand, axis, int(kept[0]), int(kept[0] + len(kept)))
                )
            else:
                buf = _free_name(gm, f"_ecospa_keep_{space.id}")
                val = operand.meta.get("val") if isinstance(operand, fx.Node) else None
                device = val.device if isinstance(val, torch.Tensor) and not val.is_meta else "cpu"
                gm.register_buffer(buf, torch.as_tensor(kept, dtype=torch.long, device=device), persistent=False)
                index = gm.graph.get_attr(buf)
                gathered = gm.graph.call_function(aten.index_select.default, (operand, axis, index))
        _set_arg(node, path, gathered)


def _free_name(gm: fx.GraphModule, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``, ... if taken (a graph rewritten twice keeps its first buffers)."""
    name, k = base, 0
    while hasattr(gm, name):
        k += 1
        name = f"{base}_{k}"
    return name


def _set_arg(node: fx.Node, path: tuple, value) -> None:
    if path[0] == "kw":
        node.update_kwarg(path[1], value)
    elif len(path) > 1:
        items = list(node.args[path[0]])
        items[path[1]] = value
        node.update_arg(path[0], items)
    else:
        node.update_arg(path[0], value)


# ---------------------------------------------------------------------------------- literal patches
def _patch_node(gm, analysis: Analysis, node: fx.Node, keep: np.ndarray) -> None:
    if node.op != "call_function":
        return
    name = schema_name(node.target)
    patch = PATCHES.get(name)
    if patch is not None:
        patch(analysis, node, keep)


def _labels(analysis: Analysis, node) -> Labels | None:
    value = analysis.labels.get(node.name) if isinstance(node, fx.Node) else None
    return value if isinstance(value, tuple) else None


def _shape(node: fx.Node) -> list[int]:
    return [concrete(s) for s in node.meta["val"].shape]


def _sizes_after(analysis, node, keep) -> list[int] | None:
    labels = _labels(analysis, node)
    if labels is None or not any(labels):
        return None
    return new_sizes(labels, _shape(node), keep, analysis.facts.spaces)


def _patch_shape_arg(analysis, node: fx.Node, keep, index: int) -> None:
    """view/reshape/expand: replace the literal size of every axis whose size changed."""
    sizes = _sizes_after(analysis, node, keep)
    if sizes is None:
        return
    old = list(node.args[index])
    shape = _shape(node)
    lead = len(shape) - len(old)
    new = []
    for k, lit in enumerate(old):
        a = lead + k
        changed = sizes[a] != shape[a]
        if changed and isinstance(lit, int) and lit != -1:
            new.append(sizes[a])
        elif changed and not isinstance(lit, int):
            raise RewriteError(f"node {node.name}: a symbolic size on a channel axis")
        else:
            new.append(lit)
    node.update_arg(index, new)


def _patch_view(analysis, node, keep) -> None:
    _patch_shape_arg(analysis, node, keep, 1)
    if node.target in (aten.view.default, aten._unsafe_view.default) and _sizes_after(analysis, node, keep):
        # a view of a channel-carrying tensor becomes a reshape: the same values, and it still runs where the
        # smaller input comes with other strides (SDPA picks its kernel, and its output layout, by head_dim)
        node.target = aten.reshape.default


def _patch_expand_as(analysis, node, keep) -> None:
    """``expand_as(x, y)`` takes y's *new* shape, but a gather site on its broadcast axis (``x / norm``
    with the norm expanded over head_dim) is sliced from the original width: pin the original size by
    turning it into ``expand(x, sizes)`` (``-1`` where x is not broadcast), then patch like ``expand``."""
    x_shape, out_shape = _shape(node.args[0]), _shape(node)
    lead = len(out_shape) - len(x_shape)
    sizes = [n if k < lead or x_shape[k - lead] != n else -1 for k, n in enumerate(out_shape)]
    literal = [isinstance(s, int) for s in node.meta["val"].shape]
    if not all(ok for ok, n in zip(literal, sizes, strict=True) if n != -1):
        return  # a broadcast over a symbolic size (dynamic batch): leave it to follow y
    node.target = aten.expand.default
    node.args = (node.args[0], sizes)
    node.kwargs = {}
    _patch_view(analysis, node, keep)


def _patch_unflatten(analysis, node, keep) -> None:
    labels = _labels(analysis, node)
    if labels is None:
        return
    sizes = _sizes_after(analysis, node, keep)
    if _symbolic_changed_axes(node, sizes):
        raise RewriteError(f"node {node.name}: a symbolic size on a channel axis")
    d = norm_dim(node.args[1], len(_shape(node.args[0])))
    n = len(node.args[2])
    node.update_arg(  # symbolic sizes (unchanged, checked above) are kept as they are
        2,
        [
            lit if lit == -1 or not isinstance(lit, int) else s
            for s, lit in zip(sizes[d : d + n], node.args[2], strict=True)
        ],
    )


def _patch_slice(analysis, node, keep) -> None:
    labels = _labels(analysis, node.args[0])
    if labels is None:
        return
    shape = _shape(node.args[0])
    d = norm_dim(arg(node, 1, "dim", 0), len(shape))
    if labels[d] is None:
        return
    start, end, step = arg(node, 2, "start"), arg(node, 3, "end"), arg(node, 4, "step", 1)
    bounds = slice(start, end, step).indices(shape[d])
    new = remap_slice(labels, d, bounds, keep, analysis.facts.spaces)
    if new != tuple(bounds):
        node.args = (node.args[0], d, *new)
        node.kwargs = {}


def _patch_narrow(analysis, node, keep) -> None:
    labels = _labels(analysis, node.args[0])
    if labels is None:
        return
    d = norm_dim(node.args[1], len(labels))
    if labels[d] is None:
        return
    start, length = node.args[2], node.args[3]
    s, e, _ = remap_slice(labels, d, (start, start + length, 1), keep, analysis.facts.spaces)
    node.args = (node.args[0], d, s, e - s)


def _patch_select(analysis, node, keep) -> None:
    labels = _labels(analysis, node.args[0])
    if labels is None:
        return
    d = norm_dim(node.args[1], len(labels))
    if labels[d] is None:
        return
    index = node.args[2] % _shape(node.args[0])[d]
    node.update_arg(2, remap_index(labels, d, index, keep, analysis.facts.spaces))


def _patch_split(analysis, node, keep) -> None:
    """split/split_with_sizes/chunk: new piece sizes along the split axis from each piece's labels."""
    pieces = analysis.labels.get(node.name)
    if not isinstance(pieces, list):
        return
    shape = _shape(node.args[0])
    d = norm_dim(arg(node, 2, "dim", 0), len(shape))
    old, new = [], []
    for getter_val, labels in zip(node.meta["val"], pieces, strict=True):
        piece_shape = [concrete(s) for s in getter_val.shape]
        old.append(piece_shape[d])
        sizes = new_sizes(labels, piece_shape, keep, analysis.facts.spaces) if labels else piece_shape
        new.append(sizes[d])
    if old == new:
        return
    node.target = aten.split_with_sizes.default
    node.args = (node.args[0], new, d)
    node.kwargs = {}


def _patch_sdpa(analysis, node, keep) -> None:
    """Pin the softmax scale: SDPA's default 1/sqrt(E) would follow the pruned head_dim."""
    q = node.args[0]
    sizes = _sizes_after(analysis, q, keep)
    shape = _shape(q)
    if sizes is None or sizes[-1] == shape[-1]:
        return
    if arg(node, 6, "scale") is None:
        if len(node.args) > 6:
            node.update_arg(6, 1.0 / math.sqrt(shape[-1]))
        else:
            node.update_kwarg("scale", 1.0 / math.sqrt(shape[-1]))


def _patch_mean(analysis, node, keep) -> None:
    """Keep the original divisor of a mean over channels (``CouplingFacts.divisors``): the masked model
    averages over all N entries, the removed ones being 0, so the compressed one computes ``sum / N`` over
    the N' kept entries (an RMS norm over pruned head_dim stays exact)."""
    total = analysis.facts.divisors.get(node.name)
    sizes = _sizes_after(analysis, node.args[0], keep) if total is not None else None
    if sizes is None:
        return
    kept = int(np.prod([sizes[a] for a in reduced_axes(node, len(sizes))]))
    if kept == total:
        return
    node.target = aten.sum.dim_IntList if node.args[1:] else aten.sum.default
    with node.graph.inserting_after(node):
        scaled = node.graph.call_function(aten.mul.Tensor, (node, 1.0 / total))
    scaled.meta = dict(node.meta)
    node.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)


def _patch_norm_of_nothing(analysis, node, keep) -> None:
    """A norm layer whose input lost every element (a per-head LayerNorm of a removed head: StableLM's
    qk_layernorm splits q into heads and normalises each with its own weight) has nothing to compute,
    and its weight, tied to that head's channels, is sliced to nothing while ``normalized_shape`` still
    names the old width: its output (the same empty shape as its input) is the input itself."""
    sizes = _sizes_after(analysis, node.args[0], keep)
    if sizes is not None and 0 in sizes:
        node.replace_all_uses_with(node.args[0])


def _patch_view_as_complex(analysis, node, keep) -> None:
    """``view_as_complex`` needs every stride but the last even. A pruned head whose kept width is odd (7
    non-rotary channels and one rotary pair of a 12-wide head) leaves the reshaped rotary slice with odd
    strides: copy it to contiguous memory first (the values are the same)."""
    x = node.args[0]
    sizes = _sizes_after(analysis, x, keep)
    if sizes is None or sizes == _shape(x):
        return
    with node.graph.inserting_before(node):
        dense = node.graph.call_function(aten.clone.default, (x,), {"memory_format": torch.contiguous_format})
    dense.meta = dict(x.meta)
    node.update_arg(0, dense)


def _patch_conv_groups(analysis, node, keep) -> None:
    """A depthwise convolution's ``groups`` is its channel count: it follows the kept channels."""
    found = conv_groups(node)
    sizes = _sizes_after(analysis, node, keep)
    if found is not None and sizes is not None and sizes[1] != found[1]:
        index, _ = found
        if len(node.args) > index:
            node.update_arg(index, sizes[1])
        else:
            node.update_kwarg("groups", sizes[1])


PATCHES = {
    "aten::conv1d": _patch_conv_groups,
    "aten::conv2d": _patch_conv_groups,
    "aten::conv3d": _patch_conv_groups,
    "aten::convolution": _patch_conv_groups,
    "aten::view_as_complex": _patch_view_as_complex,
    "aten::layer_norm": _patch_norm_of_nothing,
    "aten::rms_norm": _patch_norm_of_nothing,
    "aten::mean": _patch_mean,
    "aten::view": _patch_view,
    "aten::reshape": _patch_view,
    "aten::_unsafe_view": _patch_view,
    "aten::expand": _patch_view,
    "aten::expand_as": _patch_expand_as,
    "aten::unflatten": _patch_unflatten,
    "aten::slice": _patch_slice,
    "aten::narrow": _patch_narrow,
    "aten::select": _patch_select,
    "aten::split": _patch_split,
    "aten::split_with_sizes": _patch_split,
    "aten::unsafe_split": _patch_split,
    "aten::chunk": _patch_split,
    "aten::scaled_dot_product_attention": _patch_sdpa,
}
