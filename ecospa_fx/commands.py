"""The subcommands of ``ecospa-fx`` (argument parsing and exit codes are in ``ecospa_fx.cli``)."""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from ecospa_fx.cli_ui import Ui
from ecospa_fx.errors import EcospaWarning, InputError
from ecospa_fx.loading import load_source, load_tokenizer, offline
from ecospa_fx.report import KINDS

HF_HINT = " (--granularity head or --kinds ffn often give one: see README, Command line)"


def run_demo(args: argparse.Namespace, ui: Ui) -> int:
    from ecospa_fx.demo import run_demo as demo

    with ui.stage("loading all-MiniLM-L6-v2") as update:
        rows = demo(args.sparsity, args.batch, args.seq, args.repeats, progress=update)
    dense = rows[0]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    table = Table(
        title=f"all-MiniLM-L6-v2, batch {args.batch} x seq {args.seq}, 2 CPU threads, "
        f"models timed round robin, load average {load:.1f}"
    )
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
    ui.show(table)
    last = rows[-1]
    ui.result(
        f"{last.name}: {last.params / 1e6:.2f}M parameters, cosine {last.cosine:.3f}, onnxruntime "
        f"{dense.ort_ms / last.ort_ms:.2f}x faster",
        {"rows": [r.__dict__ for r in rows], "load_average": load},
    )
    return 0


def run_demo_llm(args: argparse.Namespace, ui: Ui) -> int:
    from ecospa_fx.generation.demo import PROMPT, run_llm_demo

    if not 0 < args.sparsity < 1 or args.max_new_tokens < 2 or args.rounds < 1:
        raise InputError("--sparsity must be in (0, 1), --max-new-tokens >= 2 and --rounds >= 1")
    prompt = args.prompt or PROMPT
    with ui.stage("loading SmolLM2") as update:
        rows = run_llm_demo(
            args.sparsity, prompt, args.max_new_tokens, args.calibration_tokens, args.rounds, progress=update
        )
    dense = rows[0]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    ui.note(f"prompt: {prompt}")
    for r in rows:
        ui.show_text(f"{r.name}, {r.params / 1e6:.1f}M parameters", r.text)
    table = Table(title=f"SmolLM2-135M greedy decode, batch 1, 2 threads, round robin, load average {load:.1f}")
    for col in ("model", "params", "torch tok/s", "ORT tok/s", "ORT speedup", "ORT prefill ms", "ONNX MB"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r.name,
            f"{r.params / 1e6:.1f}M",
            f"{r.torch_tokens_per_s:.1f}",
            f"{r.ort_tokens_per_s:.1f}",
            f"{r.ort_tokens_per_s / dense.ort_tokens_per_s:.2f}x",
            f"{r.ort_prefill_ms:.0f}",
            f"{r.onnx_mb:.0f}",
        )
    ui.show(table)
    last = rows[-1]
    ui.result(
        f"{last.name}: {last.params / 1e6:.1f}M parameters, onnxruntime decode "
        f"{last.ort_tokens_per_s / dense.ort_tokens_per_s:.2f}x the dense model's tokens/s",
        {"prompt": prompt, "rows": [r.__dict__ for r in rows], "load_average": load},
    )
    return 0


def example_ids(config, batch: int, seq: int) -> tuple[torch.Tensor]:
    """Random token ids ``[batch, seq]`` (seeded) in the config's vocabulary."""
    if batch < 1 or seq < 1:
        raise InputError(f"--batch and --seq must be positive, got {batch} and {seq}")
    generator = torch.Generator().manual_seed(0)
    return (torch.randint(0, getattr(config, "vocab_size", None) or 100, (batch, seq), generator=generator),)


def run_inspect(args: argparse.Namespace, ui: Ui) -> int:
    import ecospa_fx
    from ecospa_fx.loading import check_model_path, is_artifact, load_model

    offline()
    check_model_path(args.model, args.gguf_file)
    if is_artifact(args.model):
        return _inspect_artifact(args, ui)
    with ui.stage(f"loading {args.model}"):
        model, config = load_model(args.model, args.gguf_file)
    inputs = example_ids(config, args.batch, args.seq)
    with ui.stage("discovering coupled groups"):
        report = ecospa_fx.discover(model, inputs, granularity=args.granularity)
    ui.show(report.summary())
    counts = ", ".join(f"{k} {report.count(k)}" for k in KINDS if report.count(k))
    ui.result(
        f"{len(report.groups)} coupled groups ({counts or 'none'}), {len(report.skipped)} left dense, "
        f"{report.params_before:,} parameters",
        report.to_dict(),
    )
    return 0


def _inspect_artifact(args: argparse.Namespace, ui: Ui) -> int:
    """What a saved artifact removed, per parameter dimension, and whether it has a transformers copy."""
    from ecospa_fx.artifact import check_artifact, hf_export_info
    from ecospa_fx.loading import artifact_plan

    plan = artifact_plan(args.model)
    with warnings.catch_warnings():  # no checksums: said below, as a note
        warnings.simplefilter("ignore", EcospaWarning)
        checked = check_artifact(args.model)
    table = Table(title=f"{args.model}: {plan.get('granularity')} granularity, sparsity {plan.get('sparsity')}")
    for col in ("parameter", "dim", "removed"):
        table.add_column(col)
    for name, dim, idx in plan.get("removed", []):
        table.add_row(name, str(dim), str(len(idx)))
    ui.show(table)
    hf = hf_export_info(args.model)
    ui.note(
        f"transformers copy: {args.model / hf['written']}"
        if hf["written"]
        else f"no transformers config: {hf['reason']}"
    )
    ui.note(
        "weights: sha256 verified"
        if checked["checksums"] == "verified"
        else "weights: not verified (no checksums recorded: written before ecospa_fx recorded them)"
    )
    source = (plan.get("source") or {}).get("path") or plan.get("hf_class") or "a plain module"
    ui.result(
        f"artifact of {source}: channels removed from {len(plan.get('removed', []))} parameter dimensions",
        {
            "artifact": str(args.model),
            "granularity": plan.get("granularity"),
            "sparsity": plan.get("sparsity"),
            "removed": {f"{n}[{d}]": len(i) for n, d, i in plan.get("removed", [])},
            "hf_export": hf,
            "source": plan.get("source"),
            "checksums": checked["checksums"],
        },
    )
    return 0


def run_compress(args: argparse.Namespace, ui: Ui) -> int:
    import ecospa_fx

    offline()
    from ecospa_fx.loading import load_model

    check_out_dir(args.out)
    with ui.stage(f"loading {args.model}"):
        model, config = load_model(args.model, args.gguf_file)
    tokenizer = _tokenizer_or_none(args.model, args.gguf_file)
    example, calibration, loss_fn = _compress_inputs(args, config, tokenizer, type(model).__name__)
    tokens = _calibration_tokens(calibration)
    scores = args.importance if args.importance != "auto" else "fisher" if loss_fn else "activation"
    what = f"compressing at sparsity {args.sparsity:g} ({scores if calibration else args.importance} scores"
    what += f" on {len(calibration)} calibration batches, {tokens:,} tokens)" if calibration else ")"
    stages = ": calibration batches, then refit weights"
    meter = ui.bar(what + stages) if calibration else ui.stage(what + ": capture, score, rewrite")
    with meter as update:
        compressed = ecospa_fx.compress(
            model,
            example,
            args.sparsity,
            granularity=args.granularity,
            kinds=tuple(args.kinds),
            importance=args.importance,
            round_to=args.round_to,
            calibration=calibration,
            loss_fn=loss_fn,
            progress=update if calibration else None,
        )
    with ui.stage(f"writing {args.out}"):
        out, figures, hf = _write_artifact(compressed, args, tokenizer)
    report = compressed.ecospa_report
    ui.show(report.summary())
    ui.note(f"figure: {figures[0]}  {figures[1]}")
    hf_line = (
        f"transformers copy: {out / hf['written']} (config changes {hf['config_changes']})"
        if hf["written"]
        else f"no transformers config: {hf['reason']}" + (HF_HINT if compressed.ecospa_source.get("hf_class") else "")
    )
    ui.note(hf_line)
    ratio = report.params_after / max(report.params_before, 1)
    ui.result(
        f"wrote {out}: parameters {report.params_before:,} -> {report.params_after:,} ({ratio:.3f}x)",
        {
            "artifact": str(out),
            "figure": str(figures[0]),
            "figure_png": str(figures[1]),
            "hf_export": hf,
            "params_before": report.params_before,
            "params_after": report.params_after,
            "max_abs_diff": report.max_abs_diff,
            "groups": {k: report.count(k) for k in KINDS},
            "skipped": len(report.skipped),
            "calibration_tokens": tokens,
        },
    )
    return 0


FEW_CALIBRATION_TOKENS = 1024


def _calibration_tokens(calibration) -> int:
    """How many tokens the calibration batches hold; a warning when they are few. Measured (issue 15):
    SmolLM2 at 30% on held-out Python docs reached 3.9x the dense perplexity with 64 calibration tokens
    (this command's old default) and 2.3x with 2,048."""
    if not calibration:
        return 0
    tokens = sum(int(batch[0].numel()) for batch in calibration)
    if tokens < FEW_CALIBRATION_TOKENS:
        warnings.warn(
            f"calibration used only {tokens:,} tokens; activation scores from so few are noisy (64 tokens gave "
            "3.9x the dense perplexity at 30% where 2,048 gave 2.3x): raise --calibration-batches, --batch or "
            "--seq to reach 2,048 or more",
            EcospaWarning,
            stacklevel=2,
        )
    return tokens


def check_out_dir(out: Path) -> None:
    """Refuse an ``--out`` that cannot become the artifact directory before any work is done: an existing
    file, or a path under one."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file: give a directory for the artifact (it is created if missing)")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise InputError(f"--out {out}: {parent} is a file, so the artifact directory cannot be created there")


def _tokenizer_or_none(path: Path, gguf_file: str | None):
    try:
        return load_tokenizer(path, gguf_file)
    except InputError:
        return None


def _compress_inputs(args: argparse.Namespace, config, tokenizer, class_name: str) -> tuple[tuple, list | None, Any]:
    """Example inputs, calibration batches (from --calibration) and the Fisher loss (next-token cross entropy,
    for --importance fisher, and for "auto" on a causal LM: Fisher scores with global allocation are the best
    measured, benchmarks/README "Quality")."""
    needs = args.importance in ("activation", "fisher")
    if needs and args.calibration is None:
        raise InputError(
            f"--importance {args.importance} needs --calibration TEXT (a UTF-8 text file to score channels on)"
        )
    if args.calibration is None:
        return example_ids(config, args.batch, args.seq), None, None
    if tokenizer is None:
        raise InputError(f"{args.model} has no tokenizer to read --calibration with; add tokenizer files to it")
    from ecospa_fx.evaluate import CALIBRATION_FLAGS, Protocol, read_tokens

    if args.seq < 2 or args.batch < 1:
        raise InputError(f"--calibration needs --seq 2 or more and --batch 1 or more, got {args.seq} and {args.batch}")
    n = max(args.calibration_batches, 1) * args.batch * args.seq
    protocol = Protocol(seq_len=args.seq, max_tokens=n)
    ids = read_tokens(args.calibration, tokenizer, protocol, CALIBRATION_FLAGS)
    rows = ids[: len(ids) // args.seq * args.seq].view(-1, args.seq)
    batches = [(rows[k : k + args.batch],) for k in range(0, len(rows) - args.batch + 1, args.batch)]
    if not batches:
        raise InputError(f"{args.calibration} is too short for one batch of {args.batch} x {args.seq} tokens")
    causal = _metric("auto", class_name) == "perplexity"
    from ecospa_fx.evaluate import next_token_loss

    loss_fn = next_token_loss if args.importance == "fisher" or (args.importance == "auto" and causal) else None
    return batches[0], batches, loss_fn


def _write_artifact(compressed, args: argparse.Namespace, tokenizer) -> tuple[Path, tuple[Path, Path], dict]:
    import ecospa_fx
    from ecospa_fx.artifact import annotate, hf_export_info
    from ecospa_fx.figure import write_figures

    out = ecospa_fx.save(compressed, args.out, hf=not args.no_hf)
    annotate(out, source={"path": str(args.model.resolve()), "gguf_file": args.gguf_file})
    hf = hf_export_info(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
        if hf["written"]:
            tokenizer.save_pretrained(str(out / hf["written"]))
    figures = write_figures(compressed.ecospa_report, out, title=args.model.name)
    return out, figures, hf


def run_export(args: argparse.Namespace, ui: Ui) -> int:
    from ecospa_fx.export_job import ExportJob
    from ecospa_fx.export_job import run_export as export

    offline()
    job = ExportJob(
        args.model,
        args.out,
        gguf_file=args.gguf_file,
        sparsity=args.sparsity,
        granularity=args.granularity,
        batch=args.batch,
        seq=args.seq,
        opset=args.opset,
        static=args.static,
        atol=args.atol,
        kv=args.kv,
        int8=args.int8,
        genai=args.genai,
    )
    if (args.int8 or args.genai) and not args.kv:
        raise InputError("--int8 and --genai apply to --kv exports (a causal LM for generation); add --kv")
    if args.kv:
        return _run_kv_export(job, args, ui)
    with ui.stage(f"loading {args.model}") as update:
        outcome = export(job, step=update)
    result = outcome.result
    for note in outcome.notes:
        ui.note(f"note: {note}")
    if outcome.compress:
        c = outcome.compress
        ui.note(f"compressed at sparsity {c['sparsity']:g}: parameters {c['params_before']:,} -> {c['params_after']:,}")
    ui.show(result.summary())
    ui.result(
        f"wrote {result.path}: onnxruntime vs PyTorch max abs diff {result.max_diff:.2e} (atol {outcome.atol:.2g})",
        {
            "onnx": str(result.path),
            "opset": result.opset,
            "dynamic_axes": result.dynamic_axes,
            "max_abs_diff": result.max_abs_diff,
            "atol": outcome.atol,
            "params": outcome.params,
            "notes": [*outcome.notes, *result.notes],
            "compress": outcome.compress,
        },
    )
    return 0


def _run_kv_export(job, args: argparse.Namespace, ui: Ui) -> int:
    from ecospa_fx.export_job import run_kv_export

    with ui.stage(f"loading {args.model}") as update:
        outcome = run_kv_export(job, step=update)
    if outcome.compress:
        c = outcome.compress
        ui.note(f"compressed at sparsity {c['sparsity']:g}: parameters {c['params_before']:,} -> {c['params_after']:,}")
    ui.note(f"KV cache (kv_heads, head_dim) per layer: {outcome.layout['shapes'][::2]}")
    if outcome.int8:
        ui.note(
            f"int8: {outcome.int8['path']} ({outcome.int8['bytes'] / 1e6:.1f} MB), top-1 agreement with fp32 "
            f"{outcome.int8['top1_agreement']:.3f} on 8 fixed prompts"
        )
    if outcome.genai:
        ui.note(f"onnxruntime-genai folder: {outcome.genai}")
    diffs = ", ".join(f"{k} {v:.2e}" for k, v in outcome.max_abs_diff.items())
    ui.result(
        f"wrote {outcome.path}: onnxruntime vs PyTorch on prefill and decode, max abs diff {diffs}",
        {
            "onnx": str(outcome.path),
            "opset": outcome.opset,
            "max_abs_diff": outcome.max_abs_diff,
            "params": outcome.params,
            "kv": outcome.layout,
            "int8": outcome.int8,
            "genai": outcome.genai,
            "compress": outcome.compress,
        },
    )
    return 0


def run_eval(args: argparse.Namespace, ui: Ui) -> int:
    from ecospa_fx.evaluate import Protocol, read_tokens
    from ecospa_fx.loading import artifact_config, artifact_plan, is_artifact

    offline()
    if not args.text.is_file():
        raise InputError(f"{args.text} is not a file: --text takes a UTF-8 text file")
    protocol = Protocol(seq_len=args.seq_len, stride=args.stride, max_tokens=args.max_tokens, batch=args.batch)
    artifact = is_artifact(args.model)
    plan = artifact_plan(args.model) if artifact else {}
    config = artifact_config(args.model) if artifact else None
    metric = _metric(args.metric, plan.get("hf_class") or "")
    batch = 1 if metric == "perplexity" else protocol.batch
    with ui.stage(f"loading {args.model}"):
        source = load_source(args.model, args.gguf_file, example_ids(config, batch, protocol.seq_len))
    metric = metric if artifact else _metric(args.metric, type(source.model).__name__)
    _check_positions(source.config, protocol)
    reference = args.reference or _recorded_source(plan)
    tokenizer = load_tokenizer(
        args.tokenizer or args.model, None if args.tokenizer else args.gguf_file, fallback=reference
    )
    ids = read_tokens(args.text, tokenizer, protocol)
    if metric == "perplexity":
        dense = _load_reference(args.reference, plan) if args.reference else None
        return _eval_perplexity(args, ui, source.model, dense, ids, protocol)
    if reference is None:
        raise InputError("fidelity compares with the dense model: pass --reference DENSE_MODEL_DIR")
    return _eval_fidelity(args, ui, source.model, _load_reference(reference, plan), reference, ids, protocol)


def _metric(asked: str, class_name: str) -> str:
    """perplexity for causal LMs (``*ForCausalLM``, ``*LMHeadModel``), fidelity for the rest."""
    if asked != "auto":
        return asked
    return "perplexity" if class_name.endswith(("ForCausalLM", "LMHeadModel")) else "fidelity"


def _check_positions(config, protocol) -> None:
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit and protocol.seq_len > limit:
        raise InputError(f"--seq-len {protocol.seq_len} exceeds the model's {limit} positions: pass --seq-len {limit}")


def _load_reference(reference: Path, plan: dict):
    """The dense reference model: its GGUF file as recorded by ``compress``, or the only ``*.gguf`` of a
    directory without config.json."""
    recorded = plan.get("source") or {}
    gguf = recorded.get("gguf_file") if recorded.get("path") == str(reference.resolve()) else None
    if gguf is None and reference.is_dir() and not (reference / "config.json").is_file():
        found = sorted(p.name for p in reference.glob("*.gguf"))
        gguf = found[0] if len(found) == 1 else None
    return load_source(reference, gguf).model


def _recorded_source(plan: dict) -> Path | None:
    path = (plan.get("source") or {}).get("path")
    return Path(path) if path and Path(path).is_dir() else None


def _eval_perplexity(args, ui: Ui, model, dense, ids: torch.Tensor, protocol) -> int:
    from ecospa_fx.evaluate import as_dict, perplexity

    models = [(str(args.model), model)]
    if dense is not None:
        models.append((str(args.reference), dense))
    results = {}
    for name, m in models:
        with ui.bar(f"perplexity of {Path(name).name}") as advance:
            results[name] = perplexity(m, ids, protocol, advance)
    table = Table(title=f"perplexity on {args.text.name}: windows of {protocol.seq_len}, stride {protocol.step}")
    for col in ("model", "perplexity", "tokens scored", "windows"):
        table.add_column(col, justify="right")
    for name, r in results.items():
        table.add_row(name, f"{r.perplexity:.3f}", str(r.tokens_scored), str(r.windows))
    ui.show(table)
    main = results[str(args.model)]
    line = f"perplexity {main.perplexity:.3f} over {main.tokens_scored} tokens"
    if args.reference:
        line += f" (reference {results[str(args.reference)].perplexity:.3f})"
    ui.result(
        line,
        {"metric": "perplexity", "protocol": protocol.__dict__, "results": {k: as_dict(v) for k, v in results.items()}},
    )
    return 0


def _eval_fidelity(args, ui: Ui, model, dense, reference: Path, ids: torch.Tensor, protocol) -> int:
    from ecospa_fx.evaluate import as_dict, chunks, embeddings, fidelity

    data = chunks(ids, protocol)
    with ui.bar(f"embedding {len(data)} chunks") as advance:
        ours = embeddings(model, data, protocol.batch, advance)
    with ui.bar("embedding with the reference") as advance:
        theirs = embeddings(dense, data, protocol.batch, advance)
    result = fidelity(ours, theirs)
    table = Table(
        title=f"embedding fidelity on {args.text.name} vs {reference}: {result.chunks} chunks of "
        f"{protocol.seq_len} tokens"
    )
    for col in ("cosine mean", "cosine min", "top-1 agreement"):
        table.add_column(col, justify="right")
    table.add_row(f"{result.cosine_mean:.4f}", f"{result.cosine_min:.4f}", f"{result.top1_agreement:.3f}")
    ui.show(table)
    ui.result(
        f"cosine {result.cosine_mean:.4f} (min {result.cosine_min:.4f}), top-1 agreement "
        f"{result.top1_agreement:.3f} over {result.chunks} chunks",
        {"metric": "fidelity", "reference": str(reference), "protocol": protocol.__dict__, "result": as_dict(result)},
    )
    return 0


def run_generate(args: argparse.Namespace, ui: Ui) -> int:
    from ecospa_fx.generation.decode import load_stepper
    from ecospa_fx.generation.job import open_source, param_count, prompt_ids, run_one

    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if not 0 <= args.sparsity < 1:
        raise InputError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    with ui.stage(f"opening {args.model}") as update:
        source = open_source(args, update)
    ids = prompt_ids(source, args.prompt, args.max_new_tokens, args.chat)
    runs = []
    if source.dense is not None:
        runs.append((load_stepper(source.dense), f"{args.model.name} (dense)", param_count(source.dense)))
    runs.append((source.stepper, source.label, source.params))
    outputs = []
    for stepper, label, params in runs:
        stream = ui.stream_start(label) if ui.streaming else None
        outputs.append(run_one(stepper, source.tokenizer, ids, args, label, params, stream))
        if stream:
            ui.stream_end()
        else:
            ui.show_text(label, outputs[-1].text)
        if len(runs) > 1:
            ui.note(_speed_line(outputs[-1]))
    line = _speed_line(outputs[0]) if len(outputs) == 1 else _speedup_line(outputs[0], outputs[-1])
    ui.result(line, {"prompt": args.prompt, "outputs": [o.to_json() for o in outputs]})
    return 0


def _speed_line(g) -> str:
    s = g.stats
    size = f", {g.params / 1e6:.1f}M parameters" if g.params else ""
    return (
        f"{g.label}: {s.prompt_tokens} prompt tokens, prefill {s.prefill_s * 1e3:.1f} ms, "
        f"{s.new_tokens} new tokens at {s.decode_tokens_per_s:.1f} tokens/s{size}"
    )


def _speedup_line(dense, small) -> str:
    ratio = small.stats.decode_tokens_per_s / max(dense.stats.decode_tokens_per_s, 1e-9)
    return f"{small.label}: decode {ratio:.2f}x the dense model's tokens/s (same prompt, one after the other)"
