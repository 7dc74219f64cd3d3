"""The ``ecospa-fx`` command line: ``demo`` (the main job), ``inspect`` (groups of a local model)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ecospa_fx.errors import EcospaError

EXIT_OK, EXIT_USAGE, EXIT_FAILED = 0, 2, 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ecospa-fx", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compress the packaged all-MiniLM-L6-v2, export to ONNX, measure")
    demo.add_argument("--sparsity", type=float, nargs="+", default=[0.25, 0.5])
    demo.add_argument("--batch", type=int, default=8)
    demo.add_argument("--seq", type=int, default=128)
    demo.add_argument("--repeats", type=int, default=10)
    demo.add_argument("--json", action="store_true", help="print results as JSON")
    inspect = sub.add_parser("inspect", help="show the coupled groups of a local Hugging Face model")
    _model_args(inspect)
    comp = sub.add_parser("compress", help="compress a local Hugging Face model and save the artifact")
    _model_args(comp)
    comp.add_argument("--sparsity", type=float, default=0.5, help="fraction of each group removed")
    comp.add_argument("--out", type=Path, required=True, help="artifact directory to write")
    comp.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", type=Path, help="local Hugging Face model directory (no hub access)")
    p.add_argument("--gguf-file", help="GGUF file inside model_dir, loaded as transformers does")
    p.add_argument("--seq", type=int, default=16, help="example sequence length")
    p.add_argument("--batch", type=int, default=1, help="example batch size")
    p.add_argument("--granularity", choices=["channel", "head"], default="channel")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=False)
    try:
        if args.command == "demo":
            return _demo(args, console)
        if args.command == "inspect":
            return _inspect(args, console)
        if args.command == "compress":
            return _compress(args, console)
    except (EcospaError, OSError, ValueError) as err:
        if args.debug:
            raise
        print(f"ecospa-fx: error: {err}".splitlines()[0], file=sys.stderr)
        return EXIT_FAILED
    return EXIT_USAGE


def _demo(args, console: Console) -> int:
    from ecospa_fx.demo import run_demo

    with console.status("loading all-MiniLM-L6-v2") as status:
        rows = run_demo(
            args.sparsity, args.batch, args.seq, args.repeats, progress=lambda m: status.update(m)
        )
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=2))
        return EXIT_OK
    dense = rows[0]
    table = Table(title=f"all-MiniLM-L6-v2, batch {args.batch} x seq {args.seq}, 2 CPU threads")
    for col in (
        "model",
        "params",
        "cosine vs dense",
        "top-1 agree",
        "ORT ms",
        "ORT speedup",
        "torch ms",
        "torch speedup",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r.name,
            f"{r.params / 1e6:.2f}M",
            f"{r.cosine:.4f}",
            f"{r.top1:.3f}",
            f"{r.ort_ms:.1f}",
            f"{dense.ort_ms / r.ort_ms:.2f}x",
            f"{r.torch_ms:.1f}",
            f"{dense.torch_ms / r.torch_ms:.2f}x",
        )
    console.print(table)
    return EXIT_OK


def load_local_model(model_dir: Path, gguf_file: str | None = None):
    """The model and its config (see ``ecospa_fx.loading.load_model``)."""
    from ecospa_fx.loading import load_model

    return load_model(model_dir, gguf_file)


def _example_ids(config, batch: int, seq: int):
    import torch

    generator = torch.Generator().manual_seed(0)
    return (torch.randint(0, getattr(config, "vocab_size", 100), (batch, seq), generator=generator),)


def _inspect(args, console: Console) -> int:
    import ecospa_fx

    model, config = load_local_model(args.model_dir, args.gguf_file)
    report = ecospa_fx.discover(model, _example_ids(config, args.batch, args.seq), granularity=args.granularity)
    console.print(report.summary(), markup=False, highlight=False)
    return EXIT_OK


def _compress(args, console: Console) -> int:
    import ecospa_fx
    from ecospa_fx.figure import write_figure

    model, config = load_local_model(args.model_dir, args.gguf_file)
    with console.status(f"compressing {args.model_dir.name} at sparsity {args.sparsity}"):
        compressed = ecospa_fx.compress(model, _example_ids(config, args.batch, args.seq), args.sparsity,
                                        granularity=args.granularity)
    out = ecospa_fx.save(compressed, args.out)
    figure = write_figure(compressed.ecospa_report, out / "report.html", title=args.model_dir.name)
    report = compressed.ecospa_report
    if args.json:
        print(json.dumps({"artifact": str(out), "figure": str(figure), "params_before": report.params_before,
                          "params_after": report.params_after, "max_abs_diff": report.max_abs_diff,
                          "groups": {k: report.count(k) for k in ("qk", "vo", "ffn", "head")}}))
    else:
        console.print(report.summary(), markup=False, highlight=False)
        console.print(f"artifact: {out}  figure: {figure}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
