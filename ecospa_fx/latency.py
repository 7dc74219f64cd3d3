"""Latency-aware granularity: compress at every candidate granularity, cost each result, keep the cheapest.

Removing whole heads and removing head_dim channels cost the same FLOPs, but kernels do not run at the
FLOP rate: on CPU, channel granularity leaves softmax over heads x S^2 unshrunk (head granularity was
2.14x vs 1.69x for channel at 8 x 512 in onnxruntime); on GPU, halving head_dim 128 -> 64 slowed a 3B
shape's attention at 1 x 128. So the choice is made per target by a *cost model*: a function from a
``Candidate`` (the compressed module, its parameter shapes and report) to a cost (lower is better).

- ``measured_cost(inputs)`` (the default): median wall time of the candidate on ``inputs`` in eager
  PyTorch; the candidates are timed round robin (one call each per round) so load drift hits them alike.
- any callable ``Candidate -> float``: e.g. a table of measured kernel times per width for the target
  GPU, or ``flop_cost``. Tests inject one so that they do not depend on timing.

``compress(..., granularity="auto")`` calls ``choose_granularity`` with the measured cost on the example
inputs and returns the winner (its report says which granularity won and the costs).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ecospa_fx.generation.target import prefill_inputs

CANDIDATES = ("channel", "head")


@dataclass
class Candidate:
    """One compressed candidate: its granularity, module, parameter shapes (name -> shape), size, and the
    (heads, head_dim) of the query of every ``scaled_dot_product_attention`` call on the example inputs
    (what an attention-kernel cost table is indexed by)."""

    granularity: str
    model: fx.GraphModule
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    params: int = 0
    attention: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class Choice:
    """The cheapest candidate, and every candidate's cost (same units as the cost model)."""

    granularity: str
    model: fx.GraphModule
    costs: dict[str, float]
    candidates: dict[str, Candidate]


CostModel = Callable[[Candidate], float]


def candidate(granularity: str, model: fx.GraphModule, inputs: tuple) -> Candidate:
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    params = sum(p.numel() for p in model.parameters())
    return Candidate(granularity, model, shapes, params, attention_shapes(model, prefill_inputs(model, inputs)))


class _SdpaShapes(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.found: list[tuple[int, int]] = []

    def call_function(self, target, args, kwargs):
        if target is torch.ops.aten.scaled_dot_product_attention.default:
            q = args[0]
            self.found.append((int(q.shape[-3]), int(q.shape[-1])))
        return super().call_function(target, args, kwargs)


def attention_shapes(model: fx.GraphModule, inputs: tuple) -> list[tuple[int, int]]:
    """(query heads, head_dim) of every top-level SDPA call of ``model`` on ``inputs`` (one forward)."""
    collector = _SdpaShapes(model)
    with torch.inference_mode():
        collector.run(*inputs)
    return collector.found


def flop_cost(inputs: tuple) -> CostModel:
    """FLOPs of one forward on ``inputs`` (``torch.utils.flop_counter``): a hardware-blind baseline."""
    from torch.utils.flop_counter import FlopCounterMode

    def cost(c: Candidate) -> float:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            c.model(*prefill_inputs(c.model, inputs))
        return float(counter.get_total_flops())

    return cost


def measured_costs(cands: Sequence[Candidate], inputs: tuple, repeats: int = 7, warmup: int = 1) -> list[float]:
    """Median seconds per call of every candidate on ``inputs``, timed round robin after warm-up."""
    times: list[list[float]] = [[] for _ in cands]
    feeds = [prefill_inputs(c.model, inputs) for c in cands]  # a KV model times its prefill
    with torch.inference_mode():
        for c, feed in zip(cands, feeds, strict=True):
            for _ in range(warmup):
                c.model(*feed)
        for _ in range(repeats):
            for k, c in enumerate(cands):
                t = time.perf_counter()
                c.model(*feeds[k])
                times[k].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def choose_granularity(
    model: torch.nn.Module,
    example_inputs: Any,
    sparsity: float = 0.5,
    *,
    candidates: Sequence[str] = CANDIDATES,
    cost_model: CostModel | None = None,
    timing_inputs: tuple | None = None,
    repeats: int = 7,
    **compress_options: Any,
) -> Choice:
    """Compress ``model`` at each granularity in ``candidates`` and keep the one with the lowest cost.

    cost_model: ``Candidate -> float``; default: eager latency on ``timing_inputs`` (default: the example
        inputs), median of ``repeats`` round-robin calls. Other options go to ``compress``.
    """
    example = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    cands = [
        candidate(g, _compress_at(g, model, example_inputs, sparsity, compress_options), example) for g in candidates
    ]
    return choose_among(cands, cost_model, timing_inputs if timing_inputs is not None else example, repeats)


def choose_among(
    cands: Sequence[Candidate], cost_model: CostModel | None, timing_inputs: tuple | None = None, repeats: int = 7
) -> Choice:
    """The cheapest of ``cands`` under ``cost_model`` (or measured on ``timing_inputs``); ties: first."""
    if cost_model is None:
        costs = measured_costs(cands, timing_inputs, repeats)
    else:
        costs = [float(cost_model(c)) for c in cands]
    best = min(range(len(cands)), key=lambda k: (costs[k], k))
    return Choice(
        cands[best].granularity,
        cands[best].model,
        {c.granularity: x for c, x in zip(cands, costs, strict=True)},
        {c.granularity: c for c in cands},
    )


def _compress_at(granularity: str, model, example_inputs, sparsity: float, options: dict) -> fx.GraphModule:
    from ecospa_fx.api import compress

    config = options.get("config")
    if config is not None:
        options = {**options, "config": dataclasses.replace(config, granularity=granularity)}
        return compress(model, example_inputs, **options)
    return compress(model, example_inputs, sparsity, granularity=granularity, **options)
