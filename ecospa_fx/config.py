"""The frozen, validated settings of one compression."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

from ecospa_fx.errors import InputError
from ecospa_fx.report import KINDS
from passes.importance import CRITERIA
from passes.plan import ALLOCATIONS, BUDGETS

GRANULARITIES = ("channel", "head", "auto")
IMPORTANCES = ("auto", *CRITERIA)
REFITS = ("auto", "dense", "self", "none")  # auto, magnitude, activation, fisher, uncoupled, random


@dataclass(frozen=True)
class CompressConfig:
    """What to remove and how.

    sparsity: fraction of each group's channels (or heads) removed, in [0, 1).
    granularity: "channel" prunes head_dim channels (qk, vo groups) and FFN channels; "head" removes whole
        heads (with their GQA query heads) and FFN channels; "auto" compresses at both and keeps the one
        that runs faster on the example inputs (eager PyTorch, ``ecospa_fx.latency.choose_granularity``;
        call that directly for other targets or an injected cost model).
    kinds: which group kinds may be pruned (others are left dense and listed as such).
    round_to: keep counts are rounded to multiples of this where the width allows (8 suits GEMM kernels).
    importance: how units are ranked: "auto" (the default: "fisher" when ``calibration`` and ``loss_fn`` are
        given, "activation" when only ``calibration`` is, else "magnitude"; the best measured first,
        benchmarks/README "Quality"), "magnitude" (product of the coupled weights' norms, data-free),
        "activation" (expected squared contribution at the contraction sinks; needs ``calibration``),
        "fisher" (empirical Fisher of the unit masks; needs ``calibration`` and ``loss_fn``), and the
        baselines "uncoupled" (one matrix's own norms, the others follow by index) and "random".
    allocation: "uniform" (every group loses the same fraction) or "global" (groups of a kind compete by
        score per unit of cost, none losing more than ``max_sparsity``); "auto" (default): "global" when the
        importance's scores compare across layers (Fisher's are loss changes), else "uniform" (energies
        drift with depth; measured, benchmarks/README "Quality").
    budget: what ``sparsity`` is a fraction of: "channels" (of each group), "params" or "flops" (of the
        planned groups, counted over the whole model at the example shapes); "auto" (default): "params"
        under global allocation, "channels" under uniform.
    max_sparsity: the per-group (per-layer) cap under global allocation.
    across_kinds: global allocation ranks qk, vo and ffn units in one pool (scores normalised per kind,
        unless the criterion's kinds share one unit, as Fisher's loss changes do); None (default): True for
        Fisher under global allocation (measured best: SmolLM2 at 50% 100.9 per kind -> 81.9 in one pool,
        benchmarks/README "Quality"), else False.
    seed: seed of the "random" criterion.
    compensate: keep the output mean of W_o / W_down with an output bias (created where there was none;
        needs ``calibration``): with a refit, the refit fits the bias too (as ``refit_bias``); without one
        (``refit="none"``), FLAP-style ``b += W[:, R] @ E[x_R]`` (the calibration mean of every removed
        channel). The mask oracle then compares against the masked model plus the same biases.
    refit: reconstruct what is kept so that each pruned group's output is preserved on the calibration data
        (``passes.importance.refit``): the kept input columns of every W_o / W_down sink that lost columns
        are refit by damped least squares, sink by sink in graph order, each seeing the model already
        refit before it. "auto" (default): "self" when ``calibration`` is given and something is removed,
        else "none"; "self": the target is the sink's own output on the partially compressed model (the OBS
        update of SparseGPT / SlimGPT); "dense": the dense model's output at the sink (also corrects what
        earlier layers changed, but fits the calibration text more: measured worse on other text);
        "none": no refit. Existing biases are refit too.
    refit_damp: the refit's ridge towards the weights as they are, per kept channel a fraction of its energy;
        None (default): chosen per weight on held-out calibration tokens (one in five), and a weight is not
        refit where no damping beats the plain removal on them.
    refit_bias: the refit also creates an output bias where the sink had none (a constant the removed
        channels' means leave; the model then no longer matches its Hugging Face class).
    reselect: with a refit, re-choose at each W_o / W_down which units of the groups ending there go, by
        the output error the refit leaves (the OBS cost on that sink's Gram matrix, greedy in batches as in
        SlimGPT: ``passes.importance.obs_select``), keeping the plan's counts per head and per group, so the
        budget and the importance's allocation hold; False (default): the importance scores alone choose
        (measured: it lowers the calibration text's perplexity at 50% but raises other text's, see
        benchmarks/README "Reconstruction"). Groups that also meet at q.k (Q/K) are never re-chosen.
    verify: check the result against the masked dense model (the mask oracle) on the example inputs.
    atol, rtol: verification passes when max|compressed - masked dense| <= atol + rtol * max|output|.
    """

    sparsity: float = 0.5
    granularity: str = "channel"
    kinds: tuple[str, ...] = field(default=KINDS)
    round_to: int = 8
    importance: str = "auto"
    allocation: str = "auto"
    budget: str = "auto"
    max_sparsity: float = 0.9
    across_kinds: bool | None = None
    seed: int = 0
    compensate: bool = False
    refit: str = "auto"
    refit_damp: float | None = None
    refit_bias: bool = False
    reselect: bool = False
    verify: bool = True
    atol: float = 1e-4
    rtol: float = 1e-5

    def __post_init__(self) -> None:
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
            raise InputError(f"sparsity must be a number in [0, 1), got {self.sparsity!r}")
        if not 0.0 <= float(self.sparsity) < 1.0:
            raise InputError(
                f"sparsity must be in [0, 1): it is the fraction of each group's channels removed "
                f"(0.5 removes half); got {self.sparsity}"
            )
        if self.granularity not in GRANULARITIES:
            raise InputError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        kinds = (self.kinds,) if isinstance(self.kinds, str) else tuple(self.kinds)
        unknown = [k for k in kinds if k not in KINDS]
        if unknown:
            raise InputError(f"unknown group kinds {unknown}; choose from {KINDS}")
        object.__setattr__(self, "kinds", kinds)
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise InputError(f"round_to must be a positive int, got {self.round_to!r}")
        if self.importance not in IMPORTANCES:
            raise InputError(f"unknown importance {self.importance!r}; choose from {IMPORTANCES}")
        if not isinstance(self.compensate, bool):
            raise InputError(f"compensate must be True or False, got {self.compensate!r}")
        if self.refit not in REFITS:
            raise InputError(f"refit must be one of {REFITS}, got {self.refit!r}")
        if self.across_kinds not in (None, True, False):
            raise InputError(f"across_kinds must be True, False or None (auto), got {self.across_kinds!r}")
        for name in ("refit_bias", "reselect"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be True or False, got {getattr(self, name)!r}")
        damp = self.refit_damp
        real = isinstance(damp, numbers.Real) and not isinstance(damp, bool)
        if damp is not None and not (real and math.isfinite(damp) and damp >= 0):
            raise InputError(f"refit_damp must be a finite number >= 0 (a fraction of the Gram diagonal), got {damp!r}")
        if self.allocation not in ("auto", *ALLOCATIONS):
            raise InputError(f"allocation must be one of {('auto', *ALLOCATIONS)}, got {self.allocation!r}")
        if self.budget not in ("auto", *BUDGETS):
            raise InputError(f"budget must be one of {('auto', *BUDGETS)}, got {self.budget!r}")
        if not 0.0 < float(self.max_sparsity) <= 1.0:
            raise InputError(f"max_sparsity must be in (0, 1], got {self.max_sparsity!r}")
        _check_tolerance("atol", self.atol, positive=True)
        _check_tolerance("rtol", self.rtol, positive=False)


def _check_tolerance(name: str, value: object, positive: bool) -> None:
    """atol must be a finite number > 0, rtol a finite number >= 0 (NaN would make every check fail)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > 0 if positive else value >= 0)
    if not ok:
        want = "a finite number > 0" if positive else "a finite number >= 0"
        raise InputError(
            f"{name} must be {want} (verification passes when |diff| <= atol + rtol * max|output|), got {value!r}"
        )
