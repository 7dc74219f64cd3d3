"""ONNX for generation: past/present inputs and outputs at the compressed widths, dynamic batch, sequence
and past length, onnxruntime parity on prefill and decode, greedy tokens equal to PyTorch's, and int8."""

from __future__ import annotations

import onnx
import pytest
import torch

from ecospa_fx.errors import InputError
from ecospa_fx.generation.decode import generate
from ecospa_fx.generation.onnx_kv import export_kv_onnx, quantize_int8
from tests.ecospa_fx.generation.conftest import CAUSAL_LMS, compressed, left_padded_prompt


def _check_export(name: str, granularity: str, path) -> None:
    model, small, _ = compressed(name, granularity)
    result = export_kv_onnx(small, path)
    assert result.max_abs_diff["logits"] < 1e-4 and result.max_abs_diff["present"] < 1e-4
    ids, mask = left_padded_prompt(model.get_input_embeddings().weight.shape[0])
    assert torch.equal(generate(path, ids, 8, attention_mask=mask), generate(small, ids, 8, attention_mask=mask))


def test_kv_onnx_names_widths_and_greedy_parity(tmp_path):
    path = tmp_path / "kv.onnx"
    _check_export("hf_llama_gqa", "channel", path)
    graph = onnx.load(str(path)).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input}
    layout = compressed("hf_llama_gqa", "channel")[1].ecospa_kv
    assert dims["input_ids"] == ["batch_size", "sequence_length"]
    assert dims["attention_mask"] == ["batch_size", "total_sequence_length"]
    heads, width = layout.shapes[0]
    assert dims["past_key_values.0.key"] == ["batch_size", heads, "past_sequence_length", width]
    assert [v.name for v in graph.output][:3] == ["logits", "present.0.key", "present.0.value"]


def test_int8_runs_and_mostly_agrees(tmp_path):
    _, small, _ = compressed("hf_llama_gqa", "channel")
    fp32 = export_kv_onnx(small, tmp_path / "kv.onnx", check=False).path
    int8 = quantize_int8(fp32, tmp_path / "kv.int8.onnx")
    assert int8.stat().st_size < fp32.stat().st_size
    ids = torch.randint(3, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    a, b = generate(fp32, ids, 6, eos_token_id=[]), generate(int8, ids, 6, eos_token_id=[])
    assert a.shape == b.shape and torch.equal(a[:, :6], b[:, :6])


def test_export_of_a_model_without_cache_is_refused(tmp_path):
    with pytest.raises(InputError, match="KV cache"):
        export_kv_onnx(torch.nn.Linear(2, 2), tmp_path / "x.onnx")


NO_ONNX = {"hf_deepseek_v2": "complex rotary: torch.onnx has no complex ops (the dense model fails alike)"}


@pytest.mark.slow
@pytest.mark.parametrize("granularity", ["channel", "head"])
@pytest.mark.parametrize("name", CAUSAL_LMS)
def test_every_causal_lm_exports_for_generation(name, granularity, tmp_path):
    if name in NO_ONNX:
        pytest.skip(NO_ONNX[name])
    _check_export(name, granularity, tmp_path / "kv.onnx")


def test_onnxruntime_genai_runs_the_folder_and_agrees(tmp_path):
    og = pytest.importorskip("onnxruntime_genai")
    from ecospa_fx.generation.onnx_kv import write_genai_folder
    from tests.ecospa_fx.tiny_models import tokenizer

    model, small, _ = compressed("hf_llama_gqa", "head")
    onnx_path = export_kv_onnx(small, tmp_path / "kv.onnx").path
    folder = write_genai_folder(small, onnx_path, tmp_path / "genai", model.config, tokenizer())
    ids = torch.randint(3, 40, (1, 6), generator=torch.Generator().manual_seed(1))
    ours = generate(small, ids, 8)[0].tolist()
    genai_model = og.Model(str(folder))
    params = og.GeneratorParams(genai_model)
    params.set_search_options(max_length=14, do_sample=False)
    generator = og.Generator(genai_model, params)
    generator.append_tokens(ids[0].tolist())
    while not generator.is_done():
        generator.generate_next_token()
    theirs = [int(t) for t in generator.get_sequence(0)]
    assert theirs == ours[: len(theirs)] and len(theirs) > 6  # genai leaves the eos token out


def test_genai_needs_one_cache_width():
    from ecospa_fx.generation.onnx_kv import genai_problem
    from ecospa_fx.generation.target import KVLayout

    uniform = KVLayout(2, ((2, 4),) * 4, ((2, 8),) * 4, torch.float32)
    mixed = KVLayout(2, ((2, 4), (2, 4), (2, 8), (2, 8)), ((2, 8),) * 4, torch.float32)
    assert genai_problem(uniform) == "" and "differ across layers" in genai_problem(mixed)


def test_the_parity_bound_widens_to_pytorchs_own_float32_rounding_only(tmp_path):
    """Where onnxruntime misses the plain bound, the bound becomes twice PyTorch's float32 error on those
    inputs (its distance to the same graph in float64): a reference 1.0 off the exact function allows
    2.0; a reference that is exact allows no more than the plain bound."""
    from ecospa_fx.generation.onnx_kv import _inputs, _rounding_bound

    _, small, _ = compressed("hf_llama_gqa", "channel")
    inputs = _inputs(small, 1, 5, 0)
    with torch.no_grad():
        reference = small(*inputs)
    assert _rounding_bound(small, inputs, reference, 1e-4) < 1e-4 + 1e-9  # a tiny model rounds far below it
    shifted = (reference[0] + 1.0, *reference[1:])
    assert abs(_rounding_bound(small, inputs, shifted, 1e-4) - 2.0) < 1e-3
