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
    inspect.add_argument("model_dir", type=Path)
    inspect.add_argument("--seq", type=int, default=16)
    inspect.add_argument("--granularity", choices=["channel", "head"], default="channel")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=False)
    try:
        if args.command == "demo":
            return _demo(args, console)
        if args.command == "inspect":
            return _inspect(args, console)
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


def _inspect(args, console: Console) -> int:
    import torch
    from transformers import AutoConfig, AutoModel

    import ecospa_fx

    if not args.model_dir.is_dir():
        raise EcospaError(f"{args.model_dir} is not a directory: pass a local Hugging Face model directory")
    if not (args.model_dir / "config.json").exists():
        raise EcospaError(f"{args.model_dir} has no config.json: not a Hugging Face model directory")
    config = AutoConfig.from_pretrained(args.model_dir)
    if hasattr(config, "use_cache"):
        config.use_cache = False
    model = AutoModel.from_pretrained(args.model_dir, config=config).eval()
    ids = torch.randint(0, getattr(config, "vocab_size", 100), (1, args.seq))
    console.print(ecospa_fx.discover(model, (ids,), granularity=args.granularity).summary())
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
