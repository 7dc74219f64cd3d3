"""Importance during training, from what the training loop already has: gradients or Adam's moments.

Which weight side is read (as in ``passes.importance.fisher``): the *sink* side where the group has one
(W_o / W_down input columns: zeroing exactly those columns removes the unit), otherwise (Q/K, both sides
activations) every member matrix, averaged.

- ``"taylor"`` (empirical Fisher of the unit mask): each observed step adds ``(sum_{w in u} g(w) w / n)^2``
  (``n`` = matrices averaged); the score is the mean over observations since the last prune.
- ``"adam"`` (diagonal Fisher from the optimizer): ``sum_{w in u} v(w) w^2`` with ``v`` = Adam's
  ``exp_avg_sq``, the running mean of ``g^2``; ``1/2 v w^2`` is the second-order loss increase of zeroing
  ``w`` (Optimal Brain Damage), summed over the unit. Free: no extra pass, no hook.
- ``"magnitude"``: coupled weight magnitude (``passes.score``), data-free.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from passes.coupling_state import CouplingFacts
from passes.importance.base import sum_per_unit
from passes.importance.fisher import weight_sides  # noqa: F401  (re-exported: the pruner's sides)
from passes.score import coupled_magnitude

Sides = list[tuple[list[int], int]]


def channel_sum(facts: CouplingFacts, params: dict[str, torch.Tensor], spaces: list[int], fn: Callable) -> np.ndarray:
    """Per global channel id: ``sum over the channel's slice of fn(param)`` (0 where fn gives None)."""
    out = np.zeros(facts.n_channels, dtype=np.float64)
    for sid in spaces:
        space = facts.spaces[sid]
        value = fn(params[space.param])
        if value is None:
            continue
        flat = value.detach().double().transpose(0, space.dim).reshape(space.size, -1)
        out[space.offset : space.offset + space.size] = flat.sum(1).cpu().numpy()
    return out


def _per_group(groups, sides: Sides, facts, params, fn, square: bool) -> list[np.ndarray]:
    out = []
    for group, (spaces, n_mats) in zip(groups, sides, strict=True):
        per_channel = channel_sum(facts, params, spaces, fn)
        (per_unit,) = sum_per_unit([group], per_channel)
        out.append((per_unit / n_mats) ** 2 if square else per_unit / n_mats)
    return out


def taylor_observation(groups, sides: Sides, facts, params) -> list[np.ndarray]:
    """One step's ``(sum g w / n)^2`` per unit (zeros for parameters without a gradient)."""
    return _per_group(groups, sides, facts, params, lambda p: None if p.grad is None else p.grad * p, True)


def adam_fisher(groups, sides: Sides, facts, params, state: dict) -> list[np.ndarray]:
    """``sum v w^2`` per unit from the optimizer's ``exp_avg_sq`` (zeros before the first step)."""

    def vw2(p):
        v = state.get(p, {}).get("exp_avg_sq")
        return None if v is None else v * p * p

    return _per_group(groups, sides, facts, params, vw2, False)


def magnitude(groups, facts, params) -> list[np.ndarray]:
    return [coupled_magnitude(g, facts, params) for g in groups]
