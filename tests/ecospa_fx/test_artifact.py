"""save -> load round trip: safetensors + JSON, rebuilt without the original weights, exact outputs."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import ecospa_fx
from ecospa_fx import InputError
from ecospa_fx.artifact import check_artifact, hf_export_info
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


# ------------------------------------------------------------------ exact round trips (buffers, tied weights)
class _ScaledMlp(torch.nn.Module):
    """An MLP with a non-persistent buffer on the root module."""

    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)
        self.register_buffer("scale", torch.linspace(0.5, 2.0, 8), persistent=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x))) * self.scale


def test_non_persistent_root_buffer_round_trips(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    compressed = ecospa_fx.compress(_ScaledMlp().eval(), (x,), 0.5)
    ecospa_fx.save(compressed, tmp_path / "art")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "art" / "model.safetensors"), "pt") as f:
        assert "scale" not in set(f.keys())  # non-persistent: not state, as in PyTorch's own state_dict
    reloaded = ecospa_fx.load(tmp_path / "art", model=_ScaledMlp().eval())
    assert torch.equal(reloaded(x), compressed(x))


def test_tied_embedding_is_stored_once_and_retied(tmp_path):
    from safetensors import safe_open

    from tests.ecospa_fx.tiny_models import llama_config

    config = llama_config()
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    compressed = ecospa_fx.compress(model, (x,), 0.5, kinds=("ffn",))
    ecospa_fx.save(compressed, tmp_path / "art")
    with safe_open(str(tmp_path / "art" / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    assert "lm_head.weight" not in stored and "model.embed_tokens.weight" in stored
    plan = json.loads((tmp_path / "art" / "ecospa.json").read_text())
    assert plan["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    reloaded = ecospa_fx.load(tmp_path / "art")
    assert reloaded.get_parameter("lm_head.weight") is reloaded.get_parameter("model.embed_tokens.weight")
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, compressed(x).logits)


def test_artifact_files_respect_the_umask(tmp_path):
    import os
    import stat

    x = torch.randn(3, 8)
    compressed = ecospa_fx.compress(_ScaledMlp().eval(), (x,), 0.5)
    old = os.umask(0o022)
    try:
        ecospa_fx.save(compressed, tmp_path / "art")
    finally:
        os.umask(old)
    for name in ("model.safetensors", "ecospa.json"):
        assert stat.S_IMODE((tmp_path / "art" / name).stat().st_mode) == 0o644, name


# ------------------------------------------------------------------ damaged or edited artifacts
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A plain-module artifact and a tiny Llama one (with a transformers copy), written once."""
    root = tmp_path_factory.mktemp("saved")
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    ecospa_fx.save(ecospa_fx.compress(_ScaledMlp().eval(), (x,), 0.5), root / "mlp")
    model, _ = _tiny("llama")
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    ecospa_fx.save(ecospa_fx.compress(model, (ids,), 0.5, kinds=("ffn",)), root / "llama")
    return root


def _copy(saved, name: str, tmp_path):
    import shutil

    return shutil.copytree(saved / name, tmp_path / name)


def _edit_plan(art, edit) -> None:
    path = art / "ecospa.json"
    plan = json.loads(path.read_text())
    edit(plan)
    path.write_text(json.dumps(plan))


PLAN_EDITS = {
    "empty object": lambda p: p.clear(),
    "format": lambda p: p.update(format=99),
    "granularity": lambda p: p.update(granularity=3),
    "removed": lambda p: p.update(removed=[["up.weight", "zero", [1]]]),
    "removed index": lambda p: p.update(removed=[["up.weight", 0, [-1]]]),
    "inputs missing": lambda p: p.pop("inputs"),
    "input dtype": lambda p: p["inputs"][0].update(dtype="nn"),
    "input shape": lambda p: p["inputs"][0].update(shape="3x8"),
    "aliases": lambda p: p.update(aliases=["x"]),
    "checksums": lambda p: p.update(checksums={"model.safetensors": "abc"}),
    "hf_export": lambda p: p.update(hf_export={"written": 5}),
    "source": lambda p: p.update(source=["here"]),
}


@pytest.mark.parametrize("edit", PLAN_EDITS, ids=list(PLAN_EDITS))
def test_malformed_plan_is_an_input_error_naming_the_file(saved, tmp_path, edit):
    art = _copy(saved, "mlp", tmp_path)
    _edit_plan(art, PLAN_EDITS[edit])
    with pytest.raises(InputError, match=r"ecospa\.json"):
        ecospa_fx.load(art, model=_ScaledMlp().eval())


@pytest.mark.parametrize("text", ["{oops", "[1, 2]", "", "\xff"])
def test_unparsable_plan_is_an_input_error_naming_the_file(saved, tmp_path, text):
    art = _copy(saved, "mlp", tmp_path)
    (art / "ecospa.json").write_text(text, encoding="latin-1")
    with pytest.raises(InputError, match=r"ecospa\.json"):
        ecospa_fx.load(art, model=_ScaledMlp().eval())


def test_removed_index_out_of_range_is_an_input_error(saved, tmp_path):
    art = _copy(saved, "mlp", tmp_path)
    _edit_plan(art, lambda p: p["removed"][0][2].__setitem__(0, 10**6))  # same count, out of range
    with pytest.raises(InputError, match="removes channel 1000000"):
        ecospa_fx.load(art, model=_ScaledMlp().eval())


HUGE = {
    "input shape": lambda p: p["inputs"][0].update(shape=[10**6, 10**6]),
    "input rank": lambda p: p["inputs"][0].update(shape=[1] * 40),
    "tokens beyond positions": lambda p: p["inputs"][0].update(shape=[1, 10**5]),
    "vocab_size": lambda p: p["hf_config"].update(vocab_size=10**6),  # sizes a regression could still allocate
    "intermediate_size": lambda p: p["hf_config"].update(intermediate_size=10**5),
    "num_hidden_layers": lambda p: p["hf_config"].update(num_hidden_layers=64),
    "vocab_size type": lambda p: p["hf_config"].update(vocab_size="many"),
}


@pytest.mark.parametrize("edit", HUGE, ids=list(HUGE))
def test_tampered_sizes_are_refused_before_allocating(saved, tmp_path, edit, monkeypatch):
    """A size in ecospa.json that disagrees with the stored tensors is refused before the model or an
    example input is allocated (the architecture is checked on the meta device)."""
    art = _copy(saved, "llama", tmp_path)
    _edit_plan(art, HUGE[edit])
    built = []
    monkeypatch.setattr(transformers.LlamaForCausalLM, "post_init", lambda self: built.append(self))
    with pytest.raises(InputError, match=r"ecospa\.json"):
        ecospa_fx.load(art)
    assert all(p.is_meta for m in built for p in m.parameters())


def _overwrite(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


WEIGHT_DAMAGE = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "empty": lambda p: p.write_bytes(b""),
    "64 bytes overwritten": lambda p: _overwrite(p, p.stat().st_size - 200, bytes(range(64))),
}


@pytest.mark.parametrize("damage", WEIGHT_DAMAGE, ids=list(WEIGHT_DAMAGE))
def test_damaged_weights_are_an_input_error_naming_the_file(saved, tmp_path, damage):
    art = _copy(saved, "mlp", tmp_path)
    WEIGHT_DAMAGE[damage](art / "model.safetensors")
    with pytest.raises(InputError, match=r"model\.safetensors.*(sha256|safetensors)"):
        ecospa_fx.load(art, model=_ScaledMlp().eval())
    with pytest.raises(InputError, match=r"model\.safetensors"):
        check_artifact(art)


def test_artifact_without_checksums_loads_with_a_warning(saved, tmp_path):
    art = _copy(saved, "mlp", tmp_path)
    _edit_plan(art, lambda p: p.pop("checksums"))
    with pytest.warns(ecospa_fx.EcospaWarning, match="no checksums"):
        reloaded = ecospa_fx.load(art, model=_ScaledMlp().eval())
    assert isinstance(reloaded, torch.nn.Module)
    WEIGHT_DAMAGE["truncated"](art / "model.safetensors")
    with pytest.warns(ecospa_fx.EcospaWarning), pytest.raises(InputError, match=r"model\.safetensors cannot be read"):
        ecospa_fx.load(art, model=_ScaledMlp().eval())
