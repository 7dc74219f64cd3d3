from __future__ import annotations

import pytest
import torch

from ecospa_fx.training import EcoSpaPruner, PruneSchedule, UnsupportedOptimizer
from ecospa_fx.training.state_slicing import ParamSlice, restrict, slice_grads, slice_optimizer

from .tiny import batches, tiny_llama


def _stepped(opt_cls, **kw):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 5))
    opt = opt_cls([w], **kw)
    for _ in range(2):
        (w.sin().sum()).backward()
        opt.step()
    return w, opt


@pytest.mark.parametrize(
    ("opt_cls", "kw"),
    [
        (torch.optim.AdamW, {"lr": 0.1, "amsgrad": True}),
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
        (torch.optim.Adagrad, {"lr": 0.1}),
        (torch.optim.RMSprop, {"lr": 0.1, "momentum": 0.5, "centered": True}),
    ],
)
def test_state_is_the_dense_state_restricted_to_kept_indices(opt_cls, kw):
    w, opt = _stepped(opt_cls, **kw)
    dense = {k: v.clone() for k, v in opt.state[w].items()}
    index = {0: torch.tensor([0, 2, 5]), 1: torch.tensor([1, 4])}
    new = torch.nn.Parameter(restrict(w.detach(), index).clone())
    s = ParamSlice("w", w, new, index)
    slice_grads([s])
    slice_optimizer(opt, [s])
    assert opt.param_groups[0]["params"] == [new] and w not in opt.state
    for key, value in dense.items():
        expected = value if value.dim() == 0 else value[[0, 2, 5]][:, [1, 4]]
        assert torch.equal(opt.state[new][key], expected), key
    assert torch.equal(new.grad, w.grad[[0, 2, 5]][:, [1, 4]])
    opt.step()  # the optimizer runs on the sliced state


def test_unsupported_optimizer_is_refused_before_capture():
    model = tiny_llama()
    opt = torch.optim.LBFGS(model.parameters())
    with pytest.raises(UnsupportedOptimizer, match=r"LBFGS.*AdamW"):
        EcoSpaPruner(model, (batches(1)[0],), opt, PruneSchedule(0, 4, 0.5))


def test_subclass_with_unknown_state_is_refused():
    class MyAdam(torch.optim.Adam):
        pass

    model = tiny_llama()
    with pytest.raises(UnsupportedOptimizer, match="MyAdam"):
        EcoSpaPruner(model, (batches(1)[0],), MyAdam(model.parameters()), PruneSchedule(0, 4, 0.5))


def test_adam_importance_needs_adam_state():
    model = tiny_llama()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="exp_avg_sq"):
        EcoSpaPruner(model, (batches(1)[0],), opt, PruneSchedule(0, 4, 0.5), importance="adam")
