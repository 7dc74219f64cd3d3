"""Axis labels: which removable weight channels a tensor axis carries.

A *space* is one dimension of one parameter (``param``, ``dim``) whose channels could be removed, or a
*virtual* space, which has no parameter: either a *gather site*, one axis of a non-parameter operand (rotary
cos/sin, a mask, a residual input) that meets a labelled axis and would have to be gathered if channels went
away, or a *joint* space, the positions of a ``cat`` whose pieces carry different spaces on the joined axis
(MLA's key ``cat([k_nope, k_rot])``): each position is tied to the channel its piece carries there, so it is
exactly as zero as that channel, and nothing is gathered for it.

An ``AxisLabel(space, arr)`` on axis ``a`` of a tensor says: the element at multi-index ``i`` carries
channel ``sum_a arr_a[i_a]`` of ``space``, summed over every axis of that tensor labelled with that space.
A linear output ``[B, S, N]`` has ``arr = arange(N)`` on its last axis; after ``view(B, S, H, D)`` the two
new axes carry ``arr_H = D * arange(H)`` and ``arr_D = arange(D)`` (additive decomposition, so the channel
of element (h, d) is ``h*D + d``). Arbitrary integer arrays (not just strides) let the same algebra follow
``cat``/``slice``/``stack`` permutations such as rotate-half and interleaved rotary.

A label is *partial* once some axes of its space were contracted away (e.g. the head axis of ``q @ k^T``):
position ``i`` then stands for the whole *block* of channels ``arr[i] + offsets``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

Labels = tuple["AxisLabel | None", ...]


@dataclass(frozen=True)
class Space:
    """One removable channel dimension: ``param``'s dimension ``dim`` (or a virtual gather site)."""

    id: int
    size: int
    offset: int  # first global channel id of this space
    param: str | None = None  # fully qualified parameter name in the original model
    dim: int = 0
    site: tuple[str, tuple, int] | None = None  # (node name, arg path, axis) for virtual spaces

    @property
    def is_virtual(self) -> bool:
        return self.param is None

    @property
    def is_site(self) -> bool:
        """A gather site: values not zeroed by the mask (a joint space is as zero as its pieces)."""
        return self.site is not None


@dataclass(frozen=True, eq=False)
class AxisLabel:
    """Channel contribution of one tensor axis (see module docstring)."""

    space: int
    arr: np.ndarray
    full: bool = True
    offsets: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))
    zero_ok: bool = True  # value is 0 wherever the producing channels were zeroed

    def with_arr(self, arr: np.ndarray) -> AxisLabel:
        return replace(self, arr=np.asarray(arr, dtype=np.int64))

    def partial(self, offsets: np.ndarray) -> AxisLabel:
        return replace(self, full=False, offsets=np.asarray(offsets, dtype=np.int64))


def identity_label(space: Space) -> AxisLabel:
    return AxisLabel(space.id, np.arange(space.size, dtype=np.int64))


def spaces_of(labels: Labels) -> dict[int, list[int]]:
    """Map space id -> axes of ``labels`` that carry it, in axis order."""
    out: dict[int, list[int]] = {}
    for axis, lab in enumerate(labels):
        if lab is not None:
            out.setdefault(lab.space, []).append(axis)
    return out


def channel_grid(labels: Labels, space: int, axes: list[int], grid_axes: list[int], sizes: list[int]):
    """Channels of ``space`` over ``grid_axes`` (broadcast; axes of ``grid_axes`` not in ``axes`` repeat).

    Returns an int array of shape ``sizes`` (one entry per grid axis) plus a trailing axis over the
    label's block offsets (length 1 for full labels).
    """
    grid = np.zeros(sizes, dtype=np.int64)
    for axis in axes:
        lab = labels[axis]
        assert lab is not None and lab.space == space
        shape = [1] * len(grid_axes)
        pos = grid_axes.index(axis)
        shape[pos] = len(lab.arr)
        grid = grid + lab.arr.reshape(shape)
    offsets = labels[axes[0]].offsets  # type: ignore[union-attr]
    return grid[..., None] + offsets.reshape([1] * len(grid_axes) + [-1])


def of_space(labels: Labels, space: int) -> Labels:
    """``labels`` with every axis that does not carry ``space`` set to None."""
    return tuple(lab if lab is not None and lab.space == space else None for lab in labels)


def in_whole_blocks(outer: list[AxisLabel], inner: list[AxisLabel]) -> bool:
    """Every channel offset of the ``outer`` axes is a multiple of the extent the ``inner`` axes span
    (``1 + sum(ptp)``): the outer axes index whole blocks (heads) of the inner ones (head_dim). False when
    either side is empty.

    An inner axis whose contribution is constant (``ptp == 0``: a size-1 head axis left by ``split`` /
    ``select`` of one KV head, ``[32]`` for K in a fused ``[q0..q3 | k | v]``, or that axis expanded) is an
    offset, not a block dimension (``fold_constant_axes`` moves it onto a sibling): it spans nothing, so it
    does not make ``outer`` a head axis. Only inner axes that vary count; none left means no blocks."""
    inner = [lab for lab in inner if np.ptp(lab.arr) > 0]
    if not outer or not inner:
        return False
    extent = 1 + sum(int(np.ptp(lab.arr)) for lab in inner)
    return all(bool(np.all(lab.arr % extent == 0)) for lab in outer)


def is_full(labels: Labels, axes: list[int]) -> bool:
    return all(labels[a] is not None and labels[a].full for a in axes)  # type: ignore[union-attr]
