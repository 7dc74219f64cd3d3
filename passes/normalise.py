"""Graph normalisation after capture: rewrite in-place buffer fills into the pure ops they compute.

A *buffer fill* allocates a tensor and writes every position of it through views before anyone reads it::

    buf = x.new_empty(B, H, S, D)
    buf[..., :n].copy_(a)          # slice(buf, -1, 0, n) then copy_
    buf[..., n:].copy_(b)          # slice(buf, -1, n, D) then copy_
    ... = f(buf)

(DeepSeek-V2/V3 and MiniCPM3 build their attention keys this way: ``cat([k_nope, k_rot])`` without the
copy). When the slices lie along one axis, are disjoint, cover it, and nothing reads the buffer or a slice
before the last write, ``buf`` equals ``cat([a', b'], dim)`` where ``a'`` is ``a`` broadcast to its slice's
shape: the allocation's initial contents are never observed. The label analysis has rules for ``cat`` and
none for aliasing writes, so the fill is replaced by the cat; any other shape of fill is left alone (and
then fails closed in the analysis as an unknown op).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from passes.op_rules import arg, norm_dim, schema_name

aten = torch.ops.aten

ALLOCATIONS = [  # fresh tensors whose initial contents a full fill overwrites
    "aten::new_empty",
    "aten::new_zeros",
    "aten::empty",
    "aten::zeros",
]


def fills_to_cat(gm: fx.GraphModule) -> int:
    """Replace every full buffer fill of ``gm`` by a ``cat`` (module docstring); returns how many."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and schema_name(node.target) in ALLOCATIONS:
            writes = _fill_writes(node)
            if writes is not None:
                _replace_fill(gm, node, writes)
                count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def _fill_writes(buf: fx.Node) -> list[tuple[int, fx.Node, fx.Node]] | None:
    """``[(start, slice node, copy_ node), ...]`` by start when ``buf`` is fully written along one axis by
    disjoint slices before any other reader, else None."""
    order = {n: k for k, n in enumerate(buf.graph.nodes)}
    val = buf.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    writes, readers, dims = [], [], set()
    for user in buf.users:
        piece = _slice_write(user, val.dim())
        if piece is None:
            readers.append(user)
            continue
        dim, start, end, copy = piece
        dims.add(dim)
        writes.append((start, end, user, copy))
    if len(dims) != 1 or not writes or not readers:
        return None
    (dim,) = dims
    writes.sort(key=lambda w: w[0])
    ends = [0] + [end for _, end, _, _ in writes]
    if [start for start, _, _, _ in writes] != ends[:-1] or ends[-1] != val.shape[dim]:
        return None  # gaps or overlaps: some position keeps the allocation's contents
    last = max(order[copy] for *_, copy in writes)
    if any(order[r] < last for r in readers):
        return None  # read before the fill is complete
    if any(copy.args[1].meta["val"].dtype != val.dtype for *_, copy in writes):
        return None  # copy_ casts: not modelled here
    return [(start, view, copy) for start, _, view, copy in writes]


def _slice_write(user: fx.Node, rank: int) -> tuple[int, int, int, fx.Node] | None:
    """``(dim, start, end, copy_)`` when ``user`` is a unit-step slice of the buffer whose only user is a
    ``copy_`` into it whose result nobody reads."""
    if user.op != "call_function" or schema_name(user.target) != "aten::slice" or len(user.users) != 1:
        return None
    copy = next(iter(user.users))
    if schema_name(copy.target) != "aten::copy_" or copy.args[0] is not user or copy.users:
        return None
    dim = norm_dim(arg(user, 1, "dim", 0), rank)
    size = user.args[0].meta["val"].shape[dim]
    start, end, step = arg(user, 2, "start"), arg(user, 3, "end"), arg(user, 4, "step", 1)
    if not all(isinstance(v, int) for v in (start, end, step)) or step != 1 or not isinstance(size, int):
        return None
    start, end, _ = slice(start, end).indices(size)
    return dim, start, end, copy


def _replace_fill(gm: fx.GraphModule, buf: fx.Node, writes: list[tuple[int, fx.Node, fx.Node]]) -> None:
    """``buf`` -> ``cat([src broadcast to its slice], dim)`` after the last write; the fill nodes go."""
    graph = gm.graph
    order = {n: k for k, n in enumerate(graph.nodes)}
    last = max((copy for *_, copy in writes), key=order.__getitem__)
    dim = norm_dim(arg(writes[0][1], 1, "dim", 0), buf.meta["val"].dim())
    with graph.inserting_before(last.next):  # in order: the pieces, then the cat
        pieces = [_broadcast_to(graph, copy.args[1], view, buf, dim) for _, view, copy in writes]
        cat = graph.call_function(aten.cat.default, (pieces, dim))
    cat.meta["val"] = buf.meta["val"]
    buf.replace_all_uses_with(cat, delete_user_cb=lambda user: not any(user is v for _, v, _ in writes))
    for _, view, copy in writes:
        graph.erase_node(copy)
        graph.erase_node(view)
    graph.erase_node(buf)


def _broadcast_to(graph: fx.Graph, src: fx.Node, view: fx.Node, buf: fx.Node, dim: int) -> fx.Node:
    """``src`` expanded to the shape of the slice ``view`` it was copied into (``-1`` where it already
    has that size; the buffer's own size literals where it is broadcast)."""
    have, want = list(src.meta["val"].shape), list(view.meta["val"].shape)
    lead = len(want) - len(have)
    if lead == 0 and all(_same(a, b) for a, b in zip(have, want, strict=True)):
        return src
    method = schema_name(buf.target) in ("aten::new_empty", "aten::new_zeros")  # x.new_empty(size)
    sizes = list(buf.args[1] if method else buf.args[0])
    out = []
    for k, n in enumerate(want):
        if k >= lead and _same(have[k - lead], n):
            out.append(-1)
        else:
            out.append(n if k == dim else sizes[k])
    node = graph.call_function(aten.expand.default, (src, out))
    node.meta["val"] = view.meta["val"]
    return node


def _same(a: object, b: object) -> bool:
    return a is b or (isinstance(a, int) and isinstance(b, int) and a == b) or str(a) == str(b)
