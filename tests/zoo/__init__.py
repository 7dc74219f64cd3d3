"""Test model zoo for the ecospa_fx structured-pruning pass.

Tiny models with random (seeded) weights, built from configs / plain torch.nn;
no network.  Each entry is a :class:`ZooCase` with the expected number of
coupled groups per kind (``qk``, ``vo``, ``ffn``) at channel granularity.

    from tests.zoo import ALL_CASES, case_by_name, renamed
    case = case_by_name("hf_llama_gqa")
    model, args = case.build(), case.inputs()
    ep = torch.export.export(model, args, strict=False)

Run ``python -m tests.zoo._selfcheck`` to build, run, export and compare every case.
(``--ops`` lists the exported aten targets, ``--decomp`` also runs ``run_decompositions()``.)

Export gotchas seen with torch 2.13 / transformers 5.23 (see case notes):

* HF rotary embeddings run under ``@torch.no_grad()``: exporting with grad enabled wraps the
  cos/sin computation in a ``torch.ops.higher_order.wrap_with_set_grad_enabled`` subgraph
  (Llama, Mistral, Qwen2/3, Phi-3, NeoX, Falcon, Mixtral); exporting under ``torch.no_grad()``
  inlines it.
* ``hf_gpt2`` (sdpa) exports fine but ``ep.run_decompositions()`` fails (view on a
  non-contiguous SDPA output); ``hf_gpt2_eager`` decomposes.
* Falcon uses ``x @ W.T`` (``aten.numpy_T`` + ``aten.matmul``, not ``linear``) and picks K/V
  with list indexing (``aten.index.Tensor`` with a lifted constant index).
"""

from __future__ import annotations

from .case import KINDS, ZooCase
from .handwritten import HANDWRITTEN_CASES
from .hf import HF_CASES
from .hf_modern import MODERN_CASES
from .rename import is_renamed_name, renamed

ALL_CASES: list[ZooCase] = [*HF_CASES, *MODERN_CASES, *HANDWRITTEN_CASES]

_BY_NAME = {c.name: c for c in ALL_CASES}
assert len(_BY_NAME) == len(ALL_CASES), "duplicate zoo case names"


def case_by_name(name: str) -> ZooCase:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no zoo case {name!r}; known: {sorted(_BY_NAME)}") from None


__all__ = [
    "ALL_CASES",
    "HANDWRITTEN_CASES",
    "HF_CASES",
    "KINDS",
    "ZooCase",
    "case_by_name",
    "is_renamed_name",
    "renamed",
]
