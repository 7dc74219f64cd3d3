"""Plan which units each group keeps under a sparsity target.

Channel granularity: a group's units are split into *families* by the head blocks they touch (one family
per KV group under GQA; one family for an FFN). Every head block of a reshaped space must keep the same
number of channels, so each family fills its blocks to the same target ``T`` with its best-scored units;
units may be wider than one channel per block (a rotary pair takes two), so the fill is exact-fit greedy,
and ``T`` steps down until every family fits. Spaces without head structure count units directly.

Head granularity: units are whole heads (a KV head with its query heads); keep the best-scored ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from passes.coupling_state import CouplingFacts
from passes.groups import CoupledUnits


@dataclass(frozen=True)
class PlanSettings:
    sparsity: float
    round_to: int = 8
    granularity: str = "channel"


def keep_count(n: int, sparsity: float, round_to: int) -> int:
    """Channels (or units) to keep out of ``n``: ``(1-sparsity)*n``, rounded to a multiple of
    ``round_to`` when ``n`` is a larger multiple of it, at least 1."""
    target = (1.0 - sparsity) * n
    if round_to > 1 and n % round_to == 0 and n > round_to:
        kept = max(round_to, round(target / round_to) * round_to)
    else:
        kept = round(target)
    return max(1, min(n, kept))


def plan_group(
    group: CoupledUnits, scores: np.ndarray, facts: CouplingFacts, settings: PlanSettings
) -> np.ndarray:
    """Boolean keep flag per unit of ``group``."""
    if settings.sparsity == 0.0:
        return np.ones(len(group.units), dtype=bool)
    if group.kind == "head" or not group.blocks:
        n = keep_count(len(group.units), settings.sparsity, 1 if group.kind == "head" else settings.round_to)
        keep = np.zeros(len(group.units), dtype=bool)
        keep[np.argsort(-scores, kind="stable")[:n]] = True
        return keep
    return _plan_blocks(group, scores, facts, settings)


def _unit_widths(group: CoupledUnits, facts: CouplingFacts) -> list[dict[int, int]]:
    """For each unit: {block code: channels it holds there} over the group's head-structured spaces."""
    widths = []
    for unit in group.units:
        w: dict[int, int] = {}
        for sid, size in group.blocks.items():
            s = facts.spaces[sid]
            local = unit[(unit >= s.offset) & (unit < s.offset + s.size)] - s.offset
            for b, c in zip(*np.unique(local // size, return_counts=True), strict=True):
                code = s.offset + int(b)
                w[code] = w.get(code, 0) + int(c)
        widths.append(w)
    return widths


def _plan_blocks(group, scores, facts, settings) -> np.ndarray:
    widths = _unit_widths(group, facts)
    families: dict[tuple[int, ...], list[int]] = {}
    for i, w in enumerate(widths):
        families.setdefault(tuple(sorted(w)), []).append(i)
    block_total = {}
    for w in widths:
        for code, c in w.items():
            block_total[code] = block_total.get(code, 0) + c
    n_block = max(block_total.values())
    target = keep_count(n_block, settings.sparsity, settings.round_to)
    # step down from the target; if nothing that small fits (a rotary pair is 2 wide), step up
    for t in [*range(target, 0, -1), *range(target + 1, n_block + 1)]:
        keep = np.zeros(len(group.units), dtype=bool)
        if all(_fill(members, widths, scores, t, keep) for members in families.values()):
            return keep
    raise ValueError("no uniform per-head channel count fits this group")


def _fill(members: list[int], widths, scores, target: int, keep: np.ndarray) -> bool:
    """Greedy exact fill: best units first, skipping any that would overflow a block past ``target``."""
    blocks = set().union(*(widths[i] for i in members))
    if not blocks:
        keep[members] = True
        return True
    filled = dict.fromkeys(blocks, 0)
    for i in sorted(members, key=lambda i: -scores[i]):
        w = widths[i]
        if all(filled[b] + c <= target for b, c in w.items()):
            keep[i] = True
            for b, c in w.items():
                filled[b] += c
        if all(v == target for v in filled.values()):
            return True
    return all(v == target for v in filled.values())
