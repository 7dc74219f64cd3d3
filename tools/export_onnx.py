"""Compress a local Hugging Face model and export it to ONNX, checked by onnx.checker and onnxruntime.

    python tools/export_onnx.py MODEL_DIR --out model.onnx [--sparsity 0.5] [--granularity channel]
    python tools/export_onnx.py MODEL_DIR --gguf-file model.gguf --out model.onnx
    python tools/export_onnx.py ARTIFACT_DIR --out model.onnx    # a directory written by ecospa_fx.save

MODEL_DIR is a local directory (config.json + weights, or a GGUF file as transformers loads it); nothing is
fetched from the hub. The example inputs are random token ids of shape --batch x --seq; the model is
compressed with dynamic batch/seq (unless --static), exported with ``ecospa_fx.export.export_onnx`` and
compared with PyTorch in onnxruntime on the example inputs and, for a dynamic export, on a second shape.
Prints the max abs difference; exits 0 when it is within --atol, 3 when it is above, 1 on any other error
(one line; --debug shows the traceback), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PARITY = 0, 1, 2, 3
PROG = "export_onnx"


def build_parser() -> argparse.ArgumentParser:
    head, body = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(
        prog=PROG, description=head, epilog=body, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("model_dir", type=Path, help="local Hugging Face model directory or ecospa_fx artifact")
    p.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    p.add_argument("--gguf-file", help="GGUF file inside MODEL_DIR, loaded (dequantized to fp32) by transformers")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of each group removed (0: export dense)")
    p.add_argument("--granularity", choices=["channel", "head"], default="channel")
    p.add_argument("--round-to", type=int, default=8, help="keep counts rounded to multiples of this")
    p.add_argument("--batch", type=int, default=2, help="example batch size (>= 2 for a dynamic batch axis)")
    p.add_argument("--seq", type=int, default=16, help="example sequence length (>= 2 for a dynamic axis)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 24, falling back to 18)")
    p.add_argument("--static", action="store_true", help="export with the example's fixed batch and seq")
    p.add_argument(
        "--no-verify", action="store_true", help="skip compress's mask-oracle check (the ONNX parity check still runs)"
    )
    p.add_argument("--atol", type=float, default=1e-4, help="max abs difference allowed (default 1e-4)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch < 1 or args.seq < 1:
        parser.error("--batch and --seq must be positive")
    try:
        return run(args)
    except Exception as err:  # one line for the user, the traceback with --debug
        if args.debug:
            raise
        from ecospa_fx.errors import EcospaError

        kind = "" if isinstance(err, (EcospaError, OSError)) else f"{type(err).__name__}: "
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"{PROG}: error: {kind}{message}", file=sys.stderr)
        return EXIT_PARITY if type(err).__name__ == "ParityError" else EXIT_FAILED


def run(args) -> int:
    """Compress (when --sparsity > 0) and export with ``ecospa_fx.export_job``; print what happened."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    from ecospa_fx.export_job import ExportJob, run_export
    from ecospa_fx.loading import offline

    offline()
    start = time.perf_counter()
    job = ExportJob(
        args.model_dir,
        args.out,
        gguf_file=args.gguf_file,
        sparsity=args.sparsity,
        granularity=args.granularity,
        round_to=args.round_to,
        batch=args.batch,
        seq=args.seq,
        opset=args.opset,
        static=args.static,
        verify=not args.no_verify,
        atol=args.atol,
    )
    outcome = run_export(job, step=print)
    info = outcome.compress
    if info:
        print(
            f"compressed at sparsity {info['sparsity']:g} ({info['granularity']}): parameters "
            f"{info['params_before']:,} -> {info['params_after']:,} "
            f"({info['params_after'] / info['params_before']:.3f}x)"
        )
    for note in outcome.notes:
        print(f"note: {note}")
    print(outcome.result.summary())
    print(f"max abs diff: {outcome.result.max_diff:.3e} (atol {args.atol:g}) in {time.perf_counter() - start:.1f}s")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
