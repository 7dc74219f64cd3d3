"""ONNX export of compressed models: dynamic batch/seq, onnx.checker, onnxruntime parity, clear errors."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

import ecospa_fx
from ecospa_fx.export import (
    DEFAULT_OPSET,
    FALLBACK_OPSET,
    ExportError,
    ParityError,
    export_onnx,
    token_dynamic_shapes,
)
from tests.zoo import case_by_name

#: (batch, seq) shapes checked in onnxruntime besides the (2, 8) example: two batch sizes, two lengths
OTHER_SHAPES = [(3, 5), (1, 12)]


def _tokens(batch: int, seq: int, vocab: int = 90, seed: int = 0) -> tuple:
    return (torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed)),)


def _initializer_numel(path) -> int:
    model = onnx.load(str(path))
    total = 0
    for init in model.graph.initializer:
        n = 1
        for d in init.dims:
            n *= d
        total += n if init.data_type == onnx.TensorProto.FLOAT else 0
    return total


@pytest.mark.parametrize("name", ["hf_llama_gqa", "hf_gpt2", "hw_interleaved_rope"])
def test_compressed_exports_with_dynamic_batch_and_seq(name, tmp_path):
    case = case_by_name(name)
    model, inputs = case.build(), case.inputs()
    compressed = ecospa_fx.compress(model, inputs, 0.5, dynamic_shapes=token_dynamic_shapes(inputs))
    result = export_onnx(
        compressed, inputs, tmp_path / "m.onnx", parity_inputs=[_tokens(b, s) for b, s in OTHER_SHAPES]
    )
    # structure: one dynamic file, opset 24, the compressed (not the dense) weights inside
    assert result.path.is_file() and result.checked
    assert result.opset == DEFAULT_OPSET
    assert result.dynamic_axes == {result.input_names[0]: {0: "batch", 1: "seq"}}
    assert result.notes == ()
    report = compressed.ecospa_report
    # (a tied LM head may add a folded transpose of the embedding, so compare with the dense count)
    assert report.params_after < report.params_before
    assert _initializer_numel(result.path) < report.params_before
    # numerics: onnxruntime matches PyTorch at (2, 8), (3, 5) and (1, 12)
    assert result.max_diff < 1e-4
    assert set(result.max_abs_diff) == set(result.output_names)
    onnx_input = onnx.load(str(result.path)).graph.input[0]
    assert [d.dim_param for d in onnx_input.type.tensor_type.shape.dim] == ["batch", "seq"]


def test_output_names_follow_the_model_outputs(tmp_path):
    case = case_by_name("hf_llama_gqa")
    compressed = ecospa_fx.compress(case.build(), case.inputs(), 0.5)
    result = export_onnx(compressed, case.inputs(), tmp_path / "m.onnx")
    assert result.output_names == ("logits",)


def test_static_compressed_module_exports_static_and_says_why(tmp_path):
    case = case_by_name("hf_llama_gqa")
    inputs = case.inputs()
    compressed = ecospa_fx.compress(case.build(), inputs, 0.5, dynamic_shapes=None)  # static on request
    assert compressed.ecospa_shapes == "static"
    result = export_onnx(compressed, inputs, tmp_path / "m.onnx", parity_inputs=[_tokens(3, 5)])
    assert not result.dynamic
    assert any("compressed with static shapes" in n for n in result.notes)
    assert any("parity on other shapes skipped" in n for n in result.notes)
    assert result.max_diff < 1e-4


def test_compressed_by_default_takes_other_batch_and_sequence_sizes_and_exports_dynamic(tmp_path):
    case = case_by_name("hf_llama_gqa")
    inputs = case.inputs()
    compressed = ecospa_fx.compress(case.build(), inputs, 0.5)
    assert compressed.ecospa_shapes == "dynamic"
    assert compressed(_tokens(3, 5)[0]).logits.shape[:2] == (3, 5)
    result = export_onnx(compressed, inputs, tmp_path / "m.onnx", parity_inputs=[_tokens(3, 5)])
    assert result.dynamic and result.max_diff < 1e-4


def test_plain_module_exports_dynamic(tmp_path):
    case = case_by_name("hw_gqa_sdpa")
    model, inputs = case.build(), case.inputs()
    result = export_onnx(model, inputs, tmp_path / "dense.onnx", parity_inputs=[_tokens(4, 6)])
    assert result.dynamic and result.max_diff < 1e-4


class BroadcastMqaSdpa(nn.Module):
    """Multi-query attention that lets SDPA broadcast K/V heads (4 query heads, 1 KV head, no
    ``enable_gqa``): what Falcon's SDPA did before transformers 5.25, written without transformers."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.heads, self.head_dim = heads, d // heads
        self.q, self.kv, self.o = nn.Linear(d, d), nn.Linear(d, 2 * self.head_dim), nn.Linear(d, d)

    def forward(self, x):
        b, s, d = x.shape
        q = self.q(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2, 1, self.head_dim).transpose(1, 3).unbind(2)  # [B, 1, S, hd] each
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.o(y.transpose(1, 2).reshape(b, s, d))


def test_opset_falls_back_when_the_attention_translation_fails(tmp_path):
    """SDPA that broadcasts K/V heads: the opset-24 ``Attention`` translation rejects it, so the default
    export falls back to opset 18 and says why; an explicit opset 24 fails and names the node."""
    model, inputs = BroadcastMqaSdpa().eval(), (torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0)),)
    result = export_onnx(model, inputs, tmp_path / "f.onnx")
    assert result.opset == FALLBACK_OPSET and result.max_diff < 1e-4
    assert any("scaled_dot_product_attention" in n and "q_num_heads" in n for n in result.notes)
    with pytest.raises(ExportError, match=r"opset 24: node scaled_dot_product_attention .*q_num_heads"):
        export_onnx(model, inputs, tmp_path / "g.onnx", opset=24)


def _sdpa_broadcasts_kv_heads(model: nn.Module, inputs: tuple) -> bool:
    """Some captured SDPA reads fewer K heads than Q heads (without ``enable_gqa``: broadcast)."""
    graph = torch.export.export(model, inputs, strict=False).graph
    sdpa = [n for n in graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert sdpa, "the premise needs an SDPA node"
    return any(n.args[0].meta["val"].shape[-3] != n.args[1].meta["val"].shape[-3] for n in sdpa)


def test_falcon_exports_at_the_opset_its_attention_allows(tmp_path):
    """Falcon's multi-query SDPA broadcast K/V heads up to transformers 5.24 (opset-18 fallback); 5.25
    repeats them first (``repeat_kv``) and translates at opset 24. Which one applies is read from the
    captured graph, not from the version; parity holds either way."""
    case = case_by_name("hf_falcon")
    model, inputs = case.build(), case.inputs()
    broadcasts = _sdpa_broadcasts_kv_heads(model, inputs)
    result = export_onnx(model, inputs, tmp_path / "f.onnx")
    assert result.opset == (FALLBACK_OPSET if broadcasts else DEFAULT_OPSET) and result.max_diff < 1e-4
    assert any("q_num_heads" in n for n in result.notes) == broadcasts


def test_parity_failure_names_the_output_and_the_difference(tmp_path):
    case = case_by_name("hf_llama_gqa")
    model, inputs = case.build(), case.inputs()
    with pytest.raises(ParityError, match=r"output 'logits': onnxruntime differs from PyTorch by .* \(> atol") as err:
        export_onnx(model, inputs, tmp_path / "m.onnx", atol=1e-12, dynamic=False)
    assert err.value.output == "logits" and err.value.diff > 1e-12


def test_unwritable_paths_fail_before_exporting(tmp_path):
    model, inputs = nn.Linear(4, 4), (torch.randn(2, 4),)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ExportError, match="is a file, not a folder"):
        export_onnx(model, inputs, blocker / "m.onnx")
    with pytest.raises(ExportError, match="it is a directory"):
        export_onnx(model, inputs, tmp_path)
    assert not (tmp_path / "m.onnx").exists()


def test_capture_failure_is_surfaced(tmp_path):
    class DataDependent(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x - 1  # Python branch on a tensor value

    with pytest.raises(ExportError, match=r"torch\.export could not capture DataDependent"):
        export_onnx(DataDependent(), (torch.randn(2, 3),), tmp_path / "m.onnx")


def test_bad_inputs():
    with pytest.raises(ExportError, match=r"torch\.nn\.Module"):
        export_onnx(lambda x: x, (torch.randn(2),), "x.onnx")
    with pytest.raises(ExportError, match="example_inputs"):
        export_onnx(nn.Linear(2, 2), (), "x.onnx")


def test_export_leaves_every_submodule_mode_as_it_was(tmp_path):
    """export_onnx exports in eval mode and gives back a train-mode model in train mode (a frozen
    BatchNorm still frozen)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.2), nn.Linear(8, 4)).train()
    model[1].eval()
    before = [m.training for m in model.modules()]
    result = export_onnx(model, (torch.randn(3, 4),), tmp_path / "m.onnx")
    assert result.max_diff < 1e-4  # compared in eval mode: dropout off, running statistics
    assert [m.training for m in model.modules()] == before


MODERN = [
    "hf_qwen3",
    "hf_gemma3",
    "hf_olmo2",
    "hf_cohere_qk_norm",
    "hf_phi",
    "hf_olmo_clip_qkv",
    "hf_nemotron_relu2",
    "hf_gpt_oss_sinks",
    "hf_qwen2_moe",  # routed experts through transformers::grouped_mm_fallback (ecospa_fx.onnx_translations)
    "hf_deepseek_v3",  # MLA; hf_deepseek_v2's complex rotary has no ONNX translation (dense model included)
    "hf_minicpm3",
    "hf_lfm2",  # a depthwise short conv between two projections
    "hf_mamba",  # a selective state-space scan
]


@pytest.mark.parametrize(
    ("name", "granularity"),
    [(n, "channel") for n in MODERN]
    + [pytest.param(n, "head", marks=pytest.mark.slow) for n in ("hf_cohere_qk_norm", "hf_olmo2", "hf_deepseek_v3")],
)
def test_modern_families_export_with_parity(name, granularity, tmp_path):
    """Issue 12: qk-norm (RMS, per projection, centring with a per-head weight), partial rotary, clipped
    qkv, squared-ReLU and multi-head latent attention models compress and export; onnxruntime matches the
    compressed module."""
    case = case_by_name(name)
    model, inputs = case.build(), case.inputs()
    compressed = ecospa_fx.compress(model, inputs, 0.5, granularity=granularity)
    assert compressed.ecospa_report.params_after < compressed.ecospa_report.params_before
    result = export_onnx(compressed, inputs, tmp_path / "m.onnx")
    assert result.checked and result.max_diff < 1e-4
