"""Rewrite preflight (``passes.rewrite.preflight``): plans the rewrite cannot apply exactly are found
before the graph is touched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from passes.capture import capture
from passes.dataflow import analyse
from passes.groups import build_groups
from passes.rewrite import SYMBOLIC_REASON, RewriteError, apply_plan, preflight


def test_symbolic_batch_times_heads_size_is_flagged_by_preflight():
    """nn.MultiheadAttention views q as [seq, batch * heads, head_dim]; with a dynamic batch, removing
    heads would change a symbolic size, which the rewrite (literal sizes only) cannot patch."""
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True).eval()
    gm = capture(layer, (torch.randn(2, 3, 16),), ({0: torch.export.Dim("batch", min=2, max=8)},))
    analysis = analyse(gm)
    head = next(g for g in build_groups(analysis.facts, "head") if g.kind == "head")
    keep = np.ones(analysis.facts.n_channels, dtype=bool)
    keep[head.units[0]] = False  # remove one head
    bad = preflight(analysis, keep)
    flagged = [bad[s] for s in head.spaces if s in bad]
    assert flagged and flagged[0].startswith(SYMBOLIC_REASON) and "symbolic" in flagged[0]
    with pytest.raises(RewriteError, match="symbolic"):
        apply_plan(gm, analysis, keep)


def test_per_head_layer_norm_of_a_removed_head_is_dropped():
    """StableLM's qk_layernorm normalises each head with its own LayerNorm: at head granularity a removed
    head's norm sees an empty tensor and its weight is sliced to nothing; the rewrite drops that norm (its
    output is its empty input) instead of running it against the old normalized_shape."""
    import transformers as tf

    import ecospa_fx

    torch.manual_seed(0)
    config = tf.StableLmConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        qk_layernorm=True,
        use_cache=False,
        partial_rotary_factor=0.5,
    )
    model = tf.StableLmForCausalLM(config).eval()
    small = ecospa_fx.compress(model, (torch.randint(0, 64, (2, 8)),), 0.5, granularity="head")
    assert any(g.kind == "head" and g.units_removed for g in small.report.groups)
    assert small.report.max_abs_diff < 1e-5


class SplitHeadsMqaRotary(nn.Module):
    """transformers 5.25's Falcon attention (multi_query): one fused projection viewed [B, S, H + 2, D] and
    ``split([H, 1, 1], dim=-2)`` into q, k, v, so k keeps a size-1 head axis labelled with the constant
    offset H*D; rotate_half rotary with one cos/sin table for q and k; K/V repeated over the query heads
    (unsqueeze, expand, reshape); SDPA with an explicit scale."""

    def __init__(self, d: int = 32, heads: int = 4, head_dim: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(d, (heads + 2) * head_dim, bias=False)
        self.o = nn.Linear(heads * head_dim, d, bias=False)
        inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        h, hd = self.heads, self.head_dim
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x).view(b, s, -1, hd).split([h, 1, 1], dim=-2))
        angle = torch.outer(torch.arange(s, dtype=torch.float32), self.inv_freq)
        cos, sin = torch.cat((angle, angle), -1).cos(), torch.cat((angle, angle), -1).sin()

        def rotate_half(t: torch.Tensor) -> torch.Tensor:
            return torch.cat((-t[..., hd // 2 :], t[..., : hd // 2]), -1)

        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = (t[:, :, None].expand(b, 1, h, s, hd).reshape(b, h, s, hd) for t in (k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=hd**-0.5)
        return x + self.o(y.transpose(1, 2).reshape(b, s, -1))


def test_rotary_table_is_gathered_for_a_key_split_out_with_a_size1_head_axis():
    """The cos/sin table meets k's head_dim next to k's size-1 head axis (constant offset 32): it must be a
    channel-level gather site tied to k's kept channels (it was taken for a per-head table, left whole,
    and the compressed model failed with 'size of tensor a (4) must match ... b (8)')."""
    import ecospa_fx

    model = SplitHeadsMqaRotary().eval()
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    small = ecospa_fx.compress(model, (x,), 0.5, round_to=1)
    report = small.ecospa_report
    assert report.count("qk") == 1 and report.count("vo") == 1, report.summary()
    assert dict(small.named_parameters())["qkv.weight"].shape == (24, 32)  # 4 q heads, k, v: head_dim 4 each
    assert report.max_abs_diff < 1e-5
