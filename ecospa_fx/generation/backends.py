"""One decoding step of a KV-form model, in PyTorch or onnxruntime.

``step(input_ids, attention_mask, position_ids, past) -> (logits, present)``; ``empty_past(batch)`` gives
the length-0 cache a prefill starts from, at the compressed widths.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ecospa_fx.errors import InputError

PAST_NAME = "past_key_values.{layer}.{kind}"
PRESENT_NAME = "present.{layer}.{kind}"


def kv_names(n_past: int, template: str) -> list[str]:
    """``past_key_values.0.key, past_key_values.0.value, ...`` (onnxruntime-genai's convention)."""
    return [template.format(layer=k // 2, kind=("key", "value")[k % 2]) for k in range(n_past)]


class TorchStepper:
    """A compressed KV module (``compress`` of a cached causal LM) run eagerly."""

    def __init__(self, module: torch.nn.Module):
        layout = getattr(module, "ecospa_kv", None)
        if layout is None:
            raise InputError(
                "this model has no KV cache: compress a causal LM loaded with use_cache=True (the Hugging "
                "Face default) to get a model that generates (a model whose cache holds recurrent state, a conv or "
                "state-space layer's, is compressed without one)"
            )
        self.module, self.layout = module, layout
        self.eos_token_id = list(layout.eos_token_id)
        self.device = next((p.device for p in module.parameters()), torch.device("cpu"))

    def empty_past(self, batch: int) -> list[torch.Tensor]:
        return self.layout.empty_past(batch, self.device)

    @torch.no_grad()
    def step(self, ids, mask, positions, past):
        out = self.module(ids.to(self.device), mask.to(self.device), positions.to(self.device), *past)
        return out[0].cpu(), list(out[1:])


class OrtStepper:
    """An ONNX file with ``past_key_values.*`` inputs and ``present.*`` outputs, run in onnxruntime."""

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        if not Path(path).is_file():
            raise InputError(f"{path}: no such ONNX file")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        past = [n for n in inputs if n.startswith("past_key_values.")]
        if not past:
            raise InputError(f"{path} has no past_key_values inputs: export it with export_kv_onnx to generate")
        self.past_names = kv_names(len(past), PAST_NAME)
        self.widths = [(int(inputs[n].shape[1]), int(inputs[n].shape[3])) for n in self.past_names]
        self.dtype = np.float16 if "float16" in inputs[self.past_names[0]].type else np.float32
        self.has_positions = "position_ids" in inputs
        meta = self.session.get_modelmeta().custom_metadata_map.get("ecospa_kv")
        self.eos_token_id = json.loads(meta).get("eos_token_id", []) if meta else []

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, h, 0, d), dtype=self.dtype) for h, d in self.widths]

    def step(self, ids, mask, positions, past):
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        if self.has_positions:
            feed["position_ids"] = positions.numpy()
        feed.update(zip(self.past_names, past, strict=True))
        logits, *present = self.session.run(None, feed)
        return torch.from_numpy(logits), present
