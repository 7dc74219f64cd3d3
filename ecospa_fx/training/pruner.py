"""Gradual coupled pruning inside a training loop: the model physically shrinks, optimizer state with it.

The model is captured once (``torch.export``) into a ``GraphModule`` that the loop trains. At every
scheduled step the pruner re-runs discovery on the *current* graph (so each prune composes with the
previous ones), scores units from gradients or the optimizer's second moments (``scores``), keeps in every
group ``round((1 - s(t)) * dense width)`` channels per head, and rewrites the graph **in place**
(``passes.rewrite.apply_plan``): the module object the loop holds stays the same, its parameters are new
smaller tensors, and the optimizer's param groups and state are rebuilt in place around them
(``state_slicing``). After the last prune training simply continues on the small dense model.

    pruner = EcoSpaPruner(model, (input_ids,), optimizer, PruneSchedule(100, 1000, 0.5, every=100))
    for batch in data:
        loss = loss_fn(pruner.model(*batch), batch)
        loss.backward()
        pruner.observe()          # only needed for importance="taylor"
        optimizer.step(); optimizer.zero_grad()
        pruner.step()             # prunes at the scheduled steps
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ecospa_fx.api import _reconcile
from ecospa_fx.artifact import source_info
from ecospa_fx.config import CompressConfig
from ecospa_fx.errors import EcospaError, InputError, VerificationError
from ecospa_fx.report import KINDS, Report
from ecospa_fx.training import scores as S
from ecospa_fx.training.distributed import broadcast_keep, mean_across_ranks
from ecospa_fx.training.fsdp import fsdp_wrapper, is_sharded, reshard, unshard
from ecospa_fx.training.graph import capture_trainable, refresh_meta, removed_report
from ecospa_fx.training.schedule import PruneSchedule
from ecospa_fx.training.state_slicing import ParamSlice, check_optimizer, slice_grads, slice_optimizer
from passes.capture import CaptureInputError, check_inputs
from passes.dataflow import analyse
from passes.groups import build_groups
from passes.plan import PlanSettings, plan_group
from passes.rewrite import RewriteError, apply_plan
from passes.verify import oracle_diff

IMPORTANCES = ("auto", "adam", "taylor", "magnitude")


@dataclass(frozen=True)
class PruneEvent:
    step: int
    sparsity: float
    params_before: int
    params_after: int
    seconds: float


@dataclass
class _Discovery:
    """Discovery of the current graph: valid until the next prune."""

    analysis: Any
    groups: list  # every group (for reconciliation of fused reshapes)
    planned: list  # the prunable groups of the selected kinds
    sides: S.Sides


class EcoSpaPruner:
    """Prunes coupled groups of ``model`` on ``schedule`` while ``optimizer`` trains it (module docstring).

    model: an ``nn.Module`` (captured with ``example_inputs``) or a ``GraphModule`` from ``capture_trainable``.
    optimizer: built over the model's parameters (the captured module shares them); one of
        ``state_slicing.SLICEABLE``, checked before anything else.
    importance: "adam" (needs ``exp_avg_sq``), "taylor" (call ``observe()`` after each backward),
        "magnitude", or "auto" ("adam" when the optimizer keeps ``exp_avg_sq``, else "taylor").
    wrap: re-wraps the module after each prune (``distributed.ddp_wrapper()``, ``fsdp.fsdp_wrapper()`` for a
        module already ``fully_shard``-ed, optimizer built over its sharded parameters); ``model`` is the
        current wrapper (under FSDP2 ``module`` too is a new object after each prune).
    verify: check prunes against the mask oracle on ``example_inputs`` and two seeded probes of the same
        shapes (costs a model copy and three float64 forwards per check): "first" (default) checks the first
        prune, where the structure of every group is decided; True checks every prune; False none.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        example_inputs: Any,
        optimizer,
        schedule: PruneSchedule,
        *,
        importance: str = "auto",
        granularity: str = "channel",
        kinds: tuple[str, ...] = KINDS,
        round_to: int = 8,
        dynamic_shapes: Any = None,
        wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
        verify: bool | str = "first",
        atol: float = 1e-4,
    ) -> None:
        if not isinstance(schedule, PruneSchedule):
            raise InputError(f"schedule must be a PruneSchedule, got {type(schedule).__name__}")
        self.optimizer = optimizer
        inner = check_optimizer(optimizer)
        self.importance = _resolve(importance, inner)
        if verify not in (True, False, "first"):
            raise InputError(f"verify must be True, False or 'first', got {verify!r}")
        self._verify_mode = verify
        self.config = CompressConfig(
            schedule.final_sparsity, granularity, kinds, round_to, verify=bool(verify), atol=atol
        )
        try:
            self.example_inputs = check_inputs(model, example_inputs)
        except CaptureInputError as err:
            raise InputError(str(err)) from None
        _check_owned(inner, model)
        self.schedule, self.wrap = schedule, wrap
        self.module = capture_trainable(model, self.example_inputs, dynamic_shapes)
        self.source = getattr(self.module, "ecospa_source", None) or source_info(model, self.example_inputs)
        if wrap is None and is_sharded(self.module):
            self.wrap = wrap = fsdp_wrapper()
        self.model = wrap(self.module) if wrap else self.module
        if self.importance == "taylor" and is_sharded(self.module):
            raise InputError("importance='taylor' reads whole gradients; under FSDP use 'adam' or 'magnitude'")
        self.step_count, self.sparsity, self.history = 0, 0.0, []
        self.dense_params = _count(self.module)
        self._origin = {}  # (param, dim) -> original index of every current position
        self._dense = {}  # (param, dim) -> dense width
        self._discovery: _Discovery | None = None
        self._taylor: list[np.ndarray] | None = None
        self._observed = 0

    @property
    def origin(self) -> dict[tuple[str, int], np.ndarray]:
        """(param, dim) -> the dense index of every current position along that dim (dims seen so far)."""
        return {k: v.copy() for k, v in self._origin.items()}

    # ------------------------------------------------------------------------------ loop hooks
    def observe(self) -> None:
        """Accumulate one step of Taylor scores from the current gradients (importance="taylor")."""
        if self.importance != "taylor":
            return
        d = self._discover()
        obs = S.taylor_observation(d.planned, d.sides, d.analysis.facts, self._params())
        self._taylor = obs if self._taylor is None else [a + b for a, b in zip(self._taylor, obs, strict=True)]
        self._observed += 1

    def step(self, step: int | None = None) -> bool:
        """Count one optimizer step (or set the count to ``step``); prune if the schedule says so."""
        self.step_count = self.step_count + 1 if step is None else int(step)
        if not self.schedule.is_prune_step(self.step_count):
            return False
        self.prune(self.schedule.sparsity_at(self.step_count))
        return True

    # ------------------------------------------------------------------------------ one prune
    def prune(self, sparsity: float) -> PruneEvent:
        """Remove channels until every planned group has lost ``sparsity`` of its dense width."""
        start, before = time.perf_counter(), _count(self.module)
        sharded = is_sharded(self.module)
        if sharded:  # FSDP2: gather, prune, re-shard (``fsdp``)
            self.module, self._discovery = unshard(self.module, check_optimizer(self.optimizer)), None
        d = self._discover()
        scores = mean_across_ranks(self._scores(d))
        keep = broadcast_keep(self._plan(d, scores, sparsity))
        keep = _reconcile(d.groups, d.analysis, keep, Report(sparsity, self.config.granularity))
        self.sparsity = sparsity
        if not keep.all():
            self._rewrite(d, keep)
        if sharded:
            self.module = self.model = reshard(self.module, check_optimizer(self.optimizer), self.wrap)
        elif self.wrap and not keep.all():
            self.model = self.wrap(self.module)
        event = PruneEvent(self.step_count, sparsity, before, _count(self.module), time.perf_counter() - start)
        self.history.append(event)
        return event

    def _discover(self) -> _Discovery:
        if self._discovery is None:
            analysis = analyse(self.module)
            groups = build_groups(analysis.facts, self.config.granularity)
            planned = [g for g in groups if g.prunable and g.kind in self.config.kinds]
            sides = S.weight_sides(planned, analysis.facts, self._params())
            self._discovery = _Discovery(analysis, groups, planned, sides)
            for space in analysis.facts.spaces:
                if not space.is_virtual:
                    self._origin.setdefault((space.param, space.dim), np.arange(space.size))
                    self._dense.setdefault((space.param, space.dim), space.size)
        return self._discovery

    def _params(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.module.named_parameters(remove_duplicate=False))

    def _scores(self, d: _Discovery) -> list[np.ndarray]:
        facts, params = d.analysis.facts, self._params()
        if self.importance == "adam":
            return S.adam_fisher(d.planned, d.sides, facts, params, check_optimizer(self.optimizer).state)
        if self.importance == "taylor" and self._observed:
            return [t / self._observed for t in self._taylor]
        if self.importance == "taylor":
            warnings.warn("importance='taylor' but observe() was never called: using magnitude", stacklevel=3)
        return S.magnitude(d.planned, facts, params)

    def _plan(self, d: _Discovery, scores: list[np.ndarray], sparsity: float) -> np.ndarray:
        """Keep mask: each group keeps ``round((1 - sparsity) * dense width)`` per head, best scores first."""
        facts = d.analysis.facts
        keep = np.ones(facts.n_channels, dtype=bool)
        for group, score in zip(d.planned, scores, strict=True):
            relative = self._relative(group, facts, sparsity)
            if relative <= 1e-9:
                continue
            settings = PlanSettings(relative, self.config.round_to, self.config.granularity)
            for unit, kept in zip(group.units, plan_group(group, score, facts, settings), strict=True):
                if not kept:
                    keep[unit] = False
        return keep

    def _relative(self, group, facts, sparsity: float) -> float:
        """Sparsity w.r.t. the current width that reaches ``sparsity`` w.r.t. the dense width:
        ``1 - (1 - s) * dense / current``, measured on a space only this group owns (else from the last
        target: ``1 - (1 - s) / (1 - s_prev)``)."""
        owned = set(group.channels.tolist())
        for sid in group.spaces:
            space = facts.spaces[sid]
            if not space.is_virtual and owned.issuperset(range(space.offset, space.offset + space.size)):
                return 1.0 - (1.0 - sparsity) * self._dense[(space.param, space.dim)] / space.size
        return 1.0 - (1.0 - sparsity) / (1.0 - self.sparsity)

    # ------------------------------------------------------------------------------ rewrite + state
    def _rewrite(self, d: _Discovery, keep: np.ndarray) -> None:
        facts = d.analysis.facts
        old = self._params()
        index: dict[str, dict[int, torch.Tensor]] = {}
        for space in facts.spaces:
            local = keep[space.offset : space.offset + space.size]
            if not space.is_virtual and not local.all():
                index.setdefault(space.param, {})[space.dim] = torch.as_tensor(np.flatnonzero(local))
        first = not any(e.params_after < e.params_before for e in self.history)
        check = self._verify_mode is True or (self._verify_mode == "first" and first)
        dense = copy.deepcopy(self.module) if check else None
        try:
            apply_plan(self.module, d.analysis, keep)
        except RewriteError as err:
            raise EcospaError(f"prune at step {self.step_count} failed to rewrite the graph: {err}") from err
        slices = _slices(old, dict(self.module.named_parameters(remove_duplicate=False)), index)
        slice_grads(slices)
        slice_optimizer(self.optimizer, slices)
        self._track_origin(index)
        refresh_meta(self.module, self.example_inputs)
        if dense is not None:
            self._verify(dense, index, old)
        self._discovery, self._taylor, self._observed = None, None, 0
        self.module.ecospa_report = removed_report(self._origin, self._dense, self.sparsity, self.config.granularity)
        self.module.ecospa_source = self.source

    def _track_origin(self, index: dict[str, dict[int, torch.Tensor]]) -> None:
        for name, dims in index.items():
            for dim, idx in dims.items():
                self._origin[(name, dim)] = self._origin[(name, dim)][idx.numpy()]

    def _verify(self, dense: torch.nn.Module, index, old) -> None:
        removed = []
        for name, dims in index.items():
            for dim, idx in dims.items():
                gone = np.setdiff1d(np.arange(old[name].shape[dim]), idx.numpy())
                removed.append((name, dim, tuple(int(i) for i in gone)))
        diff, scale = oracle_diff(dense, self.module, self.example_inputs, removed)
        if not diff <= self.config.atol + self.config.rtol * scale:
            raise VerificationError(f"prune at step {self.step_count}: differs from the masked model by {diff:.3e}")


def _slices(old: dict, new: dict, index: dict[str, dict[int, torch.Tensor]]) -> list[ParamSlice]:
    """One ``ParamSlice`` per replaced parameter object (aliases of a shared parameter counted once)."""
    out, seen = [], set()
    for name, dims in index.items():
        if id(old[name]) in seen or new[name] is old[name]:
            continue
        seen.add(id(old[name]))
        out.append(ParamSlice(name, old[name], new[name], dims))
    return out


def _resolve(importance: str, optimizer: torch.optim.Optimizer) -> str:
    if importance not in IMPORTANCES:
        raise InputError(f"importance must be one of {IMPORTANCES}, got {importance!r}")
    has_v = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam))
    if importance == "adam" and not has_v:
        raise InputError(f"importance='adam' reads exp_avg_sq, which {type(optimizer).__name__} does not keep")
    if importance == "auto":
        return "adam" if has_v else "taylor"
    return importance


def _check_owned(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> None:
    """Every optimized tensor must be a parameter of ``model`` (else it could not follow a prune)."""
    owned = {id(p) for p in model.parameters()}
    stray = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in owned]
    if stray:
        raise InputError(
            f"the optimizer holds {len(stray)} tensors that are not parameters of the model (e.g. shape "
            f"{tuple(stray[0].shape)}): build it over model.parameters()"
        )


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
