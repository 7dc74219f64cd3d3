"""Coupled magnitude (data-free): the product, over the group's weight matrices, of the unit's slice norms.

For a Q/K unit ``||W_q[c]|| * ||W_k[c]||`` (the size of the term ``q_c k_c``), for V/O
``||W_v[c]|| * ||W_o[:, c]||``, for an FFN unit ``||W_up[i]|| * ||W_gate[i]|| * ||W_down[:, i]||``; see
``passes.score`` (the implementation lives there and is re-exported here).
"""

from __future__ import annotations

import numpy as np

from passes.groups import CoupledUnits
from passes.importance.base import Criterion, ScoreInputs
from passes.score import channel_norms, coupled_magnitude

__all__ = ["CRITERION", "channel_norms", "coupled_magnitude", "score"]


def score(groups: list[CoupledUnits], inputs: ScoreInputs) -> list[np.ndarray]:
    return [coupled_magnitude(g, inputs.facts, inputs.params) for g in groups]


CRITERION = Criterion("magnitude", score, doc="product of the coupled weights' slice norms (data-free)")
