"""Pluggable importance criteria: name -> ``Criterion`` (one small module each).

- ``magnitude``: coupled weight magnitude (data-free), ``passes.importance.magnitude``;
- ``activation``: activation-aware coupled energy at the contraction sinks, ``.activation``;
- ``fisher``: empirical Fisher of the unit masks from a user loss, ``.fisher``;
- ``uncoupled``, ``random``: baselines, ``.baselines``.

``score_groups(name, groups, inputs)`` returns one score array per group (one score per unit).
"""

from __future__ import annotations

import numpy as np

from passes.groups import CoupledUnits
from passes.importance import activation, baselines, fisher, magnitude
from passes.importance.base import Criterion, LossFn, ScoreInputs

CRITERIA: dict[str, Criterion] = {
    c.name: c
    for c in (
        magnitude.CRITERION,
        activation.CRITERION,
        fisher.CRITERION,
        baselines.UNCOUPLED,
        baselines.RANDOM,
    )
}


def score_groups(name: str, groups: list[CoupledUnits], inputs: ScoreInputs) -> list[np.ndarray]:
    """One score per unit for every group in ``groups`` under criterion ``name``."""
    criterion = CRITERIA[name]
    if criterion.needs_calibration and not inputs.calibration:
        raise ValueError(f"importance {name!r} needs calibration batches")
    if criterion.needs_loss and inputs.loss_fn is None:
        raise ValueError(f"importance {name!r} needs a loss_fn(outputs, batch)")
    if not groups:
        return []
    scores = criterion.score(groups, inputs)
    for group, s in zip(groups, scores, strict=True):
        if len(s) != len(group.units) or not np.all(np.isfinite(s)):
            raise ValueError(f"importance {name!r} gave invalid scores for a {group.kind} group")
    return [np.asarray(s, dtype=np.float64) for s in scores]


__all__ = ["CRITERIA", "Criterion", "LossFn", "ScoreInputs", "score_groups"]
