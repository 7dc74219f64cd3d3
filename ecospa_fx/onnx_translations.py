"""ONNX translations for ops that torch.onnx's function library (torchlib) does not translate.

Grouped matmul (routed MoE experts, transformers >= 5 by default): ``transformers::grouped_mm_fallback``
and ``aten::_grouped_mm`` take rows ``x [S, i]`` sorted by expert, a bank ``W [E, i, o]`` and the
cumulative row counts ``offs [E]``, and compute ``out[s] = x[s] @ W[e]`` for ``offs[e-1] <= s < offs[e]``
(rows past ``offs[-1]`` are zero). ``E`` is a static size, so the translation unrolls the experts:
``E`` pairs of ``Slice`` + ``MatMul`` with data-dependent row bounds, one ``Concat``, and a ``Pad`` for any
tail rows. Each row meets only its own expert's matrix, as in PyTorch: no ``[S, i, o]`` gather of expert
weights and no dense pass over every expert.
"""

from __future__ import annotations

from typing import Any

import torch
from onnxscript import opset18 as op

__all__ = ["translation_table"]


def _row_bounds(offs: Any, expert: int) -> tuple[Any, Any]:
    """``offs[expert-1]`` (0 for the first) and ``offs[expert]`` as 1-D int64 tensors for ``Slice``."""
    end = op.Slice(offs, [expert], [expert + 1], [0])
    start = op.Constant(value_ints=[0]) if expert == 0 else op.Slice(offs, [expert - 1], [expert], [0])
    return start, end


def grouped_mm(x: Any, weight: Any, offs: Any) -> Any:
    """``out[s] = x[s] @ weight[e(s)]``, experts unrolled (module docstring)."""
    experts = weight.shape[0]
    if not isinstance(experts, int):
        raise ValueError("grouped matmul: the number of experts must be static to translate to ONNX")
    offs = op.Cast(offs, to=7)  # int64, as Slice and Pad want
    pieces = []
    for e in range(experts):
        start, end = _row_bounds(offs, e)
        rows = op.Slice(x, start, end, [0])
        pieces.append(op.MatMul(rows, op.Gather(weight, op.Constant(value_int=e), axis=0)))
    out = op.Concat(*pieces, axis=0)
    tail = op.Sub(op.Shape(x, start=0, end=1), op.Slice(offs, [experts - 1], [experts], [0]))
    zero = op.Constant(value_ints=[0])
    return op.Pad(out, op.Concat(zero, zero, tail, zero, axis=0))


def _grouped_mm_aten(x: Any, weight: Any, offs: Any = None, bias: Any = None, out_dtype: Any = None) -> Any:
    if offs is None or bias is not None or out_dtype is not None:
        raise ValueError("aten::_grouped_mm: only 2-D rows x 3-D bank with offsets, no bias, is translated")
    return grouped_mm(x, weight, offs)


def translation_table() -> dict[Any, Any]:
    """``custom_translation_table`` for ``torch.onnx.export``: the grouped matmuls this module translates
    (the transformers op only when transformers registered it)."""
    table: dict[Any, Any] = {torch.ops.aten._grouped_mm.default: _grouped_mm_aten}
    transformers_ops = getattr(torch.ops, "transformers", None)
    if transformers_ops is not None and hasattr(transformers_ops, "grouped_mm_fallback"):
        table[transformers_ops.grouped_mm_fallback.default] = grouped_mm
    return table
