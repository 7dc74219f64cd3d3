"""The frozen, validated settings of one compression."""

from __future__ import annotations

from dataclasses import dataclass, field

from ecospa_fx.errors import InputError

KINDS = ("qk", "vo", "ffn", "head")
GRANULARITIES = ("channel", "head")
IMPORTANCES = ("magnitude",)


@dataclass(frozen=True)
class CompressConfig:
    """What to remove and how.

    sparsity: fraction of each group's channels (or heads) removed, in [0, 1).
    granularity: "channel" prunes head_dim channels (qk, vo groups) and FFN channels; "head" removes whole
        heads (with their GQA query heads) and FFN channels.
    kinds: which group kinds may be pruned (others are left dense and listed as such).
    round_to: keep counts are rounded to multiples of this where the width allows (8 suits GEMM kernels).
    importance: how units are ranked ("magnitude": product of the coupled weights' norms).
    verify: check the result against the masked dense model (the mask oracle) on the example inputs.
    atol, rtol: verification passes when max|compressed - masked dense| <= atol + rtol * max|output|.
    """

    sparsity: float = 0.5
    granularity: str = "channel"
    kinds: tuple[str, ...] = field(default=KINDS)
    round_to: int = 8
    importance: str = "magnitude"
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
        if self.atol <= 0 or self.rtol < 0:
            raise InputError(f"atol must be positive and rtol non-negative, got {self.atol}, {self.rtol}")
