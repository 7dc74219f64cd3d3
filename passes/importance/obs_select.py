"""Selection by reconstruction error: which units of a group to remove, chosen at the group's weight sink
with the sink's Gram matrix, so that what is removed is what the refit can best do without.

At a linear sink ``y = x W^T`` (``W``: ``[out, in]``) with the damped Gram matrix of its inputs
``H = sum_n x_n^T x_n + L`` and ``P = H^{-1}``, removing the input columns ``S`` and refitting the others
by least squares (the optimal brain surgeon update, as the ``"self"`` refit does) raises the squared output
error by

    dE(S) = tr( W_S (P_SS)^{-1} W_S^T )

and leaves ``W <- W - W_S (P_SS)^{-1} P_S.`` and ``P <- P - P_.S (P_SS)^{-1} P_S.`` (the inverse of ``H``
with ``S`` conditioned out). A unit is one planned unit of a group (one FFN channel: one column of
W_down; one value channel of a KV head: a column of W_o per query head reading it), so ``dE`` of a unit
is a small ``|S| x |S|`` solve. Batched greedy (as in SlimGPT): in ``STEPS`` rounds, remove the units of
lowest ``dE`` that still fit the plan's counts, then update ``W`` and ``P``. Energy scores
(``E[x_c^2] ||W[:, c]||^2``) see each channel alone; ``dE`` charges a channel only for what the kept
channels cannot rebuild of it (``1 / P_cc`` is its variance *given* the others), so correlated channels
go first.

The plan's counts are kept: per head block, the number of channels the plan removed there (every head of
a space keeps one count); without head blocks, the number of units. So the selection changes *which*
units go, never how many, and the budget holds. Where no exact fill of the counts exists (units wider
than what is left in a block), the plan's own choice stays.
"""

from __future__ import annotations

import numpy as np
import torch

from passes.coupling_state import CouplingFacts
from passes.groups import CoupledUnits
from passes.plan import _unit_widths

STEPS = 16  # greedy rounds per sink (SlimGPT's batched greedy)
DAMP = 1e-2  # ridge, a fraction of each channel's Gram diagonal


def unit_columns(group: CoupledUnits, ids: np.ndarray) -> list[np.ndarray]:
    """For each unit of ``group``: the sink's input columns (positions in ``ids``) that hold its channels."""
    position = {int(c): k for k, c in enumerate(ids)}
    return [np.array([position[int(c)] for c in unit if int(c) in position], dtype=np.int64) for unit in group.units]


def unit_budgets(group: CoupledUnits, facts: CouplingFacts, keep: np.ndarray) -> tuple[list[dict], dict]:
    """``(widths, budget)``: what each unit holds per head block (a single pseudo-block ``-1`` per unit
    when the group has no head blocks), and what the plan removed per block under ``keep``."""
    widths = _unit_widths(group, facts) if group.blocks else [{-1: 1} for _ in group.units]
    budget: dict = {}
    for unit, w in zip(group.units, widths, strict=True):
        if not keep[unit].any():
            for b, c in w.items():
                budget[b] = budget.get(b, 0) + c
    return widths, budget


class _Surgeon:
    """``W`` and ``P = H^{-1}`` of one sink, with the OBS removal of column sets."""

    def __init__(self, gram: torch.Tensor, weight: torch.Tensor, damp: float):
        diag = torch.diagonal(gram)
        floor = 1e-6 * float(diag.mean()) if len(diag) else 0.0
        h = gram + torch.diag(damp * diag + floor)
        factor, info = torch.linalg.cholesky_ex(h)
        self.ok = int(info) == 0  # False: a sink that saw no signal (an all-zero Gram): nothing to choose by
        self.p = torch.cholesky_inverse(factor) if self.ok else h
        self.w = weight.clone()

    def cost(self, columns: list[np.ndarray]) -> np.ndarray:
        """``dE`` of removing each column set alone (the module docstring's formula)."""
        out = np.empty(len(columns))
        for width in {len(c) for c in columns}:
            idx = [k for k, c in enumerate(columns) if len(c) == width]
            cols = torch.as_tensor(np.stack([columns[k] for k in idx]), dtype=torch.long)  # [n, m]
            p_ss = self.p[cols[:, :, None], cols[:, None, :]]  # [n, m, m]
            w_s = self.w[:, cols].permute(1, 0, 2)  # [n, out, m]
            wtw = w_s.transpose(1, 2) @ w_s
            out[idx] = (torch.linalg.solve(p_ss, wtw)).diagonal(dim1=1, dim2=2).sum(-1).numpy()
        return out

    def remove(self, cols: np.ndarray) -> None:
        """Condition ``cols`` out of ``P`` and fold their contribution into the other columns of ``W``."""
        s = torch.as_tensor(cols, dtype=torch.long)
        solve = torch.linalg.solve(self.p[s][:, s], self.p[s])  # (P_SS)^{-1} P_S.
        self.w -= self.w[:, s] @ solve
        self.p -= self.p[:, s] @ solve
        self.w[:, s] = 0.0


def select(
    gram: torch.Tensor,
    weight: torch.Tensor,
    groups: list[CoupledUnits],
    facts: CouplingFacts,
    keep: np.ndarray,
    ids: np.ndarray,
    damp: float = DAMP,
) -> np.ndarray:
    """A new keep mask: the units of ``groups`` (each ending at this sink only) re-chosen by batched greedy
    OBS with the same per-block counts as ``keep``; ``gram`` is ``[in, in]`` (float64) over the sink's
    inputs ``ids`` (global channel ids per column), ``weight`` is ``[out, in]``. Columns removed by other
    groups are conditioned out first."""
    out = keep.copy()
    units, widths, budget = [], [], {}
    for g, group in enumerate(groups):
        w, b = unit_budgets(group, facts, keep)
        cols = unit_columns(group, ids)
        if any(w[k] and not len(cols[k]) for k in range(len(group.units))):
            continue  # a unit this sink does not see: its cost is not measured here
        for k, unit in enumerate(group.units):
            if w[k]:
                units.append((unit, cols[k]))
                widths.append({(g, code): c for code, c in w[k].items()})
                out[unit] = True
        budget.update({(g, code): c for code, c in b.items()})
    if not units or not any(budget.values()):
        return keep.copy()
    surgeon = _Surgeon(gram, weight.double(), damp)
    if not surgeon.ok:
        return keep.copy()
    fixed = np.flatnonzero(~out[ids])
    if len(fixed):
        surgeon.remove(fixed)
    chosen = _greedy(surgeon, units, widths, budget)
    if chosen is None:
        return keep.copy()
    for k in chosen:
        out[units[k][0]] = False
    return out


def _greedy(surgeon: _Surgeon, units, widths: list[dict], budget: dict) -> list[int] | None:
    """Indices of the units removed, or None when the counts cannot be filled exactly."""
    left = dict(budget)
    alive = list(range(len(units)))
    chosen: list[int] = []
    per_round = max(1, -(-sum(left.values()) // STEPS))
    while any(left.values()):
        fits = [k for k in alive if all(c <= left.get(b, 0) for b, c in widths[k].items())]
        if not fits:
            return None
        costs = surgeon.cost([units[k][1] for k in fits])
        taken = []
        for j in np.argsort(costs, kind="stable"):
            k = fits[j]
            if all(c <= left.get(b, 0) for b, c in widths[k].items()):
                taken.append(k)
                for b, c in widths[k].items():
                    left[b] -= c
            if len(taken) == per_round or not any(left.values()):
                break
        surgeon.remove(np.concatenate([units[k][1] for k in taken]))
        chosen += taken
        gone = set(taken)
        alive = [k for k in alive if k not in gone]
    return chosen
