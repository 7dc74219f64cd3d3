"""Adversarial models (issue 8): each must give a clear error or a correct result, never a silently wrong
model.

"Correct" is the mask oracle: ``compress(..., verify=False)`` equals the dense model with the removed indices
zeroed, and ``compress(..., verify=True)`` (the default) does not raise. Where a construct makes pruning
inexact, the affected channels must stay dense and ``report.skipped`` must say why.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ecospa_fx
from ecospa_fx import CaptureError, EcospaError, InputError
from passes.verify import masked_copy, max_abs_diff
from tests.fuzz.generator import Spec, build

D, H, HD, FF = 16, 2, 8, 32


def _heads(t, n=H):
    b, s, _ = t.shape
    return t.view(b, s, n, -1).transpose(1, 2)


def _merge(t):
    b, n, s, hd = t.shape
    return t.transpose(1, 2).reshape(b, s, n * hd)


def _x(b=2, s=5, d=D, seed=0):
    return torch.randn(b, s, d, generator=torch.Generator().manual_seed(seed))


def _compress(model, inputs, sparsity=0.5, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ecospa_fx.compress(model, inputs, sparsity, round_to=1, **kw)


def exact_or_dense(model: nn.Module, inputs: tuple, sparsity: float = 0.5):
    """The mask oracle (verify=False, then checked here) and compress's own verification both hold;
    the user's model is untouched. Returns the report."""
    torch.manual_seed(0)
    model = model.eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    compressed = _compress(model, inputs, sparsity, verify=False)
    report = compressed.ecospa_report
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"compress changed the user's parameter {n}"
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), f"compress changed the user's buffer {n}"
    reference = masked_copy(model, [(n, d, i) for (n, d), i in report.removed.items()])
    with torch.no_grad():
        diff = max_abs_diff(compressed(*inputs), reference(*inputs))
    assert diff < 1e-4, f"mask oracle violated: {diff:.3e}\n{report.summary()}"
    for s in report.skipped:
        assert s.reasons and all(s.reasons), f"skipped without a reason: {s}"
    verified = _compress(model, inputs, sparsity).ecospa_report  # verify=True must not raise
    assert verified.max_abs_diff is not None
    return report


def _kinds(report) -> set[str]:
    return {g.kind for g in report.groups}


def _reasons(report) -> str:
    return " | ".join(r for s in report.skipped for r in s.reasons)


# ================================================================================ data-dependent control flow


class BranchOnValue(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(D, FF), nn.Linear(FF, D)

    def forward(self, x):
        h = self.up(x)
        if h.mean() > 0:  # Python branch on a tensor value
            h = F.gelu(h)
        return self.down(h)


class LoopOnValue(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(D, FF), nn.Linear(FF, D)

    def forward(self, x):
        h = self.up(x)
        for _ in range(int((x > 0).sum().item()) % 3 + 1):  # trip count from data
            h = F.gelu(h)
        return self.down(h)


@pytest.mark.parametrize("cls", [BranchOnValue, LoopOnValue], ids=lambda c: c.__name__)
@pytest.mark.parametrize("verb", ["compress", "discover"])
def test_data_dependent_control_flow_is_a_capture_error(cls, verb):
    fn = ecospa_fx.compress if verb == "compress" else ecospa_fx.discover
    with pytest.raises(CaptureError, match=rf"torch.export could not trace {cls.__name__}") as info:
        fn(cls().eval(), (_x(),))
    assert "data-dependent" in str(info.value)
    assert "advice" in str(info.value)


class DataDependentShape(nn.Module):
    """Boolean-mask indexing of the FFN activation: a data-dependent shape that export can trace."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(D, FF), nn.Linear(FF, D)

    def forward(self, x):
        h = F.gelu(self.up(x))
        return self.down(h) + h[h > 0].sum()


def test_data_dependent_shape_is_left_dense_with_a_reason():
    report = exact_or_dense(DataDependentShape(), (_x(),))
    assert "ffn" not in _kinds(report)
    assert "index" in _reasons(report)


# ================================================================================ in-place ops on activations


class InplaceRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(D, FF), nn.Linear(FF, D)

    def forward(self, x):
        return self.down(F.relu(self.up(x), inplace=True))


class InplaceScaleByParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(D, FF), nn.Linear(FF, D)
        self.g = nn.Parameter(torch.randn(FF))

    def forward(self, x):
        h = F.gelu(self.up(x))
        h.mul_(self.g)
        h.add_(1.0)  # removed channels become 1, not 0: still exact because down's columns go too
        return self.down(h)


class InplaceSliceFill(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(D, FF), nn.Linear(FF, D)

    def forward(self, x):
        h = F.gelu(self.up(x))
        h[..., :4] = 1.0  # overwrite some channels in place
        return self.down(h)


class InplaceIndexAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(D, FF), nn.Linear(FF, D)

    def forward(self, x):
        h = F.gelu(self.up(x))
        h[..., [1, 5, 7]] += 2.0
        return self.down(h)


class InplaceWithOtherReader(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(D, FF), nn.Linear(FF, D)

    def forward(self, x):
        h = F.gelu(self.up(x))
        g = h * 2  # read before the mutation
        h.add_(1.0)
        return self.down(h + g)


class InplaceCopyInto(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(D, FF), nn.Linear(FF, D)

    def forward(self, x):
        h = F.gelu(self.up(x))
        buf = torch.zeros_like(h)
        buf.copy_(h)
        buf[..., 0] = 3.0
        return self.down(buf)


class InplaceClampSigmoid(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(D, FF), nn.Linear(FF, D)

    def forward(self, x):
        h = self.up(x)
        h.clamp_(min=-1.0, max=1.0)
        h.sigmoid_()  # sigmoid(0) != 0, yet exact: the removed channel meets W_down's zeroed column
        return self.down(h)


class InplaceZeroThroughView(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(D, FF), nn.Linear(FF, D)

    def forward(self, x):
        h = self.up(x)
        b, s, _ = h.shape
        h.view(b, s, 4, FF // 4)[:, :, 0].zero_()  # zero channels 0..7 through a view
        return self.down(F.gelu(h))


class InplaceOnFusedQkvView(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x):
        y = self.qkv(x)
        y[..., :D].mul_(0.5)  # scale q in place through a view of the fused output
        q, k, v = y.split(D, -1)
        return self.o(_merge(F.scaled_dot_product_attention(_heads(q), _heads(k), _heads(v))))


class InplaceResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.up, self.down = nn.Linear(D, FF), nn.Linear(FF, D)

    def forward(self, x):
        x = x.clone()
        x += self.o(_merge(F.scaled_dot_product_attention(_heads(self.q(x)), _heads(self.k(x)), _heads(self.v(x)))))
        x += self.down(F.gelu(self.up(x)))
        return x


class InplaceOnQKV(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.vb = nn.Parameter(torch.randn(HD))

    def forward(self, x):
        q, k, v = _heads(self.q(x)), _heads(self.k(x)), _heads(self.v(x))
        q.mul_(HD**-0.5)
        k.add_(1.0)  # removed k channels become 1: their q partner is 0, so still exact
        v.add_(self.vb)  # a per-head-dim parameter shared by every head
        p = (q @ k.transpose(-1, -2)).softmax(-1)
        return self.o(_merge(p @ v))


INPLACE = [
    (InplaceRelu, {"ffn"}, None),  # relu_ is pointwise in the op registry, and its input has one reader
    (InplaceScaleByParam, {"ffn"}, None),
    (InplaceSliceFill, None, "fill_"),
    (InplaceIndexAdd, None, "index"),
    (InplaceWithOtherReader, None, "in-place op on a tensor that has other readers"),
    (InplaceCopyInto, None, "aten::copy_"),  # zeros_like carries h's labels; the write into it fails closed
    (InplaceClampSigmoid, {"ffn"}, None),  # clamp_/sigmoid_: pointwise; exact because W_down's columns go
    (InplaceZeroThroughView, None, "zero_"),
    (InplaceOnFusedQkvView, {"qk", "vo"}, None),
    (InplaceResidual, {"qk", "vo", "ffn"}, None),
    (InplaceOnQKV, {"qk", "vo"}, None),
]


@pytest.mark.parametrize(("cls", "kinds", "reason"), INPLACE, ids=[c[0].__name__ for c in INPLACE])
def test_inplace_ops_on_activations(cls, kinds, reason):
    torch.manual_seed(1)
    report = exact_or_dense(cls(), (_x(),))
    if kinds is not None:
        assert _kinds(report) == kinds, report.summary()
    if reason is not None:
        assert "ffn" not in _kinds(report)
        assert reason in _reasons(report), report.summary()


# ================================================================================ tied / shared parameters


class SharedFfnModule(nn.Module):
    """One FFN module object used by two layers (two attribute paths to the same parameters)."""

    def __init__(self):
        super().__init__()
        up, down = nn.Linear(D, FF), nn.Linear(FF, D)
        self.l0 = nn.ModuleDict({"up": up, "down": down})
        self.l1 = nn.ModuleDict({"up": up, "down": down})
        self.n = nn.LayerNorm(D)

    def forward(self, x):
        x = x + self.l0["down"](F.gelu(self.l0["up"](self.n(x))))
        return x + self.l1["down"](F.gelu(self.l1["up"](self.n(x))))


class TiedUpDownTranspose(nn.Module):
    """down = up.T (tied autoencoder-style FFN)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(FF, D) / 4)
        self.b = nn.Parameter(torch.randn(FF) * 0.1)

    def forward(self, x):
        return x + F.linear(F.gelu(F.linear(x, self.w, self.b)), self.w.t())


class TiedUpTwoDowns(nn.Module):
    """One up projection feeding two FFNs (gelu / relu) with their own down projections."""

    def __init__(self):
        super().__init__()
        self.up, self.d0, self.d1 = nn.Linear(D, FF), nn.Linear(FF, D), nn.Linear(FF, D)

    def forward(self, x):
        x = x + self.d0(F.gelu(self.up(x)))
        return x + self.d1(F.relu(self.up(x)))


class TiedQOfOneLayerIsVOfNext(nn.Module):
    """The same Linear is layer 0's q projection and layer 1's v projection (qk meets vo)."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(D, D)
        self.k0, self.v0, self.o0 = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.q1, self.k1, self.o1 = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x):
        a = F.scaled_dot_product_attention(_heads(self.shared(x)), _heads(self.k0(x)), _heads(self.v0(x)))
        x = x + self.o0(_merge(a))
        a = F.scaled_dot_product_attention(_heads(self.q1(x)), _heads(self.k1(x)), _heads(self.shared(x)))
        return x + self.o1(_merge(a))


class Albert(nn.Module):
    """One block applied three times (ALBERT-style cross-layer sharing)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.up, self.down = nn.Linear(D, FF), nn.Linear(FF, D)
        self.n1, self.n2 = nn.LayerNorm(D), nn.LayerNorm(D)

    def forward(self, x):
        for _ in range(3):
            h = self.n1(x)
            a = F.scaled_dot_product_attention(_heads(self.q(h)), _heads(self.k(h)), _heads(self.v(h)))
            x = x + self.o(_merge(a))
            x = x + self.down(F.gelu(self.up(self.n2(x))))
        return x


class SharedQK(nn.Module):
    """q and k are the same projection (Reformer-style shared-QK attention)."""

    def __init__(self):
        super().__init__()
        self.qk, self.v, self.o = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x):
        qk = _heads(self.qk(x))
        return x + self.o(_merge(F.scaled_dot_product_attention(qk, qk, _heads(self.v(x)))))


class TiedVIsFfnUp(nn.Module):
    """The attention's v projection is reused as the FFN's up projection."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o, self.down = (nn.Linear(D, D) for _ in range(5))

    def forward(self, x):
        a = F.scaled_dot_product_attention(_heads(self.q(x)), _heads(self.k(x)), _heads(self.v(x)))
        x = x + self.o(_merge(a))
        return x + self.down(F.gelu(self.v(x)))


class TiedEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.e = nn.Embedding(32, D)
        self.up, self.down, self.n = nn.Linear(D, FF), nn.Linear(FF, D), nn.LayerNorm(D)

    def forward(self, ids):
        h = self.e(ids)
        h = h + self.down(F.gelu(self.up(h)))
        return F.linear(self.n(h), self.e.weight)


TIED = [
    (SharedFfnModule, {"ffn"}),
    (TiedUpDownTranspose, {"ffn"}),
    (TiedUpTwoDowns, {"ffn"}),
    (TiedQOfOneLayerIsVOfNext, {"qk", "vo"}),
    (Albert, {"qk", "vo", "ffn"}),
    (SharedQK, {"qk", "vo"}),
    (TiedVIsFfnUp, {"qk", "vo"}),
    (TiedEmbedding, {"ffn"}),
]


def _aliases(model: nn.Module) -> dict[str, int]:
    return {n: id(p) for n, p in model.named_parameters(remove_duplicate=False)}


@pytest.mark.parametrize(("cls", "kinds"), TIED, ids=[c[0].__name__ for c in TIED])
def test_tied_parameters_are_pruned_consistently(cls, kinds):
    torch.manual_seed(2)
    model = cls().eval()
    inputs = (torch.randint(0, 32, (2, 5)),) if cls is TiedEmbedding else (_x(),)
    report = exact_or_dense(model, inputs)
    assert _kinds(report) == kinds, report.summary()
    # the tie is respected: every alias of one parameter loses the same indices (or none)
    alias = _aliases(model)
    by_param: dict[tuple[int, int], set[tuple[int, ...]]] = {}
    for (name, dim), idx in report.removed.items():
        by_param.setdefault((alias[name], dim), set()).add(idx)
    assert all(len(v) == 1 for v in by_param.values()), by_param
    # (that the compressed module keeps one tensor per tie: test_regressions.py::test_shared_block_stays_tied...)


def test_tied_parameter_in_two_groups_is_one_group():
    """A parameter that is q in one layer and v in the next ties the two groups: one removed set."""
    report = exact_or_dense(TiedQOfOneLayerIsVOfNext(), (_x(),))
    holding = [g for g in report.groups if any(m.param == "shared.weight" for m in g.members)]
    assert len(holding) == 1
    assert {m.param for m in holding[0].members} >= {"shared.weight", "k0.weight", "o1.weight"}


# ================================================================================ buffers derived from weights


class BufferRowNorms(nn.Module):
    """A buffer computed from up.weight at init, rescaling each FFN channel."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(D, FF), nn.Linear(FF, D)
        self.register_buffer("inv_norm", 1.0 / self.up.weight.detach().norm(dim=1))

    def forward(self, x):
        return self.down(F.gelu(self.up(x) * self.inv_norm))


class BufferShift(nn.Module):
    """A bias-like buffer (row sums of up.weight) added to the FFN activation."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(D, FF, bias=False), nn.Linear(FF, D)
        self.register_buffer("shift", self.up.weight.detach().sum(1).clone())

    def forward(self, x):
        return self.down(F.gelu(self.up(x) + self.shift))


class BufferAsDownWeight(nn.Module):
    """The down projection is a frozen buffer copy of up.weight (not a Parameter)."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(D, FF)
        self.register_buffer("down_t", self.up.weight.detach().clone())  # [FF, D]

    def forward(self, x):
        return x + F.gelu(self.up(x)) @ self.down_t


class BufferAsUpWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("up_w", torch.randn(FF, D) / 4)
        self.down = nn.Linear(FF, D)

    def forward(self, x):
        return x + self.down(F.gelu(F.linear(x, self.up_w)))


class WeightNormParametrization(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.utils.parametrizations.weight_norm(nn.Linear(D, FF))
        self.down = nn.Linear(FF, D)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x)))


class WeightNormPerRow(nn.Module):
    """w = g * v / ||v||_row, computed in forward (pruning rows is exact, but it must be proven)."""

    def __init__(self):
        super().__init__()
        self.v, self.g = nn.Parameter(torch.randn(FF, D)), nn.Parameter(torch.rand(FF) + 0.5)
        self.down = nn.Linear(FF, D)

    def forward(self, x):
        w = self.g[:, None] * self.v / self.v.norm(dim=1, keepdim=True)
        return x + self.down(F.gelu(F.linear(x, w)))


class WeightNormOverRows(nn.Module):
    """w = v / ||v||_col: every FFN channel's weight depends on every other channel's."""

    def __init__(self):
        super().__init__()
        self.v, self.down = nn.Parameter(torch.randn(FF, D)), nn.Linear(FF, D)

    def forward(self, x):
        return x + self.down(F.gelu(F.linear(x, self.v / self.v.norm(dim=0, keepdim=True))))


class WeightOverGlobalMax(nn.Module):
    def __init__(self):
        super().__init__()
        self.v, self.down = nn.Parameter(torch.randn(FF, D)), nn.Linear(FF, D)

    def forward(self, x):
        return x + self.down(F.gelu(F.linear(x, self.v / self.v.abs().max())))


class SoftmaxParamGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(D, FF), nn.Linear(FF, D)
        self.a = nn.Parameter(torch.randn(FF))

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x)) * self.a.softmax(0))


class CentredWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.v, self.down = nn.Parameter(torch.randn(FF, D)), nn.Linear(FF, D)

    def forward(self, x):
        return x + self.down(F.gelu(F.linear(x, self.v - self.v.sum(0, keepdim=True) / FF)))


class RunningStatBuffer(nn.Module):
    """A per-channel buffer updated in forward from the activations (a running statistic)."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(D, FF), nn.Linear(FF, D)
        self.register_buffer("ema", torch.ones(FF))

    def forward(self, x):
        h = F.gelu(self.up(x))
        self.ema.mul_(0.9).add_(0.1 * h.detach().abs().mean((0, 1)))
        return x + self.down(h / self.ema)


BUFFERS = [
    (BufferRowNorms, {"ffn"}),
    (BufferShift, None),
    (BufferAsDownWeight, None),  # kind: see test_regressions.py::test_buffer_down_projection_is_an_ffn_group
    (BufferAsUpWeight, None),
    (WeightNormParametrization, set()),
    (WeightNormPerRow, None),
    (WeightNormOverRows, set()),
    (WeightOverGlobalMax, set()),
    (SoftmaxParamGate, set()),
    (CentredWeight, set()),
    (RunningStatBuffer, set()),
]


@pytest.mark.parametrize(("cls", "kinds"), BUFFERS, ids=[c[0].__name__ for c in BUFFERS])
def test_buffers_and_weights_derived_from_weights(cls, kinds):
    torch.manual_seed(3)
    report = exact_or_dense(cls(), (_x(),))
    if kinds is not None:
        assert _kinds(report) == kinds, report.summary()
    if kinds == set():  # left dense: the report must still account for the FFN weights
        dense = {p for s in report.skipped for p in s.params}
        assert "down.weight" in dense, report.summary()


# ================================================================================ outputs


def _generated(**kw):
    base = {"layers": 2, "hidden": 32, "heads": 4, "kv_heads": 2, "ffn": "swiglu", "rotary": "rotate_half"}
    base.update(kw)
    return build(Spec(**base))


class TupleOut(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, ids):
        y = self.m(ids)
        return y, y.softmax(-1)


class DictOut(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, ids):
        y = self.m(ids)
        return {"logits": y, "probs": y.softmax(-1), "length": ids.shape[1]}


class ModelOutputOut(nn.Module):
    """A Hugging Face ``ModelOutput`` (a registered pytree dataclass)."""

    def __init__(self, m):
        super().__init__()
        from transformers.modeling_outputs import CausalLMOutput  # registers its pytree on import

        self.m = m
        self.out_cls = CausalLMOutput

    def forward(self, ids):
        return self.out_cls(logits=self.m(ids))


class PlainObject:
    def __init__(self, logits):
        self.logits = logits


class UnregisteredOut(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, ids):
        return PlainObject(self.m(ids))


@pytest.mark.parametrize("wrapper", [TupleOut, DictOut, ModelOutputOut], ids=lambda c: c.__name__)
def test_structured_outputs(wrapper):
    built = _generated()
    model = wrapper(built.model).eval()
    report = exact_or_dense(model, built.inputs)
    assert _kinds(report) == {"qk", "vo", "ffn"}
    compressed = _compress(model, built.inputs)
    with torch.no_grad():
        got, want = compressed(*built.inputs), model(*built.inputs)
    assert type(got) is type(want)
    if isinstance(want, dict):  # dict and ModelOutput (an OrderedDict)
        assert list(got.keys()) == list(want.keys())
    if wrapper is DictOut:
        assert got["length"] == want["length"]
    if isinstance(want, tuple):
        assert len(got) == len(want)


def test_unregistered_output_type_is_a_capture_error():
    built = _generated()
    with pytest.raises(CaptureError, match=r"PlainObject|not a known type|pytree"):
        ecospa_fx.compress(UnregisteredOut(built.model), built.inputs, 0.5)


# ================================================================================ inputs


def test_dict_example_inputs_are_an_input_error():
    built = _generated()
    ids = built.inputs[0]
    for bad in ({"ids": ids}, ({"ids": ids},)):
        for fn in (ecospa_fx.compress, ecospa_fx.discover):
            with pytest.raises(InputError, match="dict"):
                fn(built.model, bad)


class KeywordOnly(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, *, ids):
        return self.m(ids)


def test_keyword_only_forward_is_a_clear_error():
    built = _generated()
    with pytest.raises((InputError, CaptureError), match="positional"):
        ecospa_fx.compress(KeywordOnly(built.model), built.inputs, 0.5)


def test_list_and_bare_tensor_inputs_are_accepted():
    built = _generated()
    for inputs in (list(built.inputs), built.inputs[0]):
        report = _compress(built.model, inputs).ecospa_report
        assert report.max_abs_diff is not None and report.max_abs_diff < 1e-4


def test_wrong_dtype_inputs_are_a_clear_error():
    built = _generated()
    with pytest.raises(EcospaError, match="indices"):
        ecospa_fx.compress(built.model, (built.inputs[0].float(),), 0.5)


class IdsAndMask(nn.Module):
    """Integer token ids and a float (additive) or bool key mask as two positional inputs."""

    def __init__(self):
        super().__init__()
        self.e = nn.Embedding(32, D)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.up, self.down = nn.Linear(D, FF), nn.Linear(FF, D)

    def forward(self, ids, mask):
        x = self.e(ids)
        a = F.scaled_dot_product_attention(
            _heads(self.q(x)), _heads(self.k(x)), _heads(self.v(x)), attn_mask=mask[:, None, None, :]
        )
        x = x + self.o(_merge(a))
        return x + self.down(F.silu(self.up(x)))


@pytest.mark.parametrize("mask_kind", ["additive", "bool"])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_integer_and_float_inputs_together(mask_kind, id_dtype):
    torch.manual_seed(4)
    ids = torch.randint(0, 32, (2, 5), dtype=id_dtype)
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[0, 3:] = False
    mask = keep if mask_kind == "bool" else torch.zeros(2, 5).masked_fill(~keep, -1e9)
    report = exact_or_dense(IdsAndMask(), (ids, mask))
    assert _kinds(report) == {"qk", "vo", "ffn"}


def test_float64_model_and_inputs():
    built = build(Spec(layers=1, hidden=16, heads=2, kv_heads=2, token_input=False, ffn="geglu"))
    model = built.model.double()
    report = exact_or_dense(model, (built.inputs[0].double(),))
    assert _kinds(report) == {"qk", "vo", "ffn"}


# ================================================================================ batch size 1


@pytest.mark.parametrize("attention", ["sdpa", "matmul", "einsum", "bmm"])
def test_batch_size_one(attention):
    built = _generated(batch=1, seq=6, attention=attention)
    report = exact_or_dense(built.model, built.inputs)
    assert _kinds(report) == {"qk", "vo", "ffn"}


def test_batch_one_module_refuses_other_shapes_or_is_exact():
    """Compressed at batch 1 with static shapes, it must not silently run a batch of 2 wrongly."""
    built = _generated(batch=1, seq=6)
    compressed = _compress(built.model, built.inputs, verify=False)
    removed = [(n, d, i) for (n, d), i in compressed.ecospa_report.removed.items()]
    reference = masked_copy(built.model, removed)
    for shape in ((2, 6), (1, 7)):
        ids = torch.randint(0, 32, shape)
        try:
            with torch.no_grad():
                got = compressed(ids)
        except Exception as err:  # a guard: clear refusal
            assert "Guard" in str(err) or "shape" in str(err), err
            continue
        with torch.no_grad():
            assert max_abs_diff(got, reference(ids)) < 1e-4


class SqueezedSingleHead(nn.Module):
    """Batch 1 squeezed away, single head, q @ k.T on 2-D tensors."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(D, HD), nn.Linear(D, HD), nn.Linear(D, HD)
        self.o = nn.Linear(HD, D)
        self.up, self.down = nn.Linear(D, FF), nn.Linear(FF, D)

    def forward(self, x):
        h = x.squeeze()  # [1, S, D] -> [S, D]
        p = (self.q(h) @ self.k(h).T / math.sqrt(HD)).softmax(-1)
        h = h + self.o(p @ self.v(h))
        return (h + self.down(F.gelu(self.up(h)))).unsqueeze(0)


def test_batch_one_squeezed_away():
    report = exact_or_dense(SqueezedSingleHead(), (_x(b=1),))
    assert _kinds(report) == {"qk", "vo", "ffn"}
