"""Discovery and planning at scale without weights: Llama-3-8B / 70B, Mixtral-8x7B, Qwen2-72B shapes on meta.

    PYTHONPATH=. .venv/bin/python benchmarks/scale.py --shapes llama3-8b llama3-70b mixtral-8x7b qwen2-72b
    PYTHONPATH=. .venv/bin/python benchmarks/scale.py --shapes llama3-70b --layers 8 16 32 48 80
    PYTHONPATH=. .venv/bin/python benchmarks/scale.py --shapes llama3-70b --layers 8 --width 1024 2048 4096 8192

Builds each model from a transformers config under ``torch.device("meta")`` (no weights, no memory), then
runs what ``ecospa_fx.streaming.plan_compression`` runs, stage by stage: capture (torch.export), analyse
(axis labels and ties), groups, plan (data-free magnitude at 50% removed: on meta every unit scores the same,
so this times the planning machinery, not a ranking; uniform per-group ratio, GQA families, rotary pairs),
reconcile (rewritability preflight) and the parameter slices. Prints wall time (total and per stage),
CPU time of the process (user + system: the figure to compare on a shared machine), peak RSS and group
counts. Each configuration runs in its own process so peak RSS is per configuration. ``--width`` sets
hidden size (heads keep head_dim 128, FFN keeps the shape's FFN/hidden ratio).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

SHAPES = {
    "llama3-8b": (
        "LlamaConfig",
        {
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "vocab_size": 128256,
        },
    ),
    "llama3-70b": (
        "LlamaConfig",
        {
            "hidden_size": 8192,
            "intermediate_size": 28672,
            "num_hidden_layers": 80,
            "num_attention_heads": 64,
            "num_key_value_heads": 8,
            "vocab_size": 128256,
        },
    ),
    "qwen2-72b": (
        "Qwen2Config",
        {
            "hidden_size": 8192,
            "intermediate_size": 29568,
            "num_hidden_layers": 80,
            "num_attention_heads": 64,
            "num_key_value_heads": 8,
            "vocab_size": 152064,
        },
    ),
    "mixtral-8x7b": (
        "MixtralConfig",
        {
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "vocab_size": 32000,
            "num_local_experts": 8,
        },
    ),
}
MODELS = {"LlamaConfig": "LlamaForCausalLM", "Qwen2Config": "Qwen2ForCausalLM", "MixtralConfig": "MixtralForCausalLM"}


def measure(shape: str, layers: int | None, width: int | None = None) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import transformers

    from ecospa_fx.api import _capture, _plan, _reconcile
    from ecospa_fx.config import CompressConfig
    from passes.dataflow import analyse
    from passes.groups import build_groups
    from passes.rewrite import parameter_plan

    cfg_name, kwargs = SHAPES[shape]
    if layers:
        kwargs = {**kwargs, "num_hidden_layers": layers}
    if width:
        ratio = kwargs["intermediate_size"] / kwargs["hidden_size"]
        kwargs = {
            **kwargs,
            "hidden_size": width,
            "intermediate_size": int(width * ratio) // 128 * 128,
            "num_attention_heads": width // 128,
            "num_key_value_heads": min(8, width // 128),
        }
    config = getattr(transformers, cfg_name)(**kwargs, use_cache=False)
    if cfg_name == "MixtralConfig":
        config._experts_implementation = "batched_mm"
    times = {}
    start = last = time.perf_counter()
    cpu = time.process_time()

    def lap(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        times[name] = round(now - last, 1)
        last = now

    with torch.device("meta"):
        model = getattr(transformers, MODELS[cfg_name])(config).eval()
    ids = torch.zeros(1, 16, dtype=torch.long, device="meta")
    gm = _capture(model, (ids,), None)
    lap("capture")
    analysis = analyse(gm)
    lap("analyse")
    groups = build_groups(analysis.facts, "channel")
    lap("build_groups")
    config = CompressConfig(sparsity=0.5, importance="magnitude", verify=False)
    keep, report = _plan(groups, analysis.facts, dict(gm.named_parameters(remove_duplicate=False)), config)
    lap("plan")
    keep = _reconcile(groups, analysis, keep, report)
    slices = parameter_plan(analysis.facts, keep)
    lap("reconcile+slices")
    return {
        "shape": shape,
        "layers": kwargs["num_hidden_layers"],
        "hidden": kwargs["hidden_size"],
        "seconds": round(time.perf_counter() - start, 1),
        "cpu_seconds": round(time.process_time() - cpu, 1),
        **times,
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "channels_m": round(analysis.facts.n_channels / 1e6, 1),
        "nodes": len(gm.graph.nodes),
        "groups": {k: report.count(k) for k in ("qk", "vo", "ffn")},
        "skipped": len(report.skipped),
        "sliced_params": len(slices),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["llama3-8b", "llama3-70b"], choices=list(SHAPES))
    parser.add_argument("--layers", type=int, nargs="*", default=[None], help="override layer counts")
    parser.add_argument("--width", type=int, nargs="*", default=[None], help="override hidden size")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        shape, layers, width = args.one.split(":")
        print(json.dumps(measure(shape, int(layers) if layers else None, int(width) if width else None)))
        return
    for shape in args.shapes:
        for layers in args.layers:
            for width in args.width:
                spec = f"{shape}:{layers or ''}:{width or ''}"
                out = subprocess.run(
                    [sys.executable, __file__, "--one", spec], capture_output=True, text=True, check=False
                )
                print(out.stdout.strip() or out.stderr.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
