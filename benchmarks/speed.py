"""CPU latency, dense vs ecospa_fx-compressed, onnxruntime and eager PyTorch, side by side, in one run.

    python benchmarks/speed.py                 # full grid: batch 1/8 x seq 128/512, 25%/50%, channel/head
    python benchmarks/speed.py --quick         # batch 1, seq 128, 50% only
    python benchmarks/speed.py --seq 128 --profile   # + per-op-type onnxruntime time (where time goes)
    python benchmarks/speed.py --preset smollm2 --memory   # SmolLM2-135M shapes, LM head included

Presets: ``llama768`` (default, below) and ``smollm2`` (SmolLM2-135M's config: 30 layers, hidden 576,
9 query / 3 KV heads of 64, SwiGLU FFN 1536, vocabulary 49,152 with tied embeddings, rope theta 1e5;
random weights, so the GGUF is not needed: end-to-end timing *including the LM head*).

Model: a 12-layer, 768-wide Llama (12 heads, head_dim 64, SwiGLU FFN 2048, vocabulary 1024 so that the
LM head does not hide the decoder; random weights: timing only; ``--kv-heads`` for GQA). For each
granularity x sparsity the dense model is compressed once with dynamic batch/seq
(``token_dynamic_shapes``), exported once to ONNX (``ecospa_fx.export.export_onnx``: checker + parity),
and timed at every batch x seq of the grid. Next to it runs a *built-small* reference: the same Llama
config built at the compressed widths (fresh random weights); compressed/built-small near 1.0 means the
rewrite left no overhead (extra Gather/Slice ops) in the graph.

Timing: onnxruntime CPU sessions (``intra_op_num_threads=--threads``, sequential) and eager PyTorch
(``torch.set_num_threads(--threads)``, inference mode); the models of one batch x seq are timed round
robin (one call each per round, after warm-up) so drift hits them alike; the median is reported.
Speedup = dense median / model median. FLOPs are counted with ``torch.utils.flop_counter`` at batch 1.
"""

from __future__ import annotations

import argparse
import bisect
import json
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

import ecospa_fx
from ecospa_fx.export import DEFAULT_OPSET, export_onnx, token_dynamic_shapes

PRESETS = {
    "llama768": {
        "layers": 12,
        "hidden": 768,
        "heads": 12,
        "kv_heads": None,
        "head_dim": 64,
        "ffn": 2048,
        "vocab": 1024,
        "tie": False,
        "rope_theta": 10000.0,
    },
    "smollm2": {
        "layers": 30,
        "hidden": 576,
        "heads": 9,
        "kv_heads": 3,
        "head_dim": 64,
        "ffn": 1536,
        "vocab": 49152,
        "tie": True,
        "rope_theta": 100000.0,
    },
}


@dataclass
class Variant:
    name: str
    torch_model: torch.nn.Module
    params: int
    onnx: Path | None = None
    ops: dict[str, int] = field(default_factory=dict)
    flops: dict[int, float] = field(default_factory=dict)  # seq -> FLOPs at batch 1
    reference: Variant | None = None  # built-small counterpart of a compressed variant


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--preset", choices=sorted(PRESETS), default="llama768", help="model shape; the size flags below override it"
    )
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--kv-heads", type=int, default=None, help="KV heads (GQA); default: the preset's")
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--ffn", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument(
        "--memory",
        action="store_true",
        help="peak resident memory of each model's onnxruntime session (own process) at the largest cell",
    )
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--seq", type=int, nargs="+", default=[128, 512])
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--granularity", nargs="+", default=["channel", "head"], choices=["channel", "head"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10, help="timed calls per model and cell (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--max-seconds",
        type=float,
        default=60.0,
        help="per cell and runtime: stop adding rounds after this long (at least 3 rounds)",
    )
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument(
        "--ort-fusions",
        action="store_true",
        help="fuse RMSNorm (+ residual add) into onnxruntime contrib ops with onnxscript",
    )
    p.add_argument("--no-reference", action="store_true", help="skip the built-small reference models")
    p.add_argument(
        "--exported-dense",
        action="store_true",
        help="also time the dense model as a torch.export graph module (the pipeline's start)",
    )
    p.add_argument("--no-torch", action="store_true", help="skip eager PyTorch timing")
    p.add_argument(
        "--profile",
        action="store_true",
        help="onnxruntime per-op-type time for dense, compressed and built-small at the first cell",
    )
    p.add_argument("--workdir", type=Path, default=None, help="where the .onnx files go (default: a temp dir)")
    p.add_argument(
        "--onnx-dir",
        type=Path,
        default=None,
        help="time the .onnx files already in this directory (a --workdir of an earlier run) in "
        "onnxruntime only: no compression, export, eager timing or FLOP count",
    )
    p.add_argument("--quick", action="store_true", help="batch 1, seq 128, sparsity 0.5, 5 repeats")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.kv_heads = args.kv_heads or args.heads
    if args.quick:
        args.batch, args.seq, args.sparsity, args.repeats = [1], [128], [0.5], 5
    return args


def llama(args, *, heads=None, kv_heads=None, head_dim=None, ffn=None, seed=0) -> torch.nn.Module:
    cfg = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=ffn or args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        vocab_size=args.vocab,
        use_cache=False,
        max_position_embeddings=max(2048, *args.seq),
        tie_word_embeddings=args.tie,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
    )
    # set after validation: some transformers versions insist on hidden % heads == 0, which a model with
    # explicit head_dim and fewer heads (9 x 64 < 768) does not need
    cfg.num_attention_heads = heads or args.heads
    cfg.num_key_value_heads = kv_heads or args.kv_heads
    cfg.head_dim = head_dim or args.head_dim
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float().eval()


def widths(compressed: torch.nn.Module, granularity: str, args) -> dict | None:
    """The Llama config widths of a compressed model (layer 0), or None if layers or q/v differ."""
    params = dict(compressed.named_parameters())

    def rows(layer, name):
        return params[f"model.layers.{layer}.{name}.weight"].shape[0]

    shapes = {
        (
            rows(i, "self_attn.q_proj"),
            rows(i, "self_attn.k_proj"),
            rows(i, "self_attn.v_proj"),
            rows(i, "mlp.gate_proj"),
        )
        for i in range(args.layers)
    }
    if len(shapes) != 1:
        return None
    q, k, v, ffn = shapes.pop()
    if granularity == "head":
        heads, kv, hd = q // args.head_dim, k // args.head_dim, args.head_dim
    else:
        heads, kv, hd = args.heads, args.kv_heads, q // args.heads
    if q != heads * hd or k != kv * hd or v != kv * hd:
        return None  # q/k and v head dims differ: no single-head_dim HF config matches
    return {"heads": heads, "kv_heads": kv, "head_dim": hd, "ffn": ffn}


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.inference_mode()
def flops(model, seq: int, vocab: int) -> float:
    x = torch.randint(0, vocab, (1, seq))
    with FlopCounterMode(display=False) as counter:
        model(x)
    return float(counter.get_total_flops())


def build_variants(args, workdir: Path) -> list[Variant]:
    dense = llama(args)
    example = (torch.randint(0, args.vocab, (2, 16), generator=torch.Generator().manual_seed(0)),)
    probe = [(torch.randint(0, args.vocab, (3, 40)),)]
    variants = [Variant("dense", dense, count(dense))]
    if args.exported_dense:  # what compress starts from: the dense model as a torch.export graph module
        program = torch.export.export(dense, example, dynamic_shapes=token_dynamic_shapes(example), strict=False)
        variants.append(Variant("dense, exported graph", program.module(), count(dense)))
    for gran in args.granularity:
        for sp in args.sparsity:
            t = time.perf_counter()
            comp = ecospa_fx.compress(
                dense, example, sp, granularity=gran, dynamic_shapes=token_dynamic_shapes(example)
            )
            name = f"{gran} {sp:.0%}"
            variant = Variant(name, comp, count(comp))
            w = widths(comp, gran, args)
            print(f"# compressed {name} in {time.perf_counter() - t:.1f}s: widths {w}", flush=True)
            if w and not args.no_reference:
                small = llama(args, **w, seed=1)
                variant.reference = Variant(f"{name} built-small", small, count(small))
            variants.append(variant)
    for v in all_variants(variants):
        t = time.perf_counter()
        path = workdir / (v.name.replace(" ", "_").replace("%", "").replace(",", "") + ".onnx")
        result = export_onnx(v.torch_model, example, path, opset=args.opset, parity_inputs=probe)
        v.onnx, v.ops = path, result.op_counts
        if args.ort_fusions:
            v.onnx, v.ops, fused = fuse_for_ort(path, v.torch_model, probe[0])
            print(f"#   onnxscript fusions on {v.name}: {fused}", flush=True)
        notes = "; ".join(result.notes)
        print(
            f"# exported {v.name}: opset {result.opset}, dynamic {result.dynamic_axes}, parity "
            f"{result.max_diff:.1e}, {time.perf_counter() - t:.1f}s {notes}",
            flush=True,
        )
        v.flops = {s: flops(v.torch_model, s, args.vocab) for s in args.seq}
    return variants


def onnx_variants(folder: Path) -> list[Variant]:
    """Variants from the ``.onnx`` files of an earlier run's ``--workdir`` (dense first); parameters are the
    initializers' element counts, ops the node counts by type."""
    import onnx

    variants = []
    for path in sorted(folder.glob("*.onnx"), key=lambda p: (p.stem != "dense", p.stem)):
        model = onnx.load(str(path), load_external_data=False)
        params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
        name = path.stem.replace("_built-small", " built-small")
        name = " ".join(f"{w}%" if w.isdigit() else w for w in name.split("_"))
        v = Variant(name, None, params, path, dict(Counter(n.op_type for n in model.graph.node)))
        variants.append(v)
    return variants


def fuse_for_ort(path: Path, model, probe: tuple) -> tuple[Path, dict[str, int], dict[str, int]]:
    """onnxscript's RMSNorm and SkipRMSNorm fusions (ORT contrib ops ``SimplifiedLayerNormalization`` and
    ``SkipSimplifiedLayerNormalization``); parity rechecked at batch > 1. The rest of ``optimize_for_ort``
    is left out: its RotaryEmbedding fusion takes HF's [1, S] position_ids and fails at batch > 1 in
    onnxruntime ("position_ids dimension 0 should be of size batch_size, got 1")."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions._core import _pre_optimize
    from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
    from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization

    model_ir = _pre_optimize(ir.load(str(path)))
    counts = {
        "rms_normalization": fuse_rms_normalization(model_ir),
        "skip_rms_normalization": fuse_skip_rms_normalization(model_ir),
    }
    out = path.with_name(path.stem + "_fused.onnx")
    ir.save(model_ir, str(out))
    so = ort.SessionOptions()
    so.log_severity_level = 3  # the fusions leave unused constants that onnxruntime warns about
    session = ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": probe[0].numpy()})[0]
    with torch.inference_mode():
        want = model(*probe).logits.numpy()
    diff = float(np.abs(got - want).max())
    if diff > 1e-4:
        raise RuntimeError(f"fused {out.name} differs from PyTorch by {diff:.2e}")
    ops = dict(Counter(n.op_type for n in model_ir.graph.all_nodes()))
    return out, ops, {k: v for k, v in counts.items() if v}


def ort_session(path: Path, threads: int, profile: str | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def round_robin(calls: dict[str, callable], args) -> dict[str, float]:
    """Median ms per call, timed one call each per round after warm-up."""
    for fn in calls.values():
        for _ in range(args.warmup):
            fn()
    times: dict[str, list[float]] = defaultdict(list)
    start = time.perf_counter()
    for r in range(args.repeats):
        for name, fn in calls.items():
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) * 1e3)
        if r >= 2 and time.perf_counter() - start > args.max_seconds:
            break
    return {name: statistics.median(ts) for name, ts in times.items()}


def all_variants(variants: list[Variant]) -> list[Variant]:
    return [x for v in variants for x in (v, v.reference) if x is not None]


def time_cell(variants, sessions, batch: int, seq: int, args) -> dict[str, dict[str, float]]:
    ids = torch.randint(0, args.vocab, (batch, seq), generator=torch.Generator().manual_seed(batch * seq))
    feed = {"input_ids": ids.numpy()}
    out = {
        "ort": round_robin(
            {v.name: (lambda s=sessions[v.name]: s.run(None, feed)) for v in all_variants(variants)}, args
        )
    }
    if not args.no_torch:

        def eager(model):
            with torch.inference_mode():
                model(ids)

        out["torch"] = round_robin({v.name: (lambda m=v.torch_model: eager(m)) for v in all_variants(variants)}, args)
    return out


def profile_ops(variants, args, workdir: Path) -> None:
    """Per-op-type onnxruntime time (ms per call) for dense, each compressed model and its reference."""
    batch, seq = args.batch[0], args.seq[0]
    feed = {"input_ids": np.random.default_rng(0).integers(0, args.vocab, (batch, seq), dtype=np.int64)}
    table: dict[str, Counter] = {}
    runs = args.warmup + 7
    for v in all_variants(variants):
        session = ort_session(v.onnx, args.threads, str(workdir / f"profile_{v.onnx.stem}"))
        for _ in range(runs):
            session.run(None, feed)
        table[v.name] = _per_op_median(json.loads(Path(session.end_profiling()).read_text()), args.warmup)
    ops = sorted({op for c in table.values() for op in c}, key=lambda op: -table["dense"].get(op, 0.0))
    names = list(table)
    print(f"\nonnxruntime time per op type, ms per call (batch {batch}, seq {seq}, {args.threads} threads)\n")
    print("| op | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for op in ops:
        if max(table[n].get(op, 0.0) for n in names) >= 0.05:
            print(f"| {op} | " + " | ".join(f"{table[n].get(op, 0.0):.2f}" for n in names) + " |")
    print("| total | " + " | ".join(f"{sum(table[n].values()):.2f}" for n in names) + " |")


def _per_op_median(events: list[dict], skip: int) -> Counter:
    """Median over runs (after ``skip`` warm-up runs) of each op type's summed kernel time, in ms."""
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    per_run: list[Counter] = [Counter() for _ in starts]
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            k = bisect.bisect_right(starts, e["ts"]) - 1
            if k >= 0:
                per_run[k][e["args"]["op_name"]] += e["dur"] / 1e3
    kept = per_run[skip:] or per_run
    ops = {op for c in kept for op in c}
    return Counter({op: statistics.median(c.get(op, 0.0) for c in kept) for op in ops})


_PEAK_SCRIPT = """
import sys, numpy as np, onnxruntime as ort
path, batch, seq, vocab, threads = sys.argv[1], *map(int, sys.argv[2:])
so = ort.SessionOptions()
so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
ids = np.random.default_rng(0).integers(0, vocab, (batch, seq), dtype=np.int64)
session.run(None, {"input_ids": ids})
print(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])  # kB; ru_maxrss survives exec
"""


def peak_memory_mb(variants, batch: int, seq: int, args) -> dict[str, float]:
    """Peak resident set (MB) of a fresh process that loads each ONNX model into onnxruntime and runs it
    once at ``batch x seq`` (weights + arena + activations + the logits, plus ~40 MB of Python/ORT)."""
    import subprocess

    out = {}
    for v in all_variants(variants):
        res = subprocess.run(
            [sys.executable, "-c", _PEAK_SCRIPT, str(v.onnx), str(batch), str(seq), str(args.vocab), str(args.threads)],
            capture_output=True,
            text=True,
            check=True,
        )
        out[v.name] = int(res.stdout.split()[-1]) / 1024
    return out


def op_diffs(variants) -> None:
    """ONNX nodes by op type: every model against dense, and compressed against built-small."""
    dense = Counter(variants[0].ops)
    print(f"\nONNX graph, dense: {sum(dense.values())} nodes; extra nodes by op type vs dense / vs built-small")
    for v in variants[1:]:
        vs_dense = Counter(v.ops)
        vs_dense.subtract(dense)
        line = f"  {v.name}: vs dense {({k: n for k, n in sorted(vs_dense.items()) if n}) or 'none'}"
        if v.reference:
            extra = Counter(v.ops)
            extra.subtract(Counter(v.reference.ops))
            line += f"; vs built-small {({k: n for k, n in sorted(extra.items()) if n}) or 'none'}"
        print(line)


def report(variants, results, args) -> None:
    dense = variants[0]
    print(
        f"\n{args.preset}: {args.layers}-layer Llama, hidden {args.hidden}, {args.heads} heads ({args.kv_heads} KV), "
        f"head_dim {args.head_dim}, FFN {args.ffn}, vocab {args.vocab}; onnxruntime {ort.__version__} (opset "
        f"{args.opset}) and torch {torch.__version__} eager, {args.threads} threads, median ms\n"
    )
    cols = ["batch", "seq", "model", "params x", "FLOPs x", "ORT ms", "ORT x"]
    if not args.no_torch:
        cols += ["torch ms", "torch x"]
    cols += ["ORT vs built-small"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * 3 + "---:|" * (len(cols) - 3))
    for (batch, seq), cell in results.items():
        for v in all_variants(variants):
            flops_x = f"{dense.flops[seq] / v.flops[seq]:.2f}" if v.flops else "n/a"
            row = [
                str(batch),
                str(seq),
                v.name,
                f"{dense.params / v.params:.2f}",
                flops_x,
                f"{cell['ort'][v.name]:.1f}",
                f"{cell['ort']['dense'] / cell['ort'][v.name]:.2f}",
            ]
            if not args.no_torch:
                row += [f"{cell['torch'][v.name]:.1f}", f"{cell['torch']['dense'] / cell['torch'][v.name]:.2f}"]
            ref = v.reference
            row.append(f"{cell['ort'][ref.name] / cell['ort'][v.name]:.2f}" if ref else "")
            print("| " + " | ".join(row) + " |")
    op_diffs(variants)


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    print("# " + " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        if args.onnx_dir:
            args.no_torch = True
            variants = onnx_variants(args.onnx_dir)
        else:
            variants = build_variants(args, workdir)
        sessions = {v.name: ort_session(v.onnx, args.threads) for v in all_variants(variants)}
        results = {}
        for seq in args.seq:
            for batch in args.batch:
                t = time.perf_counter()
                results[(batch, seq)] = time_cell(variants, sessions, batch, seq, args)
                print(f"# timed batch {batch} seq {seq} in {time.perf_counter() - t:.0f}s", flush=True)
        report(variants, results, args)
        if args.memory:
            batch, seq = max(args.batch), max(args.seq)
            peaks = peak_memory_mb(variants, batch, seq, args)
            print(f"\npeak resident memory, onnxruntime, batch {batch} x seq {seq} (own process), MB:")
            for v in all_variants(variants):
                print(f"  {v.name}: {peaks[v.name]:.0f} (fp32 weights {v.params * 4 / 2**20:.0f})")
        if args.profile:
            profile_ops(variants, args, workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
