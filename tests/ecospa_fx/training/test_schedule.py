from __future__ import annotations

import pytest

from ecospa_fx.errors import InputError
from ecospa_fx.training import PruneSchedule


def test_cubic_ramp_reaches_final_sparsity_at_end_step():
    s = PruneSchedule(10, 40, 0.5, every=10)
    assert s.prune_steps() == [20, 30, 40]
    assert s.sparsity_at(10) == 0.0
    assert s.sparsity_at(25) == pytest.approx(0.5 * (1 - 0.5**3))
    assert s.sparsity_at(40) == s.sparsity_at(99) == 0.5
    values = [s.sparsity_at(t) for t in s.prune_steps()]
    assert values == sorted(values)


def test_linear_ramp_and_end_step_off_the_grid():
    s = PruneSchedule(0, 25, 0.4, every=10, ramp="linear")
    assert s.prune_steps() == [10, 20, 25]
    assert s.sparsity_at(10) == pytest.approx(0.16)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"start_step": 10, "end_step": 5, "final_sparsity": 0.5}, "ends before it starts"),
        ({"start_step": 10, "end_step": 10, "final_sparsity": 0.5}, "ends before it starts"),
        ({"start_step": 0, "end_step": 5, "final_sparsity": 1.0}, r"\[0, 1\)"),
        ({"start_step": 0, "end_step": 5, "final_sparsity": -0.1}, r"\[0, 1\)"),
        ({"start_step": 0, "end_step": 5, "final_sparsity": 0.5, "every": 0}, "every"),
        ({"start_step": -1, "end_step": 5, "final_sparsity": 0.5}, "start_step"),
        ({"start_step": 0, "end_step": 5, "final_sparsity": 0.5, "ramp": "exp"}, "ramp"),
        ({"start_step": 0.5, "end_step": 5, "final_sparsity": 0.5}, "int"),
    ],
)
def test_bad_schedules_fail_up_front(kwargs, match):
    with pytest.raises(InputError, match=match):
        PruneSchedule(**kwargs)
