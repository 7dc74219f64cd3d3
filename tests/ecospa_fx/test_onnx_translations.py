"""ONNX translations of ops torchlib lacks (``ecospa_fx.onnx_translations``): onnxruntime matches PyTorch."""

from __future__ import annotations

import torch
from torch import nn

import ecospa_fx
from ecospa_fx.export import export_onnx
from tests.passes.test_op_rules import GroupedExperts


class GroupedMatmul(nn.Module):
    """One grouped matmul with the row counts given as an input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.bank = nn.Parameter(torch.randn(3, 4, 8))

    def forward(self, x, offs):
        import transformers.integrations.moe  # noqa: F401  (registers transformers::grouped_mm_fallback)

        return torch.ops.transformers.grouped_mm_fallback(x, self.bank, offs)


def test_grouped_matmul_translation_handles_empty_experts_and_tail_rows(tmp_path):
    """Expert 1 gets no row and row 6 lies past ``offs[-1]`` (zero in PyTorch): the unrolled Slice/MatMul
    translation agrees with the op, row bounds read from ``offs`` at run time."""
    x, offs = torch.randn(7, 4), torch.tensor([2, 2, 6], dtype=torch.int32)
    other = (torch.randn(5, 4), torch.tensor([0, 3, 5], dtype=torch.int32))
    model = GroupedMatmul()
    assert model(x, offs)[6].abs().max() == 0 and model(x, offs)[:2].abs().max() > 0
    result = export_onnx(model, (x, offs), tmp_path / "g.onnx", dynamic=False)
    assert result.checked and result.max_diff < 1e-5
    result = export_onnx(model, (x, offs), tmp_path / "d.onnx", parity_inputs=[other])
    assert result.checked and result.max_diff < 1e-5


def test_compressed_grouped_experts_export_with_parity(tmp_path):
    x = torch.randn(10, 8)
    compressed = ecospa_fx.compress(GroupedExperts().eval(), (x,), 0.5, round_to=1)
    result = export_onnx(compressed, (x,), tmp_path / "m.onnx", dynamic=False)
    assert result.checked and result.max_diff < 1e-5
