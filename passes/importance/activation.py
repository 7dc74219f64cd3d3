"""Activation-aware coupled importance: the expected squared contribution of each unit to the
contractions its channels end in, measured on calibration batches in one pass.

Where it is measured is read off the labels, not module names: every contraction the analysis recorded
(``CouplingFacts.contractions``) in which an activation's labelled channel axis is summed away is a *sink*
(the sites flagged 'score' and 'param_sink'). At a sink with operands ``x`` (the activation) and ``y``
(a weight or another activation) meeting on channel letters ``K``:

    energy[k] = prod over operands of  reduce(operand^2, every letter not in K)      for k in K

where activations are averaged over their other letters (batch, tokens) and weights are summed over theirs
(the output features). So

- weight sink ``x @ W^T`` (W_o, W_down): ``E[x_c^2] * ||W[:, c]||^2`` -- V/O and FFN units;
- q.k sink (SDPA, matmul): ``E_l[q_c^2] * E_s[k_c^2]`` per (head, channel), i.e. ``E[(q_c k_c)^2]`` with the
  query and key positions taken as independent -- Q/K units; GQA heads read their KV head.

``energy`` is scattered into the global channel ids of ``x`` (one side only, so nothing counts twice) and a
unit's score is the sum over its channels, over calibration batches. The graph runs under a
``torch.fx.Interpreter`` that frees every value after its last use and stops after the last sink (the final
norm and LM head, and their [B, S, vocab] logits, are never computed), and only per-channel sums are kept:
memory is the model plus the live activations of the current layer, never a stored activation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx

from passes.coupling_state import Contraction, CouplingFacts
from passes.groups import CoupledUnits
from passes.importance.base import Criterion, ScoreInputs, operand_ids, sinks, sum_per_unit, wanted_mask
from passes.score import coupled_magnitude


@dataclass
class _Factor:
    path: tuple | None
    letters: list[str]
    is_weight: bool


@dataclass
class _Sink:
    """One scatter site: the operands' reduction recipes and the global ids of the kept letters."""

    factors: list[_Factor]
    kept: list[str]
    sizes: dict[str, int]
    ids: np.ndarray  # global ids, shape [sizes[k] for k in kept]


def plan_sinks(facts: CouplingFacts, wanted: np.ndarray) -> dict[str, list[_Sink]]:
    """Node name -> sinks to accumulate there (only those that touch a wanted channel)."""
    out: dict[str, list[_Sink]] = {}
    for c in facts.contractions:
        found = sinks(c)
        if not found:
            continue
        i, space, kept = found[0]  # the first sunk activation receives the energy
        ids = operand_ids(facts, c.operands[i], space, kept, c.sizes)
        if not wanted[ids].any():
            continue
        factors = _factors(c, kept)
        if factors is None:
            continue
        out.setdefault(c.node, []).append(_Sink(factors, kept, c.sizes, ids))
    return out


def _factors(c: Contraction, kept: list[str]) -> list[_Factor] | None:
    factors = []
    for op in c.operands:
        if op.path is None:
            if any(ch in kept for ch in op.letters):
                return None  # an intermediate we cannot read carries the channel axis
            continue  # a constant factor over this sink's channels: irrelevant to their ranking
        factors.append(_Factor(op.path, list(op.letters), op.is_weight))
    return factors


def _fetch(args, kwargs, path: tuple):
    if path[0] == "kw":
        return kwargs[path[1]]
    value = args[path[0]]
    for p in path[1:]:
        value = value[p]
    return value


def _reduced(t: torch.Tensor, f: _Factor, kept: list[str], sizes: dict[str, int]) -> torch.Tensor:
    """``t^2`` reduced over every letter not kept (mean for activations, sum for weights), laid out on
    ``kept`` and broadcast / GQA-repeated to the meeting sizes."""
    t = t.detach().to(torch.float64)
    sq = t * t
    drop = [a for a, ch in enumerate(f.letters) if ch not in kept]
    if drop:
        sq = sq.sum(drop) if f.is_weight else sq.mean(drop)
    mine = [ch for ch in f.letters if ch in kept]
    sq = sq.permute([mine.index(ch) for ch in kept if ch in mine]) if mine else sq
    shape = []
    for ch in kept:
        if ch not in mine:
            sq = sq.unsqueeze(len(shape))
            shape.append(sizes[ch])
            continue
        axis = len(shape)
        n, m = sizes[ch], sq.shape[axis]
        if m == 1:
            shape.append(n)
        elif m != n:
            sq = sq.repeat_interleave(n // m, dim=axis)  # GQA: head h reads KV head h // (n / m)
            shape.append(n)
        else:
            shape.append(n)
    return sq.expand(shape)


class StopAfterLast(fx.Interpreter):
    """An interpreter that stops right after the last node it needs (``StopAfterLast.run_until``): what
    follows the last sink (final norm, LM head, the [B, S, vocab] logits) is never computed."""

    last: str | None = None
    _stopping: bool = False  # only run_until stops early (subclasses may run segments themselves)

    def run_until(self, *args) -> None:
        self.extra_traceback, self._stopping = False, True  # _Done is control flow, not an error
        try:
            self.run(*args)
        except _Done:
            pass
        finally:
            self._stopping = False
            self.env.clear()

    def stop_if_last(self, n: fx.Node) -> None:
        if self._stopping and n.name == self.last:
            raise _Done


class _Done(Exception):
    pass


def last_node(gm: fx.GraphModule, names) -> str | None:
    """The name of the last node of ``gm`` (in graph order) among ``names``."""
    last = None
    for n in gm.graph.nodes:
        if n.name in names:
            last = n.name
    return last


class _Collector(StopAfterLast):
    def __init__(self, gm: fx.GraphModule, plans: dict[str, list[_Sink]], acc: np.ndarray):
        super().__init__(gm)  # garbage_collect_values: every value is freed after its last use
        self.plans, self.acc = plans, acc
        self.weights: dict[tuple[int, int], torch.Tensor] = {}  # reduced weights, computed once
        self.last = last_node(gm, plans)

    def run_node(self, n: fx.Node):
        plans = self.plans.get(n.name)
        if plans:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            for sink in plans:
                energy = None
                for k, f in enumerate(sink.factors):
                    key = (id(sink), k)
                    if key in self.weights:
                        part = self.weights[key]
                    else:
                        value = _fetch(args, kwargs, f.path)
                        if not isinstance(value, torch.Tensor):
                            continue
                        part = _reduced(value, f, sink.kept, sink.sizes)
                        if f.is_weight:
                            self.weights[key] = part
                    energy = part if energy is None else energy * part
                if energy is not None:
                    np.add.at(self.acc, sink.ids.ravel(), energy.reshape(-1).cpu().numpy())
            self.stop_if_last(n)
        return super().run_node(n)


def channel_energy(inputs: ScoreInputs, groups: list[CoupledUnits]) -> np.ndarray:
    """Mean over calibration batches of the per-channel sink energy (global ids; 0 where never sunk)."""
    facts = inputs.facts
    acc = np.zeros(facts.n_channels, dtype=np.float64)
    plans = plan_sinks(facts, wanted_mask(facts, groups))
    collector = _Collector(inputs.gm, plans, acc)
    batches = inputs.calibration or []
    with torch.no_grad():
        for batch in batches:  # iterated once, in order (ReportingBatches reports progress)
            collector.run_until(*batch)
    return acc / max(1, len(batches))


def score(groups: list[CoupledUnits], inputs: ScoreInputs) -> list[np.ndarray]:
    if inputs.layerwise:  # same statistics, one decoder layer's weights at a time
        from passes.importance import layerwise

        batches = list(inputs.calibration or [])
        energy = layerwise.channel_energy(inputs.gm, inputs.facts, groups, batches, inputs.params)
    else:
        energy = channel_energy(inputs, groups)
    return finish_scores(groups, inputs, energy)


def finish_scores(groups: list[CoupledUnits], inputs: ScoreInputs, energy: np.ndarray) -> list[np.ndarray]:
    """Per-unit sums of the channel energy; a group no sink measured falls back to coupled magnitude."""
    out = []
    for group, scores in zip(groups, sum_per_unit(groups, energy), strict=True):
        if not np.any(scores > 0):  # no sink measured for this group: fall back to the data-free score
            scores = coupled_magnitude(group, inputs.facts, inputs.params)
        out.append(scores)
    return out


CRITERION = Criterion(
    "activation",
    score,
    needs_calibration=True,
    doc="expected squared contribution at the contraction sinks (E[x_c^2]*||W[:,c]||^2, E[(q_c k_c)^2])",
    comparable=False,  # residual-update energies grow with depth: global plans use relative_to_median
)
