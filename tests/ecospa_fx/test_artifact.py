"""save -> load round trip: safetensors + JSON, rebuilt without the original weights, exact outputs."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import ecospa_fx
from ecospa_fx import InputError
from ecospa_fx.artifact import hf_export_info
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


def test_round_trip_with_bias_compensation(tmp_path):
    """compensate=True adds output biases (new parameters on bias-free Llama linears): load recreates
    them, so the reloaded model equals the compressed one exactly."""
    case = case_by_name("hf_llama_gqa")
    model, inputs = case.build(), case.inputs()
    compressed = ecospa_fx.compress(
        model, inputs, 0.5, round_to=1, importance="activation", calibration=[inputs], compensate=True
    )
    assert compressed.ecospa_compensated
    ecospa_fx.save(compressed, tmp_path / "comp", hf=False)
    reloaded = ecospa_fx.load(tmp_path / "comp")
    with torch.no_grad():
        a, b = compressed(*inputs), reloaded(*inputs)
    la = [x for x in torch.utils._pytree.tree_leaves(a) if isinstance(x, torch.Tensor)]
    lb = [x for x in torch.utils._pytree.tree_leaves(b) if isinstance(x, torch.Tensor)]
    assert all(torch.equal(x, y) for x, y in zip(la, lb, strict=True))


def test_load_rejects_non_artifacts(tmp_path):
    with pytest.raises(InputError, match="not an ecospa_fx artifact"):
        ecospa_fx.load(tmp_path)
    with pytest.raises(InputError, match="compress"):
        ecospa_fx.save(torch.nn.Linear(2, 2), tmp_path / "x")


# ------------------------------------------------------------------ transformers-loadable copy (hf/)
def _tiny(kind: str):
    from tests.ecospa_fx.tiny_models import bert_config, llama_config

    torch.manual_seed(0)
    if kind == "llama":
        return transformers.LlamaForCausalLM(llama_config()).eval(), transformers.AutoModelForCausalLM
    return transformers.BertModel(bert_config()).eval(), transformers.AutoModel


@pytest.mark.parametrize(
    ("kind", "options", "changes"),
    [
        (
            "llama",
            {"granularity": "head"},
            {"intermediate_size": 24, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8},
        ),
        ("llama", {"kinds": ("ffn",)}, {"intermediate_size": 24}),
        ("bert", {"kinds": ("ffn",)}, {"intermediate_size": 24}),
    ],
)
def test_uniform_widths_give_a_config_transformers_loads(kind, options, changes, tmp_path):
    model, auto = _tiny(kind)
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    compressed = ecospa_fx.compress(model, (x,), 0.5, **options)
    ecospa_fx.save(compressed, tmp_path / "art")
    record = hf_export_info(tmp_path / "art")
    assert record["written"] == "hf" and record["config_changes"] == changes
    config = json.loads((tmp_path / "art" / "hf" / "config.json").read_text())
    assert all(config[k] == v for k, v in changes.items())
    hf = auto.from_pretrained(tmp_path / "art" / "hf").eval()
    y = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(1))  # another shape
    reloaded = ecospa_fx.load(tmp_path / "art", example_inputs=(y,))
    with torch.no_grad():
        torch.testing.assert_close(hf(y)[0], reloaded(y)[0], atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in hf.parameters()) == compressed.ecospa_report.params_after


@pytest.mark.parametrize(
    ("kind", "options", "reason"),
    [
        ("llama", {}, "computes a different function"),  # head_dim channels: rotary frequencies differ
        ("bert", {}, "does not take the compressed tensors"),  # BERT's head size is hidden_size / heads
        ("bert", {"granularity": "head"}, "does not take the compressed tensors"),
    ],
)
def test_no_config_when_none_describes_the_model_exactly(kind, options, reason, tmp_path):
    model, _ = _tiny(kind)
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    ecospa_fx.save(ecospa_fx.compress(model, (x,), 0.5, **options), tmp_path / "art")
    record = hf_export_info(tmp_path / "art")
    assert record["written"] is None and reason in record["reason"]
    assert not (tmp_path / "art" / "hf").exists()


def test_non_uniform_widths_are_named():
    from ecospa_fx.hf_config import uniform_reason
    from ecospa_fx.report import Group, Member, Report

    def ffn(layer: int, kept: int) -> Group:
        return Group("ffn", (Member(f"layers.{layer}.mlp.up.weight", 0, 48, tuple(range(48 - kept))),), 48, 48 - kept)

    assert uniform_reason(Report(0.5, "channel", [ffn(0, 24), ffn(1, 24)])) == ""
    reason = uniform_reason(Report(0.5, "channel", [ffn(0, 24), ffn(1, 32)]))
    assert "not uniform across layers" in reason and "ffn" in reason


def test_dynamic_reload_is_exact_at_the_saved_shape(tmp_path):
    case = case_by_name("hf_llama_gqa")
    model, inputs = case.build(), case.inputs()
    compressed = ecospa_fx.compress(model, inputs, 0.5, round_to=1)
    ecospa_fx.save(compressed, tmp_path / "art", hf=False)
    dynamic = ecospa_fx.load(tmp_path / "art", dynamic_shapes=ecospa_fx.token_dynamic_shapes(inputs))
    with torch.no_grad():
        assert torch.equal(dynamic(*inputs).logits, compressed(*inputs).logits)
        assert dynamic(inputs[0][:, :5]).logits.shape[1] == 5
