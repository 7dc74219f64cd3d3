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
from passes.groups import CoupledUnits, space_of_channel


def channel_norms(facts: CouplingFacts, params: dict[str, torch.Tensor], spaces: list[int]) -> np.ndarray:
    """Squared L2 norm of every channel slice (global ids); NaN for vectors and virtual spaces."""
    out = np.full(facts.n_channels, np.nan)
    for sid in spaces:
        space = facts.spaces[sid]
        if space.is_virtual:
            continue
        weight = params[space.param]
        if weight.ndim < 2 or weight.is_meta:
            continue
        flat = weight.detach().float().transpose(0, space.dim).reshape(space.size, -1)
        out[space.offset : space.offset + space.size] = (flat * flat).sum(1).cpu().numpy()
    return out


def coupled_magnitude(
    group: CoupledUnits, facts: CouplingFacts, params: dict[str, torch.Tensor]
) -> np.ndarray:
    """One score per unit of ``group`` (see module docstring)."""
    sq = channel_norms(facts, params, group.spaces)
    owner = space_of_channel(facts)
    scores = np.ones(len(group.units))
    for i, unit in enumerate(group.units):
        vals = sq[unit]
        valid = ~np.isnan(vals)
        if not valid.any():
            continue
        per_space = {}
        for ch, v in zip(owner[unit][valid], vals[valid], strict=True):
            per_space[ch] = per_space.get(ch, 0.0) + v
        scores[i] = float(np.prod(np.sqrt(list(per_space.values()))))
    return scores
