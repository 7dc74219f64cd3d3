"""Verification: the mask oracle.

For a plan that removes indices ``R`` along ``dim`` of parameter ``P`` (for every member of every group),
the dense model with ``P.index_fill(dim, R, 0)`` must compute what the compressed model computes: the
removed channels' terms vanish from every contraction they fed, and nothing else changes.

The comparison does not trust the example inputs alone: a lucky example (an offset input that happens to
be 0, all-ones ids) can hide a wrong rewrite, so it also runs on seeded *probes* of the same shapes and
dtypes (``probe_inputs``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.utils._pytree as pytree


def masked_copy(model: torch.nn.Module, removed: Iterable[tuple[str, int, tuple[int, ...]]]) -> torch.nn.Module:
    """A deep copy of ``model`` with the removed indices of each (param, dim) zeroed."""
    masked = copy.deepcopy(model)
    params = dict(masked.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, dim, indices in removed:
            if indices:
                index = torch.as_tensor(indices, device=params[name].device)
                params[name].index_fill_(dim, index, 0.0)
    return masked


def max_abs_diff(a, b) -> float:
    """Largest absolute difference over the tensor leaves of two outputs of the same structure."""
    leaves_a = [x for x in pytree.tree_leaves(a) if isinstance(x, torch.Tensor)]
    leaves_b = [x for x in pytree.tree_leaves(b) if isinstance(x, torch.Tensor)]
    if len(leaves_a) != len(leaves_b):
        return float("inf")
    worst = 0.0
    for x, y in zip(leaves_a, leaves_b, strict=True):
        if x.shape != y.shape:
            return float("inf")
        if x.is_floating_point():
            worst = max(worst, (x.float() - y.float()).abs().max().item() if x.numel() else 0.0)
        elif not torch.equal(x, y):
            return float("inf")
    return worst


def max_abs_value(a) -> float:
    leaves = [x for x in pytree.tree_leaves(a) if isinstance(x, torch.Tensor) and x.is_floating_point()]
    return max((x.abs().max().item() for x in leaves if x.numel()), default=0.0)


PROBES = 2  # seeded random inputs checked besides the example (measured cost: see benchmarks/README)


def probe_inputs(example_inputs: tuple, n: int = PROBES, seed: int = 0) -> list[tuple]:
    """``n`` seeded inputs shaped and typed like ``example_inputs``: floats drawn N(0, 1) (scaled to the
    example's spread when it has one); integer ids drawn within the example's [min, max]; booleans and
    0/1 integer tensors (attention masks) and non-tensors kept as given."""
    gen = torch.Generator().manual_seed(seed)
    return [tuple(_probe(x, gen) for x in example_inputs) for _ in range(n)]


def _probe(x, gen: torch.Generator):
    if not isinstance(x, torch.Tensor) or x.numel() == 0 or x.dtype == torch.bool or x.is_meta:
        return x
    if x.is_floating_point():
        spread = float(x.detach().double().std()) if x.numel() > 1 else 0.0
        scale = spread if spread > 0 and spread == spread and spread < float("inf") else 1.0
        noise = torch.randn(x.shape, generator=gen, dtype=torch.float64) * scale
        return noise.to(dtype=x.dtype, device=x.device)
    if x.is_complex():
        return x
    low, high = int(x.min()), int(x.max())
    if low >= 0 and high <= 1:  # a mask: keep what the caller gave
        return x
    return torch.randint(low, high + 1, x.shape, generator=gen).to(dtype=x.dtype, device=x.device)


@torch.no_grad()
def oracle_diff(
    model, compressed, example_inputs: tuple, removed, probes: int | None = None, state=None
) -> tuple[float, float]:
    """(max |compressed(x) - masked_dense(x)|, max |masked_dense(x)|) over the example inputs and ``probes``
    seeded probes of the same shapes (probes whose dense output is not finite are skipped).

    ``state`` (a ``passes.state.StateMap``) narrows carried-state inputs for the compressed model (the
    dense model gets them whole, removed channels included: they must not matter) and narrows the dense
    model's state outputs before comparing.

    Both run in float64, so fp32 rounding (which differs between a sum over zeroed terms and a sum
    without them) does not hide or fake a mismatch: an exact rewrite gives ~0.
    """
    reference = masked_copy(model, removed).eval()
    batches = [example_inputs, *probe_inputs(example_inputs, PROBES if probes is None else probes)]
    try:
        return _compare(_as_float64(reference), _as_float64(compressed), [_float64(b) for b in batches], state)
    except RuntimeError:  # a graph that insists on float32 somewhere: compare in the model's dtype
        return _compare(reference.float(), compressed, batches, state)


def _compare(reference, candidate, batches: list[tuple], state=None) -> tuple[float, float]:
    worst, scale = 0.0, 0.0
    for k, inputs in enumerate(batches):
        try:
            expected = reference(*inputs)
        except Exception:
            if not k:
                raise
            continue  # a probe the dense model itself rejects (ids it cannot embed, ...) says nothing
        size = max_abs_value(expected)
        if k and not size < float("inf"):
            continue  # nor does one it overflows on
        got = candidate(*(state.narrow_inputs(inputs) if state else inputs))
        if state:
            expected, got = state.narrow_outputs(pytree.tree_leaves(expected)), pytree.tree_leaves(got)
        worst = max(worst, max_abs_diff(got, expected))
        scale = max(scale, size)
    return worst, scale


def _float64(inputs: tuple) -> tuple:
    return tuple(x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)


def _as_float64(module):
    """A float64 copy of a module; in graph modules (and their submodules, e.g. HF rotary under
    ``wrap_with_set_grad_enabled``) export's float32 dtype assertions go and float32 casts become
    float64 casts, so both sides of the oracle compute in float64 end to end."""
    candidate = copy.deepcopy(module).double()
    for sub in candidate.modules():
        if not isinstance(sub, torch.fx.GraphModule):
            continue
        for node in list(sub.graph.nodes):
            if node.op != "call_function":
                continue
            if "_assert_tensor_metadata" in str(node.target):
                sub.graph.erase_node(node)
            elif node.kwargs.get("dtype") is torch.float32:
                node.update_kwarg("dtype", torch.float64)
            elif any(a is torch.float32 for a in node.args):
                node.args = tuple(torch.float64 if a is torch.float32 else a for a in node.args)
        sub.recompile()
    return candidate
