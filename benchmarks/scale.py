"""Discovery at scale without weights: Llama-3-8B / 70B, Mixtral-8x7B, Qwen2-72B shapes on the meta device.

    python benchmarks/scale.py --shapes llama3-8b llama3-70b

Builds each model from a transformers config under ``torch.device("meta")`` (no weights, no memory),
runs ``ecospa_fx.discover`` and prints wall time, peak RSS and group counts. Each shape runs in its own
process so peak RSS is per shape.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

SHAPES = {
    "llama3-8b": ("LlamaConfig", {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                                  "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256}),
    "llama3-70b": ("LlamaConfig", {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                                   "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256}),
    "qwen2-72b": ("Qwen2Config", {"hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
                                  "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 152064}),
    "mixtral-8x7b": ("MixtralConfig", {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                                       "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
                                       "num_local_experts": 8}),
}
MODELS = {"LlamaConfig": "LlamaForCausalLM", "Qwen2Config": "Qwen2ForCausalLM",
          "MixtralConfig": "MixtralForCausalLM"}


def measure(shape: str, layers: int | None) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import transformers

    import ecospa_fx

    cfg_name, kwargs = SHAPES[shape]
    if layers:
        kwargs = {**kwargs, "num_hidden_layers": layers}
    config = getattr(transformers, cfg_name)(**kwargs, use_cache=False)
    if cfg_name == "MixtralConfig":
        config._experts_implementation = "batched_mm"
    start = time.perf_counter()
    with torch.device("meta"):
        model = getattr(transformers, MODELS[cfg_name])(config).eval()
    ids = torch.zeros(1, 16, dtype=torch.long, device="meta")
    report = ecospa_fx.discover(model, (ids,))
    seconds = time.perf_counter() - start
    return {"shape": shape, "layers": kwargs["num_hidden_layers"], "seconds": round(seconds, 1),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "groups": {k: report.count(k) for k in ("qk", "vo", "ffn")}, "skipped": len(report.skipped)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", nargs="+", default=["llama3-8b", "llama3-70b"], choices=list(SHAPES))
    parser.add_argument("--layers", type=int, nargs="*", default=[None], help="override layer counts")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        shape, layers = args.one.split(":")
        print(json.dumps(measure(shape, int(layers) if layers else None)))
        return
    for shape in args.shapes:
        for layers in args.layers:
            out = subprocess.run([sys.executable, __file__, "--one", f"{shape}:{layers or ''}"],
                                 capture_output=True, text=True, check=False)
            print(out.stdout.strip() or out.stderr.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
