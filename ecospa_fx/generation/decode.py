"""``generate``: prefill once, then one token per step through the KV cache, in PyTorch or onnxruntime.

Both backends run the same KV form ``(input_ids, attention_mask, position_ids, *past) -> (logits,
*present)``: the module ``compress`` returns for a cached causal LM, or the ONNX file
``export_kv_onnx`` writes from it. Left-padded batches work as in Hugging Face: positions count only the
real tokens (``cumsum(mask) - 1``) and the mask hides the padding from every query.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ecospa_fx.errors import InputError
from ecospa_fx.generation.causal_lm import positions_of
from ecospa_fx.generation.sampling import Sampling


@dataclass
class GenerationStats:
    """Wall-clock prefill time and decode throughput of one ``generate`` call."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    step_s: list[float] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        steps = len(self.step_s)
        return steps / self.decode_s if self.decode_s > 0 else 0.0


def generate(
    model_or_path: Any,
    input_ids: torch.Tensor,
    max_new_tokens: int = 32,
    *,
    attention_mask: torch.Tensor | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    seed: int = 0,
    on_token: Callable[[torch.Tensor], None] | None = None,
    stats: GenerationStats | None = None,
) -> torch.LongTensor:
    """Continue ``input_ids`` [B, S] by up to ``max_new_tokens`` tokens; returns [B, S + N].

    ``model_or_path``: what ``ecospa_fx.compress`` returned for a causal LM with a KV cache, an artifact
    directory ``save`` wrote from one, or an ONNX file ``export_kv_onnx`` wrote (run in onnxruntime).
    ``attention_mask`` marks real tokens (1) and left padding (0). Greedy unless ``do_sample``. Rows that
    produced ``eos_token_id`` are filled with ``pad_token_id`` (default: the eos id) until all are done;
    ``eos_token_id=None`` uses the source model's generation config (as Hugging Face does), ``[]`` none.
    ``on_token(ids [B])`` is called for every new token; ``stats`` receives timings.
    """
    stepper = load_stepper(model_or_path)
    input_ids, attention_mask = _check_prompt(input_ids, attention_mask, max_new_tokens)
    choose = Sampling(do_sample, temperature, top_k, top_p, seed).chooser()
    eos = _eos_set(eos_token_id if eos_token_id is not None else stepper.eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (min(eos) if eos else 0)
    stats = stats if stats is not None else GenerationStats()
    return _loop(stepper, input_ids, attention_mask, max_new_tokens, choose, eos, pad, on_token, stats)


def _loop(stepper, ids, mask, max_new_tokens, choose, eos, pad, on_token, stats) -> torch.LongTensor:
    batch = ids.shape[0]
    positions = positions_of(mask)
    stats.prompt_tokens = int(mask.sum())
    start = time.perf_counter()
    logits, past = stepper.step(ids, mask, positions, stepper.empty_past(batch))
    stats.prefill_s = time.perf_counter() - start
    out, done = [ids], torch.zeros(batch, dtype=torch.bool)
    last = positions[:, -1:]
    for t in range(max_new_tokens):
        token = choose(logits[:, -1]).to(torch.long)
        if eos:
            token = torch.where(done, torch.full_like(token, pad), token)
            done |= torch.isin(token, torch.tensor(sorted(eos)))
        out.append(token[:, None])
        stats.new_tokens += 1
        if on_token is not None:
            on_token(token)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], -1)
        last = last + 1
        tick = time.perf_counter()
        logits, past = stepper.step(token[:, None], mask, last, past)
        stats.step_s.append(time.perf_counter() - tick)
    stats.decode_s = sum(stats.step_s)
    return torch.cat(out, -1)


def _check_prompt(input_ids, attention_mask, max_new_tokens: int):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise InputError("input_ids must be an integer tensor [batch, seq]")
    if input_ids.shape[1] == 0:
        raise InputError("input_ids is empty: give at least one prompt token")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise InputError(f"attention_mask {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
    if not bool((attention_mask.sum(-1) > 0).all()):
        raise InputError("a row of attention_mask is all zeros: every prompt needs a real token")
    return input_ids.long(), attention_mask.long()


def _eos_set(eos_token_id) -> set[int]:
    if eos_token_id is None:
        return set()
    return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(t) for t in eos_token_id}


def load_stepper(model_or_path: Any):
    """The backend for ``model_or_path``: a compressed KV module, an artifact directory, an ONNX file."""
    from ecospa_fx.generation.backends import OrtStepper, TorchStepper

    if isinstance(model_or_path, (TorchStepper, OrtStepper)):
        return model_or_path
    if isinstance(model_or_path, torch.nn.Module):
        return TorchStepper(model_or_path)
    path = Path(model_or_path)
    if path.suffix == ".onnx" or path.is_file():
        return OrtStepper(path)
    if path.is_dir():
        from ecospa_fx.loading import load_artifact

        return TorchStepper(load_artifact(path, kv=True))
    raise InputError(f"{model_or_path}: not a compressed module, an artifact directory or an .onnx file")
