"""The ``ZooCase`` record shared by the HF and hand-written zoos."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

#: The coupled-group kinds a case may list in ``expect``.
KINDS = ("qk", "vo", "ffn", "latent")


@dataclasses.dataclass
class ZooCase:
    """One test model.

    ``expect`` holds the expected number of coupled groups per kind, counted
    at channel granularity:

    * ``"qk"``: one group per (layer, KV head), or one per layer when a
      rotary cos/sin table shared by every head of the layer forces all heads
      to keep the same head-dim channels.
    * ``"vo"``: one group per attention module (V rows to O columns).
    * ``"ffn"``: one group per FFN (up (+gate) rows to down columns).
    * ``"latent"``: one group per normalised low-rank bottleneck (MLA's q and kv latents).

    A kind that is absent from ``expect`` is expected to produce 0 groups.
    """

    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], tuple]
    expect: dict[str, int]
    exact: bool = True
    notes: str = ""
    #: groups that discovery should find but report as skipped (not prunable exactly)
    skipped_min: int = 0
    #: ``torch.export.export(model, inputs, strict=False)`` works and matches eager
    exportable: bool = True
    #: "hf" or "handwritten"
    family: str = ""
    #: shape facts: layers, heads, kv_heads, head_dim, hidden, ffn, rotary, ...
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def expected(self, kind: str) -> int:
        return int(self.expect.get(kind, 0))

    def __repr__(self) -> str:  # keep pytest ids / logs short
        return f"ZooCase({self.name!r}, expect={self.expect})"


def seeded(seed: int, fn: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build ``fn()`` under ``torch.manual_seed(seed)``, in eval mode, fp32."""
    torch.manual_seed(seed)
    model = fn()
    return model.float().eval()


def token_inputs(vocab: int, batch: int = 2, seq: int = 8, seed: int = 1234) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, vocab, (batch, seq), generator=g),)


def float_inputs(*shape: int, seed: int = 1234) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g),)
