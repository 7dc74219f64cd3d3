"""State-space and short-conv layers in onnxruntime: dense vs compressed, side by side in one run.

    python benchmarks/ssm_onnx.py [--tokens 64] [--sparsity 0.5] [--repeats 20]

Random-weight models, batch 1, static shapes (transformers' torch Mamba path unrolls its scan over time):
Mamba (hidden 256, 4 layers, inner 512, state 16) and LFM2 (hidden 256, conv/attention/conv/conv, FFN 768).
Compressed at channel granularity, data-free; times are the median of ``--repeats`` onnxruntime runs
(1 thread) after a warm-up. What is removed is what the zoo cases ``hf_mamba`` / ``hf_lfm2`` check exactly.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch
import transformers as tf
from moe_onnx import ort_median_ms

import ecospa_fx
from ecospa_fx.export import export_onnx


def mamba() -> torch.nn.Module:
    config = tf.MambaConfig(
        vocab_size=512, hidden_size=256, num_hidden_layers=4, state_size=16, expand=2, conv_kernel=4, use_cache=False
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return tf.MambaForCausalLM(config).eval()


def lfm2() -> torch.nn.Module:
    config = tf.Lfm2Config(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=768,
        block_auto_adjust_ff_dim=False,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        layer_types=["conv", "full_attention", "conv", "conv"],
        use_cache=False,
        pad_token_id=0,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return tf.Lfm2ForCausalLM(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    ids = torch.randint(0, 512, (1, args.tokens))
    print(f"tokens {args.tokens}, sparsity {args.sparsity}; onnxruntime median ms (1 thread)")
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in (("mamba", mamba), ("lfm2", lfm2)):
            model = build()
            small = ecospa_fx.compress(model, (ids,), args.sparsity, dynamic_shapes=None)
            report = small.ecospa_report
            row = []
            for label, module in (("dense", model), ("compressed", small)):
                path = Path(tmp) / f"{name}_{label}.onnx"
                result = export_onnx(module, (ids,), path, dynamic=False)
                row.append((ort_median_ms(path, ids.numpy(), args.repeats), result.max_diff))
            (dense_ms, dense_diff), (small_ms, small_diff) = row
            print(
                f"{name:>6}: params {report.params_before:,} -> {report.params_after:,}"
                f"  dense {dense_ms:8.2f}  compressed {small_ms:8.2f}  ratio {dense_ms / small_ms:5.2f}x"
                f"  (oracle {report.max_abs_diff:.1e}, parity {dense_diff:.1e} / {small_diff:.1e})"
            )


if __name__ == "__main__":
    main()
