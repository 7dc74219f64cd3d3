"""Calibration checks (``ecospa_fx.input_checks``) against a captured graph: structure, dtypes, static and
dynamic axes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ecospa_fx import InputError
from ecospa_fx.input_checks import calibration_list, check_batches, require_parameters
from passes.capture import capture


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, extra, scale):
        return self.lin(x) * scale + extra[0].sum()


def test_unbounded_dynamic_axis_accepts_any_size_and_nested_inputs_are_checked():
    x, extra = torch.randn(3, 4), (torch.randn(2),)
    gm = capture(Two(), (x, extra, 2.0), ({0: torch.export.Dim("b", min=2)}, ((None,),), None))
    check_batches(gm, (x, extra, 2.0), [(torch.randn(100, 4), (torch.randn(2),), 2.0)])
    with pytest.raises(InputError, match=r"calibration\[0\]\[1\] has shape \(3,\).*axis 0 is 3"):
        check_batches(gm, (x, extra, 2.0), [(torch.randn(5, 4), (torch.randn(3),), 2.0)])
    nested = r"calibration\[0\]\[1\] is a tensor of shape \(2,\) where example_inputs\[1\] is a tuple of 1"
    with pytest.raises(InputError, match=nested):
        check_batches(gm, (x, extra, 2.0), [(torch.randn(5, 4), torch.randn(2), 2.0)])
    with pytest.raises(InputError, match=r"calibration\[0\]\[2\] is a str, example_inputs has a tensor there"):
        check_batches(gm, (x, extra, torch.tensor(2.0)), [(x, extra, "2")])


def test_calibration_list_and_parameters():
    assert calibration_list(None) is None
    assert calibration_list(iter([(1,), (2,)])) == [(1,), (2,)]
    with pytest.raises(InputError, match="calibration is empty"):
        calibration_list(iter([]))
    with pytest.raises(InputError, match="calibration must be a list of batches"):
        calibration_list(3)
    with pytest.raises(InputError, match="no parameters"):
        require_parameters(nn.Sequential(nn.ReLU()))
