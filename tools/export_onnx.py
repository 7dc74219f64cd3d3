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
import os
import sys
import time
import warnings
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PARITY = 0, 1, 2, 3
PROG = "export_onnx"


from ecospa_fx.loading import load_model  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    head, body = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(prog=PROG, description=head, epilog=body,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--no-verify", action="store_true",
                   help="skip compress's mask-oracle check (the ONNX parity check still runs)")
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
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything local: never reach for the hub
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    import ecospa_fx
    from ecospa_fx.errors import CaptureError, EcospaError
    from ecospa_fx.export import check_writable, export_onnx, token_dynamic_shapes

    start = time.perf_counter()
    check_writable(args.out)
    if (args.model_dir / "ecospa.json").is_file():
        from ecospa_fx.artifact import load

        model, inputs, dynamic = load(args.model_dir), _artifact_inputs(args.model_dir), False
        print(f"loaded ecospa_fx artifact {args.model_dir} (captured with static shapes "
              f"{[tuple(x.shape) for x in inputs]}: the ONNX model will be static)")
    else:
        model, config = load_model(args.model_dir, args.gguf_file)
        vocab = getattr(config, "vocab_size", None)
        if not vocab:
            raise EcospaError(f"{args.model_dir}: the config has no vocab_size; this tool feeds token ids")
        generator = torch.Generator().manual_seed(0)
        inputs = (torch.randint(0, vocab, (args.batch, args.seq), generator=generator),)
        dynamic = not args.static
        print(f"loaded {type(model).__name__} from {args.model_dir} ({_count(model):,} parameters)")
        if args.sparsity > 0:
            shapes = token_dynamic_shapes(inputs) if dynamic else None
            try:
                model = ecospa_fx.compress(model, inputs, args.sparsity, granularity=args.granularity,
                                           round_to=args.round_to, dynamic_shapes=shapes,
                                           verify=not args.no_verify)
            except CaptureError as err:
                if not dynamic:
                    raise
                print(f"note: dynamic capture failed ({str(err).splitlines()[0]}); compressing with static shapes")
                dynamic = False
                model = ecospa_fx.compress(model, inputs, args.sparsity, granularity=args.granularity,
                                           round_to=args.round_to, verify=not args.no_verify)
            report = model.ecospa_report
            print(f"compressed at sparsity {args.sparsity:g} ({args.granularity}): parameters "
                  f"{report.params_before:,} -> {report.params_after:,} "
                  f"({report.params_after / report.params_before:.3f}x)"
                  + (f", max abs diff vs masked dense {report.max_abs_diff:.1e}"
                     if report.max_abs_diff is not None else ""))
    probe = []
    if dynamic:
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        seq2 = inputs[0].shape[1] + 5 if not limit else min(limit, inputs[0].shape[1] + 5)
        probe = [(torch.randint(0, int(inputs[0].max()) + 1, (inputs[0].shape[0] + 1, seq2)),)]
    result = export_onnx(model, inputs, args.out, opset=args.opset, dynamic=dynamic, atol=args.atol,
                         parity_inputs=probe)
    print(result.summary())
    print(f"max abs diff: {result.max_diff:.3e} (atol {args.atol:g}) in {time.perf_counter() - start:.1f}s")
    return EXIT_OK


def _artifact_inputs(path: Path) -> tuple:
    import json

    import torch

    plan = json.loads((path / "ecospa.json").read_text())
    vocab = (plan.get("hf_config") or {}).get("vocab_size", 2)
    generator = torch.Generator().manual_seed(0)
    out = []
    for spec in plan["inputs"]:
        dtype = getattr(torch, spec["dtype"])
        if dtype.is_floating_point:
            out.append(torch.randn(spec["shape"], generator=generator, dtype=dtype))
        else:
            out.append(torch.randint(0, vocab, spec["shape"], generator=generator, dtype=dtype))
    return tuple(out)


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    sys.exit(main())
