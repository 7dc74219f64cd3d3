"""Training benchmark: dense training vs EcoSpa training (gradual coupled pruning to 50%), same steps and data.

Run from the repository root (results: ``benchmarks/README.md``, section "Training"):

    PYTHONPATH=. .venv/bin/python benchmarks/train.py                 # small Llama on CPU, a few minutes
    PYTHONPATH=. .venv/bin/python benchmarks/train.py --recovery      # + SmolLM2 50% recovery rows (~10 min)

Model: a Llama-style decoder (RoPE, GQA, SwiGLU) from a ``LlamaConfig``, random init, byte-level tokens
(vocab 256, so the transformer blocks and not the embedding hold the parameters). Text: Jane Austen from
Debian ``r-cran-janeaustenr`` (``benchmarks.quality.austen_novels``): five novels train, *Persuasion*
validates. Both runs train the same captured graph (``capture_trainable``) with AdamW on the same batches;
the EcoSpa run prunes Q/K, V/O and FFN groups on a cubic schedule (importance: Adam's ``exp_avg_sq``
times ``w^2``) and then keeps training the small dense model.

Measured: validation perplexity at the end; training memory after the last prune, counted exactly as
bytes of parameters + gradients + optimizer state + activations saved for backward (a
``saved_tensors_hooks`` count over one step); step time after the last prune, dense and pruned steps
interleaved (ABAB...) so that load on the machine hits both alike.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import transformers as tf

from benchmarks.quality import CALIBRATION_NOVELS, EVAL_NOVEL, austen_novels
from ecospa_fx.training import EcoSpaPruner, PruneSchedule, capture_trainable, causal_lm_loss, logits_of


# ---------------------------------------------------------------------------------- data and model
def byte_ids(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def austen_bytes() -> tuple[torch.Tensor, torch.Tensor]:
    novels = austen_novels()
    return byte_ids("\n\n".join(novels[n] for n in CALIBRATION_NOVELS)), byte_ids(novels[EVAL_NOVEL])


def train_batches(ids: torch.Tensor, steps: int, batch: int, seq: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq, (steps, batch), generator=g)
    return [torch.stack([ids[s : s + seq] for s in row]) for row in starts.tolist()]


def val_batches(ids: torch.Tensor, count: int, batch: int, seq: int) -> list[torch.Tensor]:
    starts = np.linspace(0, len(ids) - seq, count * batch).astype(int)
    rows = torch.stack([ids[s : s + seq] for s in starts])
    return list(rows.split(batch))


def llama(args, head_dim: int | None = None, ffn: int | None = None) -> tf.LlamaForCausalLM:
    """The benchmark model; ``head_dim`` / ``ffn`` build it small (the built-small baseline)."""
    torch.manual_seed(args.seed)
    config = tf.LlamaConfig(
        vocab_size=256,
        hidden_size=args.hidden,
        intermediate_size=ffn or 4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads // 2,
        head_dim=head_dim or args.hidden // args.heads,
        max_position_embeddings=args.seq,
        use_cache=False,
        tie_word_embeddings=False,
    )
    return tf.LlamaForCausalLM(config)


def built_small(args, pruned) -> tf.LlamaForCausalLM:
    """Same architecture at the widths EcoSpa ended with (uniform per layer), random init."""
    head_dim = pruned.get_parameter("model.layers.0.self_attn.q_proj.weight").shape[0] // args.heads
    ffn = pruned.get_parameter("model.layers.0.mlp.up_proj.weight").shape[0]
    return llama(args, head_dim, ffn)


# ---------------------------------------------------------------------------------- measurements
@torch.no_grad()
def perplexity(module, batches: list[torch.Tensor]) -> float:
    return math.exp(float(np.mean([causal_lm_loss(logits_of(module(x)), x).item() for x in batches])))


def training_bytes(module, optimizer, x: torch.Tensor) -> dict[str, int]:
    """Parameters + gradients + optimizer state + activations saved for backward, over one step."""
    saved = [0]

    def pack(t: torch.Tensor):
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = causal_lm_loss(logits_of(module(x)), x)
    loss.backward()
    params = list(module.parameters())
    out = {
        "params": sum(p.numel() * p.element_size() for p in params),
        "grads": sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None),
        "optimizer": sum(
            v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if v.dim() > 0
        ),
        "activations": saved[0],
    }
    optimizer.zero_grad(set_to_none=True)
    out["total"] = sum(out.values())
    return out


def step(module, optimizer, x: torch.Tensor) -> float:
    loss = causal_lm_loss(logits_of(module(x)), x)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def interleaved_times(runs: dict, data: list[torch.Tensor], reps: int) -> dict[str, float]:
    """Median (and fastest, ``<name>_min``) step seconds per run, steps alternating between runs."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(reps):
        for name, (module, opt) in runs.items():
            t0 = time.perf_counter()
            step(module, opt, data[i % len(data)])
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()} | {
        f"{name}_min": min(t) for name, t in times.items()
    }


# ---------------------------------------------------------------------------------- the two runs
def schedule_of(args) -> PruneSchedule:
    """Prune from 10% to 50% of the steps, 5 times, cubic: the second half trains the small model."""
    start, end = int(0.1 * args.steps), int(0.5 * args.steps)
    return PruneSchedule(start, end, args.sparsity, every=max(1, (end - start) // 5))


def train(args, data: list[torch.Tensor], ecospa: bool, log, model=None) -> dict:
    gm = capture_trainable(model or llama(args), (data[0],))
    opt = torch.optim.AdamW(gm.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 20))
    pruner = EcoSpaPruner(gm, (data[0],), opt, schedule_of(args)) if ecospa else None
    losses, t0 = [], time.time()
    for i, x in enumerate(data):
        losses.append(step(gm, opt, x))
        sched.step()
        if pruner is not None and pruner.step():
            e = pruner.history[-1]
            log(
                f"  step {e.step}: pruned to {e.sparsity:.1%}, params {e.params_before:,} -> {e.params_after:,} "
                f"({e.seconds:.1f} s)"
            )
        if (i + 1) % max(1, len(data) // 5) == 0:
            log(f"  {'ecospa' if ecospa else 'dense'} step {i + 1}: loss {np.mean(losses[-20:]):.3f}")
    return {"module": gm, "opt": opt, "pruner": pruner, "losses": losses, "train_s": time.time() - t0}


def bench_training(args, log) -> dict:
    train_ids, val_ids = austen_bytes()
    data = train_batches(train_ids, args.steps, args.batch, args.seq, args.seed)
    val = val_batches(val_ids, args.val_batches, args.batch, args.seq)
    log(f"Austen bytes: train {len(train_ids):,}, val {len(val_ids):,}; {args.steps} steps of {args.batch}x{args.seq}")
    runs = {"dense": train(args, data, False, log), "ecospa": train(args, data, True, log)}
    if args.small_baseline:
        runs["small"] = train(args, data, False, log, built_small(args, runs["ecospa"]["module"]))
    out = {"protocol": vars(args).copy(), "schedule": repr(schedule_of(args))}
    for name, r in runs.items():
        out[name] = {
            "val_ppl": perplexity(r["module"], val),
            "params": sum(p.numel() for p in r["module"].parameters()),
            "final_train_loss": float(np.mean(r["losses"][-20:])),
            "train_s": r["train_s"],
            "memory": training_bytes(r["module"], r["opt"], data[0]),
        }
        log(f"{name}: val ppl {out[name]['val_ppl']:.3f}, params {out[name]['params']:,}")
    pairs = {name: (r["module"], r["opt"]) for name, r in runs.items()}
    out["step_s"] = interleaved_times(pairs, data, args.time_steps)
    out["prune_s"] = sum(e.seconds for e in runs["ecospa"]["pruner"].history)
    return out


# ---------------------------------------------------------------------------------- SmolLM2 recovery
def bench_recovery(args, log) -> dict:
    """SmolLM2-135M at 50% (activation-aware, one shot), then a short recovery with and without distillation."""
    import copy

    import ecospa_fx
    from benchmarks.quality import load_smollm2, windows
    from ecospa_fx.training.recovery import RecoveryConfig, recover

    dense, tok = load_smollm2()
    novels = austen_novels()
    train_ids = tok("\n\n".join(novels[n] for n in CALIBRATION_NOVELS), return_tensors="pt")["input_ids"][0]
    eval_ids = tok(novels[EVAL_NOVEL], return_tensors="pt")["input_ids"][0]
    train = windows(train_ids, args.recovery_steps + 8, args.recovery_seq)
    evaluation = windows(eval_ids, args.eval_windows, args.recovery_seq)
    t0 = time.time()
    compressed = ecospa_fx.compress(
        dense,
        train[0],
        sparsity=0.5,
        importance="activation",
        calibration=train[:8],
        round_to=1,
        kinds=("qk", "vo", "ffn"),
    )
    log(f"SmolLM2 compressed in {time.time() - t0:.0f} s")
    out = {"dense": perplexity_of(dense, evaluation), "one_shot": perplexity_of(compressed, evaluation)}
    log(f"ppl dense {out['dense']:.2f}, 50% one-shot {out['one_shot']:.2f}")
    for name, alpha in (("finetune", 0.0), ("distill", 0.5)):
        student, t0 = copy.deepcopy(compressed), time.time()
        config = RecoveryConfig(steps=args.recovery_steps, lr=args.recovery_lr, distill=alpha, temperature=2.0)
        recover(student, train[8:], config, teacher=dense if alpha else None)
        out[name] = perplexity_of(student, evaluation)
        out[f"{name}_s"] = time.time() - t0
        log(f"  recovery {name}: ppl {out[name]:.2f} ({out[f'{name}_s']:.0f} s)")
    out["protocol"] = (
        f"{args.recovery_steps} AdamW steps (lr {args.recovery_lr}) of 1x{args.recovery_seq} tokens from "
        f"{'+'.join(CALIBRATION_NOVELS)}; eval {args.eval_windows} windows of {EVAL_NOVEL}; distill a=0.5, T=2"
    )
    return out


@torch.no_grad()
def perplexity_of(module, batches: list[tuple]) -> float:
    return math.exp(float(np.mean([causal_lm_loss(logits_of(module(*b)), b[0]).item() for b in batches])))


# ---------------------------------------------------------------------------------- report
def markdown(res: dict) -> str:
    lines = training_table(res) if "dense" in res else []
    if "recovery" in res:
        r = res["recovery"]
        lines += [
            "",
            "| SmolLM2-135M, 50% removed | perplexity |",
            "|---|---|",
            f"| dense | {r['dense']:.2f} |",
            f"| one-shot (activation) | {r['one_shot']:.2f} |",
            f"| + recovery fine-tune | {r['finetune']:.2f} |",
            f"| + recovery with distillation | {r['distill']:.2f} |",
            f"\n{r['protocol']}",
        ]
    return "\n".join(lines)


def training_table(res: dict) -> list[str]:
    d, e = res["dense"], res["ecospa"]
    dm, em = d["memory"]["total"], e["memory"]["total"]
    rows = [
        (
            "validation perplexity (Persuasion, bytes)",
            f"{d['val_ppl']:.3f}",
            f"{e['val_ppl']:.3f}",
            f"{e['val_ppl'] / d['val_ppl']:.3f}x",
        ),
        ("parameters", f"{d['params']:,}", f"{e['params']:,}", f"{e['params'] / d['params']:.3f}x"),
        ("training memory after last prune (MiB)", f"{dm / 2**20:.1f}", f"{em / 2**20:.1f}", f"{em / dm:.3f}x"),
        (
            "  of which activations saved for backward",
            f"{d['memory']['activations'] / 2**20:.1f}",
            f"{e['memory']['activations'] / 2**20:.1f}",
            f"{e['memory']['activations'] / d['memory']['activations']:.3f}x",
        ),
        (
            "step time after last prune (ms, median)",
            f"{res['step_s']['dense'] * 1e3:.0f}",
            f"{res['step_s']['ecospa'] * 1e3:.0f}",
            f"{res['step_s']['ecospa'] / res['step_s']['dense']:.3f}x",
        ),
        (
            "step time after last prune (ms, fastest)",
            f"{res['step_s']['dense_min'] * 1e3:.0f}",
            f"{res['step_s']['ecospa_min'] * 1e3:.0f}",
            f"{res['step_s']['ecospa_min'] / res['step_s']['dense_min']:.3f}x",
        ),
        (
            "total training wall time (s)",
            f"{d['train_s']:.0f}",
            f"{e['train_s']:.0f}",
            f"{e['train_s'] / d['train_s']:.3f}x",
        ),
    ]
    lines = ["| | dense | EcoSpa 50% | ratio |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {r} |" for a, b, c, r in rows]
    if "small" in res:
        sm = res["small"]
        mib = sm["memory"]["total"] / 2**20
        lines.append(
            f"\nbuilt small from scratch at EcoSpa's final widths ({sm['params']:,} params), same steps and "
            f"data: validation perplexity {sm['val_ppl']:.3f}, training memory {mib:.1f} MiB, "
            f"step {res['step_s']['small'] * 1e3:.0f} ms"
        )
    lines.append(f"\nschedule {res['schedule']}; pruning itself took {res['prune_s']:.1f} s in all")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--val-batches", type=int, default=16)
    parser.add_argument("--time-steps", type=int, default=30, help="interleaved timing steps per run")
    parser.add_argument(
        "--no-small-baseline",
        dest="small_baseline",
        action="store_false",
        help="skip training the built-small model (EcoSpa's final widths, from scratch)",
    )
    parser.add_argument("--recovery", action="store_true", help="also the SmolLM2 recovery rows")
    parser.add_argument("--skip-training", action="store_true", help="only the recovery rows")
    parser.add_argument("--recovery-steps", type=int, default=40)
    parser.add_argument("--recovery-seq", type=int, default=256)
    parser.add_argument("--recovery-lr", type=float, default=1e-4)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - start:6.0f} s] {msg}", flush=True)

    res = {} if args.skip_training else bench_training(args, log)
    if args.recovery:
        res["recovery"] = bench_recovery(args, log)
    res["wall_s"] = time.time() - start
    print("\n" + markdown(res) + f"\n\nwall time {res['wall_s']:.0f} s ({args.threads} threads)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
