"""Activation statistics computed one decoder layer at a time (SparseGPT / Wanda style).

The whole-model activation criterion (``passes.importance.activation``) runs every calibration batch through
the whole graph with every weight resident. Here the captured graph is cut into *segments*: contiguous runs
of nodes, a new one starting where the nodes of the next decoder layer begin (read off
``node.meta["nn_module_stack"]``: the first ``<ModuleList>.<index>`` path; the embedding and whatever precedes
the first layer form segment 0, the final norm and head ride with the last layer). For each segment in turn:

1. load the segment's weights (``get_attr`` targets) from ``source``, e.g. memory-mapped safetensors shards;
2. run every calibration batch through the segment's nodes, starting from that batch's values at the
   segment boundary (the hidden state, rotary cos/sin, masks), accumulating the same sink statistics as the
   whole-model criterion;
3. drop the weights; keep only the values that later segments still read.

Memory: one segment's weights plus the boundary values of every batch (``batches x seq x hidden``), never the
model. The graph itself may have been captured on the ``meta`` device: every weight and buffer it reads comes
from ``source``. The statistics are the whole-model ones (same ops on the same values; only the order of the
per-channel float64 sums over batches and sinks can differ), which the tests check with ``allclose``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.fx as fx

from passes.groups import CoupledUnits
from passes.importance.activation import _Collector, plan_sinks
from passes.importance.base import wanted_mask

_LIST_ITEM = re.compile(r"^(.+)\.(\d+)$")


class _Lazy:
    """Placeholder for a ``get_attr`` value that is loaded from ``source`` only when a consumer runs."""

    __slots__ = ("target",)

    def __init__(self, target: str):
        self.target = target


def layer_key(node: fx.Node) -> tuple[str, int] | None:
    """``(ModuleList path, index)`` of the outermost repeated block this node was traced in, else None."""
    for value in (node.meta.get("nn_module_stack") or {}).values():
        path = value[0] if isinstance(value, tuple) else str(value)
        match = _LIST_ITEM.match(path)
        if match:
            return match.group(1), int(match.group(2))
    return None


def segments(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """The graph's nodes in order, cut before the first node of every new decoder layer."""
    out: list[list[fx.Node]] = [[]]
    current = None
    for node in gm.graph.nodes:
        key = layer_key(node)
        if key is not None and key != current:
            if current is not None or out[-1]:
                out.append([])
            current = key
        out[-1].append(node)
    return [seg for seg in out if seg]


class _LayerwiseCollector(_Collector):
    """The whole-model sink collector, with weights read from ``source`` per segment instead of the graph."""

    def __init__(self, gm: fx.GraphModule, plans, acc: np.ndarray, source: Mapping[str, torch.Tensor]):
        super().__init__(gm, plans, acc)
        self.source = source
        self.loaded: dict[str, torch.Tensor] = {}  # this segment's weights
        self.peak_loaded = 0  # most weight bytes resident at once

    def run_node(self, n: fx.Node):
        if n.op == "get_attr" and n.target in self.source:
            return _Lazy(str(n.target))
        return super().run_node(n)

    def fetch_args_kwargs_from_env(self, n: fx.Node):
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        resolve = lambda v: self._load(v.target) if isinstance(v, _Lazy) else v  # noqa: E731
        return fx.node.map_aggregate(args, resolve), fx.node.map_aggregate(kwargs, resolve)

    def _load(self, target: str) -> torch.Tensor:
        if target not in self.loaded:
            self.loaded[target] = self.source[target]
            self.peak_loaded = max(self.peak_loaded, sum(_nbytes(t) for t in self.loaded.values()))
        return self.loaded[target]

    def run_segment(self, nodes: list[fx.Node], env: dict, batch: tuple) -> dict:
        """Run ``nodes`` for one batch from its boundary values ``env``; free values after their last use."""
        return run_nodes(self, nodes, env, batch)


def run_nodes(interpreter: fx.Interpreter, nodes: Sequence[fx.Node], env: dict, batch: tuple) -> dict:
    """Run ``nodes`` of the interpreter's graph, in order, for one batch: from the values already in
    ``env`` (placeholders read from ``batch``), each value freed after its last use; returns ``env``."""
    interpreter.env, interpreter.args_iter = env, iter(batch)
    for node in nodes:
        env[node] = interpreter.run_node(node)
        for gone in interpreter.user_to_last_uses.get(node, []):
            del env[gone]
    return env


def _until_last_sink(segs: list[list[fx.Node]], sinks: set[str]) -> list[list[fx.Node]]:
    """``segs`` cut after the last sink node: the final norm, LM head and logits are never computed."""
    flat = [n for seg in segs for n in seg]
    last = max((i for i, n in enumerate(flat) if n.name in sinks), default=len(flat) - 1)
    keep = set(flat[: last + 1])
    return [cut for cut in ([n for n in seg if n in keep] for seg in segs) if cut]


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def channel_energy(
    gm: fx.GraphModule,
    facts,
    groups: list[CoupledUnits],
    batches: Sequence[tuple],
    source: Mapping[str, torch.Tensor] | None = None,
    stats: dict | None = None,
) -> np.ndarray:
    """Mean over ``batches`` of the per-channel sink energy (as ``activation.channel_energy``), computed
    segment by segment. ``source``: name -> tensor for every weight and buffer the graph reads (default:
    the graph's own parameters); ``stats`` (optional) receives segment count and peak weight bytes."""
    source = source if source is not None else dict(gm.named_parameters(remove_duplicate=False))
    acc = np.zeros(facts.n_channels, dtype=np.float64)
    plans = plan_sinks(facts, wanted_mask(facts, groups))
    collector = _LayerwiseCollector(gm, plans, acc, source)
    segs = _until_last_sink(segments(gm), set(plans))
    envs: list[dict] = [{} for _ in batches]
    with torch.no_grad():
        for nodes in segs:
            for b, batch in enumerate(batches):
                envs[b] = collector.run_segment(nodes, envs[b], batch)
            collector.loaded.clear()
    if stats is not None:
        stats.update(segments=len(segs), peak_weight_bytes=collector.peak_loaded)
    return acc / max(1, len(batches))
