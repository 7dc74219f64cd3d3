"""Plan which units each group keeps under a sparsity target.

Channel granularity: every head block of a reshaped space must keep the same number of channels, so the
group's units fill its blocks to one target ``T`` with the best-scored units first (a unit holds channels
in one or more blocks: a channel of one KV group's heads, or a rotary pair shared by every head); units may
be wider than one channel per block (a rotary pair takes two), so the fill is exact-fit greedy, and ``T``
steps down until every block fits. Spaces without head structure count units directly.

Head granularity: units are whole heads (a KV head with its query heads); keep the best-scored ones.

Across groups (``plan_groups``): ``allocation="uniform"`` gives every group the same ratio;
``allocation="global"`` walks each group down its *ladder* of feasible plans (one per per-head keep count,
so rounding, rotary pairs and GQA families hold at every rung) and repeatedly takes the cheapest next rung
over all groups of a kind -- the one that loses the least score per unit of cost removed -- until the kind
has lost its share of the budget, never taking a group past ``max_sparsity``. ``budget`` says what the
sparsity measures: channels (per group), parameters, or FLOPs of the planned groups (``unit_costs``).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import torch

from passes.coupling_state import CouplingFacts
from passes.groups import CoupledUnits

ALLOCATIONS = ("uniform", "global")
BUDGETS = ("channels", "params", "flops")


@dataclass(frozen=True)
class PlanSettings:
    sparsity: float
    round_to: int = 8
    granularity: str = "channel"
    allocation: str = "uniform"  # "uniform": same ratio per group; "global": allocate by score
    budget: str = "channels"  # what ``sparsity`` counts: "channels" (per group), "params", "flops"
    max_sparsity: float = 0.9  # global allocation: no group loses more than this fraction of its channels
    across_kinds: bool = False  # global allocation: one pool for all kinds
    kind_scale: bool = True  # across kinds: normalise each kind's scores (False: they share one unit, as Fisher's)


def keep_count(n: int, sparsity: float, round_to: int) -> int:
    """Channels (or units) to keep out of ``n``: ``(1-sparsity)*n``, rounded to a multiple of
    ``round_to`` when ``n`` is a larger multiple of it, at least 1."""
    target = (1.0 - sparsity) * n
    if round_to > 1 and n % round_to == 0 and n > round_to:
        kept = max(round_to, round(target / round_to) * round_to)
    else:
        kept = round(target)
    return max(1, min(n, kept))


def plan_group(group: CoupledUnits, scores: np.ndarray, facts: CouplingFacts, settings: PlanSettings) -> np.ndarray:
    """Boolean keep flag per unit of ``group``."""
    if settings.sparsity == 0.0:
        return np.ones(len(group.units), dtype=bool)
    if group.kind == "head" or not group.blocks:
        n = keep_count(len(group.units), settings.sparsity, 1 if group.kind == "head" else settings.round_to)
        keep = np.zeros(len(group.units), dtype=bool)
        keep[np.argsort(-scores, kind="stable")[:n]] = True
        return keep
    return _plan_blocks(group, scores, facts, settings)


def why_nothing_removed(group: CoupledUnits, facts: CouplingFacts, settings: PlanSettings) -> str:
    """Why a group planned at a nonzero sparsity lost no unit (for the report: no silent no-ops)."""
    if settings.allocation == "global":
        return "global allocation kept it whole (its units score above the budget's cut)"
    if group.kind == "head" or not group.blocks:
        n = len(group.units)
        return f"the keep count rounds to all {n} units (sparsity {settings.sparsity:g}, round_to {settings.round_to})"
    width = max(_block_totals(_unit_widths(group, facts)).values())
    if keep_count(width, settings.sparsity, settings.round_to) >= width:
        return f"the per-head keep count rounds to the full {width} (round_to {settings.round_to})"
    return (
        "no per-head channel count below the full width fits every head (its units hold different "
        "numbers of channels in different heads)"
    )


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


def _block_totals(widths: list[dict[int, int]]) -> dict[int, int]:
    """Channels per head block over all units (the full per-head width of the group)."""
    totals: dict[int, int] = {}
    for w in widths:
        for code, c in w.items():
            totals[code] = totals.get(code, 0) + c
    return totals


def _plan_blocks(group, scores, facts, settings) -> np.ndarray:
    """Every head block of a space keeps the same channel count: one greedy fill over all units at once,
    since families may share blocks (partial rotary: a rotary pair spans every head, a pass-through channel
    one head; filling each family to ``t`` on its own kept ``2 t`` per block, i.e. everything). The widest
    blocks keep ``t``; a block of a narrower space keeps ``t`` in proportion (``_targets``)."""
    widths = _unit_widths(group, facts)
    totals = _block_totals(widths)
    n_block = max(totals.values())
    target = keep_count(n_block, settings.sparsity, settings.round_to)
    uneven = len(set(totals.values())) > 1
    # step down from the target; if nothing that small fits (a rotary pair is 2 wide), step up
    for t in [*range(target, 0, -1), *range(target + 1, n_block + 1)]:
        targets = _targets(totals, t, n_block)
        keep = np.zeros(len(group.units), dtype=bool)
        if _fill(list(range(len(group.units))), widths, scores, targets, keep):
            return keep
        if uneven:
            keep = _fill_shared_first(group, facts, widths, scores, targets)
            if keep is not None:
                return keep
    return np.ones(len(group.units), dtype=bool)  # no count fits every head: keep all (the report says so)


def _fill_shared_first(
    group: CoupledUnits,
    facts: CouplingFacts,
    widths: list[dict[int, int]],
    scores: np.ndarray,
    targets: dict[int, int],
) -> np.ndarray | None:
    """The fill for blocks of uneven widths, where best-first can take too many shared units: MLA's
    rotary pairs sit in every W_q_b head but in no W_kv_b head, so ``q_b = 2 r + n`` and ``kv_b = n`` per
    head fix how many pairs ``r`` fit; best-first takes both pairs first and then no ``n`` fits. Keep the
    best ``k`` *shared* units (those in several blocks of one space), then fill with the others, for ``k``
    from all of them down: the first exact fill wins (None when none is)."""
    space_of = _block_spaces(group, facts)
    shared = [i for i, w in enumerate(widths) if len({space_of[b] for b in w}) < len(w)]
    shared.sort(key=lambda i: -scores[i])
    chosen = set(shared)
    rest = [i for i in range(len(group.units)) if i not in chosen]
    for k in range(len(shared), -1, -1):
        keep = np.zeros(len(group.units), dtype=bool)
        filled = dict.fromkeys(targets, 0)
        for i in shared[:k]:
            keep[i] = True
            for b, c in widths[i].items():
                filled[b] += c
        if any(filled[b] > targets[b] for b in filled):
            continue
        if _fill(rest, widths, scores, targets, keep, filled):
            return keep
    return None


def _block_spaces(group: CoupledUnits, facts: CouplingFacts) -> dict[int, int]:
    """Block code (``_unit_widths``) -> the space it belongs to."""
    out = {}
    for sid, size in group.blocks.items():
        s = facts.spaces[sid]
        for b in range(-(-s.size // size)):
            out[s.offset + b] = sid
    return out


def _targets(totals: dict[int, int], t: int, n_block: int) -> dict[int, int]:
    """Channels each block keeps when the widest keep ``t``: ``round(t * width / n_block)``, at least 1.
    Blocks of one space have one width, so they keep one count (the compaction needs no more). Widths
    differ across spaces when a space holds only part of what meets in a head: MLA's W_kv_b head holds
    the key's non-rotary channels while W_q_b's and the key's heads hold those and the shared rotary
    ones."""
    return {b: t if w == n_block else max(1, round(t * w / n_block)) for b, w in totals.items()}


def _fill(members: list[int], widths, scores, targets: dict[int, int], keep: np.ndarray, filled=None) -> bool:
    """Greedy exact fill: best units first, skipping any that would overflow a block past its target;
    units outside every head block are kept. True when every block holds exactly its target. ``filled``:
    what units kept beforehand already hold per block."""
    free = [i for i in members if not widths[i]]
    keep[free] = True
    filled = dict.fromkeys(targets, 0) if filled is None else filled
    for i in sorted((i for i in members if widths[i]), key=lambda i: -scores[i]):
        w = widths[i]
        if all(filled[b] + c <= targets[b] for b, c in w.items()):
            keep[i] = True
            for b, c in w.items():
                filled[b] += c
        if all(v == targets[b] for b, v in filled.items()):
            return True
    return all(v == targets[b] for b, v in filled.items())


# ---------------------------------------------------------------------------------- costs
def unit_costs(
    groups: list[CoupledUnits], facts: CouplingFacts, params: dict[str, torch.Tensor], budget: str
) -> list[np.ndarray]:
    """What removing each unit saves: 1 per unit ("channels"), parameters, or FLOPs of one forward at the
    captured shapes (every recorded contraction costs ``2 * prod(letter sizes)``; a channel's share of it
    is that over the extent of the letters carrying it, counted once per contraction)."""
    if budget == "channels":
        return [np.array([float(len(u)) for u in g.units]) for g in groups]
    per_channel = np.zeros(facts.n_channels)
    if budget == "params":
        for space in facts.spaces:
            p = params.get(space.param) if not space.is_virtual else None
            if p is not None:
                per_channel[space.offset : space.offset + space.size] = p.numel() / space.size
    elif budget == "flops":
        per_channel = channel_flops(facts)
    else:
        raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
    return [np.array([per_channel[u].sum() for u in g.units]) for g in groups]


def channel_flops(facts: CouplingFacts) -> np.ndarray:
    from passes.meet import grid_over

    out = np.zeros(facts.n_channels)
    for c in facts.contractions:
        total = 2.0 * float(np.prod([c.sizes[ch] for ch in c.sizes]))
        seen: set[frozenset[str]] = set()
        for op in c.operands:
            for space in {lab.space for lab in op.labels if lab is not None}:
                letters = [
                    ch for ch, lab in zip(op.letters, op.labels, strict=True) if lab is not None and lab.space == space
                ]
                key = frozenset(letters)
                if key in seen or not all(op.labels[op.letters.index(ch)].full for ch in letters):
                    continue
                seen.add(key)
                ids = grid_over(op, space, letters, c.sizes)[..., 0] + facts.spaces[space].offset
                np.add.at(out, ids.ravel(), total / ids.size)
    return out


# ---------------------------------------------------------------------------------- many groups
def plan_groups(
    groups: list[CoupledUnits],
    scores: list[np.ndarray],
    facts: CouplingFacts,
    settings: PlanSettings,
    costs: list[np.ndarray] | None = None,
) -> list[np.ndarray]:
    """Keep flags per unit for every group under ``settings`` (see module docstring).

    ``costs`` (from ``unit_costs``) are needed unless budget is "channels" with uniform allocation.
    """
    if settings.allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {settings.allocation!r}")
    if settings.sparsity == 0.0 or not groups:
        return [np.ones(len(g.units), dtype=bool) for g in groups]
    if settings.allocation == "uniform" and settings.budget == "channels":
        return [plan_group(g, s, facts, settings) for g, s in zip(groups, scores, strict=True)]
    if costs is None:
        raise ValueError(f"budget {settings.budget!r} / allocation {settings.allocation!r} needs unit costs")
    if settings.allocation == "uniform":
        return _uniform_to_budget(groups, scores, costs, facts, settings)
    ladders = [_ladder(g, s, c, facts, settings) for g, s, c in zip(groups, scores, costs, strict=True)]
    pools: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        pools.setdefault("all" if settings.across_kinds else g.kind, []).append(i)
    level = [0] * len(groups)
    for members in pools.values():
        scale = _kind_scales(groups, scores, costs, members) if settings.across_kinds and settings.kind_scale else None
        target = settings.sparsity * sum(float(costs[i].sum()) for i in members)
        _greedy(ladders, members, level, target, scale)
    return [ladders[i][level[i]][0] for i in range(len(groups))]


def _ladder(group, scores, costs, facts, settings) -> list[tuple[np.ndarray, float, float]]:
    """Feasible plans of one group from dense downwards: (keep flags, removed score, removed cost)."""
    n = _width(group, facts)
    rounded = n % settings.round_to == 0 and n > settings.round_to
    step = settings.round_to if rounded and group.kind != "head" else 1
    rungs = [(np.ones(len(group.units), dtype=bool), 0.0, 0.0)]
    seen = {rungs[0][0].tobytes()}
    lengths = np.array([len(u) for u in group.units])
    removed_channels = int(lengths.sum())
    for kept in range(n - step, 0, -step):
        sparsity = 1.0 - kept / n
        if sparsity > settings.max_sparsity + 1e-9:
            break
        keep = plan_group(group, scores, facts, PlanSettings(sparsity, settings.round_to, settings.granularity))
        if keep.tobytes() in seen:
            continue
        seen.add(keep.tobytes())
        gone = int(lengths[~keep].sum())
        if gone / removed_channels > settings.max_sparsity + 1e-9:
            break
        rungs.append((keep, float(scores[~keep].sum()), float(costs[~keep].sum())))
    return rungs


def _width(group: CoupledUnits, facts: CouplingFacts) -> int:
    """Per-head channel count for head-structured groups, else the number of units."""
    if group.kind == "head" or not group.blocks:
        return len(group.units)
    totals: dict[int, int] = {}
    for sid, size in group.blocks.items():
        s = facts.spaces[sid]
        ch = group.channels
        local = ch[(ch >= s.offset) & (ch < s.offset + s.size)] - s.offset
        for b, c in zip(*np.unique(local // size, return_counts=True), strict=True):
            totals[s.offset + int(b)] = totals.get(s.offset + int(b), 0) + int(c)
    return max(totals.values())


def _kind_scales(groups, scores, costs, members) -> dict[int, float]:
    """Across kinds: divide each kind's scores by its mean score per unit cost (kinds measure different
    things: a q.k energy is not a residual-stream energy), so only relative importance is compared."""
    by_kind: dict[str, list[int]] = {}
    for i in members:
        by_kind.setdefault(groups[i].kind, []).append(i)
    out = {}
    for idx in by_kind.values():
        density = sum(float(scores[i].sum()) for i in idx) / max(1e-30, sum(float(costs[i].sum()) for i in idx))
        for i in idx:
            out[i] = 1.0 / density if density > 0 else 1.0
    return out


def _greedy(ladders, members: list[int], level: list[int], target: float, scale) -> None:
    removed = 0.0
    heap = []

    def push(i: int) -> None:
        if level[i] + 1 < len(ladders[i]):
            _, s0, c0 = ladders[i][level[i]]
            _, s1, c1 = ladders[i][level[i] + 1]
            ds = (s1 - s0) * (scale[i] if scale else 1.0)
            heapq.heappush(heap, (ds / max(c1 - c0, 1e-30), i, level[i]))

    for i in members:
        push(i)
    while heap and removed < target:
        _, i, at = heapq.heappop(heap)
        if at != level[i]:
            continue
        step = ladders[i][at + 1][2] - ladders[i][at][2]
        if removed + step > target and removed + step - target > target - removed:
            continue  # this step overshoots more than stopping here undershoots: try smaller steps
        level[i] += 1
        removed += step
        push(i)


def _uniform_to_budget(groups, scores, costs, facts, settings) -> list[np.ndarray]:
    """One channel ratio for every group, chosen so the removed cost is closest to the budget."""
    total = sum(float(c.sum()) for c in costs)
    target = settings.sparsity * total
    best, best_gap = None, None
    lo, hi = 0.0, 0.999
    for _ in range(30):  # bisection on the channel ratio (removed cost grows with it, in steps)
        mid = (lo + hi) / 2
        plans = [
            plan_group(g, s, facts, PlanSettings(mid, settings.round_to, settings.granularity))
            for g, s in zip(groups, scores, strict=True)
        ]
        removed = sum(float(c[~k].sum()) for c, k in zip(costs, plans, strict=True))
        gap = abs(removed - target)
        if best_gap is None or gap < best_gap:
            best, best_gap = plans, gap
        if removed < target:
            lo = mid
        else:
            hi = mid
    return best
