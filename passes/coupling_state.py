"""The facts dataflow analysis collects: channel spaces, ties between channels, blockers, flags.

Everything is stored in *global channel ids*: space ``s`` owns ids ``[s.offset, s.offset + s.size)``.

Tie kinds (each a list of ``(a, b)`` id arrays, meaning ``a[i]`` and ``b[i]`` are removed together):

- ``aligned``: the two channels meet one to one (q's (h, d) with k's (g(h), d); rotate-half partners;
  an up row with a down column). Used at every granularity.
- ``broadcast``: one side meets many (a shared cos/sin column or norm weight meets channel d of every
  head). Forces identical positions across heads at channel granularity; irrelevant when whole heads go.
- ``block``: whole blocks (heads) meet (the head axis of ``q @ k^T`` with the head axis of ``v``), and the
  channels of one block belong together. Used only at head granularity.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from passes.labels import Space

TIE_KINDS = ("aligned", "broadcast", "block")
FLAGS = (
    "score",  # contracted against another activation (q . k)
    "value",  # carried through an attention-weighted sum (softmax(.) @ v)
    "param_sink",  # contracted against a weight's input dimension (W_o, W_down)
    "sum_sink",  # summed away
    "residual",  # added onto a stream that carries no channel label (the residual / hidden dim)
    "produced",  # the free output axis of a weight contraction: where channels are born
    "normalised",  # rescaled by its own mean of squares (an RMS norm over these channels, divisor kept)
)
SCOPES = ("all", "channel", "head")


def unique_ids(ids: np.ndarray) -> np.ndarray:
    """Sorted unique values of a 1-D array, by sorting: ``np.unique`` of numpy >= 2.3 takes a hash path that
    is superlinear here (8.5 s vs 0.06 s on 3M channel ids), which made discovery superlinear in layers."""
    out = np.sort(np.asarray(ids).ravel())
    if len(out) > 1:
        out = out[np.concatenate(([True], out[1:] != out[:-1]))]
    return out


@dataclass(frozen=True)
class Contraction:
    """One contraction the analysis saw (an einsum-style meeting with contracted letters), kept for the
    scoring and costing stages: ``operands`` are ``passes.meet.Operand`` records (labels after GQA
    expansion, letters, ``path`` into ``node.args`` or None for intermediates, ``is_weight``), ``sizes``
    the letter extents, ``contracted`` the letters summed away, ``out_letters`` the output's letters."""

    node: str
    operands: tuple
    sizes: dict[str, int]
    contracted: frozenset[str]
    out_letters: tuple[str, ...]


@dataclass
class Blocker:
    """Channels that must stay dense at ``scope`` granularity, and why."""

    channels: np.ndarray
    scope: str
    reason: str
    node: str


@dataclass
class CouplingFacts:
    spaces: list[Space] = field(default_factory=list)
    ties: dict[str, list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=lambda: {k: [] for k in TIE_KINDS})
    flags: dict[str, list[np.ndarray]] = field(default_factory=lambda: {k: [] for k in FLAGS})
    blockers: list[Blocker] = field(default_factory=list)
    block_size: dict[int, int] = field(default_factory=dict)  # space id -> channels per head block
    block_notes: dict[int, dict[str, int]] = field(default_factory=dict)  # space -> {node: block it showed}
    n_channels: int = 0
    contractions: list[Contraction] = field(default_factory=list)  # for scoring and FLOP costs
    divisors: dict[str, int] = field(default_factory=dict)  # mean node -> original count (keep dividing by it)

    def new_space(self, size: int, **kw) -> Space:
        space = Space(id=len(self.spaces), size=size, offset=self.n_channels, **kw)
        self.spaces.append(space)
        self.n_channels += size
        return space

    def tie(self, kind: str, a: np.ndarray, b: np.ndarray) -> None:
        a = np.asarray(a, dtype=np.int64).ravel()
        b = np.asarray(b, dtype=np.int64).ravel()
        a, b = np.broadcast_arrays(a, b)
        keep = a != b
        if keep.any():
            self.ties[kind].append((a[keep].copy(), b[keep].copy()))

    def flag(self, name: str, channels: np.ndarray) -> None:
        self.flags[name].append(unique_ids(np.asarray(channels, dtype=np.int64).ravel()))

    def block(self, channels: np.ndarray, scope: str, reason: str, node: str) -> None:
        assert scope in SCOPES
        self.blockers.append(Blocker(unique_ids(np.asarray(channels).ravel()), scope, reason, node))

    def note_block_size(self, space: int, size: int, node: str = "") -> None:
        """``node`` showed ``space`` split into blocks of ``size`` channels; the head block is the smallest."""
        if size > 1:
            notes = self.block_notes.setdefault(space, {})
            notes[node] = min(size, notes.get(node, size))
            self.block_size[space] = min(size, self.block_size.get(space, size))

    def retract_block_note(self, space: int, node: str) -> None:
        """Forget what ``node`` showed (a split into complex pairs is not a split into heads)."""
        notes = self.block_notes.get(space, {})
        if notes.pop(node, None) is None:
            return
        if notes:
            self.block_size[space] = min(notes.values())
        else:
            self.block_size.pop(space, None)

    def flag_mask(self, name: str) -> np.ndarray:
        mask = np.zeros(self.n_channels, dtype=bool)
        for ids in self.flags[name]:
            mask[ids] = True
        return mask
