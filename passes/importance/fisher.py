"""Empirical Fisher of each unit's mask, from gradients of a loss on calibration batches.

Removing unit ``u`` is zeroing its channels; with a mask ``m_u`` scaling the unit's slice of one weight
side, ``dL/dm_u = sum over the slice of grad * weight``. The empirical Fisher of the mask is

    F_u = sum over calibration batches b of ( sum_{w in unit u} g_b(w) * w )^2

(the first-order Taylor term squared, summed over batches: the EcoSpa / Kwon et al. mask Fisher). Which
weight side: the *sink* side where the group has one (W_o / W_down input columns: exactly the columns the
mask oracle zeros, and scaling them scales the unit's contribution linearly); otherwise (Q/K, where both
sides are activations) the average over the group's matrices (Q rows and K rows each give the same
derivative of the bilinear term ``q_c k_c``). Biases and norm vectors in that side count too.

Each sequence is one sample of the gradient: a batch of ``B`` sequences runs forward once and backward
``B`` times, once per sequence's own loss (``loss_fn`` on that sequence's slice of the outputs and of the
batch, along the leading axis), so the score does not depend on how the calibration data is batched. Where
the outputs or the batch do not share that leading size, or the loss cannot be taken per slice, the batch
is one sample. Memory is the model, its gradients for the scored weights only, and one batch's autograd
graph.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.utils._pytree as pytree

from passes.coupling_state import CouplingFacts
from passes.groups import CoupledUnits
from passes.importance.base import Criterion, ScoreInputs, sink_weight_spaces, sum_per_unit


def weight_sides(
    groups: list[CoupledUnits], facts: CouplingFacts, params: dict[str, torch.Tensor]
) -> list[tuple[list[int], int]]:
    """Per group: the spaces whose ``grad * weight`` is read (the sink side where the group has one,
    else every member matrix), and the number of matrices their sum is averaged over."""
    sinks = sink_weight_spaces(facts)
    out = []
    for group in groups:
        real = [s for s in group.spaces if not facts.spaces[s].is_virtual]
        chosen = [s for s in real if s in sinks]
        if chosen:
            out.append((chosen, 1))
        else:
            mats = [s for s in real if params[facts.spaces[s].param].ndim >= 2]
            out.append((real, max(1, len(mats))))
    return out


def channel_gw(inputs: ScoreInputs, spaces: set[int]) -> np.ndarray:
    """``sum over the channel slice of grad * weight`` per global channel id (0 elsewhere)."""
    facts, params = inputs.facts, inputs.params
    out = np.zeros(facts.n_channels, dtype=np.float64)
    for sid in spaces:
        space = facts.spaces[sid]
        p = params[space.param]
        if p.grad is None:
            continue
        gw = (p.grad.detach().double() * p.detach().double()).transpose(0, space.dim).reshape(space.size, -1)
        out[space.offset : space.offset + space.size] = gw.sum(1).cpu().numpy()
    return out


def sample_losses(loss_fn, outputs, batch: tuple) -> list[torch.Tensor]:
    """One loss per sequence of ``batch`` (module docstring), or ``[loss of the whole batch]``."""
    tensors = [t for t in pytree.tree_leaves(batch) if isinstance(t, torch.Tensor) and t.dim() > 0]
    sizes = {t.shape[0] for t in tensors}
    out_sizes = {t.shape[0] for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor) and t.dim() > 0}
    if len(sizes) != 1 or sizes != out_sizes or next(iter(sizes)) < 2:
        return [loss_fn(outputs, batch)]
    n = next(iter(sizes))

    def row(tree, i: int):
        return pytree.tree_map(lambda t: t[i : i + 1] if isinstance(t, torch.Tensor) and t.dim() > 0 else t, tree)

    try:
        losses = [loss_fn(row(outputs, i), row(batch, i)) for i in range(n)]
    except Exception:  # a loss that needs the whole batch (in-batch negatives, ...): the batch is one sample
        return [loss_fn(outputs, batch)]
    return losses if all(isinstance(x, torch.Tensor) and x.dim() == 0 for x in losses) else [loss_fn(outputs, batch)]


def score(groups: list[CoupledUnits], inputs: ScoreInputs) -> list[np.ndarray]:
    facts, params, gm = inputs.facts, inputs.params, inputs.gm
    sides = weight_sides(groups, inputs.facts, inputs.params)
    used = {s for spaces, _ in sides for s in spaces}
    names = {facts.spaces[s].param for s in used}
    masks = []
    for spaces, _ in sides:
        mask = np.zeros(facts.n_channels, dtype=bool)
        for s in spaces:
            sp = facts.spaces[s]
            mask[sp.offset : sp.offset + sp.size] = True
        masks.append(mask)
    fisher = [np.zeros(len(g.units)) for g in groups]
    flags = {name: p.requires_grad for name, p in gm.named_parameters()}
    grads = {name: p.grad for name, p in gm.named_parameters()}  # the user's: gm shares their Parameters
    try:
        for name, p in gm.named_parameters():
            p.requires_grad_(name in names)  # gradients only for the weights that are read
        for batch in inputs.calibration or []:
            with torch.enable_grad():
                losses = sample_losses(inputs.loss_fn, gm(*batch), batch)
                for i, loss in enumerate(losses):
                    gm.zero_grad(set_to_none=True)
                    loss.backward(retain_graph=i + 1 < len(losses))
                    gw = channel_gw(inputs, used)
                    for k, (group, (_, n_mats)) in enumerate(zip(groups, sides, strict=True)):
                        (per_unit,) = sum_per_unit([group], np.where(masks[k], gw, 0.0))
                        fisher[k] += (per_unit / n_mats) ** 2
    finally:
        for name, p in gm.named_parameters():
            p.requires_grad_(flags[name])
            p.grad = grads[name]
    del params
    return fisher


CRITERION = Criterion(
    "fisher",
    score,
    needs_calibration=True,
    needs_loss=True,
    across_kinds=True,  # every kind's score is the same loss-change estimate (Q/K's derivative is q_c k_c's)
    doc="empirical Fisher of the unit mask: sum over batches of (sum of grad*weight over the unit)^2",
)
