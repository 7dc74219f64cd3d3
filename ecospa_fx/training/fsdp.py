"""FSDP2 (``fully_shard``): gather, prune, re-shard -- parameters and optimizer shards stay consistent.

A prune needs whole channels, and FSDP2 shards every parameter and its optimizer state along dim 0. At a
prune step (only then) each rank:

1. gathers the full parameters and full optimizer state (``DTensor.full_tensor``) and rebuilds the graph
   as a plain ``GraphModule`` over them (``unshard``); the optimizer now holds the full tensors;
2. prunes as usual: discovery, scores (mean over ranks), rank 0's keep mask, exact state slicing;
3. shards the pruned module again (``fully_shard`` through ``wrap``) and redistributes every state tensor
   with its new parameter's mesh and placements (``reshard``): ``S'_shard = shard(S_full[kept])``.

Peak memory at a prune is one full copy of the model and its state on every rank (transient).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.fx as fx

from ecospa_fx.training.graph import allow_mode_switch


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def fsdp_wrapper(**fully_shard_kwargs) -> Callable[[torch.nn.Module], torch.nn.Module]:
    """``wrap=`` for ``EcoSpaPruner`` under FSDP2: ``fully_shard(module)`` (skipped if already sharded)."""
    from torch.distributed.fsdp import fully_shard

    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        return module if is_sharded(module) else fully_shard(module, **fully_shard_kwargs)

    return wrap


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def unshard(module: fx.GraphModule, optimizer: torch.optim.Optimizer) -> fx.GraphModule:
    """A plain ``GraphModule`` (same graph, full tensors); the optimizer is moved onto its parameters."""
    params = dict(module.named_parameters(remove_duplicate=False))
    root: dict[str, object] = {}
    for node in module.graph.find_nodes(op="get_attr"):
        value = params.get(node.target)
        if value is not None:
            root[node.target] = torch.nn.Parameter(_full(value).detach().clone(), requires_grad=value.requires_grad)
        else:
            root[node.target] = _full(_attr(module, node.target))
    for node in module.graph.find_nodes(op="call_module"):
        root[node.target] = module.get_submodule(node.target)
    plain = fx.GraphModule(root, copy.deepcopy(module.graph))
    allow_mode_switch(plain)
    _move_optimizer(optimizer, params, dict(plain.named_parameters(remove_duplicate=False)), lambda _: _full)
    for attr in ("ecospa_report", "ecospa_source"):
        if hasattr(module, attr):
            setattr(plain, attr, getattr(module, attr))
    return plain


def reshard(plain: fx.GraphModule, optimizer: torch.optim.Optimizer, wrap: Callable) -> torch.nn.Module:
    """``wrap(plain)`` (``fully_shard``) and the optimizer moved onto the sharded parameters, its state
    distributed like each parameter."""
    from torch.distributed.tensor import distribute_tensor

    before = dict(plain.named_parameters(remove_duplicate=False))
    sharded = wrap(plain)
    after = dict(sharded.named_parameters(remove_duplicate=False))

    def shard_like(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        p = after[name]
        return lambda t: distribute_tensor(t, p.device_mesh, p.placements)

    _move_optimizer(optimizer, before, after, shard_like)
    return sharded


def _move_optimizer(optimizer, old: dict, new: dict, convert) -> None:
    """Swap ``old[name]`` for ``new[name]`` in the param groups; state tensors go through ``convert(name)``."""
    by_id = {id(old[name]): name for name in old}
    for group in optimizer.param_groups:
        group["params"] = [new[by_id[id(p)]] if id(p) in by_id else p for p in group["params"]]
    for name, p in old.items():
        state = optimizer.state.pop(p, None)
        if state is None or new[name] is p:
            continue
        fn = convert(name)
        optimizer.state[new[name]] = {
            k: fn(v) if isinstance(v, torch.Tensor) and v.dim() > 0 else _full(v) for k, v in state.items()
        }


def _attr(module: torch.nn.Module, target: str):
    owner, _, leaf = target.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, leaf)
