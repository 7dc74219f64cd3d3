"""save -> load round trip: safetensors + JSON, rebuilt without the original weights, exact outputs."""

from __future__ import annotations

import json

import pytest
import torch

import ecospa_fx
from ecospa_fx import InputError
from tests.zoo import case_by_name


@pytest.mark.parametrize("name", ["hf_llama_gqa", "hf_gpt2", "hf_phi3"])
def test_round_trip_hf_reloads_from_config(name, tmp_path):
    case = case_by_name(name)
    model, inputs = case.build(), case.inputs()
    compressed = ecospa_fx.compress(model, inputs, 0.5, round_to=1)
    ecospa_fx.save(compressed, tmp_path / "art")
    assert json.loads((tmp_path / "art" / "ecospa.json").read_text())["removed"]
    reloaded = ecospa_fx.load(tmp_path / "art")  # rebuilt from the saved config, random init, then loaded
    with torch.no_grad():
        a, b = compressed(*inputs), reloaded(*inputs)
    la = [x for x in torch.utils._pytree.tree_leaves(a) if isinstance(x, torch.Tensor)]
    lb = [x for x in torch.utils._pytree.tree_leaves(b) if isinstance(x, torch.Tensor)]
    assert all(torch.equal(x, y) for x, y in zip(la, lb, strict=True))


def test_round_trip_plain_module_needs_fresh_instance(tmp_path):
    make = lambda: torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))  # noqa: E731
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(3, 8)
    compressed = ecospa_fx.compress(model, (x,), 0.5)
    ecospa_fx.save(compressed, tmp_path / "mlp")
    with pytest.raises(InputError, match="model="):
        ecospa_fx.load(tmp_path / "mlp")
    reloaded = ecospa_fx.load(tmp_path / "mlp", model=make().eval())
    assert torch.equal(reloaded(x), compressed(x))


def test_load_rejects_non_artifacts(tmp_path):
    with pytest.raises(InputError, match="not an ecospa_fx artifact"):
        ecospa_fx.load(tmp_path)
    with pytest.raises(InputError, match="compress"):
        ecospa_fx.save(torch.nn.Linear(2, 2), tmp_path / "x")
