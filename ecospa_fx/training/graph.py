"""The trainable captured graph: capture once, keep ``meta["val"]`` true after every in-place rewrite.

``torch.export`` captures in eval mode, so the graph has no dropout and no train/eval switch; it runs
forward and backward like any module (its parameters are the original model's tensors until a prune
replaces them). ``ExportedProgram.module()`` refuses ``train()``/``eval()``; the graph ignores the mode, so
those refusals are removed to let training loops (and the Hugging Face ``Trainer``) call them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from ecospa_fx.api import _capture
from ecospa_fx.artifact import source_info
from ecospa_fx.report import Group, Member, Report


def capture_trainable(model: torch.nn.Module, example_inputs: tuple, dynamic_shapes: Any = None) -> fx.GraphModule:
    """``model`` captured as a ``GraphModule`` (returned as is if already captured; the graph inside a
    ``CausalLMGraph`` adapter otherwise)."""
    if isinstance(model, CausalLMGraph):
        return model.graph_module
    if isinstance(model, fx.GraphModule) and any("val" in n.meta for n in model.graph.nodes):
        allow_mode_switch(model)
        return model
    gm = _capture(model, example_inputs, dynamic_shapes)
    allow_mode_switch(gm)
    gm.ecospa_source = source_info(model, example_inputs)
    return gm


def allow_mode_switch(gm: torch.nn.Module) -> None:
    """Undo ``ExportedProgram.module()``'s refusal of ``train()``/``eval()`` (the graph has no mode)."""
    for name in ("train", "eval"):
        if name in gm.__dict__:
            delattr(gm, name)


def refresh_meta(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Re-derive every node's ``meta["val"]`` (fake tensors) after a rewrite changed shapes."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
    FakeTensorProp(gm, mode=mode).propagate_dont_convert_inputs(*fake)


def removed_report(origin: dict, dense: dict, sparsity: float, granularity: str) -> Report:
    """A ``Report`` listing, per (param, dim), the dense indices removed so far (what ``ecospa_fx.save``
    records; ``ecospa_fx.load`` replays it on the dense architecture)."""
    report = Report(sparsity=sparsity, granularity=granularity)
    for (param, dim), kept in sorted(origin.items()):
        size = dense[(param, dim)]
        gone = tuple(int(i) for i in np.setdiff1d(np.arange(size), kept))
        if gone:
            report.groups.append(Group("pruned", (Member(param, dim, size, gone),), size, len(gone)))
    return report


def logits_of(output: Any) -> torch.Tensor:
    """Logits from a tensor, a Hugging Face ``ModelOutput`` or a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    return output[0]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy (labels shifted by one; -100 ignored)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


class CausalLMGraph(torch.nn.Module):
    """Adapter for the Hugging Face ``Trainer``: ``forward(input_ids, labels=None, ...)`` -> ``{"loss",
    "logits"}`` around a captured causal LM (other keyword inputs are ignored: the graph takes ids only)."""

    def __init__(self, graph_module: fx.GraphModule):
        super().__init__()
        self.graph_module = graph_module

    @classmethod
    def capture(cls, model: torch.nn.Module, example_inputs: tuple) -> CausalLMGraph:
        return cls(capture_trainable(model, example_inputs))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **_: Any) -> dict:
        logits = logits_of(self.graph_module(input_ids))
        out = {"logits": logits}
        if labels is not None:
            out = {"loss": causal_lm_loss(logits, labels), **out}
        return out


def example_inputs_of(gm: fx.GraphModule) -> tuple:
    """Placeholder-shaped example inputs (zeros) from a captured graph's ``meta["val"]``."""
    out = []
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise ValueError(f"input {node.name} has no recorded tensor value: pass example_inputs")
        out.append(torch.zeros([int(s) for s in val.shape], dtype=val.dtype))
    return tuple(out)
