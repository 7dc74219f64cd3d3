"""torch.distributed: every rank makes the same pruning decision and slices the same way.

Under DDP every rank holds the full model, the same (all-reduced) gradients and the same optimizer state,
so the scores agree up to floating-point order. To make the decision *identical* anyway:

1. scores are all-reduced (mean over ranks) -- with per-rank gradient observations (``"taylor"``) this is
   also the mean over all data seen;
2. the keep mask rank 0 computes is broadcast, so a float tie broken differently cannot split the ranks.

Every rank then slices its own parameters and optimizer state with the same indices. DDP's reducer is
bound to the old parameter objects, so after a prune the module is wrapped again (``ddp_wrapper``): use
``pruner.model`` (the current wrapper) in the training loop.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def mean_across_ranks(scores: list[np.ndarray], group=None) -> list[np.ndarray]:
    """All-reduce the concatenated per-unit scores (float64), divided by the world size."""
    if not is_distributed() or not scores:
        return scores
    flat = torch.from_numpy(np.concatenate([np.asarray(s, dtype=np.float64) for s in scores]))
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat /= dist.get_world_size(group)
    return np.split(flat.numpy(), np.cumsum([len(s) for s in scores])[:-1])


def broadcast_keep(keep: np.ndarray, group=None) -> np.ndarray:
    """Rank 0's keep mask on every rank."""
    if not is_distributed():
        return keep
    mask = torch.from_numpy(keep.astype(np.uint8))
    dist.broadcast(mask, src=0, group=group)
    return mask.numpy().astype(bool)


def ddp_wrapper(**ddp_kwargs) -> Callable[[torch.nn.Module], torch.nn.Module]:
    """``wrap=`` for ``EcoSpaPruner``: ``DistributedDataParallel(module, **ddp_kwargs)``, rebuilt after every
    prune (its buckets and hooks are bound to the parameter objects a prune replaces)."""

    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        return torch.nn.parallel.DistributedDataParallel(module, **ddp_kwargs)

    return wrap
