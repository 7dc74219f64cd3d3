"""Peers in the same run (issue 15): reference re-implementations of published one-shot structured pruning
methods beside ours, on identical calibration and evaluation windows of SmolLM2-135M (the
``benchmarks/quality.py`` protocol: Persuasion and Python docs perplexity, calibration on the other five
Austen novels).

These are BASELINES written from the papers for this benchmark, not part of ecospa_fx: they read the
Llama module names (``o_proj``, ``down_proj``) for their statistics, and their plans are applied with our
exact rewrite (so their parameter counts are real):

- **Wanda-sp** (the structured Wanda of An et al., FLAP, AAAI 2024, Sec. 5): input channel ``c`` of W_o /
  W_down scores ``||x_c||_2 * sum_i |W_ic|``; a head (a KV head with its query heads) sums its W_o
  columns; every layer loses the same fraction of heads and of FFN channels; nothing is compensated.
- **FLAP** (An et al. 2024): the fluctuation ``Var_n(x_c) * ||W[:, c]||^2`` per W_o / W_down input
  channel, standardised over each layer's channels of one structure (W_o's, W_down's), a head scored by
  the mean of its channels; the lowest standardised units are removed over all layers and both
  structures until the parameter budget is met (adaptive structure search); the removed channels'
  calibration means are folded into the output bias (``W[:, R] E[x_R]``).
- **SlimGPT-style** (Ling et al. 2024): OBS selection and update at each sink, layer by layer on the
  model already pruned before it, the same fraction everywhere: our refit with ``reselect`` and a uniform
  plan at channel granularity (``activation+refitself+obs`` of quality.py).

Ours: the default with a loss (Fisher scores, one global pool over layers and kinds by parameters, the
"self" refit). Run (about 25 minutes on 2 quiet cores):

    PYTHONPATH=. .venv/bin/python benchmarks/peers.py --ratios 0.2,0.3,0.5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as Q

from passes.importance.refit import RefitSettings

SINKS = ("o_proj", "down_proj")


class SinkStats:
    """Per input column of every W_o / W_down: token count, sum, sum of squares (float64)."""

    def __init__(self, model: torch.nn.Module):
        self.sums: dict[str, torch.Tensor] = {}
        self.squares: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self.hooks = [
            m.register_forward_pre_hook(self._hook(name))
            for name, m in model.named_modules()
            if name.rsplit(".", 1)[-1] in SINKS
        ]

    def _hook(self, name: str):
        def record(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            self.sums[name] = self.sums.get(name, 0) + x.sum(0)
            self.squares[name] = self.squares.get(name, 0) + (x * x).sum(0)
            self.count[name] = self.count.get(name, 0) + x.shape[0]

        return record

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def collect(model: torch.nn.Module, batches) -> SinkStats:
    stats = SinkStats(model)
    with torch.no_grad():
        for b in batches:
            model(*b)
    stats.close()
    return stats


def column_scores(model: torch.nn.Module, stats: SinkStats, method: str) -> dict[str, np.ndarray]:
    """Weight name (as the graph names it) -> score per input column."""
    out = {}
    for name, module in model.named_modules():
        if name not in stats.count:
            continue
        w = module.weight.detach().double()
        n = stats.count[name]
        if method == "wanda":
            s = stats.squares[name].sqrt() * w.abs().sum(0)
        else:  # flap: fluctuation (unbiased variance over tokens) times the squared column norm
            mean = stats.sums[name] / n
            var = (stats.squares[name] - n * mean * mean) / max(n - 1, 1)
            s = var.clamp_min(0) * w.pow(2).sum(0)
        out[f"{name}.weight"] = s.numpy()
    return out


def standardised(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """FLAP's standardisation: each weight's (one layer's one structure's) column scores minus their mean,
    over their standard deviation (this removes the growth of the fluctuation with depth)."""
    return {k: (v - v.mean()) / (v.std(ddof=1) or 1.0) for k, v in columns.items()}


def unit_scores(prunable: Q.Prunable, columns: dict[str, np.ndarray], mean: bool = False) -> list[np.ndarray]:
    """Each unit's score: the sum (``mean``: the mean, as FLAP averages a head's standardised channels)
    over the W_o / W_down input columns it holds."""
    facts = prunable.analysis.facts
    out = []
    for group in prunable.groups:
        spaces = [facts.spaces[s] for s in group.spaces]
        sinks = [s for s in spaces if s.dim == 1 and s.param in columns]
        scores = np.zeros(len(group.units))
        for i, unit in enumerate(group.units):
            picked = [columns[s.param][unit[(unit >= s.offset) & (unit < s.offset + s.size)] - s.offset] for s in sinks]
            values = np.concatenate(picked) if picked else np.zeros(0)
            scores[i] = float(values.mean() if mean else values.sum()) if len(values) else 0.0
        out.append(scores)
    return out


def flap_keep(prunable: Q.Prunable, scores: list[np.ndarray], sparsity: float) -> np.ndarray:
    """FLAP's adaptive structure search over standardised scores (``standardised``): remove the lowest
    units anywhere, heads and FFN channels alike, until ``sparsity`` of the prunable parameters are gone
    (every group keeps at least one unit)."""
    facts = prunable.analysis.facts
    costs = Q.unit_costs(prunable.groups, facts, prunable.params, "params")
    z = [(scores[i][u], i, u) for i in range(len(scores)) for u in range(len(scores[i]))]
    target = sparsity * sum(float(c.sum()) for c in costs)
    keep = np.ones(facts.n_channels, dtype=bool)
    left = [len(g.units) for g in prunable.groups]
    removed = 0.0
    for _, i, u in sorted(z):
        if removed >= target:
            break
        if left[i] <= 1:
            continue
        keep[prunable.groups[i].units[u]] = False
        left[i] -= 1
        removed += float(costs[i][u])
    return keep


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    model, tok = Q.load_smollm2()
    novels = Q.austen_novels()
    calib_ids = tok("\n\n".join(novels[n] for n in Q.CALIBRATION_NOVELS), return_tensors="pt")["input_ids"][0]
    eval_ids = tok(novels[Q.EVAL_NOVEL], return_tensors="pt")["input_ids"][0]
    calibration = Q.windows(calib_ids, args.calib, args.seq)
    texts = {"persuasion": Q.windows(eval_ids, 4, args.seq), "pydoc": Q.windows(Q.python_docs_ids(tok), 4, args.seq)}
    channel = Q.Prunable(model, calibration[0])
    head = Q.Prunable(model, calibration[0], granularity="head")
    stats = collect(model, calibration)
    results: dict = {"dense": {t: Q.perplexity(channel.gm, b) for t, b in texts.items()}, "rows": {}}
    print(f"dense: {results['dense']}", flush=True)
    columns = {k: column_scores(model, stats, k) for k in ("wanda", "flap")}
    wanda = unit_scores(head, columns["wanda"])
    flap = unit_scores(head, standardised(columns["flap"]), mean=True)
    means = head.means(calibration)
    fisher = channel.scores("fisher", calibration, Q.lm_loss)
    activation = channel.scores("activation", calibration)
    rows = {
        "Wanda-sp (heads + FFN, uniform)": lambda r: head.compressed(wanda, r),
        "FLAP (heads + FFN, adaptive, bias)": lambda r: head.build(flap_keep(head, flap, r), r, means=means),
        "SlimGPT-style (OBS select + update, uniform)": lambda r: channel.compressed(
            activation, r, refit=RefitSettings("self", None, True, True), calibration=calibration
        ),
        "ours: Fisher, one global pool, refit (default)": lambda r: channel.compressed(
            fisher, r, "global", "params", refit=RefitSettings("self"), calibration=calibration, across=True
        ),
    }
    for name, build in rows.items():
        for ratio in args.ratios:
            t0 = time.time()
            compressed = build(ratio)
            cell = {t: Q.perplexity(compressed, b) for t, b in texts.items()}
            cell["params"] = Q.n_params(compressed)
            results["rows"].setdefault(name, {})[str(ratio)] = cell
            print(f"{name} {ratio:.0%}: {cell} ({time.time() - t0:.0f} s)", flush=True)
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratios", default="0.2,0.3,0.5")
    parser.add_argument("--calib", type=int, default=32, help="calibration windows")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    args.ratios = [float(x) for x in args.ratios.split(",")]
    results = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
