"""Carried state: graph inputs that hold a previous step's output, such as a KV cache.

A decoder with a KV cache takes the past keys and values as inputs and returns them extended by this
step's, e.g. ``present_k = cat([past_k, k], seq_axis)``. In the compressed model the cache holds only the
kept channels, so a state input is *narrower* than the dense one, not gathered from it.

Declared state pairs ``(input position, output position)`` are handled by the dataflow alone:

* **adopt.** A state input is unlabelled until it meets a labelled tensor in a ``cat``; it then takes
  that tensor's labels on every axis but the joined one (``past_k`` carries K's head and head_dim
  channels because it is concatenated with ``k``). Its removed channels hold whatever the caller put
  there, so the adopted labels are *not zero* (``zero_ok=False``): a contraction over them is exact only
  when another factor is zero there (Q's zeroed rows for q.k, W_o's zeroed columns for attn @ v), the
  same rule as for any activation.
* **read once.** A state input read by anything but the cats that adopted it (or a size query of an
  unlabelled axis) would be read at its narrow width unlabelled: its channels are blocked.
* **carry back.** A labelled output is allowed (not blocked as "reaches a model output") only when it
  is the paired state output and carries exactly the labels its input adopted, so the state the
  compressed model returns is the state it takes next step.

``gather_kept`` maps a dense state tensor to its compressed form (for the mask oracle), and
``state_shapes`` gives the compressed widths (for allocating an empty cache).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from passes.compaction import _outer_first, kept_grid, new_sizes
from passes.labels import AxisLabel, Labels, of_space, spaces_of

SIZE_QUERIES = {"aten.sym_size.int", "aten.size.int", "aten.sym_size", "aten.size.default"}


def state_placeholders(gm: fx.GraphModule, pairs) -> dict[str, int]:
    """Placeholder name -> output position for every declared ``(input position, output position)`` pair."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    n_out = len(pytree.tree_leaves(gm.graph.output_node().args[0])) if pairs else 0
    out = {}
    for i, j in pairs:
        if not 0 <= i < len(placeholders) or not 0 <= j < n_out:
            raise ValueError(
                f"state pair ({i}, {j}) out of range: the graph has {len(placeholders)} inputs, {n_out} outputs"
            )
        out[placeholders[i].name] = j
    return out


def adopt(ctx, node: fx.Node, tensors: list, parts: list[Labels], d: int) -> list[Labels]:
    """``parts`` with every unlabelled state-input piece of ``cat(tensors, d)`` labelled like the labelled
    pieces on the other axes (not zero at removed channels); records what each state input adopted."""
    labelled = [p for p in parts if any(lab is not None for lab in p)]
    if not labelled or labelled[0][d] is not None:
        return parts
    template = tuple(
        None if a == d or lab is None else replace(lab, zero_ok=False) for a, lab in enumerate(labelled[0])
    )
    out = list(parts)
    for k, t in enumerate(tensors):
        if not (isinstance(t, fx.Node) and t.name in ctx.analysis.state_inputs and not any(parts[k])):
            continue
        before = ctx.analysis.state_labels.get(t.name)
        if before is not None and not _same_labels(before, template):
            ctx.block_labels(template, "all", "a cache input joined with different channels in two places", node)
            ctx.block_labels(before, "all", "a cache input joined with different channels in two places", node)
        ctx.analysis.state_labels[t.name] = template
        ctx.analysis.state_readers.setdefault(t.name, set()).add(node.name)
        out[k] = template
    return out


def check_readers(ctx, gm: fx.GraphModule) -> None:
    """Block the channels of a state input that something besides its adopting cats reads as a tensor."""
    for name, labels in ctx.analysis.state_labels.items():
        for user in _by_name(gm, name).users:
            if user.name in ctx.analysis.state_readers.get(name, set()) or _is_export_guard(gm, user):
                continue
            if str(user.target) in SIZE_QUERIES and labels[_size_axis(user, len(labels))] is None:
                continue
            ctx.block_labels(labels, "all", f"a cache input is also read by {user.target} unlabelled", user)


def _is_export_guard(gm: fx.GraphModule, node: fx.Node) -> bool:
    """torch.export's input-guard call (``GuardsFn``): it asserts relations between *symbolic* sizes (batch,
    past length), which the rewrite leaves alone; a wrong static size would fail loudly, never silently."""
    if node.op != "call_module":
        return False
    from torch.export._unlift import GuardsFn

    return isinstance(gm.get_submodule(str(node.target)), GuardsFn)


def narrow_placeholders(gm: fx.GraphModule, analysis, keep: np.ndarray) -> None:
    """Give each state placeholder's example value (``meta["val"]``) its compressed width, so shape
    checks and exporters that read it see the cache the compressed graph takes."""
    nodes = {n.name: n for n in gm.graph.find_nodes(op="placeholder")}
    for name, labels in analysis.state_labels.items():
        node = nodes.get(name)
        val = node.meta.get("val") if node is not None else None
        if not isinstance(val, torch.Tensor):
            continue
        dense = [len(lab.arr) if lab is not None else 1 for lab in labels]
        sizes = new_sizes(labels, dense, keep, analysis.facts.spaces)
        for axis, lab in enumerate(labels):
            if lab is not None and sizes[axis] != dense[axis]:
                val = val.narrow(axis, 0, sizes[axis])
        node.meta["val"] = val


def _by_name(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def _size_axis(node: fx.Node, rank: int) -> int:
    return node.args[1] % rank if len(node.args) > 1 else 0


def carried_back(ctx, position: int, labels: Labels) -> bool:
    """Output ``position`` is a declared state output carrying exactly what its input adopted."""
    for name, j in ctx.analysis.state_inputs.items():
        if j == position:
            adopted = ctx.analysis.state_labels.get(name)
            return adopted is not None and _same_labels(adopted, labels)
    return False


def _same_labels(a: Labels, b: Labels) -> bool:
    if len(a) != len(b):
        return False
    return all(_same_axis(x, y) for x, y in zip(a, b, strict=True))


def _same_axis(x: AxisLabel | None, y: AxisLabel | None) -> bool:
    if x is None or y is None:
        return x is None and y is None
    return x.space == y.space and x.full == y.full and np.array_equal(x.arr, y.arr)


def gather_kept(x: torch.Tensor, labels: Labels, keep: np.ndarray, spaces) -> torch.Tensor:
    """The compressed form of a dense state tensor ``x``: the kept elements of every labelled space, laid
    out as the rewrite lays them out (outermost axis first, kept channels in increasing order)."""
    for space, axes in spaces_of(labels).items():
        ordered = _outer_first(labels, axes)
        mask = kept_grid(labels, ordered, keep, spaces[space].offset)
        if mask.all():
            continue
        sizes = new_sizes(of_space(labels, space), list(x.shape), keep, spaces)
        rest = [a for a in range(x.dim()) if a not in ordered]
        moved = x.permute(*rest, *ordered)
        flat = moved.reshape(*moved.shape[: len(rest)], -1)
        picked = flat.index_select(-1, torch.as_tensor(np.flatnonzero(mask.ravel()), device=x.device))
        picked = picked.reshape(*moved.shape[: len(rest)], *[sizes[a] for a in ordered])
        x = picked.permute(*np.argsort(rest + ordered).tolist())
    return x


def state_shapes(analysis, keep: np.ndarray) -> dict[int, list[int]]:
    """Input position -> compressed shape of each state input that adopted labels (the example's sizes
    on unlabelled axes, e.g. batch and past length)."""
    positions = {n.name: i for i, n in enumerate(analysis.graph_module.graph.find_nodes(op="placeholder"))}
    out = {}
    for name, labels in analysis.state_labels.items():
        val = _by_name(analysis.graph_module, name).meta["val"]
        shape = [int(s) if isinstance(s, int) else -1 for s in val.shape]
        dense = [len(lab.arr) if lab is not None else max(n, 1) for lab, n in zip(labels, shape, strict=True)]
        sizes = new_sizes(labels, dense, keep, analysis.facts.spaces)
        out[positions[name]] = [s if lab is not None else n for s, n, lab in zip(sizes, shape, labels, strict=True)]
    return out


@dataclass
class StateMap:
    """How dense state tensors become compressed ones, by input and output position (for the oracle)."""

    inputs: dict[int, Labels]
    outputs: dict[int, Labels]
    keep: np.ndarray
    spaces: list

    @classmethod
    def of(cls, analysis, keep: np.ndarray) -> StateMap:
        positions = {n.name: i for i, n in enumerate(analysis.graph_module.graph.find_nodes(op="placeholder"))}
        inputs = {positions[name]: labels for name, labels in analysis.state_labels.items()}
        outputs = {analysis.state_inputs[name]: labels for name, labels in analysis.state_labels.items()}
        return cls(inputs, outputs, keep, analysis.facts.spaces)

    def narrow_inputs(self, inputs: tuple) -> tuple:
        return tuple(self._narrow(x, self.inputs.get(i)) for i, x in enumerate(inputs))

    def narrow_outputs(self, leaves: list) -> list:
        return [self._narrow(x, self.outputs.get(j)) for j, x in enumerate(leaves)]

    def _narrow(self, x, labels: Labels | None):
        if labels is None or not isinstance(x, torch.Tensor):
            return x
        return gather_kept(x, labels, self.keep, self.spaces)
