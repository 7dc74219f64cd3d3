"""From coupling facts to coupled groups: units (channels removed together) and their groups.

1. *Units*: connected components of the channel-tie graph (aligned + broadcast ties at channel
   granularity; aligned + block ties at head granularity). Removing a unit removes every channel it holds
   in every member, which is what makes the rewrite exact.
2. *Groups*: units of one kind that share a channel space are planned together (every head block of a
   reshaped space must keep the same count, so per-KV-group channel sets are *families* inside one
   group). The unit/space graph is a networkx graph; its connected components are the groups.
3. Each group is classified by the flags on its channels (``qk``, ``vo``, ``ffn``, ``head``, ``hidden``),
   and skipped, with the blockers' reasons, when any channel is blocked at this granularity.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from passes.coupling_state import CouplingFacts, unique_ids

GRANULARITIES = ("channel", "head")


@dataclass
class CoupledUnits:
    """One group: its units (arrays of global channel ids), kind, and why it is skipped (if it is)."""

    kind: str
    units: list[np.ndarray]
    spaces: list[int]
    blocks: dict[int, int]  # space id -> block size (channels per head) for spaces with head structure
    reasons: list[str] = field(default_factory=list)

    @property
    def channels(self) -> np.ndarray:
        return np.concatenate(self.units)

    @property
    def prunable(self) -> bool:
        return not self.reasons


def removed_by_space(group: CoupledUnits, facts: CouplingFacts, keep: np.ndarray) -> list[tuple[int, tuple[int, ...]]]:
    """``(space id, removed local indices)`` for every space of ``group``: the indices of that space that
    belong to the group and that ``keep`` drops (virtual spaces included; they hold no parameter)."""
    out = []
    channels = group.channels
    for sid in group.spaces:
        space = facts.spaces[sid]
        mine = channels[(channels >= space.offset) & (channels < space.offset + space.size)] - space.offset
        in_group = np.zeros(space.size, dtype=bool)
        in_group[mine] = True
        local = keep[space.offset : space.offset + space.size]
        out.append((sid, tuple(np.flatnonzero(in_group & ~local).tolist())))
    return out


def unit_components(facts: CouplingFacts, granularity: str) -> np.ndarray:
    """Component label per global channel id under the ties used at ``granularity``."""
    kinds = ("aligned", "broadcast") if granularity == "channel" else ("aligned", "block")
    pairs = [p for k in kinds for p in facts.ties[k]]
    n = facts.n_channels
    if not pairs:
        return np.arange(n)
    rows = np.concatenate([a for a, _ in pairs])
    cols = np.concatenate([b for _, b in pairs])
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return labels


def space_of_channel(facts: CouplingFacts) -> np.ndarray:
    owner = np.empty(facts.n_channels, dtype=np.int64)
    for space in facts.spaces:
        owner[space.offset : space.offset + space.size] = space.id
    return owner


def build_groups(facts: CouplingFacts, granularity: str) -> list[CoupledUnits]:
    """Every coupled group of the graph (prunable or skipped) at ``granularity``.

    A group is a connected component of units of one kind that share a channel space (so one qk, one vo
    and one ffn group per layer; a fused qkv weight holds a qk and a vo group side by side).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    comp = unit_components(facts, granularity)
    owner = space_of_channel(facts)
    flags = {name: facts.flag_mask(name) for name in facts.flags}
    tied = np.zeros(facts.n_channels, dtype=bool)
    for pairs in facts.ties.values():
        for a, b in pairs:
            tied[a] = tied[b] = True
    chans = np.flatnonzero(tied | flags["produced"])
    if not len(chans):  # no channel is tied or produced (no linears, or none the analysis recognises)
        return []
    chans = chans[np.argsort(comp[chans], kind="stable")]
    _, starts = np.unique(comp[chans], return_index=True)
    ends = np.append(starts[1:], len(chans))
    units = [chans[a:b] for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]  # np.split is 3x slower
    kinds = _unit_kinds(flags, chans, starts, granularity)
    kind_ids = {k: i for i, k in enumerate(sorted(set(kinds)))}
    unit_of_chan = np.repeat(np.arange(len(units)), np.diff(np.append(starts, len(chans))))
    kind_of_unit = np.array([kind_ids[k] for k in kinds], dtype=np.int64)
    # space-level graph: node (kind, space); a unit links every space it touches to its first one
    unit_space = _unique_rows(unit_of_chan, owner[chans])
    first_space = np.full(len(units), -1, dtype=np.int64)
    first_space[unit_space[::-1, 0]] = unit_space[::-1, 1]
    links = _unique_rows(kind_of_unit[unit_space[:, 0]], first_space[unit_space[:, 0]], unit_space[:, 1])
    graph = nx.Graph()
    graph.add_edges_from(((int(k), int(a)), (int(k), int(b))) for k, a, b in links)
    component = {node: i for i, nodes in enumerate(nx.connected_components(graph)) for node in nodes}
    groups = []
    shared = _broadcast_mask(facts) if granularity == "head" else None
    for unit_list in _units_by_component(component, kind_of_unit, first_space):
        group = _make_group(facts, flags, owner, [units[u] for u in unit_list], kinds[unit_list[0]], granularity)
        if group is not None:
            if shared is not None and group.kind == "other" and shared[group.channels].any():
                group.reasons.append(SHARED_BY_HEADS)
            groups.append(group)
    _attach_blocking_reasons(facts, groups, granularity)
    groups.sort(key=lambda g: int(g.units[0][0]))  # units ascend, sorted by first channel
    return groups


SHARED_BY_HEADS = (
    "shared by every head (broadcast over the heads, e.g. the rotary key part of multi-head latent "
    "attention): removing whole heads leaves it whole"
)


def _broadcast_mask(facts: CouplingFacts) -> np.ndarray:
    """Channels in a ``broadcast`` tie: met by every head (ignored at head granularity, so alone there)."""
    mask = np.zeros(facts.n_channels, dtype=bool)
    for a, b in facts.ties["broadcast"]:
        mask[a] = mask[b] = True
    return mask


def _units_by_component(component: dict, kind_of_unit: np.ndarray, first_space: np.ndarray) -> list[list[int]]:
    """Unit indices (ascending) per component of the space graph, components in order of their first unit."""
    base = int(first_space.max()) + 1 if len(first_space) else 1
    codes, inverse = np.unique(kind_of_unit * base + first_space, return_inverse=True)
    comp_of_code = np.array([component[(int(c) // base, int(c) % base)] for c in codes], dtype=np.int64)
    comp_of_unit = comp_of_code[inverse.ravel()]
    order = np.argsort(comp_of_unit, kind="stable")
    pieces = np.split(order, np.flatnonzero(np.diff(comp_of_unit[order])) + 1) if len(order) else []
    return sorted((p.tolist() for p in pieces), key=lambda p: p[0])


def _unique_rows(*columns: np.ndarray) -> np.ndarray:
    """``np.unique(np.stack(columns, axis=1), axis=0)`` for non-negative int columns, via one int64 key per
    row (a 1-D sort instead of a row sort: seconds saved on 70B-sized graphs)."""
    cols = [np.asarray(c, dtype=np.int64) for c in columns]
    if not len(cols[0]):
        return np.zeros((0, len(cols)), dtype=np.int64)
    bases = [int(c.max()) + 1 for c in cols]
    if float(np.prod(bases, dtype=np.float64)) >= 2.0**62:
        return np.unique(np.stack(cols, axis=1), axis=0)
    key = np.zeros(len(cols[0]), dtype=np.int64)
    for c, base in zip(cols, bases, strict=True):
        key = key * base + c
    if len(key) > 1 and bool(np.all(key[1:] >= key[:-1])):  # already sorted (unit, space) rows: no sort
        key = key[np.concatenate(([True], key[1:] != key[:-1]))]
    else:
        key = unique_ids(key)
    out = np.empty((len(key), len(cols)), dtype=np.int64)
    for i in range(len(cols) - 1, -1, -1):
        key, out[:, i] = np.divmod(key, bases[i])
    return out


KIND_NAMES = ("hidden", "head", "qk", "vo", "latent", "ffn", "other")


def _unit_kinds(flags, chans: np.ndarray, starts: np.ndarray, granularity: str) -> list[str]:
    """Kind of every unit from the flags on its channels, first match wins: added to the residual stream
    -> hidden; scored and carried through attention at head granularity -> head; contracted against
    another activation -> qk; carried through attention -> vo; contracted by a weight or summed after an
    RMS normalisation over these channels -> latent (the low-rank q/kv latents of multi-head latent
    attention); contracted by a weight or summed -> ffn."""
    has = {name: np.logical_or.reduceat(mask[chans], starts) for name, mask in flags.items()}
    head = has["score"] & has["value"] if granularity == "head" else np.zeros_like(has["score"])
    sunk = has["param_sink"] | has["sum_sink"]
    code = np.select(
        [has["residual"], head, has["score"], has["value"], sunk & has["normalised"], sunk],
        [0, 1, 2, 3, 4, 5],
        default=6,
    )
    return [KIND_NAMES[c] for c in code.tolist()]


def _make_group(facts, flags, owner, units, kind, granularity) -> CoupledUnits | None:
    channels = np.concatenate(units)
    if not flags["produced"][channels].any():
        return None  # no weight produces these channels: input-side (hidden) positions only
    spaces = unique_ids(owner[channels]).tolist()
    blocks = {s: facts.block_size[s] for s in spaces if s in facts.block_size}
    group = CoupledUnits(kind, sorted(units, key=lambda u: int(u[0])), spaces, blocks)  # units ascend
    if kind == "hidden":
        group.reasons.append("hidden (residual) dimension: off by default (norms over it make it inexact)")
    if granularity == "head" and kind in ("qk", "vo"):
        group.reasons.append("not whole heads at head granularity (e.g. K/V shared by every query head)")
    return group


def _attach_blocking_reasons(facts: CouplingFacts, groups: list[CoupledUnits], granularity: str) -> None:
    """Give every group the reasons of the blockers (at this granularity) that touch its channels."""
    group_of = np.full(facts.n_channels, -1, dtype=np.int64)
    for gi, group in enumerate(groups):
        group_of[group.channels] = gi
    for blocker in facts.blockers:
        if blocker.scope not in ("all", granularity):
            continue
        text = f"{blocker.reason} (node {blocker.node})"
        for gi in unique_ids(group_of[blocker.channels]):
            if gi >= 0 and text not in groups[gi].reasons:
                groups[gi].reasons.append(text)


def orphan_blockers(facts: CouplingFacts, groups: list[CoupledUnits]) -> list[tuple[str, tuple[str, ...]]]:
    """Blockers on weights that belong to no group (e.g. expert weights gathered by routing indices):
    (reason, parameter names), so the report can say which weights stayed dense and why."""
    covered = {s for g in groups for s in g.spaces}
    owner = space_of_channel(facts)
    out: dict[str, set[str]] = {}
    for blocker in facts.blockers:
        names = {
            facts.spaces[s].param
            for s in unique_ids(owner[blocker.channels])
            if s not in covered and not facts.spaces[s].is_virtual
        }
        if names:
            out.setdefault(f"{blocker.reason} (node {blocker.node})", set()).update(names)
    return [(reason, tuple(sorted(names))) for reason, names in out.items()]
