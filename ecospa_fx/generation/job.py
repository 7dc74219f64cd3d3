"""``ecospa-fx generate``: text from a model directory (compressed on the fly), an artifact or an ONNX file.

The source decides the backend: a Hugging Face model directory is loaded with its KV cache and compressed
at ``--sparsity`` (0: the dense model, still run through the same KV graph); an artifact is rebuilt in
its KV form; a ``.onnx`` file written by ``export_kv_onnx`` runs in onnxruntime. The tokenizer comes from
the model directory or artifact (``compress`` saves it there), or ``--tokenizer``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ecospa_fx.errors import InputError
from ecospa_fx.generation.decode import GenerationStats, generate, load_stepper


@dataclass
class Generated:
    """One generation: the text, the token counts and the timings."""

    label: str
    text: str
    stats: GenerationStats
    params: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.label,
            "text": self.text,
            "prompt_tokens": self.stats.prompt_tokens,
            "new_tokens": self.stats.new_tokens,
            "prefill_ms": round(self.stats.prefill_s * 1e3, 2),
            "decode_tokens_per_s": round(self.stats.decode_tokens_per_s, 2),
            "params": self.params,
            **self.extra,
        }


@dataclass
class Source:
    """What generates (a stepper), how to tokenize for it, and what it is."""

    stepper: Any
    tokenizer: Any
    label: str
    max_positions: int | None
    params: int | None = None
    dense: Any = None  # the dense stepper of a model directory compressed here (for --compare)


def open_source(args, status: Callable[[str], None]) -> Source:
    """The stepper and tokenizer for ``args.model`` (see the module docstring)."""
    from ecospa_fx.loading import check_model_path, is_artifact, load_tokenizer, offline

    offline()
    path: Path = args.model
    if path.suffix == ".onnx" or path.is_file():
        if not path.is_file():
            raise InputError(f"{path}: no such ONNX file")
        tokenizer = load_tokenizer(args.tokenizer or path.parent)
        return Source(load_stepper(path), tokenizer, path.name, None)
    check_model_path(path, args.gguf_file)
    if is_artifact(path):
        from ecospa_fx.loading import artifact_config, load_artifact

        status(f"rebuilding {path} with its KV cache")
        module = load_artifact(path, kv=True)
        tokenizer = load_tokenizer(path, fallback=args.tokenizer)
        return Source(
            load_stepper(module), tokenizer, path.name, _positions(artifact_config(path)), param_count(module)
        )
    return _compressed_here(args, path, status)


def _compressed_here(args, path: Path, status) -> Source:
    import ecospa_fx
    from ecospa_fx.generation.causal_lm import is_cached_causal_lm
    from ecospa_fx.loading import load_model, load_tokenizer

    status(f"loading {path}")
    model, config = load_model(path, args.gguf_file, cache=True)
    if not is_cached_causal_lm(model):
        raise InputError(f"{path} holds a {type(model).__name__}, not a causal LM: there is nothing to generate with")
    tokenizer = load_tokenizer(args.tokenizer or path, None if args.tokenizer else args.gguf_file)
    example = (torch.randint(0, config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0)),)
    doing = f", compressing at {args.sparsity:g}" if args.sparsity else ""
    status(f"capturing {type(model).__name__} with its KV cache{doing}")
    calibration = _calibration(args, tokenizer) if args.sparsity else None
    small = ecospa_fx.compress(
        model, example, args.sparsity, granularity=args.granularity, verify=args.sparsity > 0, calibration=calibration
    )
    label = f"{path.name} at {args.sparsity:g}" if args.sparsity else f"{path.name} (dense)"
    dense = None
    if args.compare and args.sparsity:
        status("capturing the dense model for --compare")
        dense = ecospa_fx.compress(model, example, 0.0)
    return Source(load_stepper(small), tokenizer, label, _positions(config), param_count(small), dense)


def _calibration(args, tokenizer) -> list[tuple] | None:
    """``--calibration TEXT`` as batches of 4 x 128 tokens, ``--calibration-tokens`` in all (activation
    scores); None without it (data-free magnitude scores)."""
    if args.calibration is None:
        return None
    from ecospa_fx.evaluate import CALIBRATION_FLAGS, Protocol, read_tokens

    seq, batch = 128, 4
    ids = read_tokens(
        args.calibration, tokenizer, Protocol(seq_len=seq, max_tokens=args.calibration_tokens), CALIBRATION_FLAGS
    )
    rows = ids[: len(ids) // seq * seq].view(-1, seq)
    batches = [(rows[k : k + batch],) for k in range(0, len(rows) - batch + 1, batch)]
    if not batches:
        raise InputError(f"{args.calibration} is too short for one batch of {batch} x {seq} tokens")
    return batches


def _positions(config) -> int | None:
    from ecospa_fx.artifact_format import POSITION_KEYS

    for key in POSITION_KEYS:
        value = getattr(config, key, None) if config is not None else None
        if isinstance(value, int) and value > 0:
            return value
    return None


def param_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def prompt_ids(source: Source, prompt: str, max_new_tokens: int, chat: bool) -> torch.Tensor:
    """The prompt as token ids [1, S] (through the chat template with ``chat``), checked against the
    model's positions."""
    if not prompt:
        raise InputError("--prompt is empty: give the text to continue")
    ids = encode_prompt(source.tokenizer, prompt, chat)
    limit = source.max_positions
    if limit is not None and ids.shape[1] + max_new_tokens > limit:
        raise InputError(
            f"the prompt has {ids.shape[1]} tokens and --max-new-tokens is {max_new_tokens}: more than the "
            f"{limit} positions the model has; shorten the prompt or ask for fewer tokens"
        )
    return ids


def encode_prompt(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    """``prompt`` as token ids [1, S]; with ``chat`` (and a template) as one user turn of the chat template."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    else:
        ids = tokenizer(prompt)["input_ids"]
    return torch.tensor([list(ids)], dtype=torch.long)


def run_one(stepper, tokenizer, ids: torch.Tensor, args, label: str, params, stream) -> Generated:
    """Generate for ``ids`` with ``stepper``; ``stream(text_delta)`` gets the text as it grows."""
    stats = GenerationStats()
    produced: list[int] = []
    shown = [""]

    def on_token(token: torch.Tensor) -> None:
        produced.append(int(token[0]))
        text = tokenizer.decode(produced, skip_special_tokens=True)
        if stream is not None and text.startswith(shown[0]):
            stream(text[len(shown[0]) :])
            shown[0] = text

    eos = set(getattr(stepper, "eos_token_id", []) or [])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        eos.add(int(tokenizer.eos_token_id))
    generate(
        stepper,
        ids,
        args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        eos_token_id=sorted(eos),
        on_token=on_token,
        stats=stats,
    )
    return Generated(label, tokenizer.decode(produced, skip_special_tokens=True), stats, params)
