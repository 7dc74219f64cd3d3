"""Capture: ``torch.export`` (non-strict) of an ``nn.Module`` with positional example inputs.

The unlifted graph module (``ExportedProgram.module()``) keeps every parameter under its original fully
qualified name as a ``get_attr`` target, which is the placeholder <-> parameter map the later stages use.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx


class CaptureInputError(ValueError):
    """The model or its example inputs cannot be captured as given."""


class CaptureFailed(RuntimeError):
    """torch.export raised; the message carries its error and advice."""


def check_inputs(model: Any, example_inputs: Any, allow_meta: bool = False) -> tuple:
    """Validate the model and example inputs; return the inputs as a tuple."""
    if not isinstance(model, torch.nn.Module):
        raise CaptureInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, Mapping):
        raise CaptureInputError(
            "example_inputs is a dict: pass positional inputs as a tuple, e.g. (input_ids,); "
            "keyword inputs are not supported (wrap the model in a module whose forward takes them positionally)"
        )
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise CaptureInputError(
            f"example_inputs must be a non-empty tuple of tensors, got {type(example_inputs).__name__}"
        )
    for i, x in enumerate(example_inputs):
        if isinstance(x, Mapping):
            raise CaptureInputError(f"example_inputs[{i}] is a dict: pass tensors positionally")
        if isinstance(x, torch.Tensor) and x.is_meta and not allow_meta:
            raise CaptureInputError(f"example_inputs[{i}] is on the meta device: pass real tensors")
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta and not allow_meta:
        raise CaptureInputError(
            f"model has {len(meta)} parameters on the meta device (e.g. {meta[0]}): compress needs real "
            "weights; load them first (discovery alone works on meta models via ecospa_fx.discover)"
        )
    return tuple(example_inputs)


def capture(model: torch.nn.Module, example_inputs: tuple, dynamic_shapes: Any = None) -> fx.GraphModule:
    """Export ``model`` and return the unlifted graph module (parameters as ``get_attr``)."""
    was_training = model.training
    model.eval()
    try:
        program = torch.export.export(model, example_inputs, strict=False, dynamic_shapes=dynamic_shapes)
    except Exception as err:  # surface the exporter's error with advice
        raise CaptureFailed(
            f"torch.export could not trace {type(model).__name__}: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}\n"
            "advice: make forward traceable (no data-dependent Python control flow on tensor values, no "
            "unsupported outputs); Hugging Face models need use_cache=False"
        ) from err
    finally:
        model.train(was_training)
    try:
        return program.module()
    except Exception as err:  # e.g. a submodule named like a Python keyword
        raise CaptureFailed(f"torch.export traced {type(model).__name__} but could not rebuild it as a module: "
                            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
