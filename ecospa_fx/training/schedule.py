"""When to prune and how much: a gradual sparsity ramp, validated before training starts.

The target fraction of every coupled group's channels removed after optimizer step ``t`` is

    s(t) = 0                                   for t < start_step
    s(t) = s_f * (1 - (1 - u)^3),  u = (t - start_step) / (end_step - start_step)   ("cubic", Zhu & Gupta 2017)
    s(t) = s_f * u                                                                      ("linear")
    s(t) = s_f                                 for t >= end_step

and pruning happens at ``start_step + k * every`` (k >= 1) inside ``(start_step, end_step]`` and always at
``end_step``, so the last prune lands exactly on the final sparsity. The cubic ramp removes most channels
early, while the model still has capacity to recover, and little near the end.
"""

from __future__ import annotations

from dataclasses import dataclass

from ecospa_fx.errors import InputError

RAMPS = ("cubic", "linear")


@dataclass(frozen=True)
class PruneSchedule:
    """start_step < prune steps <= end_step; final_sparsity in [0, 1); every >= 1 steps between prunes."""

    start_step: int
    end_step: int
    final_sparsity: float
    every: int = 1
    ramp: str = "cubic"

    def __post_init__(self) -> None:
        for name in ("start_step", "end_step", "every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InputError(f"PruneSchedule.{name} must be an int, got {value!r}")
        if self.start_step < 0:
            raise InputError(f"PruneSchedule.start_step must be >= 0, got {self.start_step}")
        if self.end_step <= self.start_step:
            raise InputError(
                f"PruneSchedule ends before it starts: end_step={self.end_step} <= start_step={self.start_step} "
                "(pruning happens at steps in (start_step, end_step])"
            )
        if self.every < 1:
            raise InputError(f"PruneSchedule.every must be >= 1 step, got {self.every}")
        s = self.final_sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= float(s) < 1.0:
            raise InputError(f"final_sparsity must be a number in [0, 1) (0.5 removes half), got {s!r}")
        if self.ramp not in RAMPS:
            raise InputError(f"PruneSchedule.ramp must be one of {RAMPS}, got {self.ramp!r}")

    def sparsity_at(self, step: int) -> float:
        """Target sparsity after ``step`` optimizer steps (see module docstring)."""
        if step <= self.start_step:
            return 0.0
        if step >= self.end_step:
            return float(self.final_sparsity)
        u = (step - self.start_step) / (self.end_step - self.start_step)
        frac = 1.0 - (1.0 - u) ** 3 if self.ramp == "cubic" else u
        return float(self.final_sparsity) * frac

    def is_prune_step(self, step: int) -> bool:
        inside = self.start_step < step <= self.end_step
        return inside and ((step - self.start_step) % self.every == 0 or step == self.end_step)

    def prune_steps(self) -> list[int]:
        return [t for t in range(self.start_step + 1, self.end_step + 1) if self.is_prune_step(t)]
