"""Reconstruction: refit the kept input columns (and the bias) of every weight sink that lost columns, so
that its output on calibration data stays what the dense model computes.

At a linear sink ``y = x W^T + b`` (W_o after attention, W_down after the FFN activation) that loses input
columns ``R`` and keeps ``K``, the refit solves, over the calibration tokens ``n``, the damped least squares

    min_{A, c}  sum_n || x_n[K] A^T + c - t_n ||^2 + sum_k L_k ||A[:, k] - W[:, k]||^2

(the ridge pulls towards the weights as they are, channel k by ``L_k = damp * G_kk``, its own energy) in
closed form. With ``z = [x[K], 1]`` (the 1 only when an intercept is fitted), ``G = sum z^T z`` and
``C = sum z^T [x_t, 1]``:

    [A, c]^T = (G + L)^{-1} (C [W, b]^T + L [W_K, b]^T)

The target ``t_n = x_t W^T + b`` is, per ``target``:

- ``"dense"``: the dense model's output at this sink (``x_t`` = the dense model's input there), while
  ``x`` comes from the model already compressed *and refit* up to this sink: the refit also corrects the
  error every earlier layer left (error-aware, layer by layer);
- ``"self"``: this sink's own output on the partially compressed model (``x_t = x``, the removed channels
  still alive): ``A = W_K + W_R G_RK (G_KK + L)^{-1}``, the OBS update of SparseGPT / SlimGPT for removing whole
  input columns.

Sinks are visited in graph order. All calibration batches step through the graph together (one
``torch.fx.Interpreter`` environment per batch, values freed after their last use), pausing before each
refit sink: its Gram matrices are accumulated in float64 over every batch, solved (Cholesky), and written
into the working model, so the next sink sees the refit one. The damping is chosen per sink by
measurement: one token in five is held out, each candidate of ``DAMPINGS`` is fitted on the rest and scored
on it (the held-out error is a quadratic form in the held-out Gram matrices, no extra pass), the best is
refit on every token; where no candidate beats the plain removal on the held-out tokens (too little data
for the width), the sink is not refit. Memory: the live values of every batch plus
one sink's ``(width + 1)^2`` float64 Gram (two for ``"dense"``), never a stored activation of the model.

Groups whose channels also end in a contraction that is not refit (Q/K at q.k, a shared weight, a matmul
with a weight) are masked in the working model from the start; the others stay alive until their sink is
refit and its removed columns are zeroed. Either way the result is only new values for existing weights
(and new biases), a function of the dense model, the plan and the data: the mask oracle compares the
compressed model with the dense model carrying the same weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx

from passes.capture import copy_module
from passes.groups import CoupledUnits, removed_by_space
from passes.importance.base import ScoreInputs, operand_ids, sinks, wanted_mask
from passes.importance.compensate import add_output_biases, weight_row_ids
from passes.importance.layerwise import run_nodes
from passes.importance.obs_select import select
from passes.verify import masked_copy

aten = torch.ops.aten
TARGETS = ("dense", "self")


@dataclass(frozen=True)
class RefitSettings:
    """target: "dense" or "self" (module docstring); damp: ridge as a fraction of each channel's Gram diagonal
    (None: the value of ``DAMPINGS`` with the lowest error on held-out tokens, per sink; no refit at a sink
    where none beats the plain removal there);
    intercept: also fit the output bias (a new bias where the linear had none and its outputs are whole);
    select: at each sink, re-choose which units of the groups ending there are removed, by their OBS cost on
    this sink's Gram matrix (``passes.importance.obs_select``), keeping the plan's counts."""

    target: str = "self"
    damp: float | None = None  # None: chosen per sink on held-out tokens
    intercept: bool = True
    select: bool = False  # re-choose which units go at each sink by reconstruction error (obs_select)


@dataclass
class _Site:
    """One refit sink: its node, which argument is the activation, the weight (and the weight axis that
    meets the activation's channels: 1 for ``linear``'s [out, in], 0 for ``addmm`` / ``mm``'s [in, out]),
    the bias, and the input columns it keeps / loses."""

    node: str
    x_arg: int
    weight: str
    in_axis: int
    bias: str | None
    kept: np.ndarray
    removed: np.ndarray
    intercept: bool = False
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # channel id per input column

    def rekeep(self, keep: np.ndarray) -> None:
        """Kept / removed columns under a new keep mask."""
        self.kept, self.removed = np.flatnonzero(keep[self.ids]), np.flatnonzero(~keep[self.ids])


@dataclass
class Refit:
    """New values of existing weights and biases (by target), new biases (by linear node), and the weights
    that were refit."""

    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    new_biases: dict[str, torch.Tensor] = field(default_factory=dict)
    sites: list[str] = field(default_factory=list)
    damping: dict[str, float | None] = field(default_factory=dict)  # weight -> damping used (None: not refit)
    keep: np.ndarray | None = None  # the keep mask the refit was made for (re-chosen units, ``select``)

    def apply_weights(self, gm: fx.GraphModule) -> fx.GraphModule:
        """In place: every refit weight and existing bias takes its new value (shapes unchanged)."""
        with torch.no_grad():
            for target, value in self.weights.items():
                _tensor(gm, target).copy_(value)
        return gm

    def dense_model(self, gm: fx.GraphModule) -> fx.GraphModule:
        """A copy of the dense ``gm`` with the refit weights and the new biases (the oracle's dense side)."""
        return add_output_biases(self.apply_weights(copy_module(gm)), self.new_biases)


def _tensor(gm: fx.GraphModule, target: str) -> torch.Tensor:
    owner, _, leaf = target.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    return getattr(module, leaf)


def refit_sites(inputs: ScoreInputs, groups: list[CoupledUnits], keep: np.ndarray, intercept: bool) -> list[_Site]:
    """The weight sinks that lose input columns, have a linear form and own their weight alone, in graph
    order."""
    facts, gm = inputs.facts, inputs.gm
    wanted = wanted_mask(facts, groups)
    nodes = {n.name: n for n in gm.graph.nodes}
    owners = _tensor_owners(gm)
    out = []
    for c in facts.contractions:
        form = _linear_form(c, nodes[c.node])
        found = sinks(c)
        if form is None or len(found) != 1 or found[0][0] != form[0]:
            continue
        i, space, letters = found[0]
        ids = operand_ids(facts, c.operands[i], space, letters, c.sizes).reshape(-1)
        if not wanted[ids].any() or keep[ids].all():
            continue
        x_arg, weight, in_axis, bias = form[1:]
        if not _sole_use(weight, owners) or (bias is not None and not _sole_use(bias, owners)):
            continue
        fit_bias = intercept and (bias is not None or _takes_new_bias(nodes[c.node], facts, weight, keep))
        site = _Site(
            c.node,
            x_arg,
            str(weight.target),
            in_axis,
            None if bias is None else str(bias.target),
            np.flatnonzero(keep[ids]),
            np.flatnonzero(~keep[ids]),
            fit_bias,
            ids,
        )
        out.append(site)
    order = {n.name: k for k, n in enumerate(gm.graph.nodes)}
    return sorted(out, key=lambda site: order[site.node])


def _linear_form(c, node: fx.Node):
    """``(operand index, activation arg, weight node, weight input axis, bias node)`` when ``node`` is
    ``x @ W^T + b`` (``linear``), ``b + x @ W`` (``addmm``) or ``x @ W`` (``mm`` / ``matmul``) with a 2-D
    weight and the activation's last axis as the only contracted one; else None."""
    if node.target is aten.linear.default:
        x_arg, w_arg, in_axis = 0, 1, 1
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    elif node.target is aten.addmm.default and not node.kwargs:
        x_arg, w_arg, in_axis, bias = 1, 2, 0, node.args[0]
    elif node.target in (aten.mm.default, aten.matmul.default):
        x_arg, w_arg, in_axis, bias = 0, 1, 0, None
    else:
        return None
    paths = [op.path for op in c.operands]
    if (x_arg,) not in paths or (w_arg,) not in paths or len(c.contracted) != 1:
        return None
    i, j = paths.index((x_arg,)), paths.index((w_arg,))
    x, w = c.operands[i], c.operands[j]
    if not w.is_weight or len(w.letters) != 2 or x.letters[-1] not in c.contracted:
        return None
    if w.letters[in_axis] != x.letters[-1] or (bias is not None and getattr(bias, "op", None) != "get_attr"):
        return None
    weight, in_axis = _through_transposes(node.args[w_arg], in_axis)
    return i, x_arg, weight, in_axis, bias


_SWAPS = {aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default}


def _through_transposes(node, in_axis: int):
    """The stored weight behind ``W.t()`` / ``W.transpose(0, 1)`` / ``W.permute(1, 0)`` (each read only
    once), with the axis that meets the activation counted in the stored layout (each swap flips it)."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in _SWAPS:
        if len(node.users) != 1 or not isinstance(node.args[0], fx.Node):
            break
        node, in_axis = node.args[0], 1 - in_axis
    return node, in_axis


def _tensor_owners(gm: fx.GraphModule) -> dict[int, int]:
    """id(tensor) -> how many names (parameters and buffers) hold it: tied weights count more than once."""
    counts: dict[int, int] = {}
    for _, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        counts[id(t)] = counts.get(id(t), 0) + 1
    return counts


def _sole_use(node, owners: dict[int, int]) -> bool:
    """A get_attr read by exactly one node, naming a tensor no other name holds."""
    if not isinstance(node, fx.Node) or node.op != "get_attr" or len(node.users) != 1:
        return False
    siblings = [n for n in node.graph.nodes if n.op == "get_attr" and n.target == node.target]
    return len(siblings) == 1 and owners.get(id(_tensor(node.graph.owning_module, str(node.target))), 0) == 1


def _takes_new_bias(node: fx.Node, facts, weight: fx.Node, keep: np.ndarray) -> bool:
    """A new output bias can go on ``node``: an ``aten.linear`` (``add_output_biases`` puts it into its bias
    argument; ``mm`` / ``matmul`` have none) whose output rows all stay (a bias on removed rows would make
    removed channels nonzero)."""
    return node.target is aten.linear.default and keep[weight_row_ids(facts, str(weight.target))].all()


def upfront_removed(inputs: ScoreInputs, groups: list[CoupledUnits], keep: np.ndarray, refit: set[str]):
    """(param, dim, indices) to zero before the run: every group with a channel that some contraction other
    than a refit sink sums away (q.k, a matmul with a weight, a sink sharing its weight)."""
    facts = inputs.facts
    elsewhere = summed_elsewhere(facts, refit)
    out = []
    for group in groups:
        if elsewhere[group.channels].any():
            spaces = [(facts.spaces[s], idx) for s, idx in removed_by_space(group, facts, keep)]
            out += [(space.param, space.dim, idx) for space, idx in spaces if not space.is_virtual]
    return out


def summed_elsewhere(facts, refit: set[str]) -> np.ndarray:
    """Channels that some contraction other than the refit sinks ``refit`` sums away."""
    elsewhere = np.zeros(facts.n_channels, dtype=bool)
    for c in facts.contractions:
        if c.node in refit:
            continue
        for i, space, letters in sinks(c):
            elsewhere[operand_ids(facts, c.operands[i], space, letters, c.sizes).reshape(-1)] = True
    return elsewhere


def ending_at(facts, groups: list[CoupledUnits], sites: list[_Site]) -> dict[str, list[CoupledUnits]]:
    """Sink node -> the groups whose channels are summed away at that refit sink and nowhere else (the
    groups whose units ``select`` may re-choose there)."""
    elsewhere = summed_elsewhere(facts, {s.node for s in sites})
    where = np.full(facts.n_channels, -1)
    for k, site in enumerate(sites):
        seen = where[site.ids]
        where[site.ids] = np.where((seen == -1) | (seen == k), k, -2)  # -2: summed at two sinks
    out: dict[str, list[CoupledUnits]] = {}
    for group in groups:
        hit = set(where[group.channels].tolist()) - {-1}
        if len(hit) == 1 and min(hit) >= 0 and not elsewhere[group.channels].any():
            out.setdefault(sites[min(hit)].node, []).append(group)
    return out


class _Stepper(fx.Interpreter):
    """Runs a graph a stretch of nodes at a time, for one batch environment at a time (values freed after
    their last use), so that many batches can advance through the graph together."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.by_name = {n.name: n for n in gm.graph.nodes}
        self.added_bias: dict[str, torch.Tensor] = {}  # linear node -> bias it did not have (refit intercept)

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        return out + self.added_bias[n.name] if n.name in self.added_bias else out

    def run_nodes(self, names: Sequence[str], env: dict, batch: tuple) -> dict:
        """Run the nodes named ``names`` (of this graph) for one batch from its environment ``env``."""
        return run_nodes(self, [self.by_name[name] for name in names], env, batch)

    def input_of(self, env: dict, site: _Site) -> torch.Tensor:
        """The activation argument of ``site``'s node in ``env``."""
        return env[self.by_name[site.node].args[site.x_arg]]


def _stretches(gm: fx.GraphModule, stops: list[str]) -> list[list[str]]:
    """Node names in graph order, cut before each name in ``stops`` (the last stretch ends before the last
    stop: the sink itself runs at the start of the next stretch, after its refit)."""
    out: list[list[str]] = [[]]
    pending = list(stops)
    for node in gm.graph.nodes:
        if not pending:
            break
        if node.name == pending[0]:
            pending.pop(0)
            out.append([])
        out[-1].append(node.name)
    return out[: len(stops)]


class _Gram:
    """``G = sum z^T z`` and ``C = sum z^T [x_t, 1]`` over tokens, ``z = [x, 1]``, kept apart for a fit
    part and a held-out part (every ``HOLD``-th token), each product in float32 and summed in float64."""

    def __init__(self, width: int, cross: bool):
        zeros = lambda: torch.zeros(width + 1, width + 1, dtype=torch.float64)  # noqa: E731
        self.g, self.g_held = zeros(), zeros()
        self.c, self.c_held = (zeros(), zeros()) if cross else (None, None)

    def add(self, x: torch.Tensor, target: torch.Tensor | None) -> None:
        z = _with_ones(x)
        t = _with_ones(target) if target is not None else z
        held = torch.arange(z.shape[0]) % HOLD == HOLD - 1
        for rows, g, c in ((~held, self.g, self.c), (held, self.g_held, self.c_held)):
            zr = z[rows]
            g += (zr.T @ zr).double()
            if c is not None:
                c += (zr.T @ t[rows]).double()

    def total(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(G, C) over every token."""
        g = self.g + self.g_held
        return g, g if self.c is None else self.c + self.c_held

    def fit(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.g, self.g if self.c is None else self.c

    def held(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.g_held, self.g_held if self.c_held is None else self.c_held


HOLD = 5  # one token in HOLD is held out to choose the damping
DAMPINGS = (1e-3, 1e-2, 1e-1, 1.0)  # candidates, fractions of each channel's Gram diagonal


def _with_ones(x: torch.Tensor) -> torch.Tensor:
    flat = x.detach().reshape(-1, x.shape[-1]).to(device="cpu", dtype=torch.float32)
    return torch.cat([flat, torch.ones(flat.shape[0], 1)], dim=1)


class _Problem:
    """The least squares of one site: rows of ``z`` used (kept columns, then the intercept), and the
    dense weight and bias as one ``[out, in + 1]`` matrix ``Wb`` (the target is ``[x_t, 1] Wb^T``)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, site: _Site):
        w = weight.detach().to(device="cpu", dtype=torch.float64)
        self.w = w if site.in_axis == 1 else w.T  # [out, in]
        fitted_bias = bias is not None and site.intercept  # without an intercept, regress y - b on x[K]
        b = bias.detach().cpu().double() if fitted_bias else torch.zeros(self.w.shape[0], dtype=torch.float64)
        self.wb = torch.cat([self.w, b[:, None]], dim=1)
        rows = np.append(site.kept, self.w.shape[1]) if site.intercept else site.kept
        self.rows = torch.as_tensor(rows, dtype=torch.long)
        self.k = len(site.kept)

    def solve(self, g: torch.Tensor, c: torch.Tensor, damp: float) -> torch.Tensor:
        """``P = (G_rr + L)^{-1} (C_r Wb^T + L P0)``, ``L = damp * diag(G_KK)``: ``[rows, out]``, the new
        kept columns (and bias) as rows. The ridge pulls towards the weights as they are (``P0``,
        ``plain``), not towards 0, so a large damping tends to no refit at all; it is scaled per channel by
        that channel's own energy, so a massive-activation channel does not set the damping of the rest."""
        g_rr = g.index_select(0, self.rows).index_select(1, self.rows)
        diag = torch.diagonal(g_rr)[: self.k]
        floor = 1e-6 * float(diag.mean()) if self.k else 0.0  # a channel that is always 0 still gets a ridge
        ridge = torch.cat([damp * (diag + floor), torch.zeros(len(self.rows) - self.k, dtype=g.dtype)])
        return _spd_solve(g_rr + torch.diag(ridge), self.rhs(c) + ridge[:, None] * self.plain())

    def rhs(self, c: torch.Tensor) -> torch.Tensor:
        return c.index_select(0, self.rows) @ self.wb.T

    def plain(self) -> torch.Tensor:
        """``P`` of the removal without refit: the kept columns (and bias) as they are."""
        return self.wb.T.index_select(0, self.rows)

    def error(self, p: torch.Tensor, g: torch.Tensor, c: torch.Tensor) -> float:
        """``sum ||z_r P - t||^2`` up to a constant: ``tr(P^T G_rr P) - 2 tr(P^T C_r Wb^T)``."""
        g_rr = g.index_select(0, self.rows).index_select(1, self.rows)
        return float((p * (g_rr @ p)).sum() - 2 * (p * self.rhs(c)).sum())


def solve(gram: _Gram, weight: torch.Tensor, bias: torch.Tensor | None, site: _Site, damp: float | None):
    """``(new weight, new bias or None, damping)``, or None where no refit beats the plain removal on the
    held-out tokens. ``damp`` None: the candidate of ``DAMPINGS`` with the lowest held-out error, then
    solved on every token. Shapes and layout are the dense weight's (``[in, out]`` when ``site.in_axis``
    is 0); removed columns are 0."""
    problem = _Problem(weight, bias, site)
    if damp is None:
        errors = {d: problem.error(problem.solve(*gram.fit(), d), *gram.held()) for d in DAMPINGS}
        damp = min(errors, key=errors.get)
        if errors[damp] >= problem.error(problem.plain(), *gram.held()):
            return None
    p = problem.solve(*gram.total(), damp)
    new_w = torch.zeros_like(problem.w)
    new_w[:, torch.as_tensor(site.kept, dtype=torch.long)] = p[: problem.k].T
    new_w = (new_w if site.in_axis == 1 else new_w.T).to(weight)
    new_b = p[-1].to(dtype=weight.dtype, device=weight.device) if site.intercept else None
    return new_w, new_b, damp


def _spd_solve(g: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``g^{-1} rhs`` by Cholesky; least squares where ``g`` is singular (a kept channel that is always 0)."""
    factor, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, factor)
    return torch.linalg.lstsq(g, rhs, driver="gelsd").solution


def reconstruct(
    inputs: ScoreInputs,
    groups: list[CoupledUnits],
    keep: np.ndarray,
    settings: RefitSettings = RefitSettings(),
    progress: Callable[[int, int], None] | None = None,
) -> Refit:
    """Refit every sink of ``groups`` that loses input columns under ``keep`` (module docstring), on
    ``inputs.calibration``; ``progress(done, total)`` after each sink."""
    if settings.target not in TARGETS:
        raise ValueError(f"refit target must be one of {TARGETS}, got {settings.target!r}")
    sites = refit_sites(inputs, groups, keep, settings.intercept)
    refit = Refit(keep=keep)
    if not sites or not inputs.calibration:
        return refit
    gm = inputs.gm
    choosable = ending_at(inputs.facts, groups, sites) if settings.select else {}
    work = masked_copy(gm, upfront_removed(inputs, groups, keep, {s.node for s in sites}))
    runners = [_Stepper(work)] + ([_Stepper(gm)] if settings.target == "dense" else [])
    batches = list(getattr(inputs.calibration, "batches", inputs.calibration))  # unwrapped: no per-batch progress
    envs = [[{} for _ in batches] for _ in runners]
    with torch.no_grad():
        for done, (site, stretch) in enumerate(zip(sites, _stretches(gm, [s.node for s in sites]), strict=True)):
            gram = _Gram(_tensor(work, site.weight).shape[site.in_axis], cross=len(runners) > 1)
            for b, batch in enumerate(batches):
                for runner, env in zip(runners, envs, strict=True):
                    env[b] = runner.run_nodes(stretch, env[b], batch)
                dense = runners[-1].input_of(envs[-1][b], site) if len(runners) > 1 else None
                gram.add(runners[0].input_of(envs[0][b], site), dense)
            if site.node in choosable:
                keep = _reselect(gram, gm, site, choosable[site.node], inputs.facts, keep)
            solved = solve(gram, *_weight_and_bias(gm, site), site, settings.damp)
            _write(runners[0], refit, site, solved if solved is not None else _plain(work, site))
            if progress is not None:
                progress(done + 1, len(sites))
    refit.keep = keep
    return refit


def _reselect(gram: _Gram, dense: fx.GraphModule, site: _Site, groups, facts, keep: np.ndarray) -> np.ndarray:
    """``keep`` with the units of ``groups`` re-chosen at ``site`` by OBS cost (``obs_select.select``) on
    the sink's Gram over every token (the intercept row included when a bias is fitted)."""
    g = gram.total()[0]
    weight = _tensor(dense, site.weight).detach().to(device="cpu", dtype=torch.float64)
    weight = weight if site.in_axis == 1 else weight.T
    if site.intercept:
        weight = torch.cat([weight, torch.zeros(weight.shape[0], 1, dtype=weight.dtype)], dim=1)
    else:
        g = g[:-1, :-1]
    keep = select(g, weight, groups, facts, keep, site.ids)
    site.rekeep(keep)
    return keep


def _weight_and_bias(dense: fx.GraphModule, site: _Site):
    """The dense weight and bias of ``site`` (what the target output is computed with)."""
    return _tensor(dense, site.weight), None if site.bias is None else _tensor(dense, site.bias)


def _plain(work: fx.GraphModule, site: _Site) -> tuple[torch.Tensor, None, None]:
    """The weight with the removed columns zeroed and nothing refit (where no refit helps)."""
    weight = _tensor(work, site.weight).detach().clone()
    weight.index_fill_(site.in_axis, torch.as_tensor(site.removed, dtype=torch.long, device=weight.device), 0.0)
    return weight, None, None


def _write(runner: _Stepper, refit: Refit, site: _Site, solved) -> None:
    """Record the refit of ``site`` and put it into the working model (so later sinks see it)."""
    weight, bias, damp = solved
    _tensor(runner.module, site.weight).copy_(weight)
    refit.damping[site.weight] = damp
    if damp is None:
        return
    refit.weights[site.weight] = weight
    refit.sites.append(site.weight)
    if bias is None:
        return
    work = runner.module
    if site.bias is not None:
        _tensor(work, site.bias).copy_(bias)
        refit.weights[site.bias] = bias
    else:
        refit.new_biases[site.node] = bias
        runner.added_bias[site.node] = bias
