"""Where labelled axes meet: the one rule behind elementwise ops, matmul, einsum and attention.

Every op that combines operands is described einsum-style: each operand axis gets a *letter*; operands
sharing a letter meet along it. For two operands A, B and a channel space on each:

- both labels full, same letters: channel ``A(i)`` meets channel ``B(i)`` one to one -> ``aligned`` tie
  (q's (h, d) with k's (h, d) in ``q @ k^T``; a gate row with an up row in ``silu(g) * u``);
- both full, different letters: B is broadcast over A's extra axes -> ``broadcast`` tie
  (cos column d meets channel d of every head);
- either partial (its block axes were contracted earlier): the blocks meet -> ``block`` ties.

A labelled letter that meets an *unlabelled* operand of size > 1 which is not a weight makes that operand
a *gather site*: a virtual space whose positions must be sliced together with the channels they meet.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from passes.labels import AxisLabel, Labels, in_whole_blocks, spaces_of


@dataclass
class Operand:
    """One input of a combining op: its labels, shape, letters, and where it sits in ``node.args``."""

    labels: Labels
    shape: list[int]
    letters: list[str]
    path: tuple | None  # position in node.args (None for internal intermediates)
    is_weight: bool = False

    def letter_labels(self) -> dict[str, AxisLabel]:
        return {ch: lab for ch, lab in zip(self.letters, self.labels, strict=True) if lab is not None}


def grid_over(op: Operand, space: int, letters: list[str], sizes: dict[str, int]) -> np.ndarray:
    """Channels of ``space`` in ``op`` over ``letters`` (broadcast), plus a trailing block-offset axis."""
    grid = np.zeros([sizes[ch] for ch in letters], dtype=np.int64)
    offsets = np.zeros(1, dtype=np.int64)
    for ch, lab in zip(op.letters, op.labels, strict=True):
        if lab is None or lab.space != space:
            continue
        shape = [1] * len(letters)
        shape[letters.index(ch)] = len(lab.arr)
        grid = grid + lab.arr.reshape(shape)
        offsets = lab.offsets
    return grid[..., None] + offsets.reshape([1] * len(letters) + [-1])


def tie_operands(facts, spaces, a: Operand, b: Operand, sizes: dict[str, int]) -> None:
    """Record the ties between every pair of channel spaces of ``a`` and ``b`` that meet."""
    for sa, axes_a in spaces_of(a.labels).items():
        letters_a = [a.letters[x] for x in axes_a]
        for sb, axes_b in spaces_of(b.labels).items():
            letters_b = [b.letters[x] for x in axes_b]
            meet = [ch for ch in letters_a if ch in letters_b and sizes[ch] > 1]
            if not meet:
                continue
            full = all(a.labels[x].full for x in axes_a) and all(b.labels[x].full for x in axes_b)
            off_a, off_b = spaces[sa].offset, spaces[sb].offset
            if full:
                union = sorted(set(letters_a) | set(letters_b))
                ga = grid_over(a, sa, union, sizes) + off_a
                gb = grid_over(b, sb, union, sizes) + off_b
                kind = "aligned" if set(letters_a) == set(letters_b) else "broadcast"
                if kind == "broadcast" and _tie_per_head(
                    facts, a, sa, off_a, letters_a, b, sb, off_b, letters_b, meet, sizes
                ):
                    continue
                facts.tie(
                    kind,
                    np.broadcast_to(ga, np.broadcast_shapes(ga.shape, gb.shape)),
                    np.broadcast_to(gb, np.broadcast_shapes(ga.shape, gb.shape)),
                )
            else:
                _tie_blocks(facts, a, sa, off_a, b, sb, off_b, meet, sizes)


def _tie_blocks(facts, a, sa, off_a, b, sb, off_b, meet, sizes) -> None:
    """Blocks at each meeting position belong together: tie every channel to a representative."""
    parts = []
    for op, space, off in ((a, sa, off_a), (b, sb, off_b)):
        letters = meet + [ch for ch in op.letters if ch not in meet and _carries(op, ch, space)]
        grid = grid_over(op, space, letters, sizes) + off
        parts.append(grid.reshape(int(np.prod([sizes[ch] for ch in meet])), -1))
    rep = parts[0][:, :1]
    for part in parts:
        facts.tie("block", np.broadcast_to(rep, part.shape), part)


def _tie_per_head(facts, a, sa, off_a, letters_a, b, sb, off_b, letters_b, meet, sizes) -> bool:
    """A space that meets another only on the other's *head* axes (the rows of a per-head norm weight
    [H, D], a per-head scale [H, 1], times q [.., H, D]) goes with those heads when whole heads are removed
    and never when channels inside the heads are: tie its channel h to head h's block (a ``block`` tie,
    head granularity only) instead of to every channel of the head. A table that meets channels inside the
    heads (rotary cos/sin, the weight's D axis) is not this. True when it applied."""
    for small, s_small, off_s, l_small, big, s_big, off_b2, l_big in (
        (a, sa, off_a, letters_a, b, sb, off_b, letters_b),
        (b, sb, off_b, letters_b, a, sa, off_a, letters_a),
    ):
        if set(l_small) == set(meet) and set(meet) < set(l_big) and all(_head_axis(big, ch, s_big) for ch in meet):
            _tie_blocks(facts, small, s_small, off_s, big, s_big, off_b2, meet, sizes)
            return True
    return False


def _head_axis(op: Operand, letter: str, space: int) -> bool:
    """``letter`` indexes whole blocks of ``space`` in ``op``: its channel offsets are multiples of the
    extent of the space's other axes."""
    labs = op.letter_labels()
    return in_whole_blocks([labs[letter]], [lab for ch, lab in labs.items() if ch != letter and lab.space == space])


def _carries(op: Operand, letter: str, space: int) -> bool:
    lab = op.letter_labels().get(letter)
    return lab is not None and lab.space == space


# Stand-in for a size known only at run time (an unbacked symbol: tokens routed to one expert). Such an axis
# is never a channel axis (channel sizes come from weight shapes); a prime no channel width shares keeps the
# view algebra from factoring it together with channels by coincidence. Where it meets a static size > 1,
# torch's trace asserted they are equal at run time, so it takes that size.
DATA_DEPENDENT_SIZE = 1009


def gqa_expand(op: Operand, sizes: dict[str, int]) -> Operand:
    """Repeat labels of a grouped (GQA) head axis so that head h reads KV head h // (H / H_kv)."""
    labels = list(op.labels)
    shape = list(op.shape)
    for k, ch in enumerate(op.letters):
        n, m = sizes[ch], shape[k]
        if m in (1, n):
            continue
        if m == DATA_DEPENDENT_SIZE and labels[k] is None:
            shape[k] = n
            continue
        if n % m:
            raise ValueError(f"axis {ch!r}: size {m} does not divide {n}")
        shape[k] = n
        if labels[k] is not None:
            labels[k] = replace(labels[k], arr=labels[k].arr[np.arange(n) // (n // m)])
    return replace(op, labels=tuple(labels), shape=shape)


def letter_sizes(operands: list[Operand]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for op in operands:
        for ch, n in zip(op.letters, op.shape, strict=True):
            known = sizes.get(ch, 1)
            if DATA_DEPENDENT_SIZE in (n, known) and min(n, known) > 1:
                # the static size the run-time one equals (see DATA_DEPENDENT_SIZE)
                sizes[ch] = known if n == DATA_DEPENDENT_SIZE else n
            else:
                sizes[ch] = max(known, n)
    return sizes
