"""Capture (``passes.capture``): input checks, eval-mode capture that restores every submodule's own mode,
and the dtype check the exporter does not do."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from passes.capture import CaptureFailed, CaptureInputError, capture, check_inputs, train_mode_modules


def test_capture_restores_each_submodule_mode_even_on_failure():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Dropout(0.5)

        def forward(self, x):
            return self.b(self.a(x)) if x.sum() > 0 else x  # data-dependent: export fails

    model = Branchy().train()
    model.a.eval()
    with pytest.raises(CaptureFailed):
        capture(model, (torch.randn(2, 4),))
    assert [m.training for m in model.modules()] == [True, False, True]


def test_captured_module_is_marked_eval():
    gm = capture(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).train(), (torch.randn(2, 4),))
    assert not any(m.training for m in gm.modules())


def test_train_mode_modules_lists_only_mode_dependent_ones():
    model = nn.Sequential(
        nn.Linear(4, 4), nn.Dropout(0.0), nn.Dropout(0.1), nn.BatchNorm1d(4), nn.InstanceNorm1d(4), nn.LayerNorm(4)
    ).train()
    assert train_mode_modules(model) == ["2 (Dropout)", "3 (BatchNorm1d)"]
    model[3].eval()
    assert train_mode_modules(model) == ["2 (Dropout)"]
    assert train_mode_modules(model.eval()) == []


def test_non_finite_inputs_are_refused_by_name():
    x = torch.ones(2, 4)
    x[0, 0] = float("inf")
    with pytest.raises(CaptureInputError, match=r"calibration\[2\]\[1\] contains infinite values"):
        check_inputs(nn.Linear(4, 4), (torch.ones(2, 4), x), what="calibration[2]")
    check_inputs(nn.Linear(4, 4), (torch.ones(2, 4, dtype=torch.long),))  # integer tensors have no NaN


def test_dtype_mismatch_is_an_input_error_but_masks_and_ids_are_not():
    with pytest.raises(CaptureInputError, match=r"dtype mismatch: aten::linear .*input 0 is torch\.int64"):
        capture(nn.Linear(4, 4), (torch.ones(2, 4, dtype=torch.long),))

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.q = nn.Embedding(10, 8), nn.Linear(8, 8)

        def forward(self, ids, mask):
            h = self.q(self.emb(ids)).unflatten(-1, (2, 4)).transpose(1, 2)
            return F.scaled_dot_product_attention(h, h, h, attn_mask=mask)

    ids, mask = torch.randint(0, 10, (2, 5)), torch.ones(5, 5, dtype=torch.bool).tril()
    capture(Attn(), (ids, mask))  # int ids into an embedding, a bool mask into SDPA: fine


def test_copy_module_keeps_non_persistent_buffers_out_of_the_state_dict():
    """B1's root: ``copy.deepcopy`` of a GraphModule forgets ``_non_persistent_buffers_set``."""
    import warnings

    import ecospa_fx
    from passes.capture import capture, copy_module

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
            self.register_buffer("scale", torch.full((8,), 2.0), persistent=False)

        def forward(self, x):
            return x * self.scale + self.down(torch.relu(self.up(x)))

    model, x = Scaled().eval(), torch.randn(2, 3, 8)
    gm = capture(model, (x,))
    assert "scale" not in copy_module(gm).state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert "scale" not in ecospa_fx.compress(model, (x,), 0.5).state_dict()


def test_eager_experts_failure_names_the_traceable_implementations():
    """transformers' eager experts loop over the experts a batch hits (data-dependent): export fails, and the
    error says which experts implementations trace."""
    import transformers as tf

    cfg = tf.Qwen2MoeConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        moe_intermediate_size=8,
        shared_expert_intermediate_size=8,
        num_experts=2,
        num_experts_per_tok=1,
        use_cache=False,
    )
    cfg._experts_implementation = "eager"
    model = tf.Qwen2MoeForCausalLM(cfg).eval()
    with pytest.raises(CaptureFailed, match=r"set_experts_implementation\('grouped_mm'\)"):
        capture(model, (torch.randint(0, 32, (1, 5)),))
    model.set_experts_implementation("grouped_mm")
    assert capture(model, (torch.randint(0, 32, (1, 5)),)) is not None
