"""FLAP-style bias compensation: fold the mean contribution of removed channels into the output bias.

At a weight sink ``y = x @ W^T + b`` (``aten.linear``: W_o after attention, W_down after the FFN
activation) removing input channels ``R`` drops the term ``sum_{c in R} x_c W[:, c]``. Replacing it by its
expectation over calibration data keeps the output's mean:

    y' = x_K @ W[:, K]^T + (b + W[:, R] @ E[x_R])            (K = kept channels)

so ``E[y'] = E[y]`` and the error left is only the zero-mean fluctuation ``W[:, R] @ (x_R - E[x_R])``.
``E[x]`` is measured on the *dense* model (one no-grad pass of the captured graph over the calibration
batches, only per-channel sums kept). A linear without a bias gets one (a new parameter). The delta is a
function of the dense model and the plan only, so the mask oracle checks it exactly: the compressed model
must equal the masked dense model with the same deltas added (``with_output_biases``).

Only ``aten.linear`` sinks are compensated (the activation's last axis meets the weight's input columns);
other contractions (``matmul`` / ``einsum`` with weights) are left as they are and counted as skipped. So is
a sink whose own output rows lose channels (MLA's latent up-projection W_q_b / W_kv_b, whose rows are q, k
and v channels): a bias there would make removed output channels nonzero, which the coupling relied on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx

from passes.capture import copy_module
from passes.importance.activation import StopAfterLast, last_node
from passes.importance.base import ScoreInputs, operand_ids, sinks

aten = torch.ops.aten


@dataclass
class SinkMeans:
    """Per compensable linear: global channel id of each input column, and E[x] per column."""

    ids: dict[str, np.ndarray]  # node name -> [in_features] global ids (activation side)
    means: dict[str, np.ndarray]  # node name -> [in_features] mean over calibration tokens
    skipped: list[str]  # weight sinks that are not aten.linear (not compensated)
    rows: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # node -> weight output-row ids


def linear_sinks(inputs: ScoreInputs, wanted: np.ndarray) -> tuple[dict[str, np.ndarray], list[str]]:
    """Node name -> input-column channel ids, for every weight sink touching a ``wanted`` channel."""
    out, skipped, _ = _linear_sinks(inputs, wanted)
    return out, skipped


def _linear_sinks(inputs: ScoreInputs, wanted: np.ndarray):
    """``linear_sinks`` plus, per sink, the global ids of its weight's output rows (empty if unlabelled)."""
    facts = inputs.facts
    nodes = {n.name: n for n in inputs.gm.graph.nodes}
    out, skipped, rows = {}, [], {}
    for c in facts.contractions:
        found = sinks(c)
        if not found or not any(op.is_weight for op in c.operands):
            continue
        i, space, kept = found[0]
        ids = operand_ids(facts, c.operands[i], space, kept, c.sizes)
        if not wanted[ids].any():
            continue
        node = nodes[c.node]
        x = c.operands[i]
        if node.target is aten.linear.default and x.path == (0,) and len(kept) == 1 and kept[0] == x.letters[-1]:
            out[c.node] = ids.reshape(-1)
            rows[c.node] = weight_row_ids(facts, str(node.args[1].target))
        else:
            skipped.append(c.node)
    return out, skipped, rows


def weight_row_ids(facts, weight: str) -> np.ndarray:
    """Global ids of the output rows (dim 0) of the ``linear`` weight ``weight``: its dim-0 space, empty when
    no group can remove them."""
    for space in facts.spaces:
        if space.param == weight and space.dim == 0:
            return np.arange(space.offset, space.offset + space.size)
    return np.zeros(0, dtype=np.int64)


class _MeanCollector(StopAfterLast):
    """Runs the graph up to the last sink (values freed after last use) and sums each sink input over its
    leading axes."""

    def __init__(self, gm: fx.GraphModule, names: set[str]):
        super().__init__(gm)
        self.names = names
        self.last = last_node(gm, names)
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def run_node(self, n: fx.Node):
        if n.name in self.names:
            x = self.env[n.args[0]].detach()
            flat = x.reshape(-1, x.shape[-1]).to(torch.float64)
            self.sums[n.name] = self.sums.get(n.name, 0) + flat.sum(0)
            self.counts[n.name] = self.counts.get(n.name, 0) + flat.shape[0]
            self.stop_if_last(n)
        return super().run_node(n)


def sink_means(inputs: ScoreInputs, wanted: np.ndarray) -> SinkMeans:
    """E[x] per input column of every compensable linear sink, over all calibration tokens."""
    ids, skipped, rows = _linear_sinks(inputs, wanted)
    collector = _MeanCollector(inputs.gm, set(ids))
    with torch.no_grad():
        for batch in inputs.calibration or []:
            collector.run_until(*batch)
    means = {k: (collector.sums[k] / collector.counts[k]).cpu().numpy() for k in ids if k in collector.sums}
    return SinkMeans({k: v for k, v in ids.items() if k in means}, means, skipped, rows)


def bias_deltas(gm: fx.GraphModule, stats: SinkMeans, keep: np.ndarray) -> dict[str, torch.Tensor]:
    """Node name -> ``W[:, R] @ E[x_R]`` for every sink that lost input columns ``R`` (dense weights)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    out = {}
    for name, ids in stats.ids.items():
        removed = np.flatnonzero(~keep[ids])
        rows = stats.rows.get(name, np.zeros(0, dtype=np.int64))
        if not len(removed) or not keep[rows].all():  # output rows pruned too: no bias (module docstring)
            continue
        weight = _param(gm, nodes[name].args[1])
        mu = torch.as_tensor(stats.means[name][removed], dtype=torch.float64)
        cols = torch.as_tensor(removed, device=weight.device)
        delta = weight.detach().double().index_select(1, cols).cpu() @ mu
        out[name] = delta.to(weight.dtype).to(weight.device)
    return out


def _param(gm: fx.GraphModule, node) -> torch.Tensor:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        raise ValueError(f"expected a parameter operand, got {node}")
    return gm.get_parameter(node.target) if _is_param(gm, node.target) else gm.get_buffer(node.target)


def _is_param(gm: fx.GraphModule, target: str) -> bool:
    owner, _, leaf = target.rpartition(".")
    return leaf in (gm.get_submodule(owner) if owner else gm)._parameters


def add_output_biases(gm: fx.GraphModule, deltas: dict[str, torch.Tensor]) -> fx.GraphModule:
    """In place: ``b <- b + delta`` at each named linear (a new parameter ``_ecospa_bias_<node>``)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for name, delta in deltas.items():
        node = nodes[name]
        old = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        value = delta if old is None else _param(gm, old).detach() + delta
        attr = f"_ecospa_bias_{name}"
        gm.register_parameter(attr, torch.nn.Parameter(value.clone(), requires_grad=False))
        with gm.graph.inserting_before(node):
            getter = gm.graph.get_attr(attr)
        getter.meta["val"] = value
        node.kwargs = {k: v for k, v in node.kwargs.items() if k != "bias"}
        node.args = (node.args[0], node.args[1], getter)
        if isinstance(old, fx.Node) and not old.users:  # the old bias is now unused: drop it
            gm.graph.erase_node(old)
            owner, _, leaf = old.target.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, leaf)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def with_output_biases(gm: fx.GraphModule, deltas: dict[str, torch.Tensor]) -> fx.GraphModule:
    """A copy of ``gm`` with the deltas added (the dense side of the mask oracle)."""
    return add_output_biases(copy_module(gm), deltas)
