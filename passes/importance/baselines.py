"""Baselines: uncoupled magnitude and random.

*Uncoupled* emulates "each matrix scored and pruned on its own, aligned only by index", as in the
structured-pruning literature (L1/L2 filter pruning, Li et al. 2017): a group's units are ranked by the
norm of ONE matrix's slice, and that matrix's choice of indices is imposed on the others. A truly
uncoupled prune of Q without K is not expressible as an exact rewrite (``q . k`` needs both to lose the
same channels), so the other members follow by index. The one matrix is the *producing* side (the weight
whose output rows create the channels: flag 'produced') with the most channels in the group, ties to the
earliest in the graph: Q rows (not K) for Q/K, V rows for V/O, the first of gate/up rows for a gated FFN
(up rows for a plain FFN); W_o / W_down columns are never consulted.

*Random*: uniform scores from ``numpy.random.default_rng(seed)``.
"""

from __future__ import annotations

import numpy as np

from passes.groups import CoupledUnits
from passes.importance.base import Criterion, ScoreInputs
from passes.score import channel_norms


def producer_space(group: CoupledUnits, inputs: ScoreInputs, sq: np.ndarray, produced: np.ndarray) -> int | None:
    """The one matrix an uncoupled method would score this group by (see module docstring)."""
    facts = inputs.facts
    channels = group.channels
    best, best_key = None, None
    for sid in group.spaces:
        space = facts.spaces[sid]
        mine = channels[(channels >= space.offset) & (channels < space.offset + space.size)]
        if space.is_virtual or not len(mine) or np.isnan(sq[mine]).all():
            continue
        key = (bool(produced[mine].any()), len(mine), -sid)
        if best_key is None or key > best_key:
            best, best_key = sid, key
    return best


def uncoupled(groups: list[CoupledUnits], inputs: ScoreInputs) -> list[np.ndarray]:
    facts = inputs.facts
    sq = channel_norms(facts, inputs.params, sorted({s for g in groups for s in g.spaces}))
    produced = facts.flag_mask("produced")
    out = []
    for group in groups:
        sid = producer_space(group, inputs, sq, produced)
        scores = np.zeros(len(group.units))
        if sid is not None:
            space = facts.spaces[sid]
            for i, unit in enumerate(group.units):
                mine = unit[(unit >= space.offset) & (unit < space.offset + space.size)]
                scores[i] = float(np.sqrt(np.nansum(sq[mine]))) if len(mine) else 0.0
        out.append(scores)
    return out


def random(groups: list[CoupledUnits], inputs: ScoreInputs) -> list[np.ndarray]:
    rng = np.random.default_rng(inputs.seed)
    return [rng.random(len(g.units)) for g in groups]


UNCOUPLED = Criterion("uncoupled", uncoupled, doc="one matrix's own slice norms (Q rows, V rows, up rows)")
RANDOM = Criterion("random", random, doc="uniform random scores (seeded)")
