"""compress(..., importance=X): every criterion and allocation gives an exact rewrite (the mask oracle
holds), data criteria demand their inputs, and the new config fields are validated."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ecospa_fx
from ecospa_fx import CompressConfig, InputError
from ecospa_fx.config import IMPORTANCES
from passes.verify import probe_inputs
from tests.zoo import case_by_name


def lm_loss(out, batch):
    logits = out if isinstance(out, torch.Tensor) else out[0]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[0][:, 1:].flatten())


@pytest.fixture(scope="module")
def llama():
    case = case_by_name("hf_llama_gqa")
    model, inputs = case.build(), case.inputs()
    g = torch.Generator().manual_seed(7)
    calibration = [(torch.randint(0, 96, inputs[0].shape, generator=g),) for _ in range(2)]
    return model, inputs, calibration


@pytest.mark.parametrize("importance", IMPORTANCES)
def test_every_criterion_passes_the_mask_oracle(llama, importance):
    model, inputs, calibration = llama
    out = ecospa_fx.compress(
        model, inputs, 0.5, importance=importance, calibration=calibration, loss_fn=lm_loss, round_to=1
    )
    report = out.ecospa_report
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-4  # verify=True raised otherwise
    assert report.params_after < report.params_before
    assert {g.kind for g in report.groups} == {"qk", "vo", "ffn"}


@pytest.mark.parametrize(
    ("allocation", "budget"), [("global", "channels"), ("global", "params"), ("global", "flops"), ("uniform", "params")]
)
def test_budgets_pass_the_mask_oracle(llama, allocation, budget):
    model, inputs, calibration = llama
    out = ecospa_fx.compress(
        model,
        inputs,
        0.3,
        importance="activation",
        calibration=calibration,
        allocation=allocation,
        budget=budget,
        max_sparsity=0.8,
    )
    assert out.ecospa_report.max_abs_diff < 1e-4


def test_head_granularity_with_activation_scores():
    case = case_by_name("hf_bert")
    model, inputs = case.build(), case.inputs()
    out = ecospa_fx.compress(model, inputs, 0.5, granularity="head", importance="activation", calibration=[inputs])
    assert out.ecospa_report.max_abs_diff < 1e-4


def test_data_criteria_need_their_inputs(llama):
    model, inputs, calibration = llama
    with pytest.raises(InputError, match="calibration"):
        ecospa_fx.compress(model, inputs, 0.5, importance="activation")
    with pytest.raises(InputError, match="loss_fn"):
        ecospa_fx.compress(model, inputs, 0.5, importance="fisher", calibration=calibration)
    with pytest.raises(InputError, match="dict"):
        ecospa_fx.compress(model, inputs, 0.5, importance="activation", calibration=[{"x": inputs[0]}])


def test_new_config_fields_are_validated():
    with pytest.raises(InputError, match="importance"):
        CompressConfig(importance="taylor")
    with pytest.raises(InputError, match="allocation"):
        CompressConfig(allocation="greedy")
    with pytest.raises(InputError, match="budget"):
        CompressConfig(budget="bytes")
    with pytest.raises(InputError, match="max_sparsity"):
        CompressConfig(max_sparsity=0.0)


@pytest.mark.parametrize(
    ("name", "granularity"), [("hf_llama_gqa", "channel"), ("hf_bert", "channel"), ("hf_llama_gqa", "head")]
)
def test_compensation_passes_the_oracle_and_adds_output_biases(name, granularity):
    """The oracle compares against masked dense + the same biases, so it stays exact; the biases exist
    (created on bias-free Llama linears) and make the output differ from the uncompensated model."""
    case = case_by_name(name)
    model, inputs = case.build(), case.inputs()
    kw = {"granularity": granularity, "importance": "activation", "calibration": [inputs], "round_to": 1}
    kw["refit"] = "none"  # FLAP's mean compensation; with a refit the refit fits the bias (below)
    plain = ecospa_fx.compress(model, inputs, 0.5, **kw)
    out = ecospa_fx.compress(model, inputs, 0.5, compensate=True, **kw)
    assert out.ecospa_report.max_abs_diff < 1e-4
    assert len(out.ecospa_compensated) >= 2  # W_o and W_down of at least one layer
    for node in out.ecospa_compensated:
        assert out.get_parameter(f"_ecospa_bias_{node}").ndim == 1
    report = out.ecospa_report
    assert len(report.compensated) == len(out.ecospa_compensated)
    params = {m.param for g in report.groups for m in g.members}
    assert set(report.compensated) <= params and "bias compensation" in report.summary()
    with torch.no_grad():
        assert (_first(out(*inputs)) - _first(plain(*inputs))).abs().max() > 1e-6


def _first(y):
    return y if isinstance(y, torch.Tensor) else y[0]


def test_auto_importance_is_data_aware_with_calibration(llama):
    model, inputs, calibration = llama
    assert CompressConfig().importance == "auto"
    auto = ecospa_fx.compress(model, inputs, 0.5, calibration=calibration)
    act = ecospa_fx.compress(model, inputs, 0.5, importance="activation", calibration=calibration)
    mag = ecospa_fx.compress(model, inputs, 0.5, importance="magnitude")
    assert auto.ecospa_report.removed == act.ecospa_report.removed
    assert ecospa_fx.compress(model, inputs, 0.5).ecospa_report.removed == mag.ecospa_report.removed
    assert act.ecospa_report.removed != mag.ecospa_report.removed


def test_compensation_needs_calibration(llama):
    model, inputs, _ = llama
    with pytest.raises(InputError, match="compensate"):
        ecospa_fx.compress(model, inputs, 0.5, compensate=True)


def test_progress_reports_every_calibration_batch():
    """compress(progress=) is told (done, total) as each calibration batch is processed, ending at total."""
    case = case_by_name("hf_llama_gqa")
    model, inputs = case.build(), case.inputs()
    calls = []
    ecospa_fx.compress(
        model,
        inputs,
        0.5,
        importance="activation",
        calibration=[inputs] * 3,
        progress=lambda done, total: calls.append((done, total)),
    )
    scoring = calls[: calls.index((3, 3)) + 1]
    assert scoring[0] == (0, 3) and [d for d, _ in scoring] == sorted(d for d, _ in scoring)
    refit = calls[len(scoring) :]  # then one call per refit weight: W_o and W_down of 2 layers
    assert refit == [(k, 4) for k in range(1, 5)]


def test_fisher_leaves_the_user_grads_and_flags_as_they_were():
    """The captured module shares the user's Parameters: Fisher scoring must not clear their .grad."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    x = torch.randn(4, 8)
    model(x).pow(2).sum().backward()
    model[2].bias.grad = None  # a mix of grads and Nones
    model[0].bias.requires_grad_(False)
    grads = {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}
    objects = {n: p.grad for n, p in model.named_parameters()}
    ecospa_fx.compress(
        model,
        (x,),
        0.5,
        importance="fisher",
        calibration=[(x,), (torch.randn(4, 8),)],
        loss_fn=lambda out, batch: out.pow(2).mean(),
        round_to=1,
    )
    for name, p in model.named_parameters():
        assert p.grad is objects[name], name
        if grads[name] is not None:
            assert torch.equal(p.grad, grads[name]), name
    assert [p.requires_grad for p in model.parameters()] == [True, False, True, True]


def test_refit_is_the_default_with_calibration_and_passes_the_oracle(llama):
    """With calibration the kept W_o / W_down columns are refit (the report lists them) and the oracle,
    against the dense model carrying the same weights, stays exact; refit="none" leaves them as they were."""
    model, inputs, calibration = llama
    batches = calibration * 4
    out = ecospa_fx.compress(model, inputs, 0.5, calibration=batches, refit_damp=1e-3)
    plain = ecospa_fx.compress(model, inputs, 0.5, calibration=batches, refit="none")
    report = out.ecospa_report
    assert report.max_abs_diff < 1e-4 and not plain.ecospa_report.refit
    assert len(report.refit) == 4 and all(name.endswith(("o_proj.weight", "down_proj.weight")) for name in report.refit)
    assert "refit on calibration data: 4 weights" in report.summary() and report.to_dict()["refit"] == list(
        report.refit
    )
    assert report.removed == plain.ecospa_report.removed  # the refit changes values, not what is removed
    name = report.refit[0]
    assert not torch.equal(out.get_parameter(name), plain.get_parameter(name))
    assert not out.ecospa_compensated  # Llama has no o/down bias and refit_bias is off
    auto = ecospa_fx.compress(model, inputs, 0.5, calibration=batches).ecospa_report
    assert sorted(auto.refit + auto.not_refit) == sorted(report.refit) and auto.max_abs_diff < 1e-4  # damping


def test_reselection_changes_which_units_go_not_how_many(llama):
    """reselect=True: the refit re-chooses the V/O and FFN units at their sinks (OBS cost): the report lists the
    new indices, every member loses as many as the plan said, Q/K keep the plan's choice, and the oracle
    (with the report's indices) stays exact."""
    model, inputs, calibration = llama
    batches = calibration * 4
    chosen = ecospa_fx.compress(model, inputs, 0.5, calibration=batches, reselect=True).ecospa_report
    planned = ecospa_fx.compress(model, inputs, 0.5, calibration=batches).ecospa_report
    assert chosen.max_abs_diff < 1e-4
    groups = zip(chosen.groups, planned.groups, strict=True)
    pairs = [(a, b) for g, h in groups for a, b in zip(g.members, h.members, strict=True)]
    assert all(a.param == b.param and len(a.removed) == len(b.removed) for a, b in pairs)
    assert any(a.removed != b.removed for a, b in pairs if a.param.endswith("down_proj.weight"))
    assert all(a.removed == b.removed for a, b in pairs if a.param.endswith(("q_proj.weight", "k_proj.weight")))


def test_refit_bias_and_self_target(llama):
    model, inputs, calibration = llama
    out = ecospa_fx.compress(
        model, inputs, 0.5, calibration=calibration * 3, refit="self", refit_bias=True, refit_damp=0.1
    )
    assert out.ecospa_report.max_abs_diff < 1e-4 and len(out.ecospa_compensated) == 4
    for node in out.ecospa_compensated:
        assert out.get_parameter(f"_ecospa_bias_{node}").shape == (model.config.hidden_size,)


def test_auto_settings_resolve_to_the_best_measured_path():
    """importance/allocation/budget/across_kinds "auto": Fisher in one global pool by parameters when a
    loss is given; activation, uniform by channels with calibration only; magnitude without data; what the
    user sets explicitly stays."""
    from ecospa_fx.api import _resolved

    batches = [(torch.zeros(1, 4, dtype=torch.long),)]

    def settings(config):
        return config.importance, config.allocation, config.budget, config.across_kinds

    assert settings(_resolved(CompressConfig(), batches, loss_fn=lm_loss)) == ("fisher", "global", "params", True)
    assert settings(_resolved(CompressConfig(), batches)) == ("activation", "uniform", "channels", False)
    assert _resolved(CompressConfig(), None).importance == "magnitude"
    mine = CompressConfig(allocation="uniform", across_kinds=False)
    assert settings(_resolved(mine, batches, loss_fn=lm_loss)) == ("fisher", "uniform", "channels", False)
    with pytest.raises(InputError, match="across_kinds"):
        CompressConfig(across_kinds="yes")


def test_refit_options_are_checked(llama):
    model, inputs, _ = llama
    with pytest.raises(InputError, match="refit='dense' needs calibration"):
        ecospa_fx.compress(model, inputs, 0.5, refit="dense")
    with pytest.raises(InputError, match="refit must be one of"):
        CompressConfig(refit="obs")
    with pytest.raises(InputError, match="refit_damp"):
        CompressConfig(refit_damp=-1.0)
    with pytest.raises(InputError, match="refit_bias"):
        CompressConfig(refit_bias="yes")
    with pytest.raises(InputError, match="reselect must be True or False"):
        CompressConfig(reselect=1)


def test_refit_bias_goes_only_where_a_linear_can_take_it():
    """Falcon's linears are ``x @ W.T`` (matmul, no bias argument): their columns are refit, but no bias is
    added there (it used to be written into matmul's arguments and the result did not run)."""
    case = case_by_name("hf_falcon")
    model, inputs = case.build(), case.inputs()
    calibration = [inputs, *probe_inputs(inputs, 2, seed=5)]
    out = ecospa_fx.compress(
        model, inputs, 0.5, calibration=calibration, refit_bias=True, refit_damp=0.01, dynamic_shapes=None
    )
    assert out.ecospa_report.refit and out.ecospa_report.max_abs_diff < 1e-4
    nodes = {n.name: n for n in out.graph.nodes}
    assert all(nodes[name].target is torch.ops.aten.linear.default for name in out.ecospa_compensated)
