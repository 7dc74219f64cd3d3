"""New axis sizes and slice bounds once some channels are gone.

For a tensor whose axes ``A`` carry a channel space, the kept elements form a boolean grid ``K`` over
``A`` (``K[i] = keep[sum_a arr_a[i_a]]``; a partial axis keeps a position if any channel of its block is
kept). The rewritten tensor holds exactly the kept elements, so ``K`` must *compact* to a dense box:
taking axes from the outermost (largest channel extent) inwards, every kept row must compact to the same
inner shape. That shape gives the new size of each axis, and it matches the sliced weight's layout because
slicing keeps channels in increasing order. A grid that does not compact is an error, never a guess.
"""

from __future__ import annotations

import numpy as np

from passes.labels import Labels, spaces_of


class CompactionError(Exception):
    """Kept channels do not form a dense box on some tensor: the plan cannot be rewritten exactly."""


def kept_grid(labels: Labels, axes: list[int], keep: np.ndarray, offset: int) -> np.ndarray:
    """Boolean kept-mask over ``axes`` (in the given order) for one space."""
    sizes = [len(labels[a].arr) for a in axes]
    grid = np.zeros(sizes, dtype=np.int64)
    for k, a in enumerate(axes):
        shape = [1] * len(axes)
        shape[k] = sizes[k]
        grid = grid + labels[a].arr.reshape(shape)
    offsets = labels[axes[0]].offsets
    full = grid[..., None] + offsets.reshape([1] * len(axes) + [-1]) + offset
    return keep[full].any(axis=-1)


def compact_shape(mask: np.ndarray) -> tuple[int, ...]:
    """Dense shape of the kept elements of ``mask`` (axes outermost first); raises if not a box."""
    if mask.ndim == 1:
        return (int(mask.sum()),)
    rows = [mask[i] for i in range(mask.shape[0]) if mask[i].any()]
    if not rows:
        return (0, *[0] * (mask.ndim - 1))
    inner = {compact_shape(r) for r in rows}
    if len(inner) != 1:
        raise CompactionError(f"rows keep different numbers of channels: {sorted(inner)}")
    return (len(rows), *inner.pop())


def _outer_first(labels: Labels, axes: list[int]) -> list[int]:
    return sorted(axes, key=lambda a: -int(np.ptp(labels[a].arr)) if len(labels[a].arr) else 0)


def new_sizes(labels: Labels, shape: list[int], keep: np.ndarray, spaces) -> list[int]:
    """Size of every axis after the rewrite (unlabelled axes keep their size)."""
    out = list(shape)
    for space, axes in spaces_of(labels).items():
        ordered = _outer_first(labels, axes)
        mask = kept_grid(labels, ordered, keep, spaces[space].offset)
        if mask.all():
            continue
        for a, n in zip(ordered, compact_shape(mask), strict=True):
            out[a] = n
    return out


def remap_slice(labels: Labels, axis: int, bounds: tuple[int, int, int], keep, spaces) -> tuple[int, int, int]:
    """New (start, end, step) on ``axis`` selecting exactly the kept positions the old slice selected."""
    lab = labels[axis]
    axes = _outer_first(labels, spaces_of(labels)[lab.space])
    mask = kept_grid(labels, axes, keep, spaces[lab.space].offset)
    if mask.size == 0:  # an empty tensor (e.g. the pass-through part of a full rotary) stays empty
        return bounds
    p = axes.index(axis)
    if p + 1 < mask.ndim:  # a position of an outer axis is a whole block: kept if anything in it is
        mask = mask.any(axis=tuple(range(p + 1, mask.ndim)))
    rows = mask.reshape(-1, mask.shape[p])
    picked = np.sort(np.arange(*slice(*bounds).indices(rows.shape[1])))  # ascending (distinct already)
    result = None
    for row in rows:
        if not row.any():
            continue
        compact = np.cumsum(row) - 1
        new = _as_range(compact[picked][row[picked]])
        if result is not None and new != result:
            raise CompactionError("a slice selects different kept positions in different rows")
        result = new
    if result is None:  # every position of the axis went (e.g. all rotary pairs of a partial rotary)
        return (0, 0, 1)
    return result


def _as_range(sel: np.ndarray) -> tuple[int, int, int]:
    """``(start, end, step)`` of the increasing strided range ``sel`` (an int array), else an error."""
    if not len(sel):
        return (0, 0, 1)
    st = int(sel[1] - sel[0]) if len(sel) > 1 else 1
    if st <= 0:
        raise CompactionError(f"kept positions {np.asarray(sel).tolist()} are not increasing")
    cand = (int(sel[0]), int(sel[-1]) + 1, st)
    if not np.array_equal(np.arange(*cand), sel):
        raise CompactionError(f"kept positions {np.asarray(sel).tolist()} are not a strided range")
    return cand


def remap_index(labels: Labels, axis: int, index: int, keep, spaces) -> int:
    """New position of ``index`` along ``axis`` (a select/unbind); the position must survive."""
    start, end, _ = remap_slice(labels, axis, (index, index + 1, 1), keep, spaces)
    if end == start:
        raise CompactionError(f"position {index} is selected but all its channels were removed")
    return start
