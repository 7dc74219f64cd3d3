"""Routed experts in onnxruntime: transformers' grouped matmul (our unrolled Slice/MatMul translation) vs the
``batched_mm`` experts (a gather of every row's expert matrix), dense vs compressed, side by side in one run.

    python benchmarks/moe_onnx.py [--tokens 256] [--sparsity 0.5] [--repeats 20]

A random-weight Qwen2-MoE (hidden 256, 8 experts of width 512, top-2, a shared expert, 2 layers, batch 1);
times are the median of ``--repeats`` onnxruntime runs (1 thread) after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import transformers as tf

import ecospa_fx
from ecospa_fx.export import export_onnx, token_dynamic_shapes


def build(experts_implementation: str) -> torch.nn.Module:
    config = tf.Qwen2MoeConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=512,
        shared_expert_intermediate_size=512,
        num_experts=8,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        decoder_sparse_step=1,
        use_cache=False,
    )
    config._attn_implementation = "sdpa"
    config._experts_implementation = experts_implementation
    torch.manual_seed(0)
    return tf.Qwen2MoeForCausalLM(config).eval()


def ort_median_ms(path: Path, ids: np.ndarray, repeats: int) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: ids}
    session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    ids = torch.randint(0, 512, (2, args.tokens))
    run_ids = ids[:1].numpy()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"tokens {args.tokens}, sparsity {args.sparsity}; onnxruntime median ms (1 thread)")
        for impl in ("grouped_mm", "batched_mm"):
            model = build(impl)
            small = ecospa_fx.compress(model, (ids,), args.sparsity, dynamic_shapes=token_dynamic_shapes((ids,)))
            row = []
            for label, module in (("dense", model), ("compressed", small)):
                path = Path(tmp) / f"{impl}_{label}.onnx"
                result = export_onnx(module, (ids,), path)
                row.append((label, ort_median_ms(path, run_ids, args.repeats), result.max_diff))
            (_, dense_ms, dense_diff), (_, small_ms, small_diff) = row
            print(
                f"{impl:>10}: dense {dense_ms:8.2f}  compressed {small_ms:8.2f}  ratio {dense_ms / small_ms:5.2f}x"
                f"  (parity {dense_diff:.1e} / {small_diff:.1e})"
            )


if __name__ == "__main__":
    main()
