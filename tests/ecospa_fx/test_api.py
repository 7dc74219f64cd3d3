"""The public contract of compress()/discover(): report fields, errors for bad input, no mutation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ecospa_fx
from ecospa_fx import CaptureError, CompressConfig, InputError
from tests.zoo import case_by_name


@pytest.fixture(scope="module")
def llama():
    case = case_by_name("hf_llama_gqa")
    return case.build(), case.inputs()


def test_report_contract(llama):
    model, inputs = llama
    compressed = ecospa_fx.compress(model, inputs, 0.5, round_to=1)
    report = compressed.ecospa_report
    assert compressed.report is report
    assert {g.kind for g in report.groups} == {"qk", "vo", "ffn"}
    names = dict(model.named_parameters())
    for group in report.groups:
        for m in group.members:
            assert m.param in names  # original qualified names
            assert 0 <= m.dim < names[m.param].ndim
            assert all(0 <= i < names[m.param].shape[m.dim] for i in m.removed)
    qk = next(g for g in report.groups if g.kind == "qk")
    # rotary: a removed channel c comes with its rotate-half partner c +/- head_dim/2, in every head
    q = next(m for m in qk.members if m.param.endswith("q_proj.weight"))
    removed = set(q.removed)
    assert removed and all(((c % 8) + 4) % 8 + (c // 8) * 8 in removed for c in removed)
    assert report.params_after < report.params_before
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-4
    text = report.summary()
    assert "qk" in text and "left dense" in text and "parameters:" in text


def test_discover_changes_nothing(llama):
    model, inputs = llama
    report = ecospa_fx.discover(model, inputs)
    assert len(report) == report.count("qk") + report.count("vo") + report.count("ffn") == 6
    assert all(m.removed == () for g in report for m in g.members)


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, "0.5", True])
def test_sparsity_out_of_range(llama, bad):
    model, inputs = llama
    with pytest.raises(InputError, match="sparsity"):
        ecospa_fx.compress(model, inputs, bad)


def test_config_validation():
    with pytest.raises(InputError, match="granularity"):
        CompressConfig(granularity="rows")
    with pytest.raises(InputError, match="kinds"):
        CompressConfig(kinds=("qk", "mlp"))
    with pytest.raises(InputError, match="round_to"):
        CompressConfig(round_to=0)


def test_dict_and_bad_inputs(llama):
    model, inputs = llama
    with pytest.raises(InputError, match="dict"):
        ecospa_fx.compress(model, {"input_ids": inputs[0]})
    with pytest.raises(InputError, match="tuple"):
        ecospa_fx.compress(model, ())
    with pytest.raises(InputError, match=r"nn\.Module"):
        ecospa_fx.compress(lambda x: x, inputs)


def test_meta_model_is_refused_by_compress_but_discoverable():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
    x = torch.randn(2, 8, device="meta")
    with pytest.raises(InputError, match="meta"):
        ecospa_fx.compress(model, (torch.randn(2, 8),))
    report = ecospa_fx.discover(model, (x,))
    assert report.count("ffn") == 1


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.lin(x)
        return x


def test_untraceable_model_reports_export_error():
    with pytest.raises(CaptureError, match=r"torch\.export could not trace Untraceable"):
        ecospa_fx.compress(Untraceable(), (torch.randn(2, 4),))


def test_plain_mlp_gives_ffn_groups_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    x = torch.randn(4, 16)
    compressed = ecospa_fx.compress(model, (x,), 0.5)
    report = compressed.ecospa_report
    assert [g.kind for g in report.groups] == ["ffn"]
    assert compressed.get_parameter("0.weight").shape == (32, 16)
    assert compressed.get_parameter("2.weight").shape == (16, 32)


def test_model_without_couplings_is_no_error():
    model = nn.Linear(8, 8).eval()
    compressed = ecospa_fx.compress(model, (torch.randn(2, 8),), 0.5)
    assert compressed.ecospa_report.groups == []
    assert compressed.ecospa_report.params_after == compressed.ecospa_report.params_before


def test_unknown_op_fails_closed():
    class Sorted(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(8, 32)
            self.down = nn.Linear(32, 8)

        def forward(self, x):
            return self.down(torch.cumsum(self.up(x), dim=-1))

    compressed = ecospa_fx.compress(Sorted().eval(), (torch.randn(2, 8),), 0.5)
    report = compressed.ecospa_report
    assert report.groups == []
    assert any("cumsum" in r for s in report.skipped for r in s.reasons)
