"""Dataflow analysis: label every tensor axis with the weight channels it carries.

The analysis walks the exported graph once, in topological order. Parameters enter labelled on every
axis with their own spaces (``identity_label``); every op maps its inputs' labels to its output's labels
through a rule in ``passes.op_rules`` and records, in ``CouplingFacts``, the ties between channels that
meet, the flags that say how channels end (contracted, summed, added to the residual stream) and the
blockers that keep channels dense. An op without a rule that touches a labelled tensor blocks every
channel it sees: unknown ops fail closed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from passes.coupling_state import Contraction, CouplingFacts, unique_ids
from passes.labels import AxisLabel, Labels, identity_label, in_whole_blocks, of_space, spaces_of
from passes.meet import DATA_DEPENDENT_SIZE, Operand, gqa_expand, letter_sizes, tie_operands

LabelValue = Labels | list[Any] | None
CONSTANT_COPIES = ("aten.lift_fresh_copy.default", "aten.clone.default", "aten.detach.default")


@dataclass
class Analysis:
    """Result of the analysis: labels per node name, and the collected facts."""

    graph_module: fx.GraphModule
    facts: CouplingFacts
    labels: dict[str, LabelValue] = field(default_factory=dict)
    weight_nodes: set[str] = field(default_factory=set)
    state_inputs: dict[str, int] = field(default_factory=dict)  # carried-state placeholder -> output position
    state_labels: dict[str, Labels] = field(default_factory=dict)  # what each state input adopted (passes.state)
    state_readers: dict[str, set[str]] = field(default_factory=dict)  # the cats that labelled it
    complex_pairs: dict[int, int] = field(default_factory=dict)  # space -> imaginary part's channel offset


class Ctx:
    """What a rule sees: labels and shapes of arguments, and the facts to record into."""

    def __init__(self, analysis: Analysis, params: dict[str, torch.Tensor]):
        self.analysis = analysis
        self.facts = analysis.facts
        self.params = params
        self._param_spaces: dict[tuple[str, int], int] = {}
        self.last_operands: list[Operand] = []

    # ----- reading -------------------------------------------------------------------------------
    def lab(self, arg: Any) -> Labels | None:
        if isinstance(arg, fx.Node):
            value = self.analysis.labels.get(arg.name)
            if isinstance(value, tuple):
                return value
        return None

    def shape(self, arg: Any) -> list[int]:
        val = arg.meta.get("val") if isinstance(arg, fx.Node) else None
        if not isinstance(val, torch.Tensor):
            return []
        return [concrete(s) for s in val.shape]

    def is_weight(self, arg: Any) -> bool:
        return isinstance(arg, fx.Node) and arg.name in self.analysis.weight_nodes

    def constant(self, arg: Any) -> torch.Tensor | None:
        """The value of a constant tensor argument (a get_attr, possibly copied), else None."""
        while isinstance(arg, fx.Node) and arg.op == "call_function" and str(arg.target) in CONSTANT_COPIES:
            arg = arg.args[0]
        if not isinstance(arg, fx.Node) or arg.op != "get_attr":
            return None
        value = self.analysis.graph_module
        for part in str(arg.target).split("."):
            value = getattr(value, part, None)
        if not isinstance(value, torch.Tensor) or value.is_meta:  # traced on meta: no values, fail closed
            return None
        return value.detach().cpu()

    def labels_or_none(self, arg: Any) -> Labels:
        lab = self.lab(arg)
        return lab if lab is not None else (None,) * len(self.shape(arg))

    # ----- recording -----------------------------------------------------------------------------
    def param_labels(self, fqn: str, shape: list[int]) -> Labels:
        out: list[AxisLabel | None] = []
        for dim, n in enumerate(shape):
            if n <= 1:
                out.append(None)
                continue
            key = (fqn, dim)
            if key not in self._param_spaces:
                self._param_spaces[key] = self.facts.new_space(n, param=fqn, dim=dim).id
            out.append(identity_label(self.facts.spaces[self._param_spaces[key]]))
        return tuple(out)

    def global_ids(self, labels: Labels, axes: list[int] | None = None) -> np.ndarray:
        """All global channel ids of the spaces that ``labels`` carries (on ``axes``, default all)."""
        ids = []
        for space, use in spaces_of(labels).items():
            if axes is not None and not set(use) & set(axes):
                continue
            grid = np.zeros(1, dtype=np.int64)
            for a in use:
                grid = np.add.outer(grid, labels[a].arr).ravel()
            grid = np.add.outer(grid, labels[use[0]].offsets).ravel()
            ids.append(grid + self.facts.spaces[space].offset)
        return unique_ids(np.concatenate(ids)) if ids else np.zeros(0, dtype=np.int64)

    def block_labels(self, labels: Labels | None, scope: str, reason: str, node: fx.Node) -> None:
        if labels is not None and any(lab is not None for lab in labels):
            self.facts.block(self.global_ids(labels), scope, reason, node.name)

    def virtual_label(self, node: fx.Node, path: tuple, axis: int, size: int) -> AxisLabel:
        space = self.facts.new_space(size, site=(node.name, path, axis))
        return identity_label(space)

    # ----- combining -----------------------------------------------------------------------------
    def combine(self, node: fx.Node, operands: list[Operand], out_letters: list[str]) -> Labels:
        """Meet ``operands`` einsum-style and return the labels of the output ``out_letters``.

        Records ties for every meeting, gather sites for unlabelled non-weight operands that meet a
        labelled letter, flags for contractions, and makes labels partial when their axes vanish.
        """
        self.node = node
        sizes = letter_sizes(operands)
        operands = [gqa_expand(op, sizes) for op in operands]
        operands = self._add_gather_sites(node, operands, sizes)
        self.last_operands = operands
        self._check_removed_terms_vanish(node, operands, out_letters)
        for i, a in enumerate(operands):
            for b in operands[i + 1 :]:
                tie_operands(self.facts, self.facts.spaces, a, b, sizes)
        self._flag_contractions(operands, out_letters)
        return self._drop_outer_products(node, operands, out_letters, self._output_labels(operands, out_letters, sizes))

    def _drop_outer_products(self, node, operands: list[Operand], out_letters: list[str], out: Labels) -> Labels:
        """One space on several output axes means ``channel = sum of the axes' offsets`` (heads and
        head_dim of one projection). When no operand carries the space on all of them, the output is an
        outer product of two channel sets of one weight (Mamba-2's ``B`` rows times its ``x`` rows, both
        rows of ``in_proj``): no label describes it. The operand that carries the space on the most of
        those axes keeps its labels there; on the other axes the channels are blocked where they come from
        and the output carries no label (it is then gathered only where nothing was removed)."""
        letters_of: dict[int, list[str]] = {}
        for ch, lab in zip(out_letters, out, strict=True):
            if lab is not None:
                letters_of.setdefault(lab.space, []).append(ch)
        result = dict(zip(out_letters, out, strict=True))
        for space, letters in letters_of.items():
            if len(letters) < 2 or any(_carries_on_all(op, space, letters) for op in operands):
                continue
            best = max(operands, key=lambda op: _outer_side_rank(op, space, letters))
            for ch in letters:
                if _carries_on_all(best, space, [ch]):
                    result[ch] = replace(best.letter_labels()[ch], zero_ok=result[ch].zero_ok)
                    continue
                result[ch] = None
                for op in operands:
                    if _carries_on_all(op, space, [ch]):
                        only = tuple(lab if c == ch else None for c, lab in zip(op.letters, op.labels, strict=True))
                        reason = "an outer product of two channel sets of one weight (no single label describes it)"
                        self.block_labels(only, "all", reason, node)
        return tuple(result[ch] for ch in out_letters)

    def _add_gather_sites(self, node, operands: list[Operand], sizes) -> list[Operand]:
        """An unlabelled, non-weight operand (a constant, a zero state ``zeros(B, D, N)``) that meets
        labelled letters becomes a gather site on each of those axes: the rewrite gathers its kept
        positions axis by axis (``index_select`` is separable, so the order does not matter)."""
        labelled = {ch for op in operands for ch in op.letter_labels()}
        out = []
        for op in operands:
            missing = [
                k for k, ch in enumerate(op.letters) if ch in labelled and op.labels[k] is None and op.shape[k] > 1
            ]
            if missing and op.path is not None and not op.is_weight:
                if len(missing) > 1 and not _separable_sites(operands, [op.letters[k] for k in missing]):
                    for other in operands:
                        if other is not op:
                            self.block_labels(
                                other.labels,
                                "all",
                                "an operand meets one channel space on several axes (heads and head_dim): "
                                "its kept positions are not a gather per axis",
                                node,
                            )
                    out.append(op)
                    continue
                labels = list(op.labels)
                for k in missing:
                    lab = self.virtual_label(node, op.path, k, op.shape[k])
                    if _is_block_axis(operands, op.letters[k]):
                        lab = lab.partial(np.zeros(1, dtype=np.int64))
                    labels[k] = lab
                op = replace(op, labels=tuple(labels))
            out.append(op)
        return out

    def _flag_contractions(self, operands: list[Operand], out_letters: list[str]) -> None:
        if len(operands) < 2:
            return
        counts: dict[str, int] = {}
        for op in operands:
            for ch in set(op.letters):
                counts[ch] = counts.get(ch, 0) + 1
        contracted = {ch for ch, c in counts.items() if c >= 2 and ch not in out_letters}
        if contracted:
            self.facts.contractions.append(
                Contraction(
                    self.node.name, tuple(operands), letter_sizes(operands), frozenset(contracted), tuple(out_letters)
                )
            )
        frozen = [op.is_weight or self._is_constant(op) for op in operands]
        if contracted:
            self._flag_produced(operands, out_letters)
        acts = [op for op, fixed in zip(operands, frozen, strict=True) if not fixed]
        for op in acts:
            lab = op.letter_labels()
            sunk = [k for k, ch in enumerate(op.letters) if ch in contracted and ch in lab]
            if sunk:
                against_weight = any(fixed for o, fixed in zip(operands, frozen, strict=True) if o is not op)
                self.facts.flag("param_sink" if against_weight else "score", self._ids(op, sunk))
            if len(acts) >= 2 and contracted:  # p @ v: v's channels ride through (not rot(q) * sin)
                free = [
                    k
                    for k, ch in enumerate(op.letters)
                    if ch in lab and lab[ch].full and ch in out_letters and counts[ch] == 1
                ]
                if free:
                    self.facts.flag("value", self._ids(op, free))

    def _flag_produced(self, operands: list[Operand], out_letters: list[str]) -> None:
        """A weight's labelled axes that survive a contraction are where channels are born: ``W @ x``, and
        ``W @ P`` alike (``k = Linear(memory)`` over a learned memory Parameter)."""
        for op in operands:
            if op.is_weight:
                free = [k for k, ch in enumerate(op.letters) if op.labels[k] is not None and ch in out_letters]
                if free:
                    self.facts.flag("produced", self._ids(op, free))

    def _check_removed_terms_vanish(self, node: fx.Node, operands: list[Operand], out_letters: list[str]) -> None:
        """Contracting (or summing) a channel letter drops the removed channels' terms. The masked dense
        model keeps them, so the two agree only if every removed term is 0 there: some factor of the
        product must be 0 at the removed positions, i.e. carry a *zero* label on that letter (a zeroed
        weight slice, or dataflow from one through ops with f(0) == 0). Constants, buffers, gather sites
        and values like ``v + t`` are not zeroed by the mask, so with no zero factor the channels are
        blocked. Scope: a partial (head-block) letter only matters when whole heads go ("head"); a full
        letter whose space survives in the output as whole blocks is exact when whole heads go
        ("channel"); anything else ("all")."""
        present = {ch for op in operands for ch in op.letters}
        for ch in sorted(present - set(out_letters)):
            carriers = [(op, op.letter_labels()[ch]) for op in operands if ch in op.letter_labels()]
            if not carriers or any(self.is_zero(lab) for _, lab in carriers):
                continue
            for op, lab in carriers:
                if self.facts.spaces[lab.space].is_site:
                    continue
                only = of_space(op.labels, lab.space)
                scope = "head" if not lab.full else ("channel" if _blocks_survive(op, ch, out_letters) else "all")
                self.block_labels(
                    only,
                    scope,
                    "a sum over channels whose removed entries are not zero in the "
                    "masked model (an offset, a constant/buffer operand or an op with f(0) != 0 "
                    "on every side): removing them would change it",
                    node,
                )

    def is_zero(self, lab: AxisLabel) -> bool:
        """Removed positions of ``lab`` are exactly 0 in the masked dense model."""
        return lab.zero_ok and not self.facts.spaces[lab.space].is_site

    def _is_constant(self, op: Operand) -> bool:
        """A buffer or literal tensor operand: contracting a channel against it is a (frozen) weight
        contraction, like ``h @ W_down``, not a meeting of two activations like ``q . k``."""
        return op.path is not None and self.constant(arg_at(self.node, op.path)) is not None

    def _broadcast_along(self, op: Operand, letter: str) -> bool:
        """``op`` does not vary with the channels of ``letter``: no label there, or only a gather site
        (an unlabelled axis, e.g. an MQA value repeated over the query heads of a bmm batch axis)."""
        if letter not in op.letters:
            return False
        lab = op.labels[op.letters.index(letter)]
        return lab is None or self.facts.spaces[lab.space].is_site

    def _ids(self, op: Operand, axes: list[int]) -> np.ndarray:
        return self.global_ids(op.labels, axes)

    def _output_labels(self, operands: list[Operand], out_letters: list[str], sizes) -> Labels:
        """Per output letter, the most informative label: full before partial, weights before sites.

        A partial (head-block) label is dropped where an operand that carries full channels into the
        output is broadcast along that letter (MQA: V has one head, so the output's head axis carries
        no V channel; labelling it with Q's heads would mix two spaces on one tensor).
        """
        carriers = [
            op for op in operands if any(lab.full and ch in out_letters for ch, lab in op.letter_labels().items())
        ]
        ordered = sorted(operands, key=lambda op: -_weight_in_output(op, out_letters))
        out: list[AxisLabel | None] = []
        for ch in out_letters:
            best = None
            for op in ordered:
                lab = op.letter_labels().get(ch)
                if lab is None:
                    continue
                lab = _survivor(op, lab, out_letters)
                if best is None or _rank(lab, self.facts) > _rank(best, self.facts):
                    best = lab
            if best is not None and not best.full and any(self._broadcast_along(op, ch) for op in carriers):
                best = None
            out.append(best)
        return tuple(out)


def arg_at(node: fx.Node, path: tuple) -> Any:
    """The argument of ``node`` at ``path``: ``(i,)``, ``(i, j)`` into a list argument, or ``("kw", name)``."""
    if path[0] == "kw":
        return node.kwargs[path[1]]
    value = node.args[path[0]]
    return value[path[1]] if len(path) > 1 else value


def _weight_in_output(op: Operand, out_letters: list[str]) -> float:
    """How much of the output's labelling ``op`` should provide: its full surviving axes, activations
    before weights (a norm weight multiplying q must not replace q's own head_dim label)."""
    labs = op.letter_labels()
    full = sum(1 for ch, lab in labs.items() if ch in out_letters and lab.full)
    return full + (0.5 if not op.is_weight else 0.0)


def _outer_side_rank(op: Operand, space: int, letters: list[str]) -> tuple[int, int]:
    """Which side of an outer product keeps its labels: the one on more of the letters, then the one that
    spans more channels there (Mamba-2's inner x channels before its state channels)."""
    carried = [op.letter_labels()[ch] for ch in letters if _carries_on_all(op, space, [ch])]
    return len(carried), sum(len(lab.arr) for lab in carried)


def _carries_on_all(op: Operand, space: int, letters: list[str]) -> bool:
    labs = op.letter_labels()
    return all(ch in labs and labs[ch].space == space for ch in letters)


def _separable_sites(operands: list[Operand], letters: list[str]) -> bool:
    """Gathering an operand axis by axis keeps a product of per-axis positions: exact only when no channel
    space it meets spans two of those ``letters`` (a [heads, head_dim] pair keeps channels per head)."""
    seen: set[int] = set()
    for ch in letters:
        spaces = {op.letter_labels()[ch].space for op in operands if ch in op.letter_labels()}
        if spaces & seen:
            return False
        seen |= spaces
    return True


def _is_block_axis(operands: list[Operand], letter: str) -> bool:
    """True when the labelled partner on ``letter`` indexes whole blocks of its space (a head axis):
    its contributions are multiples of the extent of the space's other axes, or it is partial."""
    for op in operands:
        lab = op.letter_labels().get(letter)
        if lab is None:
            continue
        if not lab.full:
            return True
        others = [o for ch, o in op.letter_labels().items() if ch != letter and o.space == lab.space]
        return in_whole_blocks([lab], others)
    return False


def _blocks_survive(op: Operand, letter: str, out_letters: list[str]) -> bool:
    """The space on ``op``'s ``letter`` keeps another axis in the output that moves in whole multiples of the
    contracted extent (head axis kept, head_dim contracted): removing whole blocks drops output positions."""
    lab = op.letter_labels()[letter]
    kept = [o for ch, o in op.letter_labels().items() if o.space == lab.space and ch in out_letters]
    gone = [o for ch, o in op.letter_labels().items() if o.space == lab.space and ch not in out_letters]
    return in_whole_blocks(kept, gone)


def _survivor(op: Operand, lab: AxisLabel, out_letters: list[str]) -> AxisLabel:
    """``lab`` as seen in the output: partial if other axes of its space were contracted away."""
    gone = [
        k
        for k, (ch, other) in enumerate(zip(op.letters, op.labels, strict=True))
        if other is not None and other.space == lab.space and ch not in out_letters
    ]
    if not gone:
        return lab
    offsets = lab.offsets
    for k in gone:
        offsets = np.add.outer(op.labels[k].arr, offsets).ravel()
    return lab.partial(np.unique(offsets))


def _rank(lab: AxisLabel, facts: CouplingFacts) -> tuple[int, int]:
    return (int(lab.full), int(not facts.spaces[lab.space].is_site))


def concrete(size: Any) -> int:
    """An int for a (possibly symbolic) size, using the example value's hint for symbols. The hint is read
    without ``int(size)``, which would add a guard that pins the symbol to the example's size (a graph
    captured with a dynamic sequence would then refuse every other length). A data-dependent size without
    a hint stands as ``DATA_DEPENDENT_SIZE``."""
    if isinstance(size, int):
        return size
    hint = getattr(getattr(size, "node", None), "hint", None)
    if isinstance(size, torch.SymInt) and hint is not None:
        return int(hint)
    if isinstance(size, torch.SymInt) and free_unbacked_symbols(size):
        return DATA_DEPENDENT_SIZE
    try:
        return int(size)
    except (TypeError, RuntimeError):
        hint = getattr(getattr(size, "node", None), "hint", None)
        if hint is None:
            raise
        return int(hint)
