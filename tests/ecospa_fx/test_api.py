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


# ------------------------------------------------------------------ bad input, modes, nothing to compress
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


def _modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def test_submodule_modes_survive_compress_and_discover():
    """A frozen BatchNorm in a training model stays frozen; an MC-dropout stays on in an eval model."""
    model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 8), nn.Dropout(0.1))
    model.train()
    model[1].eval()
    mc = _mlp()
    mc.append(nn.Dropout(0.1).train())
    x = torch.randn(4, 8)
    for m in (model, mc):
        before = _modes(m)
        ecospa_fx.compress(m, (x,), 0.5, round_to=1)
        assert _modes(m) == before
        ecospa_fx.discover(m, (x,))
        assert _modes(m) == before


def test_submodule_modes_survive_a_failed_capture():
    model = Untraceable().train()
    model.lin.eval()
    with pytest.raises(CaptureError):
        ecospa_fx.compress(model, (torch.randn(2, 4),))
    assert _modes(model) == [True, False]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_example_inputs_are_input_errors(bad):
    x = torch.randn(4, 8)
    x[1, 2] = bad
    with pytest.raises(InputError, match=r"example_inputs\[0\] contains (NaN|infinite) values"):
        ecospa_fx.compress(_mlp(), (x,), 0.5)


def test_non_finite_calibration_is_an_input_error():
    x = torch.randn(4, 8)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(InputError, match=r"calibration\[1\]\[0\] contains NaN"):
        ecospa_fx.compress(_mlp(), (x,), 0.5, importance="activation", calibration=[(x,), (bad,)])


@pytest.mark.parametrize("name", ["atol", "rtol"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, "1e-4", None])
def test_tolerances_must_be_finite_and_non_negative(name, bad):
    with pytest.raises(InputError, match=name):
        CompressConfig(**{name: bad})
    with pytest.raises(InputError, match=name):
        ecospa_fx.compress(_mlp(), (torch.randn(4, 8),), 0.5, **{name: bad})


def test_atol_zero_is_refused_rtol_zero_is_fine():
    with pytest.raises(InputError, match="atol"):
        CompressConfig(atol=0.0)
    assert CompressConfig(rtol=0).rtol == 0


def test_integer_input_to_a_float_model_names_the_dtype_mismatch():
    x = torch.randint(0, 5, (4, 8))
    with pytest.raises(InputError, match=r"dtype mismatch: aten::linear .*input 0 is torch\.int64"):
        ecospa_fx.compress(_mlp(), (x,), 0.5)


def test_model_without_parameters_is_an_input_error():
    with pytest.raises(InputError, match="model has no parameters to compress"):
        ecospa_fx.compress(nn.ReLU(), (torch.randn(2, 8),), 0.5)


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        ((torch.randn(4, 9),), r"calibration\[1\]\[0\] has shape \(4, 9\).*axis 1 is 9"),
        ((torch.randn(4, 8), torch.randn(4, 8)), r"calibration\[1\] has 2 inputs but example_inputs has 1"),
        ((torch.randn(4, 8, dtype=torch.float64),), r"calibration\[1\]\[0\] has dtype torch\.float64"),
        ((torch.randn(4, 8, 1),), r"calibration\[1\]\[0\] has shape \(4, 8, 1\).*rank"),
    ],
)
def test_calibration_batches_unlike_the_example_inputs(batch, match):
    x = torch.randn(4, 8)
    with pytest.raises(InputError, match=match):
        ecospa_fx.compress(_mlp(), (x,), 0.5, importance="activation", calibration=[(x,), batch])


def test_calibration_may_vary_on_dynamic_axes_only():
    x = torch.randn(4, 8)
    dyn = ({0: torch.export.Dim("batch", min=2, max=16)},)
    out = ecospa_fx.compress(
        _mlp(),
        (x,),
        0.5,
        importance="activation",
        dynamic_shapes=dyn,
        calibration=[(torch.randn(3, 8),), (torch.randn(6, 8),)],
        round_to=1,
    )
    assert out.get_parameter("0.weight").shape == (16, 8)
    with pytest.raises(InputError, match=r"calibration\[0\]\[0\] .*axis 0 is 1, outside the dynamic range \[2, 16\]"):
        ecospa_fx.compress(
            _mlp(), (x,), 0.5, importance="activation", dynamic_shapes=dyn, calibration=[(torch.randn(1, 8),)]
        )


def test_empty_calibration_is_an_input_error():
    x = torch.randn(4, 8)
    for importance in ("auto", "magnitude", "activation"):
        with pytest.raises(InputError, match="calibration is empty; pass None for data-free scoring"):
            ecospa_fx.compress(_mlp(), (x,), 0.5, importance=importance, calibration=[])


def test_calibration_generator_is_read_once():
    x = torch.randn(4, 8)
    out = ecospa_fx.compress(_mlp(), (x,), 0.5, calibration=((torch.randn(4, 8),) for _ in range(2)))
    assert out.ecospa_report.groups


def test_head_granularity_with_dynamic_batch_leaves_mha_heads_dense():
    """nn.MultiheadAttention views q as [seq, batch * heads, head_dim]: under a dynamic batch that size is
    symbolic, so removing heads cannot be rewritten; the head group is left dense with the reason."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 5, 32)
    dyn = ({0: torch.export.Dim("batch", min=2, max=16)},)
    out = ecospa_fx.compress(layer, (x,), 0.5, granularity="head", dynamic_shapes=dyn, round_to=1)
    report = out.ecospa_report
    assert [g.kind for g in report.groups] == ["ffn"]
    head = next(s for s in report.skipped if s.kind == "head")
    assert "self_attn.in_proj_weight" in head.params
    assert any("symbolic" in r and "dynamic shapes" in r for r in head.reasons)
    y = torch.randn(3, 5, 32)  # another batch size runs
    assert out(y).shape == (3, 5, 32)


def test_conv_network_warns_that_nothing_was_compressed():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    with pytest.warns(UserWarning, match="nothing to compress in Sequential; no coupled channels were found"):
        out = ecospa_fx.compress(model, (torch.randn(1, 3, 8, 8),), 0.5)
    assert out.ecospa_report.groups == []
    assert "nothing to compress" in out.ecospa_report.summary()


def test_nothing_prunable_warning_lists_the_skipped_groups():
    model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 8)).eval()
    with pytest.warns(UserWarning, match=r"(?s)nothing to compress .*left dense.*\n  - .*1\.weight"):
        out = ecospa_fx.compress(model, (torch.randn(4, 8),), 0.5)
    text = out.ecospa_report.summary()
    assert "nothing to compress: every coupled group was left dense" in text and "batch_norm" in text


def test_training_mode_dropout_warns_and_the_result_is_in_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.5), nn.ReLU(), nn.Linear(32, 8)).train()
    x = torch.randn(4, 8)
    with pytest.warns(UserWarning, match=r"dropout/batch norm submodules in training mode: 1 \(Dropout\)"):
        out = ecospa_fx.compress(model, (x,), 0.5, round_to=1)
    assert model.training and not out.training and not any(_modes(out))
    eval_out = ecospa_fx.compress(model.eval(), (x,), 0.5, round_to=1)
    assert not eval_out.training
    assert torch.equal(out(x), eval_out(x))  # the same eval-mode function
