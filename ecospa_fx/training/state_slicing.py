"""Slice optimizer state exactly along with the parameters it belongs to.

When parameter ``W`` is replaced by ``W' = W[idx_0, idx_1, ...]`` (``index_select`` along every sliced
dim), every elementwise state tensor ``S`` of the optimizer (same shape as ``W``: Adam's moments, SGD's
momentum buffer, Adagrad's sum, ...) becomes ``S' = S[idx_0, idx_1, ...]``: each kept weight keeps its own
history, so the next step on ``W'`` is the dense step restricted to the kept entries. Scalars (``step``)
are copied. An optimizer whose state is not elementwise (L-BFGS's flat history, factored second moments)
cannot be sliced that way and is refused before training starts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ecospa_fx.errors import InputError

# optimizer class -> its per-parameter elementwise state keys (scalars such as ``step`` are always copied)
SLICEABLE: dict[type, tuple[str, ...]] = {
    torch.optim.SGD: ("momentum_buffer",),
    torch.optim.Adam: ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    torch.optim.AdamW: ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    torch.optim.Adamax: ("exp_avg", "exp_inf"),
    torch.optim.NAdam: ("exp_avg", "exp_avg_sq"),
    torch.optim.RAdam: ("exp_avg", "exp_avg_sq"),
    torch.optim.RMSprop: ("square_avg", "momentum_buffer", "grad_avg"),
    torch.optim.Adagrad: ("sum",),
}


class UnsupportedOptimizer(InputError):
    """The optimizer keeps state that cannot be sliced with the parameters."""


@dataclass
class ParamSlice:
    """``new = old`` restricted to ``index[dim]`` (kept positions, increasing) along every listed dim."""

    name: str
    old: torch.nn.Parameter
    new: torch.nn.Parameter
    index: dict[int, torch.Tensor]


def unwrap(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside a wrapper (accelerate's ``AcceleratedOptimizer`` keeps it as ``.optimizer``)."""
    inner = optimizer
    while type(inner) not in SLICEABLE and hasattr(inner, "optimizer"):
        inner = inner.optimizer
    return inner


def check_optimizer(optimizer) -> torch.optim.Optimizer:
    """The unwrapped optimizer, or ``UnsupportedOptimizer`` naming what can be sliced."""
    inner = unwrap(optimizer)
    kind = type(inner)
    if kind not in SLICEABLE:
        names = ", ".join(sorted(c.__name__ for c in SLICEABLE))
        raise UnsupportedOptimizer(
            f"cannot slice the state of {kind.__module__}.{kind.__name__} when channels are removed "
            f"(only elementwise per-parameter state can follow a pruned parameter); use one of: {names}"
        )
    return inner


def restrict(tensor: torch.Tensor, index: dict[int, torch.Tensor]) -> torch.Tensor:
    """``tensor[idx_0, idx_1, ...]``: ``index_select`` along every dim in ``index``."""
    for dim, idx in sorted(index.items()):
        tensor = tensor.index_select(dim, idx.to(tensor.device))
    return tensor


def slice_optimizer(optimizer, slices: list[ParamSlice]) -> None:
    """In place: swap each ``old`` for ``new`` in the param groups and restrict its state (see module doc)."""
    inner = check_optimizer(optimizer)
    by_old = {id(s.old): s for s in slices}
    for group in inner.param_groups:
        group["params"] = [by_old[id(p)].new if id(p) in by_old else p for p in group["params"]]
    for s in slices:
        state = inner.state.pop(s.old, None)
        if state:
            inner.state[s.new] = {k: _restrict_entry(k, v, s) for k, v in state.items()}


def _restrict_entry(key: str, value, s: ParamSlice):
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    if value.shape != s.old.shape:
        raise UnsupportedOptimizer(
            f"optimizer state {key!r} of {s.name} has shape {tuple(value.shape)}, not the parameter's "
            f"{tuple(s.old.shape)}: it cannot be sliced elementwise"
        )
    return restrict(value, s.index).contiguous()


def slice_grads(slices: list[ParamSlice]) -> None:
    """Gradient accumulated so far (e.g. mid gradient-accumulation) follows its parameter."""
    for s in slices:
        if s.old.grad is not None:
            s.new.grad = restrict(s.old.grad, s.index).contiguous()
