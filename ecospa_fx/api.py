"""Public verbs: ``compress`` (returns a smaller model) and ``discover`` (returns the groups only)."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from ecospa_fx.artifact import source_info
from ecospa_fx.config import CompressConfig
from ecospa_fx.errors import CaptureError, EcospaError, InputError, VerificationError
from ecospa_fx.generation.target import CaptureTarget, kv_layout
from ecospa_fx.input_checks import calibration_list, check_batches, require_parameters
from ecospa_fx.report import Group, Member, Report, Skipped
from passes.capture import CaptureFailed, CaptureInputError, capture, check_inputs, copy_module, train_mode_modules
from passes.coupling_state import CouplingFacts
from passes.dataflow import analyse
from passes.groups import CoupledUnits, build_groups, orphan_blockers, removed_by_space
from passes.importance import CRITERIA, ScoreInputs, score_groups
from passes.importance.base import ReportingBatches, relative_to_median, wanted_mask
from passes.importance.compensate import add_output_biases, bias_deltas, sink_means
from passes.importance.refit import Refit, RefitSettings, reconstruct
from passes.plan import PlanSettings, plan_groups, unit_costs, why_nothing_removed
from passes.rewrite import SYMBOLIC_REASON, RewriteError, apply_plan, preflight
from passes.state import StateMap, state_shapes
from passes.verify import oracle_diff


def compress(
    model: torch.nn.Module,
    example_inputs: Any,
    sparsity: float = 0.5,
    *,
    config: CompressConfig | None = None,
    dynamic_shapes: Any = "auto",
    calibration: Any = None,
    loss_fn: Any = None,
    progress: Callable[[int, int], None] | None = None,
    state: Any = None,
    **options: Any,
) -> fx.GraphModule:
    """Remove coupled channels from ``model``; return a smaller module computing the pruned function.

    The result is a ``torch.fx.GraphModule`` called with the same positional inputs as ``model``; its
    report is ``result.ecospa_report`` (also ``result.report``). ``model`` is not modified. Options are the
    fields of ``CompressConfig`` (granularity, kinds, round_to, importance, allocation, budget,
    max_sparsity, across_kinds, seed, compensate, refit, refit_damp, refit_bias, reselect, verify, atol,
    rtol). With ``calibration`` the units are ranked by their activations, the kept W_o / W_down columns are
    refit to preserve each layer's output (``refit="auto"``; ``reselect=True`` also re-chooses there which
    V/O and FFN units go, by the error the refit leaves).

    dynamic_shapes: ``"auto"`` (default): batch (axis 0) and sequence (axis 1 of token ids and of ``[B, S, H]``
        float inputs) dynamic where the example has 2 or more and the model allows it, static where it pins
        them or the dynamic capture fails (``result.ecospa_shapes`` says which); ``None``: static, the example's
        shapes only; or torch.export's ``dynamic_shapes`` argument.
    calibration: batches of positional inputs shaped like ``example_inputs`` (needed by
        importance="activation" and "fisher"; same dtypes, same sizes except on dynamic axes; an empty list
        is an error: pass None for data-free scoring); loss_fn: ``loss_fn(outputs, batch) -> scalar`` ("fisher");
    progress: ``progress(done, total)`` called as calibration batches are processed (for a progress bar),
        then, when the kept weights are refit (``refit``), as each refit weight is done (counting from 0);
    state: carried state as ``[(input position, output position), ...]`` for a model that takes back what it
        returned (a hand-written decoder's KV cache): the state shrinks with the channels it is concatenated
        with, and the result's ``ecospa_state`` gives the narrowed shapes. A Hugging Face causal LM loaded
        with ``use_cache=True`` needs none of this: it is captured with its cache, and the result generates
        (``ecospa_fx.generate``; its cache layout is ``result.ecospa_kv``).

    ``model`` is captured in eval mode (a warning says so when dropout or batch norm submodules are in training
    mode) and every submodule keeps its own ``training`` flag; the result computes the eval-mode function and
    says so (``training=False``). A ``UserWarning`` says when nothing was prunable, and why.
    """
    calibration = calibration_list(calibration)
    config = _resolved(config or CompressConfig(sparsity=sparsity, **options), calibration, loss_fn)
    if config.granularity == "auto":
        return _auto_granularity(model, example_inputs, config, dynamic_shapes, calibration, loss_fn)
    inputs = _checked(model, example_inputs)
    require_parameters(model)
    batches = _calibration(model, config, calibration, loss_fn)
    target = CaptureTarget.of(model, inputs, batches, dynamic_shapes, state)
    inputs, batches = target.inputs, target.batches
    with target.context():
        gm, shapes = _capture_shapes(target)
    target.check_capture(gm)
    if batches is not None:
        check_batches(gm, inputs, batches)
        if progress is not None:
            batches = ReportingBatches(batches, progress)
    try:
        analysis = analyse(gm, target.state)
    except ValueError as err:  # a state pair out of range
        raise InputError(str(err)) from None
    groups = build_groups(analysis.facts, config.granularity)
    params = dict(gm.named_parameters(remove_duplicate=False))
    score_inputs = ScoreInputs(gm, analysis.facts, params, analysis.labels, batches, loss_fn, config.seed)
    keep, report = _plan(groups, analysis.facts, params, config, score_inputs)
    keep = _reconcile(groups, analysis, keep, report)
    compressed, dense, deltas, keep = _rewritten(gm, analysis, groups, keep, score_inputs, config, report, progress)
    report.params_before = _count(gm)
    report.params_after = _count(compressed)
    state = StateMap.of(analysis, keep) if target.state else None
    if config.verify:
        _verify(dense, compressed, inputs, report, config.atol, config.rtol, state)
    if target.state:
        compressed.ecospa_state = state_shapes(analysis, keep)
    if target.source is not None:
        compressed.ecospa_kv = kv_layout(analysis, keep, target)
    compressed.ecospa_compensated = tuple(deltas)
    report.compensated = _compensated_weights(gm, deltas)
    compressed.ecospa_report = report
    compressed.report = report
    compressed.ecospa_source = source_info(model, inputs)
    compressed.ecospa_shapes = shapes
    _warn_if_nothing(model, report)
    return compressed


def discover(
    model: torch.nn.Module, example_inputs: Any, *, granularity: str = "channel", dynamic_shapes: Any = None
) -> Report:
    """The coupled groups of ``model`` (nothing removed, nothing changed). Works on meta-device models."""
    CompressConfig(sparsity=0.0, granularity=granularity)
    if granularity == "auto":
        raise InputError("discover() needs granularity 'channel' or 'head' ('auto' is a compress option)")
    inputs = _checked(model, example_inputs, allow_meta=True)
    gm = _capture(model, inputs, dynamic_shapes, warn_modes=False)
    analysis = analyse(gm)
    groups = build_groups(analysis.facts, granularity)
    config = _resolved(CompressConfig(sparsity=0.0, granularity=granularity, verify=False), None)
    _, report = _plan(groups, analysis.facts, {}, config)
    report.params_before = report.params_after = _count(gm)
    return report


def _checked(model, example_inputs, allow_meta: bool = False, what: str = "example_inputs") -> tuple:
    try:
        return check_inputs(model, example_inputs, allow_meta, what)
    except CaptureInputError as err:
        raise InputError(str(err)) from None


def _capture_shapes(target: CaptureTarget) -> tuple[fx.GraphModule, str]:
    """Capture ``target``; with ``dynamic_shapes="auto"`` retry static when the dynamic capture fails.
    Returns the graph and what its shapes are ("dynamic", "static", or "static: <why>")."""
    guards = not target.state
    if not target.auto_dynamic:
        gm = _capture(target.module, target.inputs, target.dynamic_shapes, guards=guards)
        return gm, "dynamic" if target.dynamic_shapes is not None else "static"
    try:
        return _capture(target.module, target.inputs, target.dynamic_shapes, guards=guards), "dynamic"
    except CaptureError as err:
        gm = _capture(target.module, target.inputs, None, guards=guards, warn_modes=False)
        return gm, f"static: the dynamic capture failed ({str(err).splitlines()[0]})"


def _capture(model, inputs, dynamic_shapes, *, warn_modes: bool = True, guards: bool = True) -> fx.GraphModule:
    """Capture in eval mode (every submodule's own mode restored after); with ``warn_modes``, warn once
    when dropout / batch norm submodules were in training mode (the graph computes their eval behaviour)."""
    changed = train_mode_modules(model) if warn_modes else []
    try:
        gm = capture(model, inputs, dynamic_shapes, guards)
    except CaptureFailed as err:
        raise CaptureError(str(err)) from err.__cause__
    except CaptureInputError as err:
        raise InputError(str(err)) from None
    if changed:
        shown = ", ".join(changed[:4]) + (" ..." if len(changed) > 4 else "")
        warnings.warn(
            f"{type(model).__name__} has dropout/batch norm submodules in training mode: {shown}; "
            "ecospa_fx captures in eval mode, so the returned graph computes their eval-mode behaviour (no "
            "dropout, running statistics). Call model.eval() first to silence this warning.",
            UserWarning,
            stacklevel=3,
        )
    return gm


def _warn_if_nothing(model: torch.nn.Module, report: Report) -> None:
    """Nothing prunable: say so (with the report's reasons) instead of returning the same model silently."""
    if report.groups:
        return
    warnings.warn(
        f"ecospa_fx.compress: nothing to compress in {type(model).__name__}; {report.nothing_reason()}",
        UserWarning,
        stacklevel=3,
    )


def _auto_granularity(model, example_inputs, config: CompressConfig, dynamic_shapes, calibration, loss_fn):
    """granularity="auto": compress at "channel" and "head", keep the one faster on the example inputs."""
    from ecospa_fx.latency import choose_granularity

    choice = choose_granularity(
        model, example_inputs, config=config, dynamic_shapes=dynamic_shapes, calibration=calibration, loss_fn=loss_fn
    )
    choice.model.ecospa_granularity_costs = choice.costs
    return choice.model


def _resolved(config: CompressConfig, calibration, loss_fn=None) -> CompressConfig:
    """The "auto" settings made concrete (``CompressConfig``): importance "fisher" with calibration and a
    loss, "activation" with calibration only, else "magnitude"; allocation "global" for scores that compare
    across layers, else "uniform"; budget "params" under global allocation, else "channels"."""
    importance = config.importance
    if importance == "auto":
        importance = ("fisher" if loss_fn is not None else "activation") if calibration else "magnitude"
    allocation = config.allocation
    if allocation == "auto":
        allocation = "global" if importance == "fisher" else "uniform"  # measured: benchmarks/README "Quality"
    budget = config.budget if config.budget != "auto" else "params" if allocation == "global" else "channels"
    across = config.across_kinds
    if across is None:
        across = allocation == "global" and CRITERIA[importance].across_kinds
    return dataclasses.replace(config, importance=importance, allocation=allocation, budget=budget, across_kinds=across)


def _rewritten(gm, analysis, groups, keep, score_inputs: ScoreInputs, config: CompressConfig, report, progress):
    """``(compressed, dense reference for the oracle, new output biases by node, keep)``: the refit (if any)
    runs on the dense graph first (and may re-choose which units go: ``keep`` is then its mask, the report's
    groups follow it); the plan is applied to a copy carrying the refit weights; new biases (refit
    intercepts, or bias compensation when there is no refit) are added to both sides."""
    planned = [g for g in groups if not g.reasons]
    refit = _refit(score_inputs, planned, keep, config, progress)
    if refit.keep is not None and not np.array_equal(refit.keep, keep):
        keep = refit.keep
        _rechosen(report, planned, score_inputs.facts, keep)
    compressed = refit.apply_weights(copy_module(gm))
    try:
        apply_plan(compressed, analysis, keep)
    except RewriteError as err:
        raise EcospaError(f"rewrite failed, model left as it was: {err}") from err
    deltas = dict(refit.new_biases)
    if config.compensate and config.sparsity and not refit.sites:
        deltas = bias_deltas(gm, sink_means(score_inputs, wanted_mask(score_inputs.facts, planned)), keep)
    add_output_biases(compressed, deltas)
    report.refit = tuple(refit.sites)
    report.not_refit = tuple(name for name, damp in refit.damping.items() if damp is None)
    if not refit.sites and not deltas:
        return compressed, gm, deltas, keep
    return compressed, add_output_biases(refit.apply_weights(copy_module(gm)), deltas), deltas, keep


def _rechosen(report: Report, groups: list[CoupledUnits], facts: CouplingFacts, keep: np.ndarray) -> None:
    """The report's group entries rebuilt for units the refit re-chose (same counts, other indices)."""
    fresh = {(entry.kind, entry.params): entry for entry in (_report_group(g, facts, keep) for g in groups)}
    report.groups = [dataclasses.replace(fresh.get((e.kind, e.params), e), note=e.note) for e in report.groups]


def _refit(score_inputs: ScoreInputs, groups: list[CoupledUnits], keep, config: CompressConfig, progress) -> Refit:
    """The reconstruction ``config.refit`` asks for ("auto": "self" when calibration is given, the best
    measured target, benchmarks/README "Reconstruction")."""
    target = config.refit if config.refit != "auto" else "self"
    if target == "none" or not config.sparsity or not score_inputs.calibration or keep.all():
        return Refit()
    settings = RefitSettings(target, config.refit_damp, config.refit_bias or config.compensate, config.reselect)
    return reconstruct(score_inputs, groups, keep, settings, progress)


def _compensated_weights(gm: fx.GraphModule, deltas: dict) -> tuple[str, ...]:
    """The weight names of the linears whose bias took a compensation delta (``deltas`` is keyed by node)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    return tuple(str(nodes[name].args[1].target) for name in deltas)


def _calibration(model, config: CompressConfig, calibration, loss_fn) -> list[tuple] | None:
    """Calibration batches as tuples of positional inputs; the criterion's needs checked up front."""
    criterion = CRITERIA[config.importance]
    if criterion.needs_calibration and config.sparsity > 0 and not calibration:
        raise InputError(
            f"importance={config.importance!r} needs calibration=[batch, ...] (tuples of positional inputs "
            "shaped like example_inputs)"
        )
    if config.compensate and config.sparsity > 0 and not calibration:
        raise InputError("compensate=True needs calibration=[batch, ...] (the removed channels' means)")
    if config.refit in ("dense", "self") and config.sparsity > 0 and not calibration:
        raise InputError(
            f"refit={config.refit!r} needs calibration=[batch, ...] (the data the kept weights are refit on)"
        )
    if criterion.needs_loss and config.sparsity > 0 and not callable(loss_fn):
        raise InputError(f"importance={config.importance!r} needs loss_fn(outputs, batch) -> scalar tensor")
    if calibration is None:
        return None
    return [_checked(model, batch, what=f"calibration[{b}]") for b, batch in enumerate(calibration)]


def _plan(groups: list[CoupledUnits], facts: CouplingFacts, params, config: CompressConfig, score_inputs=None):
    """Keep mask over all global channels, and the report's groups and skipped entries."""
    keep = np.ones(facts.n_channels, dtype=bool)
    report = Report(sparsity=config.sparsity, granularity=config.granularity)
    settings = PlanSettings(
        config.sparsity,
        config.round_to,
        config.granularity,
        config.allocation,
        config.budget,
        config.max_sparsity,
        bool(config.across_kinds),
        kind_scale=not CRITERIA[config.importance].across_kinds,
    )
    planned = []
    for group in groups:
        reasons = list(group.reasons)
        if not reasons and group.kind not in config.kinds:
            reasons.append(f"kind {group.kind!r} not selected (kinds={config.kinds})")
        if reasons:
            report.skipped.append(Skipped(group.kind, _param_names(group, facts), tuple(reasons)))
            continue
        planned.append(group)
    if config.sparsity > 0 and planned:
        score_inputs = score_inputs or ScoreInputs(None, facts, params, seed=config.seed)
        scores = score_groups(config.importance, planned, score_inputs)
        if config.allocation == "global" and not CRITERIA[config.importance].comparable:
            scores = relative_to_median(scores)  # activation energies' scale drifts with depth
        costs = unit_costs(planned, facts, params, config.budget)
        for group, unit_keep in zip(planned, plan_groups(planned, scores, facts, settings, costs), strict=True):
            for unit, kept in zip(group.units, unit_keep, strict=True):
                if not kept:
                    keep[unit] = False
    for group in planned:
        entry = _report_group(group, facts, keep)
        if config.sparsity > 0 and not entry.units_removed:
            entry = dataclasses.replace(entry, note=why_nothing_removed(group, facts, settings))
        report.groups.append(entry)
    for reason, names in orphan_blockers(facts, groups):
        report.skipped.append(Skipped("unsupported", names, (reason,)))
    return keep, report


def _reconcile(groups: list[CoupledUnits], analysis, keep: np.ndarray, report: Report) -> np.ndarray:
    """Leave dense any planned group whose channels share a fused reshape with a group that kept a
    different count (e.g. a fused qkv viewed as [heads, head_dim] with only the qk group pruned)."""
    facts = analysis.facts
    for _ in range(len(groups) + 1):
        bad = preflight(analysis, keep)
        if not bad:
            return keep
        for group in groups:
            owned = {sid for sid in group.spaces if sid in bad}
            removed = ~keep[group.channels]
            if not owned or not removed.any():
                continue
            keep[group.channels] = True
            detail = bad[min(owned)]
            reason = (
                detail
                if detail.startswith(SYMBOLIC_REASON)
                else (f"kept channels do not fit a reshape shared with other groups: {detail}")
            )
            names = _param_names(group, facts)
            report.groups = [g for g in report.groups if set(g.params) != set(names) or g.kind != group.kind]
            report.skipped.append(Skipped(group.kind, names, (reason,)))
    raise EcospaError("could not find a rewritable plan")


def _param_names(group: CoupledUnits, facts: CouplingFacts) -> tuple[str, ...]:
    return tuple(facts.spaces[s].param for s in group.spaces if not facts.spaces[s].is_virtual)


def _report_group(group: CoupledUnits, facts: CouplingFacts, keep: np.ndarray) -> Group:
    members, sites = [], []
    channels = group.channels
    for sid, removed in removed_by_space(group, facts, keep):
        space = facts.spaces[sid]
        if space.is_site:
            sites.append(f"{space.site[0]}[arg {space.site[1]}, axis {space.site[2]}]")
        elif not space.is_virtual:  # a joint space (passes.labels) is neither a member nor a site
            members.append(Member(space.param, space.dim, space.size, removed))
    starts = np.cumsum([0] + [len(u) for u in group.units[:-1]])
    units_removed = int((~np.logical_or.reduceat(keep[channels], starts)).sum()) if group.units else 0
    return Group(group.kind, tuple(members), len(group.units), units_removed, tuple(sites))


def _count(gm: torch.nn.Module) -> int:
    return sum(p.numel() for p in gm.parameters())


def _verify(dense_gm, compressed, inputs, report: Report, atol: float, rtol: float, state=None) -> None:
    """Mask oracle against the captured dense graph (same ops as the compressed one, in float64); a KV
    cache (``state``) is fed whole to the dense graph and narrowed for the compressed one."""
    removed = [(m.param, m.dim, m.removed) for g in report.groups for m in g.members]
    try:
        diff, scale = oracle_diff(dense_gm, compressed, inputs, removed, state=state)
    except RuntimeError as err:
        raise VerificationError(
            f"the compressed model does not run on its own example inputs ({str(err).splitlines()[0]}); "
            "this is a bug in ecospa_fx: please report it with the model (try granularity='channel' or "
            "fewer kinds meanwhile)"
        ) from err
    report.max_abs_diff = diff
    bound = atol + rtol * scale
    if not diff <= bound:
        raise VerificationError(
            f"compressed model differs from the masked dense model by {diff:.3e} "
            f"(> atol + rtol * max|output| = {bound:.3e}); "
            "this is a bug in ecospa_fx: please report it with the model"
        )
