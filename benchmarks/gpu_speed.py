"""GPU latency, dense vs ecospa_fx-compressed, PyTorch bf16, eager and CUDA graphs, side by side.

    python benchmarks/gpu_speed.py --shapes 1b 3b smollm2 --sparsity 0.5

Random weights (timing only). For each shape and granularity: compress at the given sparsity (channel:
head_dim + FFN channels; head: whole KV groups + FFN channels), then time the dense and the compressed
module at batch x seq in {1x128, 8x512}: median of repeated runs, eager and replayed CUDA graph.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import ecospa_fx

SHAPES = {
    "smollm2": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
    },
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
    },
    "3b": {
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
    },
}


def build(shape: str) -> torch.nn.Module:
    cfg = LlamaConfig(**SHAPES[shape], use_cache=False, max_position_embeddings=1024)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    return model.to(torch.bfloat16).eval()


@torch.no_grad()
def eager_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def graph_ms(module, ids: torch.Tensor, repeats: int) -> float:
    static = ids.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            module(static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        module(static)
    return eager_ms(graph.replay, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", nargs="+", default=["smollm2", "1b", "3b"], choices=list(SHAPES))
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16")
    print("shape     gran     bxs     params  eager dense/comp ms  speedup  graph dense/comp ms  speedup")
    for shape in args.shapes:
        model = build(shape)
        dense_params = sum(p.numel() for p in model.parameters())
        for gran in ("channel", "head"):
            for b, s in ((1, 128), (8, 512)):
                ids = torch.randint(0, 1000, (b, s), device="cuda")
                # both sides are exported graph modules, so only the widths differ
                dense = ecospa_fx.compress(model, (ids,), 0.0, verify=False)
                compressed = ecospa_fx.compress(model, (ids,), args.sparsity, granularity=gran, verify=False)
                ratio = sum(p.numel() for p in compressed.parameters()) / dense_params
                dense_e = eager_ms(lambda ids=ids, d=dense: d(ids), args.repeats)
                comp_e = eager_ms(lambda ids=ids, c=compressed: c(ids), args.repeats)
                dense_g = graph_ms(dense, ids, args.repeats)
                comp_g = graph_ms(compressed, ids, args.repeats)
                print(
                    f"{shape:8s}  {gran:7s}  {b}x{s:<4d}  {ratio:5.2f}  {dense_e:8.2f}/{comp_e:8.2f}  "
                    f"{dense_e / comp_e:6.2f}x  {dense_g:8.2f}/{comp_g:8.2f}  {dense_g / comp_g:6.2f}x",
                    flush=True,
                )
                del dense, compressed
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
