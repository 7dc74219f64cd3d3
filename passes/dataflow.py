"""Run the label analysis over a graph module (the interpreter loop; rules live in ``op_rules``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from passes.analyse import Analysis, Ctx
from passes.coupling_state import CouplingFacts
from passes.op_rules import COPY_OR_SHAPE, RULES, is_pointwise, pointwise_rule, schema_name
from passes.state import carried_back, check_readers, state_placeholders


def analyse(gm: fx.GraphModule, state: Sequence[tuple[int, int]] = ()) -> Analysis:
    """Label every node of ``gm`` and collect the coupling facts (ties, flags, blockers). ``state`` pairs
    (input position, output position) declare carried state such as a KV cache (``passes.state``)."""
    params = dict(gm.named_parameters(remove_duplicate=False))
    analysis = Analysis(gm, CouplingFacts(), state_inputs=state_placeholders(gm, state))
    ctx = Ctx(analysis, params)
    for node in gm.graph.nodes:
        if node.op == "output":
            check_readers(ctx, gm)  # before outputs: a state blocked here is not carried back
        analysis.labels[node.name] = _visit(ctx, node, params)
    return analysis


def _visit(ctx: Ctx, node: fx.Node, params: dict[str, torch.Tensor]):
    if node.op == "get_attr":
        if node.target in params:
            ctx.analysis.weight_nodes.add(node.name)
            return ctx.param_labels(node.target, list(params[node.target].shape))
        return None
    if node.op == "output":
        _block_outputs(ctx, node)
        return None
    if node.op != "call_function":
        if node.op == "call_module" or node.op == "call_method":
            _fail_closed(ctx, node, f"{node.op} {node.target}")
        return None
    name = schema_name(node.target)
    touched = [a for a in node.all_input_nodes if ctx.lab(a) is not None and any(ctx.lab(a))]
    touched += [a for a in node.all_input_nodes if isinstance(ctx.analysis.labels.get(a.name), list)]
    if not touched and name != "getitem":
        return None
    rule = RULES.get(name) or (pointwise_rule if is_pointwise(node.target) else None)
    if rule is None:
        _fail_closed(ctx, node, name)
        return None
    out = rule(ctx, node)
    if (name in COPY_OR_SHAPE or name in WEIGHT_GATHERS) and node.args and ctx.is_weight(node.args[0]):
        ctx.analysis.weight_nodes.add(node.name)
    return out


WEIGHT_GATHERS = {
    "aten::index",
    "aten::select",
}  # W[expert_ids], W[e]: still the weight's values (zeroed where the mask zeroes W)


def _fail_closed(ctx: Ctx, node: fx.Node, what: str) -> None:
    for a in node.all_input_nodes:
        value = ctx.analysis.labels.get(a.name)
        for labels in value if isinstance(value, list) else [value]:
            ctx.block_labels(labels, "all", f"unknown op {what}: channel semantics not modelled", node)


def _block_outputs(ctx: Ctx, node: fx.Node) -> None:
    for position, a in enumerate(pytree.tree_leaves(node.args[0])):
        labels = ctx.lab(a)
        if labels is None or carried_back(ctx, position, labels):
            continue
        full = [lab for lab in labels if lab is not None and lab.full]
        scope = "all" if full else "head"
        ctx.block_labels(labels, scope, "reaches a model output", node)
