"""Per-op channel semantics, as data: which ATen ops move, combine, contract or end channel labels.

Each table line is one op (schema name) with a comment where its semantics are not obvious. An op that is
in no table and touches a labelled tensor fails closed (see ``passes.analyse``).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
import torch.fx as fx

from passes import state
from passes.analyse import Ctx
from passes.labels import AxisLabel, Labels, channel_grid, in_whole_blocks, of_space, spaces_of
from passes.meet import Operand, letter_sizes, tie_operands
from passes.view_algebra import NotSeparable, reshape_labels, reshape_segments

Rule = Callable[[Ctx, fx.Node], object]
RULES: dict[str, Rule] = {}

# Elementwise ops need no list: any OpOverload tagged ``torch.Tag.pointwise`` in PyTorch's registry is
# channelwise (``pointwise_rule``), and whether it keeps a zeroed channel at 0 is decided by evaluating it
# at 0 with its scalar arguments (``maps_zero_to_zero``). Only what the registry does not tag is listed.
COPIES = [  # value-preserving copies and casts (f(0) == 0 by construction)
    "aten::clone",
    "aten::contiguous",
    "aten::alias",
    "aten::detach",
    "aten::to",
    "aten::_to_copy",
    "aten::type_as",
    "aten::dropout",  # identity in eval; in train it scales kept entries and zeroes others
    "aten::lift_fresh_copy",
    "aten::detach_",
]
UNTAGGED_POINTWISE = [  # elementwise in fact, but carrying no pointwise tag in torch 2.13
    "aten::hardswish",
    "aten::log_sigmoid",
]  # (``aten::special_<op>`` aliases count as pointwise when ``aten::<op>`` is tagged)
# Ops with a tensor input but nothing to label (assertions, symbolic sizes).
IGNORED = [
    "aten::_assert_tensor_metadata",
    "aten::_assert_scalar",
    "aten::sym_size",
    "aten::sym_numel",
    "aten::sym_stride",
    "aten::_assert_async",
    "aten::sym_constrain_range_for_size",
    "aten::sym_constrain_range",
]
ADDITIVE = ["aten::add", "aten::sub", "aten::rsub"]
MULTIPLICATIVE = ["aten::mul"]
COMPARE_OR_SELECT = [
    "aten::maximum",
    "aten::minimum",
    "aten::eq",
    "aten::ne",
    "aten::lt",
    "aten::le",
    "aten::gt",
    "aten::ge",
    "aten::logical_and",
    "aten::logical_or",
]
RESHAPES = ["aten::view", "aten::reshape", "aten::_unsafe_view", "aten::flatten", "aten::unflatten"]
# Reductions that normalise by the number of channels (or pick one): removing channels changes them.
NORMALISING_REDUCTIONS = [  # (``aten::mean`` and ``aten::linalg_vector_norm`` have rules of their own)
    "aten::var",
    "aten::std",
    "aten::amax",
    "aten::amin",
    "aten::logsumexp",
    "aten::norm",
    "aten::var_mean",
    "aten::max",
    "aten::min",
    "aten::argmax",
    "aten::argmin",
]
SOFTMAXES = ["aten::softmax", "aten::_softmax", "aten::log_softmax", "aten::_log_softmax"]
NORM_LAYERS = ["aten::layer_norm", "aten::rms_norm", "aten::native_layer_norm", "aten::group_norm"]
# Ops whose output starts a fresh, unlabelled stream (embedding rows, conv channels): the hidden dim.
HIDDEN_ORIGINS = ["aten::embedding", "aten::conv1d", "aten::conv2d", "aten::conv3d", "aten::convolution"]
COPY_OR_SHAPE = set(COPIES + RESHAPES) | {
    "aten::t",
    "aten::numpy_T",
    "aten::transpose",
    "aten::permute",
    "aten::unsqueeze",
    "aten::expand",
    "aten::squeeze",
}


def schema_name(target: object) -> str:
    schema = getattr(target, "_schema", None)
    if schema is not None:
        return schema.name
    if target is operator.getitem:
        return "getitem"
    return getattr(target, "__name__", str(target))


def rule(*names: str):
    def deco(fn: Rule) -> Rule:
        for name in names:
            RULES[name] = fn
        return fn

    return deco


def arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def norm_dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def block_input(ctx: Ctx, node: fx.Node, reason: str, scope: str = "all") -> None:
    for a in node.all_input_nodes:
        ctx.block_labels(ctx.lab(a), scope, reason, node)


# ---------------------------------------------------------------------------------- unary and copies
@rule(*COPIES)
def _copy(ctx: Ctx, node: fx.Node) -> Labels | None:
    return ctx.lab(node.args[0])


def is_pointwise(target: object) -> bool:
    """Tagged elementwise in PyTorch's op registry (or listed in ``UNTAGGED_POINTWISE``)."""
    tags = getattr(target, "tags", ())
    name = schema_name(target)
    if torch.Tag.pointwise in tags or name in UNTAGGED_POINTWISE:
        return True
    if name.startswith("aten::special_"):
        base = getattr(torch.ops.aten, name[len("aten::special_") :], None)
        overload = getattr(base, getattr(target, "_overloadname", "default"), None) if base is not None else None
        return overload is not None and torch.Tag.pointwise in overload.tags
    return False


def pointwise_rule(ctx: Ctx, node: fx.Node) -> Labels | None:
    """Any elementwise op: its tensor operands meet position by position (``_elementwise``). The output
    is 0 at a removed channel if every operand is (a zeroed weight slice or zero-preserving dataflow, no
    bare tensor) and the op maps 0 to 0 with its scalar arguments: gelu, x**2, clamp(x, -c, c) do;
    exp, sigmoid, x + 1, clamp(x, min=0.5), 2**x do not. Ops with several outputs fail closed."""
    if isinstance(node.meta.get("val"), (tuple, list)):
        block_input(ctx, node, f"elementwise op {schema_name(node.target)} with several outputs")
        return None
    if schema_name(node.target).endswith("_") and _blocks_shared_inplace(ctx, node):
        return None
    tensors = list(_tensor_args(node))
    if len(tensors) == 1:
        labels = ctx.lab(tensors[0][1])
        if labels is None or maps_zero_to_zero(node):
            return labels
        return tuple(_not_zero(lab) for lab in labels)
    return _elementwise(ctx, node, "pointwise")


def maps_zero_to_zero(node: fx.Node) -> bool:
    """Evaluate the op at 0: every tensor argument replaced by a zero of its dtype, scalars as given.
    True only if every output element is exactly 0 (an op that fails to evaluate counts as False)."""
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), _zero_like_meta)
    try:
        with torch.no_grad():
            out = node.target(*args, **kwargs)
    except Exception:  # an op we cannot evaluate is not known to keep zeros
        return False
    outs = out if isinstance(out, (tuple, list)) else [out]
    return all(isinstance(o, torch.Tensor) and bool((o == 0).all()) for o in outs)


def _zero_like_meta(arg: fx.Node) -> torch.Tensor:
    val = arg.meta.get("val")
    dtype = val.dtype if isinstance(val, torch.Tensor) else torch.float32
    return torch.zeros((), dtype=dtype)


@rule(*IGNORED)
def _ignored(ctx: Ctx, node: fx.Node) -> None:
    return None


def _not_zero(lab: AxisLabel | None) -> AxisLabel | None:
    return None if lab is None else replace(lab, zero_ok=False)


# ---------------------------------------------------------------------------------- elementwise
def _elementwise(ctx: Ctx, node: fx.Node, mode: str) -> Labels:
    """Broadcasting op over tensor arguments: operand axes meet the output axis they align with."""
    out_shape = ctx.shape(node)
    letters = [f"e{k}" for k in range(len(out_shape))]
    operands = []
    for path, a in _tensor_args(node):
        shape = ctx.shape(a)
        operands.append(
            Operand(ctx.labels_or_none(a), shape, letters[len(letters) - len(shape) :], path, ctx.is_weight(a))
        )
    return _meet_elementwise(ctx, node, mode, operands, letters)


def _meet_elementwise(ctx: Ctx, node: fx.Node, mode: str, operands: list[Operand], letters: list[str]) -> Labels:
    """Labels of a position-by-position op whose ``operands`` align with the output ``letters``."""
    was_unlabelled = [all(lab is None for lab in op.labels) and not op.is_weight for op in operands]
    if not any(any(op.labels) and not op.is_weight for op in operands) and any(was_unlabelled):
        return None  # only weights carry labels (norm scale, position embedding): no channel flows here
    labels = ctx.combine(node, operands, letters)
    sites = [
        op
        for op, bare in zip(ctx.last_operands, was_unlabelled, strict=True)
        if bare and any(lab is not None and lab.full for lab in op.labels)
    ]
    if mode == "add" and sites:
        for op in ctx.last_operands:
            if not any(op is s for s in sites):
                ctx.facts.flag("residual", ctx.global_ids(op.labels))
    full = [ch for ch, lab in zip(letters, labels, strict=True) if _real_full(ctx, lab)]
    zeros = [_zero_at(ctx, op, full, b) for op, b in zip(ctx.last_operands, was_unlabelled, strict=True)]
    zero_ok = _combine_zero(mode, ctx.last_operands, zeros)
    if mode in ("add", "pointwise") and zero_ok:
        zero_ok = maps_zero_to_zero(node)  # x + 1.0, 1 - x: a scalar offset is not zeroed by the mask
    return tuple(None if lab is None else replace(lab, zero_ok=zero_ok) for lab in labels)


def _real_full(ctx: Ctx, lab: AxisLabel | None) -> bool:
    return lab is not None and lab.full and not ctx.facts.spaces[lab.space].is_site


def _zero_at(ctx: Ctx, op: Operand, full: list[str], bare: bool) -> bool:
    """``op`` is 0 at every removed channel of the output: on each output letter that carries channels it
    has a full, real, zero label of its own. An operand broadcast along such a letter (size 1, a per-head
    partial label like ``x.sum(-1)``, a scalar Parameter) has the same value at removed and kept channels:
    ``x - x.sum(-1, keepdim=True)`` is not 0 where x was zeroed."""
    if bare:
        return False
    if not full:
        return all(lab is None or lab.zero_ok for lab in op.labels)
    labs = op.letter_labels()
    return all(ch in labs and _real_full(ctx, labs[ch]) and labs[ch].zero_ok for ch in full)


def _combine_zero(mode: str, operands: list[Operand], zeros: list[bool]) -> bool:
    """A product is 0 where any labelled factor is; a sum (or any other pointwise op, with f(0) == 0)
    only where every operand is; comparisons and selections never count as 0."""
    labelled = [z for op, z in zip(operands, zeros, strict=True) if any(op.labels)]
    if mode == "mul":
        return any(labelled) if len(operands) > 1 else all(labelled)
    if mode in ("add", "pointwise"):
        return all(zeros)
    return False


def _tensor_args(node: fx.Node):
    for i, a in enumerate(node.args):
        if isinstance(a, fx.Node):
            yield (i,), a
    for k, a in node.kwargs.items():
        if isinstance(a, fx.Node):
            yield ("kw", k), a


@rule(*ADDITIVE)
def _additive(ctx: Ctx, node: fx.Node) -> Labels:
    return _elementwise(ctx, node, "add")


@rule("aten::add_", "aten::sub_", "aten::mul_")
def _inplace(ctx: Ctx, node: fx.Node) -> Labels | None:
    """In-place update: exact like its functional twin when nothing else reads the mutated input."""
    if _blocks_shared_inplace(ctx, node):
        return None
    return _elementwise(ctx, node, "mul" if schema_name(node.target) == "aten::mul_" else "add")


def _blocks_shared_inplace(ctx: Ctx, node: fx.Node) -> bool:
    """An in-place op whose mutated input has other readers: they would see the new values, which the
    label analysis does not follow. Blocks it (True) so that it fails closed."""
    target = node.args[0] if node.args else None
    if isinstance(target, fx.Node) and len(target.users) > 1:
        block_input(ctx, node, "in-place op on a tensor that has other readers")
        return True
    return False


@rule("aten::index_add", "aten::index_add_")
def _index_add(ctx: Ctx, node: fx.Node) -> Labels | None:
    """``out = self; out[index[i]] += alpha * source[i]`` along ``dim`` (routed experts scatter their
    tokens back). Along ``dim`` rows are matched by a run-time index: that axis must carry no channels
    (tokens). On every other axis self, source and out meet position by position, as in ``self + source``:
    out is 0 at a removed channel where both are."""
    self_arg, dim, index, source = node.args[:4]
    if schema_name(node.target) == "aten::index_add_" and _blocks_shared_inplace(ctx, node):
        return None
    out_shape = ctx.shape(node)
    d = norm_dim(dim, len(out_shape))
    labels = [ctx.labels_or_none(a) for a in (self_arg, source)]
    if any(lab[d] is not None for lab in labels) or any(ctx.labels_or_none(index)):
        block_input(ctx, node, "index_add along a channel axis (rows matched by a run-time index)")
        return None
    letters = [f"e{k}" for k in range(len(out_shape))]
    operands = [
        Operand(lab, list(out_shape), letters, (k,), ctx.is_weight(a))
        for lab, a, k in zip(labels, (self_arg, source), (0, 3), strict=True)
    ]
    return _meet_elementwise(ctx, node, "add", operands, letters)


@rule(*MULTIPLICATIVE)
def _multiplicative(ctx: Ctx, node: fx.Node) -> Labels:
    return _elementwise(ctx, node, "mul")


@rule(*COMPARE_OR_SELECT, "aten::where", "aten::masked_fill")
def _select_like(ctx: Ctx, node: fx.Node) -> Labels:
    return _elementwise(ctx, node, "other")


@rule("aten::div")
def _div(ctx: Ctx, node: fx.Node) -> Labels | None:
    """``x / y``, position by position. Where the divisor is 0 at a removed channel (a zeroed weight, or
    zero-preserving dataflow from one), the masked model divides by 0: blocked. A divisor that is not 0
    there (``clamp_min(norm, eps)`` in ``F.normalize``, ``1 + |x|``) or constant along the channels (a
    per-head norm) is fine; a per-head value that is 0 where a whole head is removed blocks head removal."""
    labels = ctx.lab(node.args[1])
    zero = [lab for lab in labels or () if lab is not None and lab.zero_ok]
    if any(lab.full for lab in zero):
        block_input(ctx, node, "division by a tensor that is 0 at removed channels (the masked model divides by 0)")
        return None
    if zero:
        ctx.block_labels(labels, "head", "division by a per-head value that is 0 where the head is removed", node)
    return _elementwise(ctx, node, "mul")


# ---------------------------------------------------------------------------------- layout
@rule(*RESHAPES)
def _reshape(ctx: Ctx, node: fx.Node) -> Labels | None:
    labels = ctx.lab(node.args[0])
    if labels is None:
        return None
    _block_dropped_blocks(ctx, node, labels)
    try:
        out = reshape_labels(labels, ctx.shape(node.args[0]), ctx.shape(node))
    except NotSeparable as err:
        block_input(ctx, node, f"reshape mixes channels: {err}")
        return None
    _note_blocks(ctx, node, out, ctx.shape(node))
    return out


def _block_dropped_blocks(ctx: Ctx, node: fx.Node, labels: Labels) -> None:
    """Partial (head) labels merged with channel axes are dropped by the reshape: whole-head removal
    of their space cannot be followed through this node, so block it at head granularity."""
    shape = ctx.shape(node.args[0])
    try:
        segments = reshape_segments(shape, ctx.shape(node))
    except NotSeparable:
        return
    for ins, _ in segments:
        labs = [labels[a] for a in ins if labels[a] is not None]
        if any(lab.full for lab in labs):
            for lab in labs:
                if not lab.full:
                    only = tuple(x if x is lab else None for x in labels)
                    ctx.block_labels(only, "head", "head axis merged with channels of another space", node)


def _note_blocks(ctx: Ctx, node: fx.Node, labels: Labels, shape: list[int]) -> None:
    """A space split over several axes has head blocks: the stride of the outer (head) axes is the block
    size (the innermost axis' extent when nothing else says: a view of a partial rotary slice spans only
    part of a head, so its extent would understate the block)."""
    for space, axes in spaces_of(labels).items():
        if len(axes) < 2 or not all(labels[a].full for a in axes):
            continue
        inner = min(axes, key=lambda a: int(np.ptp(labels[a].arr)) if shape[a] > 1 else 1 << 62)
        size = int(np.ptp(labels[inner].arr)) + 1
        outer = [labels[a].arr for a in axes if a != inner]
        strides = [np.gcd.reduce(arr[arr > 0]) for arr in outer if (arr > 0).any()]
        ctx.facts.note_block_size(space, max(size, int(min(strides))) if strides else size, node.name)


@rule("aten::transpose", "aten::swapaxes")
def _transpose(ctx: Ctx, node: fx.Node) -> Labels | None:
    labels = ctx.lab(node.args[0])
    if labels is None:
        return None
    out = list(labels)
    d0, d1 = norm_dim(node.args[1], len(out)), norm_dim(node.args[2], len(out))
    out[d0], out[d1] = out[d1], out[d0]
    return tuple(out)


@rule("aten::t", "aten::numpy_T")
def _t(ctx: Ctx, node: fx.Node) -> Labels | None:
    labels = ctx.lab(node.args[0])
    return None if labels is None else tuple(reversed(labels))


@rule("aten::permute")
def _permute(ctx: Ctx, node: fx.Node) -> Labels | None:
    labels = ctx.lab(node.args[0])
    if labels is None:
        return None
    return tuple(labels[norm_dim(d, len(labels))] for d in node.args[1])


@rule("aten::unsqueeze")
def _unsqueeze(ctx: Ctx, node: fx.Node) -> Labels | None:
    labels = ctx.lab(node.args[0])
    if labels is None:
        return None
    out = list(labels)
    out.insert(norm_dim(node.args[1], len(labels) + 1), None)
    return tuple(out)


@rule("aten::squeeze")
def _squeeze(ctx: Ctx, node: fx.Node) -> Labels | None:
    labels = ctx.lab(node.args[0])
    if labels is None:
        return None
    shape = ctx.shape(node.args[0])
    dims = node.args[1] if len(node.args) > 1 else list(range(len(shape)))
    dims = [dims] if isinstance(dims, int) else dims
    drop = {norm_dim(d, len(shape)) for d in dims if shape[norm_dim(d, len(shape))] == 1}
    return _drop_axes(ctx, node, labels, drop)


def _drop_axes(ctx: Ctx, node: fx.Node, labels: Labels, drop: set[int]) -> Labels | None:
    """Remove size-1 axes; a dropped axis' (constant) contribution moves onto a sibling axis. Where no axis
    of its space is left (one expert ``W[e]`` out of a bank), that space is blocked: its channels cannot be
    renumbered under a constant index; the other axes are not mixed and keep their labels."""
    out = [lab for a, lab in enumerate(labels) if a not in drop]
    for a in sorted(drop):
        lab = labels[a]
        if lab is None:
            continue
        sibling = next((k for k, other in enumerate(out) if other is not None and other.space == lab.space), None)
        if sibling is None:
            only = tuple(x if k == a else None for k, x in enumerate(labels))
            ctx.block_labels(only, "all", "a single channel is selected out of its space", node)
            continue
        out[sibling] = out[sibling].with_arr(out[sibling].arr + lab.arr[0])
    return tuple(out)


@rule("aten::expand", "aten::expand_as")  # expand_as(x, y): y only gives the shape
def _expand(ctx: Ctx, node: fx.Node) -> Labels | None:
    labels = ctx.lab(node.args[0])
    if labels is None:
        return None
    out_shape = ctx.shape(node)
    lead = len(out_shape) - len(labels)
    out: list[AxisLabel | None] = [None] * lead
    for k, lab in enumerate(labels):
        n = out_shape[lead + k]
        out.append(lab if lab is None or len(lab.arr) == n else lab.with_arr(np.repeat(lab.arr, n)))
    return tuple(out)


@rule("aten::repeat_interleave")
def _repeat_interleave(ctx: Ctx, node: fx.Node) -> Labels | None:
    labels = ctx.lab(node.args[0])
    repeats = node.args[1] if len(node.args) > 1 else None
    dim = arg(node, 2, "dim")
    if labels is None:
        return None
    if not isinstance(repeats, int) or dim is None:
        block_input(ctx, node, "repeat_interleave with tensor repeats or no dim")
        return None
    out = list(labels)
    d = norm_dim(dim, len(out))
    if out[d] is not None:
        out[d] = out[d].with_arr(np.repeat(out[d].arr, repeats))
    return tuple(out)


@rule("aten::repeat")
def _repeat(ctx: Ctx, node: fx.Node) -> Labels | None:
    labels = ctx.lab(node.args[0])
    if labels is None:
        return None
    reps = list(node.args[1])
    lead = len(reps) - len(labels)
    out: list[AxisLabel | None] = [None] * lead
    for k, lab in enumerate(labels):
        r = reps[lead + k]
        out.append(lab if lab is None or r == 1 else lab.with_arr(np.tile(lab.arr, r)))
    return tuple(out)


# ---------------------------------------------------------------------------------- slicing
@rule("aten::slice")
def _slice(ctx: Ctx, node: fx.Node) -> Labels | None:
    labels = ctx.lab(node.args[0])
    if labels is None:
        return None
    shape = ctx.shape(node.args[0])
    d = norm_dim(arg(node, 1, "dim", 0), len(shape))
    if labels[d] is None:
        return labels
    start, end, step = arg(node, 2, "start"), arg(node, 3, "end"), arg(node, 4, "step", 1)
    if any(isinstance(v, fx.Node) for v in (start, end, step)):
        block_input(ctx, node, "slice with symbolic bounds on a channel axis")
        return None
    out = list(labels)
    out[d] = labels[d].with_arr(labels[d].arr[slice(start, end, step)])
    return tuple(out)


@rule("aten::narrow")
def _narrow(ctx: Ctx, node: fx.Node) -> Labels | None:
    labels = ctx.lab(node.args[0])
    if labels is None:
        return None
    d, start, length = norm_dim(node.args[1], len(labels)), node.args[2], node.args[3]
    if labels[d] is None:
        return labels
    out = list(labels)
    out[d] = labels[d].with_arr(labels[d].arr[start : start + length])
    return tuple(out)


@rule("aten::select")
def _select(ctx: Ctx, node: fx.Node) -> Labels | None:
    labels = ctx.lab(node.args[0])
    if labels is None:
        return None
    d = norm_dim(node.args[1], len(labels))
    index = node.args[2]
    if labels[d] is None:
        return labels[:d] + labels[d + 1 :]
    picked = labels[d].with_arr(labels[d].arr[[index]])
    return _drop_axes(ctx, node, (*labels[:d], picked, *labels[d + 1 :]), {d})


def _pieces(ctx: Ctx, node: fx.Node, dim: int, bounds: list[tuple[int, int]]) -> list[Labels] | None:
    labels = ctx.lab(node.args[0])
    if labels is None:
        return None
    d = norm_dim(dim, len(labels))
    out = []
    for start, end in bounds:
        piece = list(labels)
        if piece[d] is not None:
            piece[d] = piece[d].with_arr(piece[d].arr[start:end])
        out.append(tuple(piece))
    return out


def _bounds(sizes: list[int]) -> list[tuple[int, int]]:
    ends = np.cumsum(sizes).tolist()
    return [(e - s, e) for s, e in zip(sizes, ends, strict=True)]


@rule("aten::split", "aten::split_with_sizes", "aten::unsafe_split")
def _split(ctx: Ctx, node: fx.Node) -> list[Labels] | None:
    shape = ctx.shape(node.args[0])
    dim = norm_dim(arg(node, 2, "dim", 0), len(shape))
    sizes = node.args[1]
    if not isinstance(sizes, int) and not all(isinstance(s, int) for s in sizes):
        return _data_dependent_pieces(ctx, node, dim, len(sizes))
    if isinstance(sizes, int):
        n = shape[dim]
        sizes = [min(sizes, n - s) for s in range(0, n, sizes)]
    return _pieces(ctx, node, dim, _bounds(list(sizes)))


def _off_channel_axis(ctx: Ctx, node: fx.Node, dim: int | None, reason: str) -> Labels | None:
    """The labels of ``node``'s first argument when its axis ``dim`` (None: ``node.args[1]``) carries no
    channel, for ops that only move or mix positions along that axis (tokens, time); along a channel axis
    they block with ``reason``."""
    labels = ctx.lab(node.args[0])
    if labels is None:
        return None
    d = norm_dim(node.args[1] if dim is None else dim, len(labels))
    if labels[d] is not None:
        block_input(ctx, node, reason)
        return None
    return labels


def _data_dependent_pieces(ctx: Ctx, node: fx.Node, dim: int, count: int) -> list[Labels] | None:
    """A split whose sizes are computed at run time (tokens per expert): every piece keeps the labels when
    the split axis carries no channel; along a channel axis nobody knows which channels each piece holds."""
    labels = _off_channel_axis(ctx, node, dim, "split with data-dependent sizes along a channel axis")
    return None if labels is None else [labels] * count


@rule("aten::cumsum", "aten::cumprod")
def _scan_along(ctx: Ctx, node: fx.Node) -> Labels | None:
    """A running sum or product along ``dim`` (Mamba-2's decay over time): along an axis that carries no
    channel the other axes keep their labels, and a removed channel stays 0 (a scan of zeros is 0);
    along a channel axis it mixes channels and blocks."""
    return _off_channel_axis(ctx, node, None, f"{schema_name(node.target)} along a channel axis (it mixes channels)")


@rule("aten::tensor_split")
def _tensor_split(ctx: Ctx, node: fx.Node) -> list[Labels] | None:
    """``tensor_split`` at positions along ``dim`` (Mamba splits its scan inputs along time): along an axis
    that carries no channel every piece keeps the labels; along a channel axis it blocks (its split points
    are not rewritten)."""
    reason = "tensor_split along a channel axis (its split points are not rewritten)"
    labels = _off_channel_axis(ctx, node, arg(node, 2, "dim", 0), reason)
    return None if labels is None else [labels] * len(node.meta["val"])


@rule("aten::chunk")
def _chunk(ctx: Ctx, node: fx.Node) -> list[Labels] | None:
    shape = ctx.shape(node.args[0])
    dim = norm_dim(arg(node, 2, "dim", 0), len(shape))
    n = shape[dim]
    each = -(-n // node.args[1])
    return _pieces(ctx, node, dim, _bounds([min(each, n - s) for s in range(0, n, each)]))


@rule("aten::unbind")
def _unbind(ctx: Ctx, node: fx.Node) -> list[Labels] | None:
    labels = ctx.lab(node.args[0])
    if labels is None:
        return None
    d = norm_dim(arg(node, 1, "dim", 0), len(labels))
    out = []
    for i in range(ctx.shape(node.args[0])[d]):
        picked = labels[d].with_arr(labels[d].arr[[i]]) if labels[d] is not None else None
        dropped = _drop_axes(ctx, node, (*labels[:d], picked, *labels[d + 1 :]), {d})
        if dropped is None:
            return None
        out.append(dropped)
    return out


@rule("getitem")
def _getitem(ctx: Ctx, node: fx.Node) -> Labels | None:
    value = ctx.analysis.labels.get(node.args[0].name) if isinstance(node.args[0], fx.Node) else None
    if isinstance(value, list):
        return value[node.args[1]]
    return None


@rule("aten::index_select")
def _index_select(ctx: Ctx, node: fx.Node) -> Labels | None:
    return _off_channel_axis(ctx, node, None, "index_select along a channel axis")


@rule("aten::index")
def _index(ctx: Ctx, node: fx.Node) -> Labels | None:
    """x[..., idx] with one constant 1-D index: labels along that axis are gathered by idx."""
    labels = ctx.lab(node.args[0])
    if labels is None:
        return None
    indices = list(node.args[1])
    used = [k for k, ix in enumerate(indices) if ix is not None]
    const = ctx.constant(indices[used[0]]) if len(used) == 1 else None
    if const is None and len(used) == 1 and _gathers_whole_rows(ctx, node, labels, used[0]):
        return _gathered_rows(ctx, node, labels, used[0])
    if const is None or const.ndim != 1 or const.dtype == torch.bool:
        block_input(ctx, node, "advanced indexing with data-dependent or multi-axis indices")
        return None
    d = used[0]
    out = list(labels)
    if out[d] is not None:
        out[d] = out[d].with_arr(out[d].arr[const.numpy()])
        if _is_outer_axis(labels, d):  # whole positions of this axis cannot be renumbered in place
            ctx.block_labels(of_space(labels, labels[d].space), "head", "constant index over a head axis", node)
        elif not np.array_equal(const.numpy(), np.arange(len(const))):
            block_input(ctx, node, "constant index that reorders channels")
            return None
    return tuple(out)


def _gathers_whole_rows(ctx: Ctx, node: fx.Node, labels: Labels, d: int) -> bool:
    """``x[ids]`` with a data-dependent 1-D integer index along axis ``d`` picks whole slices: channels on
    the other axes are not mixed. Fine when axis ``d`` carries no channel label (token gathers) or when x
    is a weight whose axis ``d`` is its own space (a routed expert bank ``W[expert_ids]``)."""
    index = node.args[1][d]
    val = index.meta.get("val") if isinstance(index, fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.ndim != 1 or val.dtype in (torch.bool, torch.uint8):
        return False
    lab = labels[d]
    if lab is None:
        return True
    own = [x for x in labels if x is not None and x.space == lab.space]
    return ctx.is_weight(node.args[0]) and len(own) == 1 and lab.full


def _gathered_rows(ctx: Ctx, node: fx.Node, labels: Labels, d: int) -> Labels:
    """Labels of ``x[ids]``: axis ``d`` now indexes the gathered rows (no channel label); a weight's row
    space (the expert axis) cannot be pruned through data-dependent routing and is blocked."""
    lab = labels[d]
    if lab is not None:
        only = tuple(x if x is lab else None for x in labels)
        reason = "expert axis gathered by data-dependent routing indices: whole experts are not removed"
        ctx.block_labels(only, "all", reason, node)
    return tuple(None if k == d else x for k, x in enumerate(labels))


def _is_outer_axis(labels: Labels, d: int) -> bool:
    lab = labels[d]
    others = [o for k, o in enumerate(labels) if k != d and o is not None and o.space == lab.space]
    return in_whole_blocks([lab], others)


# ---------------------------------------------------------------------------------- complex views
@rule("aten::view_as_complex")
def _view_as_complex(ctx: Ctx, node: fx.Node) -> Labels | None:
    """``[..., n, 2] real -> [..., n] complex`` (complex rotary: ``view_as_complex(x.reshape(..., -1, 2))``).
    Element i is the pair of channels ``c + arr[0]`` (real) and ``c + arr[1]`` (imaginary), ``c`` what
    the other axes of the space carry: one complex number is removed whole or not at all, so the two are
    tied (aligned), and the complex axis carries the real part's channel. The imaginary offset
    ``arr[1] - arr[0]`` is recorded per space for ``view_as_real``. Blocked when the pair axis is the only
    axis of its space, is partial, or its space already pairs channels at another offset."""
    labels = ctx.lab(node.args[0])
    if labels is None:
        return None
    pair = labels[-1]
    if pair is None:
        return labels[:-1]
    axes = spaces_of(labels)[pair.space]
    delta = int(pair.arr[1] - pair.arr[0])
    known = ctx.analysis.complex_pairs.setdefault(pair.space, delta)
    if len(axes) < 2 or not all(labels[a].full for a in axes) or known != delta:
        block_input(ctx, node, "view_as_complex of a pair axis that is not the low part of a channel axis")
        return None
    shape = ctx.shape(node.args[0])
    grid = channel_grid(labels, pair.space, axes, axes, [shape[a] for a in axes])[..., 0]
    offset = ctx.facts.spaces[pair.space].offset
    ctx.facts.tie("aligned", grid[..., 0] + offset, grid[..., 1] + offset)
    ctx.facts.retract_block_note(pair.space, _through_copies(node.args[0]).name)  # pairs, not heads
    low = labels[:-1]
    return _drop_axes(ctx, node, (*low, pair.with_arr(pair.arr[:1])), {len(low)})


def _through_copies(node: fx.Node) -> fx.Node:
    """The first producer of ``node`` that is not a copy or cast (the reshape that made the pair axis)."""
    while node.op == "call_function" and schema_name(node.target) in COPIES and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


@rule("aten::view_as_real")
def _view_as_real(ctx: Ctx, node: fx.Node) -> Labels | None:
    """``[..., n] complex -> [..., n, 2] real``: the new axis holds the real and imaginary parts, channels
    ``c`` and ``c + delta`` of the complex element's space, with ``delta`` what ``view_as_complex``
    recorded for that space (the two were tied there). A complex tensor that did not come from paired
    channels (a complex weight) is blocked."""
    labels = ctx.lab(node.args[0])
    if labels is None:
        return None
    spaces = {lab.space for lab in labels if lab is not None}
    if len(spaces) != 1 or next(iter(spaces)) not in ctx.analysis.complex_pairs:
        block_input(ctx, node, "view_as_real of a complex tensor whose channels were not paired by view_as_complex")
        return None
    space = spaces.pop()
    template = next(lab for lab in labels if lab is not None)
    pair = replace(template, arr=np.array([0, ctx.analysis.complex_pairs[space]], dtype=np.int64))
    return (*labels, pair)


# ---------------------------------------------------------------------------------- joining
@rule("aten::cat", "aten::concat", "aten::concatenate")
def _cat(ctx: Ctx, node: fx.Node) -> Labels | None:
    tensors = list(node.args[0])
    all_labels = [ctx.lab(t) for t in tensors]
    if all(lab is None for lab in all_labels):
        return None
    rank = len(ctx.shape(node))
    d = norm_dim(arg(node, 1, "dim", 0), rank)
    parts = state.adopt(ctx, node, tensors, [ctx.labels_or_none(t) for t in tensors], d)
    along = [p[d] for p in parts if ctx.shape(tensors[parts.index(p)])[d] > 0]
    if any(lab is None for lab in along) and any(lab is not None for lab in along):
        block_input(ctx, node, "cat joins channel and non-channel positions on one axis")
        return None
    out = list(parts[0])
    if along[0] is not None:
        if len({(lab.space, lab.full) for lab in along}) != 1:
            joint = _join_spaces(ctx, node, tensors, parts, d)
            if joint is None:
                block_input(ctx, node, "cat joins different channel spaces on one axis (not as whole pieces)")
            return joint
        out[d] = along[0].with_arr(np.concatenate([lab.arr for lab in along]))
    if not _same_off_axis(parts, d) and not _tie_per_head_pieces(ctx, tensors, parts, d, out):
        block_input(ctx, node, "cat of tensors whose other axes carry different channels")
        return None
    return _all_zero(out, parts)


def _join_spaces(ctx: Ctx, node: fx.Node, tensors: list, parts: list[Labels], d: int) -> Labels | None:
    """``cat(pieces, d)`` whose pieces carry *different* spaces on ``d`` (MLA's key ``cat([k_nope, k_rot],
    -1)``: k_nope from W_kv_b per head, k_rot from W_kv_a shared by every head). One axis label holds one
    space, so the output gets a fresh *joint* space J over the joined axis and every axis a piece labels
    (row-major, like a linear output viewed to that shape): position p of the output carries J channel p.
    Each piece is tied to its stretch of J where it lands: aligned where the piece varies along the same
    axes (J(h, e) with W_kv_b's (h, e)), broadcast where it does not (J(h, n + j) with W_kv_a's j for every
    head h). A later meeting with J (q . k over head_dim) therefore ties q's channels through J to the
    piece channels, and J is 0 at a removed position exactly when its piece is. None (the caller blocks)
    unless every non-empty piece carries a full label on ``d`` and nothing but that space elsewhere."""
    shapes = [ctx.shape(t) for t in tensors]
    live = [k for k, s in enumerate(shapes) if s[d] > 0]
    axes = {d}
    for k in live:
        own = parts[k][d]
        if own is None or not own.full:
            return None
        for a, lab in enumerate(parts[k]):
            if lab is not None and (lab.space != own.space or not lab.full):
                return None
            if lab is not None:
                axes.add(a)
    out_shape = ctx.shape(node)
    axes_list = sorted(axes)
    space = ctx.facts.new_space(int(np.prod([out_shape[a] for a in axes_list])))
    strides = np.cumprod([1] + [out_shape[a] for a in reversed(axes_list)])[::-1][1:]
    zero = all(lab.zero_ok for k in live for lab in parts[k] if lab is not None)
    out: list[AxisLabel | None] = [None] * len(out_shape)
    for a, stride in zip(axes_list, strides, strict=True):
        out[a] = AxisLabel(space.id, stride * np.arange(out_shape[a], dtype=np.int64), zero_ok=zero)
    start = 0
    for k in live:
        stretch = list(out)
        stretch[d] = out[d].with_arr(out[d].arr[start : start + shapes[k][d]])
        start += shapes[k][d]
        letters = [f"c{a}" for a in range(len(out_shape))]
        piece = _broadcast_sites(ctx, node, k, parts[k], shapes[k], out, axes_list)
        ops = [Operand(tuple(stretch), shapes[k], letters, None), Operand(piece, shapes[k], letters, (0, k))]
        tie_operands(ctx.facts, ctx.facts.spaces, *ops, letter_sizes(ops))
    _note_blocks(ctx, node, tuple(out), out_shape)
    return tuple(out)


def _broadcast_sites(
    ctx: Ctx, node: fx.Node, k: int, piece: Labels, shape: list[int], out: list, axes: list[int]
) -> Labels:
    """A piece broadcast along a joint axis (MLA's k_rot, expanded over the heads) is the same at every
    position there, so nothing ties it to J along it; but when J loses positions on that axis (whole heads
    go) the piece must lose them too: it becomes a gather site on that axis (``cat`` argument ``(0, k)``),
    tied to J's whole blocks on a head axis (head granularity only), channel by channel otherwise."""
    labels = list(piece)
    for a in axes:
        if labels[a] is None and shape[a] > 1:
            site = ctx.virtual_label(node, (0, k), a, shape[a])
            head = in_whole_blocks([out[a]], [out[x] for x in axes if x != a])
            labels[a] = site.partial(np.zeros(1, dtype=np.int64)) if head else site
    return tuple(labels)


def _tie_per_head_pieces(ctx: Ctx, tensors: list, parts: list[Labels], d: int, out: list) -> bool:
    """``cat([scores, sinks], -1)``: attention scores carry q/k *head blocks* on the head axis, a learned
    per-head sink logit carries its own full label there. Position h of both is head h, so the sink's
    entry h goes with head h when whole heads are removed (``block`` ties), and nothing moves when
    channels inside the heads are. Only this pairing (a partial label against another space's full label
    on an axis other than ``d``) is accepted; the output keeps the head-block label."""
    for a in (k for k in range(len(out)) if k != d):
        labs = [p[a] for p in parts]
        if all(_same_label(labs[0], lab) for lab in labs[1:]):
            continue
        heads = [lab for lab in labs if lab is not None and not lab.full]
        full = [(t, p) for t, p in zip(tensors, parts, strict=True) if p[a] is not None and p[a].full]
        if len(heads) != 1 or any(lab is None for lab in labs) or len(heads) + len(full) != len(labs):
            return False
        head_op = next(t for t, p in zip(tensors, parts, strict=True) if p[a] is heads[0])
        for t, p in full:
            ops = [_axis_operand(ctx, x, lab, a, d, k) for k, (x, lab) in enumerate(((head_op, heads[0]), (t, p[a])))]
            tie_operands(ctx.facts, ctx.facts.spaces, *ops, letter_sizes(ops))
        out[a] = heads[0]
    return True


def _same_label(x: AxisLabel | None, y: AxisLabel | None) -> bool:
    if x is None or y is None:
        return x is y
    return x.space == y.space and np.array_equal(x.arr, y.arr)


def _axis_operand(ctx: Ctx, tensor, lab: AxisLabel, axis: int, d: int, k: int) -> Operand:
    """``tensor`` as an operand labelled only on ``axis`` (letter shared with its partner), ``d`` private."""
    shape = ctx.shape(tensor)
    letters = [f"cat{k}" if j == d else f"c{j}" for j in range(len(shape))]
    labels = tuple(lab if j == axis else None for j in range(len(shape)))
    return Operand(labels, shape, letters, None, ctx.is_weight(tensor))


def _all_zero(out: list[AxisLabel | None], parts: list[Labels]) -> Labels:
    """Joined pieces are 0 at removed channels only if every piece is (``cat([rot(q), q_pass])``)."""
    zero = all(lab.zero_ok for p in parts for lab in p if lab is not None)
    return tuple(lab if lab is None or lab.zero_ok == zero else replace(lab, zero_ok=zero) for lab in out)


def _same_off_axis(parts: list[Labels], d: int) -> bool:
    for p in parts[1:]:
        for a, (x, y) in enumerate(zip(parts[0], p, strict=True)):
            if a == d:
                continue
            if (x is None) != (y is None):
                return False
            if x is not None and (x.space != y.space or not np.array_equal(x.arr, y.arr)):
                return False
    return True


@rule("aten::stack")
def _stack(ctx: Ctx, node: fx.Node) -> Labels | None:
    """stack(ts, d): the new axis carries each operand's constant channel shift relative to ts[0]."""
    tensors = list(node.args[0])
    parts = [ctx.labels_or_none(t) for t in tensors]
    if all(all(lab is None for lab in p) for p in parts):
        return None
    d = norm_dim(arg(node, 1, "dim", 0), len(parts[0]) + 1)
    shifts = [_constant_shift(parts[0], p) for p in parts]
    if any(s is None for s in shifts):
        block_input(ctx, node, "stack of tensors whose channels are not shifted copies of each other")
        return None
    out = list(parts[0])
    first = next(lab for lab in parts[0] if lab is not None)
    new = first.with_arr(np.asarray(shifts)) if any(shifts) else None
    out.insert(d, new)
    return _all_zero(out, parts)


def _constant_shift(base: Labels, other: Labels) -> int | None:
    shift = None
    for x, y in zip(base, other, strict=True):
        if (x is None) != (y is None):
            return None
        if x is None:
            continue
        if x.space != y.space or x.full != y.full:
            return None
        diff = y.arr - x.arr
        if np.any(diff != diff[0]):
            return None
        if diff[0] != 0:
            if shift is not None:
                return None
            shift = int(diff[0])
    return shift or 0


# ---------------------------------------------------------------------------------- reductions
def reduced_axes(node: fx.Node, rank: int, dim_index: int = 1) -> list[int]:
    dims = arg(node, dim_index, "dim")
    if dims is None or dims == []:
        return list(range(rank))
    dims = [dims] if isinstance(dims, int) else dims
    return sorted(norm_dim(d, rank) for d in dims)


def _block_if_reduced(ctx: Ctx, node: fx.Node, labels: Labels, axes: list[int], what: str) -> bool:
    """Block the spaces that ``axes`` reduces over.

    Scope 'channel' when the reduced axes lie inside one head block (every remaining axis of the space
    moves in multiples of the reduced extent, e.g. q_norm over head_dim with the head axis kept): whole
    heads can still go. Otherwise scope 'all'.
    """
    hit = False
    for space, space_axes in spaces_of(labels).items():
        gone = [a for a in space_axes if a in axes]
        if not gone:
            continue
        hit = True
        kept = [a for a in space_axes if a not in axes]
        inner = in_whole_blocks([labels[k] for k in kept], [labels[g] for g in gone])
        ctx.block_labels(
            of_space(labels, space),
            "channel" if inner else "all",
            f"{what} over a channel axis (removing channels would change it)",
            node,
        )
    return hit


@rule("aten::sum")
def _sum(ctx: Ctx, node: fx.Node) -> Labels | None:
    """Summing over channels is exact (removed channels contribute 0): a sink."""
    labels = ctx.lab(node.args[0])
    if labels is None:
        return None
    axes = reduced_axes(node, len(labels))
    sunk = [a for a in axes if labels[a] is not None]
    if sunk:
        ctx.facts.flag("sum_sink", ctx.global_ids(labels, sunk))
    return _reduce_labels(ctx, node, labels, axes, bool(arg(node, 2, "keepdim", False)))


@rule(*NORMALISING_REDUCTIONS)
def _normalising(ctx: Ctx, node: fx.Node) -> object:
    if len(node.args) > 1 and isinstance(node.args[1], fx.Node):  # max.other / min.other
        return _elementwise(ctx, node, "other")
    labels = ctx.lab(node.args[0])
    if labels is None:
        return None
    rank = len(labels)
    dim_index = 1
    axes = reduced_axes(node, rank, dim_index)
    _block_if_reduced(ctx, node, labels, axes, schema_name(node.target))
    keepdim = bool(arg(node, dim_index + 1, "keepdim", False))
    out = _reduce_labels(ctx, node, labels, axes, keepdim)
    return [out, out] if isinstance(node.meta.get("val"), (tuple, list)) else out


@rule("aten::mean")
def _mean(ctx: Ctx, node: fx.Node) -> Labels | None:
    """``mean = sum / N``. Over channels that are 0 in the masked model where removed, the masked mean is
    the sum over the kept channels divided by the *original* N: exact when the rewrite keeps that divisor
    (``CouplingFacts.divisors``). This is what RMS norms need (q_norm / k_norm over head_dim or over the
    whole projection: ``x * rsqrt(mean(x**2) + eps)`` only rescales). A mean over entries that are not 0
    where removed (a LayerNorm's variance of ``x - mean(x)``) stays blocked."""
    labels = ctx.lab(node.args[0])
    if labels is None:
        return None
    shape = ctx.shape(node.args[0])
    axes = reduced_axes(node, len(labels))
    reduced = [labels[a] for a in axes if labels[a] is not None]
    if reduced and all(lab.zero_ok and not ctx.facts.spaces[lab.space].is_site for lab in reduced):
        ctx.facts.divisors[node.name] = int(np.prod([shape[a] for a in axes]))
        if _is_square(node.args[0]):  # a mean of squares: an RMS normalisation over these channels
            ctx.facts.flag("normalised", ctx.global_ids(labels, [a for a in axes if labels[a] is not None]))
    else:
        _block_if_reduced(ctx, node, labels, axes, "aten::mean")
    return _reduce_labels(ctx, node, labels, axes, bool(arg(node, 2, "keepdim", False)))


def _is_square(node: object) -> bool:
    """``x ** 2``, ``square(x)`` or ``x * x`` (through a dtype cast)."""
    node = _through_copies(node) if isinstance(node, fx.Node) else node
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    name = schema_name(node.target)
    if name in ("aten::pow", "aten::pow_") and len(node.args) > 1:
        return node.args[1] == 2
    if name == "aten::square":
        return True
    return name == "aten::mul" and len(node.args) > 1 and node.args[0] is node.args[1]


@rule("aten::linalg_vector_norm")
def _vector_norm(ctx: Ctx, node: fx.Node) -> Labels | None:
    """``(sum |x|^p)^(1/p)`` for p > 0 (or ``max |x|`` for p = inf): removed entries that are 0 add
    nothing, so it is exact like a sum (the zero check is the contraction's); other orders are blocked."""
    labels = ctx.lab(node.args[0])
    if labels is None:
        return None
    order = arg(node, 1, "ord", 2)
    axes = reduced_axes(node, len(labels), 2)
    if not isinstance(order, (int, float)) or not order > 0:
        _block_if_reduced(ctx, node, labels, axes, "aten::linalg_vector_norm")
    return _reduce_labels(ctx, node, labels, axes, bool(arg(node, 3, "keepdim", False)))


def _reduce_labels(ctx: Ctx, node: fx.Node, labels: Labels, axes: list[int], keepdim: bool) -> Labels:
    """Labels after reducing ``axes``: what remains of a reduced space becomes a partial (block) label."""
    letters = [f"r{k}" for k in range(len(labels))]
    out_letters = [ch if k not in axes else f"k{k}" for k, ch in enumerate(letters)]
    if not keepdim:
        out_letters = [ch for k, ch in enumerate(out_letters) if k not in axes]
    op = Operand(labels, ctx.shape(node.args[0]), letters, (0,), ctx.is_weight(node.args[0]))
    return ctx.combine(node, [op], out_letters)


@rule(*SOFTMAXES)
def _softmax(ctx: Ctx, node: fx.Node) -> Labels | None:
    labels = ctx.lab(node.args[0])
    if labels is None:
        return None
    d = norm_dim(node.args[1], len(labels))
    _block_if_reduced(ctx, node, labels, [d], "softmax")
    return labels


@rule(*NORM_LAYERS)
def _norm_layer(ctx: Ctx, node: fx.Node) -> object:
    labels = ctx.lab(node.args[0])
    shape = ctx.shape(node.args[0])
    rank = len(shape)
    if schema_name(node.target) == "aten::group_norm":
        axes = list(range(1, rank))
    else:
        axes = list(range(rank - len(node.args[1]), rank))
    if labels is not None:
        _block_if_reduced(ctx, node, labels, axes, schema_name(node.target))
    out = _elementwise(ctx, node, "other")
    if isinstance(node.meta.get("val"), (tuple, list)):
        return [out, None, None]
    return out


# ---------------------------------------------------------------------------------- contractions
@rule("aten::linear")
def _linear(ctx: Ctx, node: fx.Node) -> Labels:
    x, w = node.args[0], node.args[1]
    rank = len(ctx.shape(x))
    batch = [f"b{k}" for k in range(rank - 1)]
    out = _contract(ctx, node, [(x, (0,), [*batch, "i"]), (w, (1,), ["o", "i"])], [*batch, "o"])
    bias = arg(node, 2, "bias")
    return _add_bias(ctx, node, out, bias, (2,))


def _add_bias(ctx: Ctx, node: fx.Node, out: Labels, bias, path) -> Labels:
    if not isinstance(bias, fx.Node):
        return out
    letters = [f"o{k}" for k in range(len(out))]
    shape = ctx.shape(node)
    bshape = ctx.shape(bias)
    ops = [
        Operand(out, shape, letters, None, False),
        Operand(ctx.labels_or_none(bias), bshape, letters[len(letters) - len(bshape) :], path, ctx.is_weight(bias)),
    ]
    return ctx.combine(node, ops, letters)


def _contract(ctx: Ctx, node: fx.Node, specs, out_letters: list[str]) -> Labels:
    operands = [
        Operand(ctx.labels_or_none(a), ctx.shape(a), letters, path, ctx.is_weight(a)) for a, path, letters in specs
    ]
    return ctx.combine(node, operands, out_letters)


def _matmul_letters(ra: int, rb: int) -> tuple[list[str], list[str], list[str]]:
    """Einsum letters of torch.matmul for operand ranks ``ra``, ``rb`` (batch dims broadcast)."""
    if ra == 1 and rb == 1:
        return ["k"], ["k"], []
    if ra == 1:
        batch = [f"b{k}" for k in range(rb - 2)]
        return ["k"], [*batch, "k", "n"], [*batch, "n"]
    if rb == 1:
        batch = [f"b{k}" for k in range(ra - 2)]
        return [*batch, "m", "k"], ["k"], [*batch, "m"]
    nb = max(ra, rb) - 2
    batch = [f"b{k}" for k in range(nb)]
    return [*batch[nb - (ra - 2) :], "m", "k"], [*batch[nb - (rb - 2) :], "k", "n"], [*batch, "m", "n"]


@rule("aten::matmul", "aten::mm", "aten::bmm")
def _matmul(ctx: Ctx, node: fx.Node) -> Labels:
    a, b = node.args[0], node.args[1]
    la, lb, lo = _matmul_letters(len(ctx.shape(a)), len(ctx.shape(b)))
    return _contract(ctx, node, [(a, (0,), la), (b, (1,), lb)], lo)


@rule("aten::addmm", "aten::baddbmm")
def _addmm(ctx: Ctx, node: fx.Node) -> Labels:
    bias, a, b = node.args[0], node.args[1], node.args[2]
    la, lb, lo = _matmul_letters(len(ctx.shape(a)), len(ctx.shape(b)))
    out = _contract(ctx, node, [(a, (1,), la), (b, (2,), lb)], lo)
    return _add_bias(ctx, node, out, bias, (0,))


@rule("aten::_grouped_mm", "transformers::grouped_mm_fallback")
def _grouped_mm(ctx: Ctx, node: fx.Node) -> Labels | None:
    """``out[s, o] = sum_i x[s, i] W[e(s), i, o]``, the expert ``e(s)`` of row ``s`` read from the cumulative
    row counts ``offs``: a matmul whose weight matrix is chosen per row, so ``i`` meets ``x``'s channels and
    ``o`` carries ``W``'s. The expert axis is a routing selection: whole experts are not removed (blocked)."""
    x, w = node.args[0], node.args[1]
    if len(ctx.shape(x)) != 2 or len(ctx.shape(w)) != 3 or isinstance(arg(node, 3, "bias"), fx.Node):
        block_input(ctx, node, "grouped matmul other than 2-D rows x 3-D expert bank without bias")
        return None
    labels = ctx.labels_or_none(w)
    if labels is not None and labels[0] is not None:
        only = tuple(x if k == 0 else None for k, x in enumerate(labels))
        ctx.block_labels(only, "all", "expert axis selected per row by routing offsets: whole experts stay", node)
    bank = None if labels is None else (None, *labels[1:])
    operands = [
        Operand(ctx.labels_or_none(x), ctx.shape(x), ["s", "i"], (0,), ctx.is_weight(x)),
        Operand(bank, ctx.shape(w), ["e", "i", "o"], (1,), ctx.is_weight(w)),
    ]
    return ctx.combine(node, operands, ["s", "o"])


@rule("aten::einsum")
def _einsum(ctx: Ctx, node: fx.Node) -> Labels:
    equation, tensors = node.args[0], list(node.args[1])
    lhs, rhs = equation.replace(" ", "").split("->")
    specs = []
    ellipsis_rank = 0
    for term, t in zip(lhs.split(","), tensors, strict=True):
        rank = len(ctx.shape(t))
        ellipsis_rank = max(ellipsis_rank, rank - len(term.replace("...", "")))
    for i, (term, t) in enumerate(zip(lhs.split(","), tensors, strict=True)):
        specs.append((t, (1, i), _expand_ellipsis(term, len(ctx.shape(t)), ellipsis_rank)))
    return _contract(ctx, node, specs, _expand_ellipsis(rhs, None, ellipsis_rank))


def _expand_ellipsis(term: str, rank: int | None, ellipsis_rank: int) -> list[str]:
    if "..." not in term:
        return list(term)
    head, tail = term.split("...")
    n = ellipsis_rank if rank is None else rank - len(head) - len(tail)
    dots = [f"_{k}" for k in range(ellipsis_rank - n, ellipsis_rank)]
    return [*head, *dots, *tail]


@rule("aten::scaled_dot_product_attention")
def _sdpa(ctx: Ctx, node: fx.Node) -> Labels:
    """softmax(q k^T * scale + mask) v: q, k meet over head_dim; the scores' key axis meets v's."""
    q, k, v = node.args[0], node.args[1], node.args[2]
    rank = len(ctx.shape(q))
    batch = [f"b{i}" for i in range(rank - 2)]
    scores = _contract(ctx, node, [(q, (0,), [*batch, "l", "e"]), (k, (1,), [*batch, "s", "e"])], [*batch, "l", "s"])
    score_shape = [*ctx.shape(q)[:-1], ctx.shape(k)[-2]]
    mask = arg(node, 3, "attn_mask")
    if isinstance(mask, fx.Node):
        mshape = ctx.shape(mask)
        letters = [*batch, "l", "s"]
        ops = [
            Operand(scores, score_shape, letters, None, False),
            Operand(
                ctx.labels_or_none(mask),
                mshape,
                letters[len(letters) - len(mshape) :],
                (3,) if len(node.args) > 3 else ("kw", "attn_mask"),
                False,
            ),
        ]
        scores = ctx.combine(node, ops, letters)
    _block_if_reduced(ctx, node, scores, [len(scores) - 1], "softmax (inside scaled_dot_product_attention)")
    probs = Operand(scores, score_shape, [*batch, "l", "s"], None, False)
    value = Operand(ctx.labels_or_none(v), ctx.shape(v), [*batch, "s", "v"], (2,), ctx.is_weight(v))
    return ctx.combine(node, [probs, value], [*batch, "l", "v"])


@rule("aten::pad", "aten::constant_pad_nd")
def _pad(ctx: Ctx, node: fx.Node) -> Labels | None:
    """``F.pad(x, (l_last, r_last, l_prev, r_prev, ...))`` with a constant: axes it pads must carry no
    channels (Mamba-2 pads time to whole chunks); the rest keep their labels. A removed channel stays 0
    where the pad value is 0."""
    labels = ctx.lab(node.args[0])
    if labels is None:
        return None
    pads = list(node.args[1])
    functional = schema_name(node.target) == "aten::pad"  # pad(x, pads, mode, value); constant_pad_nd(x, pads, value)
    mode = arg(node, 2, "mode", "constant") if functional else "constant"
    value = arg(node, 3 if functional else 2, "value", 0) or 0
    padded = {len(labels) - 1 - k // 2 for k, p in enumerate(pads) if p != 0}
    if mode != "constant" or any(labels[a] is not None for a in padded):
        block_input(ctx, node, f"{mode} padding of an axis that carries channels")
        return None
    if value != 0:
        return tuple(_not_zero(lab) for lab in labels)
    return labels


@rule("aten::new_zeros", "aten::new_ones", "aten::new_full")
def _fresh_constant(ctx: Ctx, node: fx.Node) -> None:
    """``x.new_zeros(size)``: a constant of literal size that takes only x's dtype and device. It carries
    no channels; where it meets channels later it is a gather site (``new_empty``, whose contents are
    undefined until written, is not here)."""


@rule("aten::zeros_like", "aten::ones_like", "aten::full_like")
def _constant_like(ctx: Ctx, node: fx.Node) -> Labels | None:
    """``zeros_like(x)`` takes x's shape, so in the compressed graph it has x's kept channels: it carries
    x's labels, with values that are 0 at removed channels only when the fill is 0."""
    labels = ctx.lab(node.args[0])
    if labels is None:
        return None
    name = schema_name(node.target)
    fill = 0 if name == "aten::zeros_like" else 1 if name == "aten::ones_like" else arg(node, 1, "fill_value")
    return labels if fill == 0 else tuple(_not_zero(lab) for lab in labels)


@rule(*HIDDEN_ORIGINS)
def _hidden_origin(ctx: Ctx, node: fx.Node) -> Labels | None:
    data = node.args[1] if schema_name(node.target) == "aten::embedding" else node.args[0]
    if ctx.lab(data) is not None and any(ctx.lab(data)):
        if conv_groups(node) is not None:
            return _depthwise_conv(ctx, node)
        block_input(ctx, node, f"{schema_name(node.target)} consumes channel-carrying input")
    return None


def conv_groups(node: fx.Node) -> tuple[int, int] | None:
    """``(argument index of groups, groups)`` of a depthwise convolution (``groups == C_in == C_out``, weight
    ``[C, 1, *kernel]``, not transposed), else None."""
    convolution = schema_name(node.target) == "aten::convolution"
    index = 8 if convolution else 6
    groups = arg(node, index, "groups", 1)
    if convolution and arg(node, 6, "transposed", False):
        return None
    weight = node.args[1].meta.get("val") if isinstance(node.args[1], fx.Node) else None
    data = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    if not isinstance(groups, int) or weight is None or data is None or data.ndim != weight.ndim:
        return None
    if groups > 1 and weight.shape[0] == groups and weight.shape[1] == 1 and data.shape[1] == groups:
        return index, groups
    return None


def _depthwise_conv(ctx: Ctx, node: fx.Node) -> Labels | None:
    """``y[b, c, t] = bias[c] + sum_k w[c, 0, k] x[b, c, t + k - pad]`` (short causal convolutions of LFM2,
    Mamba): channel ``c`` of y reads only channel ``c`` of x and of the weight, so x, w and bias meet on
    the channel axis position by position. The window mixes positions along the spatial axes: they must
    carry no channels, and the kernel taps are not removed. y is 0 at a removed channel where x or w is
    and the bias is (or there is none). The rewrite patches ``groups`` to the kept channel count."""
    x, w, bias = node.args[0], node.args[1], arg(node, 2, "bias")
    xl = ctx.labels_or_none(x)
    if any(lab is not None for k, lab in enumerate(xl) if k != 1):
        block_input(ctx, node, "depthwise convolution over an axis that carries channels (its window mixes them)")
        return None
    out_shape = ctx.shape(node)
    letters = [f"e{k}" for k in range(len(out_shape))]
    wl = ctx.labels_or_none(w)
    taps = tuple(lab if k >= 1 else None for k, lab in enumerate(wl))
    if any(taps):
        ctx.block_labels(taps, "all", "convolution taps (the window is kept whole)", node)
    operands = [
        Operand(xl, list(out_shape), letters, (0,), ctx.is_weight(x)),  # spatial sizes: unlabelled, any
        Operand(
            (wl[0], *(None,) * (len(wl) - 1)),
            ctx.shape(w),
            ["e1", *(f"k{k}" for k in range(1, len(wl)))],
            (1,),
            ctx.is_weight(w),
        ),
    ]
    if isinstance(bias, fx.Node):
        operands.append(Operand(ctx.labels_or_none(bias), ctx.shape(bias), ["e1"], (2,), ctx.is_weight(bias)))
    labels = ctx.combine(node, operands, letters)
    channel = [op.letter_labels().get("e1") for op in ctx.last_operands]
    zero = [lab is not None and ctx.is_zero(lab) for lab in channel]
    zero_ok = (zero[0] or zero[1]) and (len(zero) < 3 or zero[2])
    return tuple(None if lab is None else replace(lab, zero_ok=zero_ok) for lab in labels)
