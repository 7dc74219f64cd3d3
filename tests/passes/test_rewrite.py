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
