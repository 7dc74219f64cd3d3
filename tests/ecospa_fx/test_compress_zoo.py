"""compress() over the architecture zoo: group counts, parameter shapes, the mask oracle.

Each case checks three things (DESIGN.md, style 6): how many groups of each kind discovery finds, that
every member parameter shrank by exactly its removed indices, and that the compressed model equals the
dense model with those indices zeroed (the mask oracle), at sparsity 0, 0.25 and 0.5.
"""

from __future__ import annotations

import pytest
import torch

import ecospa_fx
from passes.verify import masked_copy, max_abs_diff, probe_inputs
from tests.zoo import ALL_CASES, renamed
from tests.zoo.case import KINDS

CASES = [c for c in ALL_CASES if c.exportable]


def _counts(report) -> dict[str, int]:
    return {k: report.count(k) for k in KINDS}


@pytest.fixture(scope="module")
def built():
    cache: dict[str, tuple] = {}

    def get(case):
        if case.name not in cache:
            cache[case.name] = (case.build(), case.inputs())
        return cache[case.name]

    return get


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_discovered_group_counts(case, built):
    model, inputs = built(case)
    report = ecospa_fx.discover(model, inputs)
    assert _counts(report) == {k: case.expected(k) for k in KINDS}, case.notes
    skipped_attention = [s for s in report.skipped if s.kind in KINDS]
    assert len(skipped_attention) >= case.skipped_min


@pytest.mark.parametrize("sparsity", [0.25, 0.5])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_mask_oracle_and_shapes(case, sparsity, built):
    model, inputs = built(case)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    shapes = "auto" if sparsity == 0.5 else None  # the default (dynamic) path once, static once: time
    compressed = ecospa_fx.compress(model, inputs, sparsity, round_to=1, verify=False, dynamic_shapes=shapes)
    report = compressed.ecospa_report
    # the user's model is untouched
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    # structure: each member lost exactly its removed indices
    params = dict(compressed.named_parameters(remove_duplicate=False))
    removed = report.removed
    assert removed, "something must be removed at this sparsity"
    for (name, dim), idx in removed.items():
        assert params[name].shape[dim] == before[name].shape[dim] - len(idx)
    # numerics: compressed == dense with removed indices zeroed
    reference = masked_copy(model, [(n, d, i) for (n, d), i in removed.items()])
    with torch.no_grad():
        diff = max_abs_diff(compressed(*inputs), reference(*inputs))
    assert diff < 1e-4


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_zero_sparsity_is_identity(case, built):
    model, inputs = built(case)
    compressed = ecospa_fx.compress(model, inputs, 0.0, dynamic_shapes=None)
    assert compressed.ecospa_report.removed == {}
    with torch.no_grad():
        assert max_abs_diff(compressed(*inputs), model(*inputs)) < 1e-5


@pytest.mark.parametrize("case", [c for c in CASES if c.expected("qk")], ids=lambda c: c.name)
def test_head_granularity_oracle(case, built):
    model, inputs = built(case)
    compressed = ecospa_fx.compress(model, inputs, 0.5, granularity="head")
    report = compressed.ecospa_report
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-4
    assert all(g.kind in ("head", "ffn", "latent") for g in report.groups)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_refit_keeps_the_oracle_exact(case, built):
    """The default calibrated path (activation scores, W_o / W_down refit on the calibration data) is
    checked by compress's own oracle against the dense model carrying the refit weights."""
    model, inputs = built(case)
    calibration = [inputs, *probe_inputs(inputs, 2, seed=5)]
    compressed = ecospa_fx.compress(model, inputs, 0.5, calibration=calibration, refit_damp=0.01, dynamic_shapes=None)
    report = compressed.ecospa_report
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-4
    sinks = {g.kind for g in report.groups if g.units_removed} & {"vo", "ffn", "latent"}
    assert bool(report.refit) == bool(sinks) or not case.exact, (report.refit, sinks)


@pytest.mark.parametrize("name", ["hf_llama_gqa", "hf_gpt2", "hw_einsum", "hw_fused_chunk", "hf_phi3"])
def test_renamed_model_gives_identical_groups(name, built):
    case = next(c for c in CASES if c.name == name)
    model, inputs = built(case)
    a = ecospa_fx.compress(model, inputs, 0.5, round_to=1, dynamic_shapes=None).ecospa_report
    b = ecospa_fx.compress(renamed(model), inputs, 0.5, round_to=1, dynamic_shapes=None).ecospa_report
    shape = lambda r: [(g.kind, [(m.dim, m.size, m.removed) for m in g.members]) for g in r.groups]  # noqa: E731
    assert shape(a) == shape(b)
    assert _counts(a) == _counts(b)
