"""One training run, single-process or as one rank of a gloo DDP group (spawned by test_distributed)."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from ecospa_fx.training import EcoSpaPruner, PruneSchedule, capture_trainable, causal_lm_loss, ddp_wrapper, logits_of
from ecospa_fx.training.fsdp import fsdp_wrapper, is_sharded
from tests.ecospa_fx.training.tiny import batches, tiny_llama

SCHEDULE = PruneSchedule(3, 9, 0.5, every=3)
STEPS, GLOBAL_BATCH = 12, 4


def run(rank: int, world: int, out: str, engine: str = "ddp") -> None:
    """Train on this rank's share of every global batch (``engine``: "ddp" or "fsdp"); save the final full
    parameters to ``out/{engine}{rank}.pt`` (the process group, if any, is initialised by the caller)."""
    torch.set_num_threads(1)
    per_rank = GLOBAL_BATCH // world
    data = [b[rank * per_rank : (rank + 1) * per_rank] for b in batches(STEPS, batch=GLOBAL_BATCH)]
    model, wrap = tiny_llama(seed=0), None
    if world > 1 and engine == "fsdp":  # FSDP2: shard the captured graph, then build the optimizer
        model, wrap = capture_trainable(model, (data[0],)), fsdp_wrapper()
        wrap(model)
    elif world > 1:
        wrap = ddp_wrapper()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    pruner = EcoSpaPruner(model, (data[0],), opt, SCHEDULE, round_to=2, wrap=wrap)
    for x in data:
        loss = causal_lm_loss(logits_of(pruner.model(x)), x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        pruner.step()
    assert engine != "fsdp" or world == 1 or is_sharded(pruner.model)
    state = {n: _full(p).detach().clone() for n, p in pruner.module.named_parameters()}
    torch.save(state, f"{out}/{engine}{rank}.pt")


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


if __name__ == "__main__":  # python -m tests.ecospa_fx.training.ddp_worker RANK WORLD RENDEZVOUS OUT ENGINES
    rank, world = int(sys.argv[1]), int(sys.argv[2])
    dist.init_process_group("gloo", init_method=sys.argv[3], rank=rank, world_size=world)
    for name in sys.argv[5].split(","):
        run(rank, world, sys.argv[4], name)
    dist.destroy_process_group()
