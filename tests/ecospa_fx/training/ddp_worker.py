"""One training run, single-process or as one rank of a gloo DDP group (spawned by test_distributed)."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from ecospa_fx.training import EcoSpaPruner, PruneSchedule, causal_lm_loss, ddp_wrapper, logits_of
from tests.ecospa_fx.training.tiny import batches, tiny_llama

SCHEDULE = PruneSchedule(3, 9, 0.5, every=3)
STEPS, GLOBAL_BATCH = 12, 4


def run(rank: int, world: int, rendezvous: str, out: str) -> None:
    """Train on this rank's share of every global batch; save the final parameters to ``out/rank{r}.pt``."""
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    per_rank = GLOBAL_BATCH // world
    data = [b[rank * per_rank : (rank + 1) * per_rank] for b in batches(STEPS, batch=GLOBAL_BATCH)]
    model = tiny_llama(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    wrap = ddp_wrapper() if world > 1 else None
    pruner = EcoSpaPruner(model, (data[0],), opt, SCHEDULE, round_to=2, wrap=wrap)
    for x in data:
        loss = causal_lm_loss(logits_of(pruner.model(x)), x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        pruner.step()
    state = {n: p.detach().clone() for n, p in pruner.module.named_parameters()}
    torch.save(state, f"{out}/rank{rank}.pt")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":  # python -m tests.ecospa_fx.training.ddp_worker RANK WORLD RENDEZVOUS OUT
    run(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
