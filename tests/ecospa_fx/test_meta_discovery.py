"""Discovery needs no weights: a model on the meta device gives the same groups as the real one."""

from __future__ import annotations

import copy

import pytest

import ecospa_fx
from tests.zoo import case_by_name


def _shape(report):
    return [(g.kind, [(m.param, m.dim, m.size) for m in g.members]) for g in report.groups]


@pytest.mark.parametrize("name", ["hf_llama_gqa", "hf_gpt2", "hf_phi3", "hf_qwen3", "hw_einsum"])
def test_meta_discovery_equals_real(name):
    case = case_by_name(name)
    real = case.build()
    inputs = case.inputs()
    meta = _meta_copy(real)
    meta_inputs = tuple(x.to("meta") for x in inputs)
    assert _shape(ecospa_fx.discover(real, inputs)) == _shape(ecospa_fx.discover(meta, meta_inputs))


def _meta_copy(model):
    return copy.deepcopy(model).to_empty(device="meta")
