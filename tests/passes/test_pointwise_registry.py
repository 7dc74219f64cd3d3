"""Elementwise ops from PyTorch's op registry (``passes.op_rules.pointwise_rule``): every op tagged
pointwise is channelwise, and "f(0) == 0" is decided by evaluating the op at 0 with its scalar arguments.

The audit lists reproduce the hand-written tables this replaced: no op may lose its rule or change its
zero-ness (except ``clamp``, which now depends on its bounds)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ecospa_fx
from passes.capture import capture
from passes.dataflow import analyse
from passes.op_rules import RULES, is_pointwise, maps_zero_to_zero, schema_name
from passes.verify import masked_copy, max_abs_diff

OLD_ZERO_PRESERVING = [
    "neg", "relu", "gelu", "silu", "tanh", "sin", "abs", "sqrt", "erf", "leaky_relu", "hardtanh", "elu",
    "mish", "sign", "relu6", "hardswish",
    "isnan",  # was listed as not zero-preserving; evaluated, isnan(0) is False (0): zero-preserving
]  # fmt: skip
OLD_NOT_ZERO = [
    "exp", "sigmoid", "cos", "rsqrt", "reciprocal", "log", "softplus", "hardsigmoid", "logical_not", "bitwise_not",
]  # fmt: skip


def _graph_node(fn, x):
    class M(nn.Module):
        def forward(self, x):
            return fn(x)

    gm = capture(M(), (x,))
    return next(n for n in gm.graph.nodes if n.op == "call_function" and "assert" not in str(n.target))


def _has_rule(node) -> bool:
    return schema_name(node.target) in RULES or is_pointwise(node.target)


@pytest.mark.parametrize("name", OLD_ZERO_PRESERVING)
def test_audit_zero_preserving_ops_keep_a_rule_and_keep_zero(name):
    fn = getattr(torch.ops.aten, name).default
    node = _graph_node(lambda x: fn(x), torch.randn(3, 4))
    assert _has_rule(node), name
    assert maps_zero_to_zero(node), name


@pytest.mark.parametrize("name", OLD_NOT_ZERO)
def test_audit_other_unary_ops_keep_a_rule_and_are_not_zero_preserving(name):
    fn = getattr(torch.ops.aten, name).default
    x = torch.randn(3, 4) if name not in ("logical_not", "bitwise_not") else torch.randn(3, 4) > 0
    node = _graph_node(lambda t: fn(t), x)
    assert _has_rule(node), name
    assert not maps_zero_to_zero(node), name


@pytest.mark.parametrize(
    ("fn", "zero"),
    [
        (lambda x: x.clamp(min=-1.0, max=1.0), True),
        (lambda x: x.clamp(min=0.5), False),  # clamp with a positive min is not zero-preserving
        (lambda x: x + 1.0, False),
        (lambda x: 1.0 - x, False),
        (lambda x: x * 3.0, True),
        (lambda x: x**2, True),
        (lambda x: x**0, False),
        (lambda x: 2.0**x, False),
        (torch.square, True),
        (torch.expm1, True),
    ],
)
def test_zero_by_evaluation(fn, zero):
    node = _graph_node(fn, torch.randn(3, 4))
    assert _has_rule(node)
    assert maps_zero_to_zero(node) is zero


class Ffn(nn.Module):
    def __init__(self, act, extra=None):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = nn.Linear(8, 32), nn.Linear(32, 8)
        self.act, self.extra = act, extra

    def forward(self, x):
        h = self.act(self.up(x))
        out = x + self.down(h)
        return out + self.extra(h) if self.extra is not None else out


def _clip_(h):
    return h.clamp_(-2.0, 2.0)  # OLMo's clip_qkv, in place


ACTIVATIONS = {
    "relu_squared": lambda h: F.relu(h).square(),
    "expm1_xielu_like": lambda h: torch.where(h > 0, h * h, torch.expm1(h) - h),
    "clamp_inplace": _clip_,
    "logsigmoid_not_zero_preserving": F.logsigmoid,  # f(0) != 0: exact only because W_down is zeroed
    "softsign": F.softsign,  # x / (1 + |x|): the divisor is 1, not 0, where a channel was removed
    "logaddexp_vs_self": lambda h: torch.logaddexp(h, h),
}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_pointwise_activations_give_exact_ffn_groups(name):
    model = Ffn(ACTIVATIONS[name]).eval()
    x = torch.randn(2, 5, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compressed = ecospa_fx.compress(model, (x,), 0.5, round_to=1)
    report = compressed.ecospa_report
    assert report.count("ffn") == 1, report.summary()
    assert all(s.kind != "hidden" or "residual" in " ".join(s.reasons) for s in report.skipped)
    removed = [(n, d, i) for (n, d), i in report.removed.items()]
    probe = torch.randn(2, 5, 8) * 2
    with torch.no_grad():
        assert max_abs_diff(compressed(probe), masked_copy(model, removed)(probe)) < 1e-4


def test_scalar_base_power_keeps_its_channels_and_blocks_the_sum():
    """``2 ** h`` used to lose h's labels (its rule read the scalar base): a sum of it went unseen."""
    model = Ffn(F.relu, extra=lambda h: (2.0**h).sum(-1, keepdim=True)).eval()
    gm = capture(model, (torch.randn(2, 5, 8),))
    analysis = analyse(gm)
    reasons = [b.reason for b in analysis.facts.blockers]
    assert any("not zero" in r for r in reasons), reasons
