"""Data-free importance: coupled weight magnitude.

A unit's score is the product, over the weight matrices of its group, of the L2 norm of the unit's slice
of that matrix: for a Q/K unit ``||W_q[c]|| * ||W_k[c]||`` (the size of the term ``q_c k_c`` it feeds), for
V/O ``||W_v[c]|| * ||W_o[:, c]||``, for an FFN unit ``||W_up[i]|| * ||W_gate[i]|| * ||W_down[:, i]||``.
Vectors (biases, norm weights) and virtual gather sites do not enter the product.
"""

from __future__ import annotations

import numpy as np
import torch

from passes.coupling_state import CouplingFacts
from passes.groups import CoupledUnits


def space_norms(space, params: dict[str, torch.Tensor]) -> np.ndarray | None:
    """Squared L2 norm of every channel slice of one space (float32 sums); None for vectors, virtual spaces
    and meta-device weights."""
    if space.is_virtual:
        return None
    weight = params[space.param]
    if weight.ndim < 2 or weight.is_meta:
        return None
    flat = weight.detach().float().transpose(0, space.dim).reshape(space.size, -1)
    return (flat * flat).sum(1).cpu().numpy()


def channel_norms(facts: CouplingFacts, params: dict[str, torch.Tensor], spaces: list[int]) -> np.ndarray:
    """Squared L2 norm of every channel slice (global ids); NaN for vectors and virtual spaces."""
    out = np.full(facts.n_channels, np.nan)
    for sid in spaces:
        space = facts.spaces[sid]
        norms = space_norms(space, params)
        if norms is not None:
            out[space.offset : space.offset + space.size] = norms
    return out


def coupled_magnitude(group: CoupledUnits, facts: CouplingFacts, params: dict[str, torch.Tensor]) -> np.ndarray:
    """One score per unit of ``group`` (see module docstring); units with no weight slice score 1.

    Vectorised over the group's own channels (no array over all channels of the model), with the same
    summation and product order as a per-unit loop: channels ascending, spaces ascending."""
    lengths = np.array([len(u) for u in group.units], dtype=np.int64)
    chans = np.concatenate(group.units)
    unit_of = np.repeat(np.arange(len(group.units)), lengths)
    scores = np.ones(len(group.units))
    for sid in group.spaces:
        space = facts.spaces[sid]
        norms = space_norms(space, params)
        if norms is None:
            continue
        mine = (chans >= space.offset) & (chans < space.offset + space.size)
        if not mine.any():
            continue
        sums = np.bincount(
            unit_of[mine], weights=norms[chans[mine] - space.offset].astype(np.float64), minlength=len(group.units)
        )
        present = np.bincount(unit_of[mine], minlength=len(group.units)) > 0
        scores = np.where(present, scores * np.sqrt(sums), scores)
    return scores
