"""What every importance criterion sees, and the helpers they share.

A criterion maps the prunable groups to one score per unit (higher = more important). Scores of one kind
are comparable across layers (global planning ranks them); scores of different kinds need not be.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from passes.coupling_state import Contraction, CouplingFacts
from passes.groups import CoupledUnits
from passes.meet import grid_over

LossFn = Callable[[Any, tuple], torch.Tensor]


class ReportingBatches(Sequence):
    """Calibration batches that call ``progress(done, total)`` as a loop moves past each one (every pass
    over the data counts from 1 again: scoring, then compensation means)."""

    def __init__(self, batches: Sequence[tuple], progress: Callable[[int, int], None]):
        self.batches, self.progress = list(batches), progress

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index):
        return self.batches[index]

    def __iter__(self):
        total = len(self.batches)
        self.progress(0, total)
        for done, batch in enumerate(self.batches, 1):
            yield batch
            self.progress(done, total)


@dataclass
class ScoreInputs:
    """The captured graph, its analysis facts and parameters, and optional calibration data.

    calibration: batches of positional inputs (tuples of tensors), each shaped like the example inputs
        the graph was captured with (sizes are literal in a captured graph unless dynamic_shapes was given).
    loss_fn: ``loss_fn(outputs, batch) -> scalar`` (for a causal LM, next-token cross entropy).
    """

    gm: fx.GraphModule
    facts: CouplingFacts
    params: dict[str, torch.Tensor]
    labels: dict[str, Any] = field(default_factory=dict)
    calibration: Sequence[tuple] | None = None
    loss_fn: LossFn | None = None
    seed: int = 0
    layerwise: bool = False  # activation statistics one decoder layer at a time (passes.importance.layerwise)


@dataclass(frozen=True)
class Criterion:
    """One importance criterion: its scoring function and what it needs."""

    name: str
    score: Callable[[list[CoupledUnits], ScoreInputs], list[np.ndarray]]
    needs_calibration: bool = False
    needs_loss: bool = False
    doc: str = ""
    comparable: bool = True  # scores of one kind comparable across layers (else normalise for global plans)
    across_kinds: bool = False  # scores of different kinds share one unit (a loss change): one global pool


def relative_to_median(scores: list[np.ndarray]) -> list[np.ndarray]:
    """Each group's scores divided by the group's median unit score: ``s_u / median_v s_v``.

    For criteria whose scale drifts between layers (activation energies grow with depth), this leaves only
    each unit's importance relative to a typical unit of its own group, so global allocation compares
    shapes, not layer scales. The median (not the sum) keeps a group with one massive-activation unit
    from making every other unit of that group look negligible."""
    return [s / max(float(np.median(s)), 1e-300) if len(s) else s for s in scores]


def sum_per_unit(groups: list[CoupledUnits], per_channel: np.ndarray) -> list[np.ndarray]:
    """Score of a unit = sum of ``per_channel`` over its global channel ids."""
    out = []
    for group in groups:
        lengths = [len(u) for u in group.units]
        sums = np.add.reduceat(per_channel[np.concatenate(group.units)], np.cumsum([0, *lengths[:-1]]))
        out.append(np.asarray(sums, dtype=np.float64))
    return out


def wanted_mask(facts: CouplingFacts, groups: list[CoupledUnits]) -> np.ndarray:
    mask = np.zeros(facts.n_channels, dtype=bool)
    for group in groups:
        mask[group.channels] = True
    return mask


def operand_ids(facts: CouplingFacts, op, space: int, letters: list[str], sizes: dict[str, int]) -> np.ndarray:
    """Global ids of ``space`` carried by operand ``op`` over ``letters`` (first block offset only)."""
    return grid_over(op, space, letters, sizes)[..., 0] + facts.spaces[space].offset


def space_letters(op, space: int) -> list[str]:
    return [ch for ch, lab in zip(op.letters, op.labels, strict=True) if lab is not None and lab.space == space]


def sinks(contraction: Contraction):
    """(operand index, space, letters of that space) for every activation operand whose labelled channel
    axis is contracted in ``contraction`` (the sites the analysis flags 'score' / 'param_sink')."""
    out = []
    for i, op in enumerate(contraction.operands):
        if op.is_weight:
            continue
        for space in {lab.space for lab in op.labels if lab is not None}:
            letters = space_letters(op, space)
            sunk = any(ch in contraction.contracted for ch in letters)
            if sunk and all(op.labels[op.letters.index(ch)].full for ch in letters):
                out.append((i, space, letters))
    return out


def sink_weight_spaces(facts: CouplingFacts) -> set[int]:
    """Weight spaces contracted against an activation's channel axis (W_o / W_down input columns)."""
    out = set()
    for c in facts.contractions:
        if not any(not op.is_weight for op in c.operands):
            continue
        for op in c.operands:
            if op.is_weight:
                for lab, ch in zip(op.labels, op.letters, strict=True):
                    if lab is not None and ch in c.contracted and not facts.spaces[lab.space].is_virtual:
                        out.add(lab.space)
    return out
