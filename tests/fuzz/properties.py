"""The properties every generated model must satisfy, as plain functions (used by the hypothesis tests and
by ``python -m tests.fuzz.explore``, which runs many examples without stopping at the first failure).

Each ``check_*`` raises ``PropertyFailure`` with the spec's code in its message, so a failing example can be
rebuilt with one line.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from dataclasses import dataclass

import numpy as np
import torch

import ecospa_fx
from passes.verify import masked_copy, max_abs_diff, probe_inputs
from tests.fuzz.generator import Built, Spec
from tests.zoo.rename import renamed

KINDS = ("qk", "vo", "ffn")
HEAD_KINDS = ("head", "ffn")
ORACLE_ATOL = 1e-4  # fp32, compressed vs masked dense copy
IDENTITY_ATOL = 1e-5
ONNX_ATOL = 1e-4
PROBES = 2  # seeded inputs besides the example, for the oracle


class PropertyFailure(AssertionError):
    pass


@dataclass(frozen=True)
class KnownBug:
    """A discovery shortfall already reported: the count check tolerates exactly this deviation."""

    name: str
    applies: object  # Spec -> bool
    expected: object  # (Spec, Truth, granularity) -> dict[str, int]: the counts the current library gives


KNOWN_BUGS: list[KnownBug] = [
    # none open; fixed: cross-attention over a learned memory dropped its vo group
    # (tests/fuzz/test_regressions.py::test_learned_memory_cross_attention_vo_group)
]  # fmt: skip


@dataclass(frozen=True)
class KnownCrash:
    """A reported bug that makes compress return a broken module for some specs: any failure of the oracle
    check (wrong group counts, a module that raises on its own inputs) is tolerated for those specs."""

    name: str
    applies: object  # (Spec, granularity) -> bool


KNOWN_CRASHES: list[KnownCrash] = [
    # none open; fixed: fused qkv + MQA + bmm (stale view literal) and MQA + rotary + enable_gqa at head
    # granularity (q-only head group): tests/fuzz/test_regressions.py
]  # fmt: skip


def known_crash(spec: Spec, granularity: str, err: BaseException) -> str | None:
    return next((c.name for c in KNOWN_CRASHES if c.applies(spec, granularity)), None)


def _fail(built: Built, what: str) -> PropertyFailure:
    return PropertyFailure(f"{what}\n  spec: {built.spec.summary()}\n  repro: {built.spec.code()}")


RECONCILED = "do not fit a reshape shared with other groups"  # planned, then left dense by compress


def counts(report, granularity: str = "channel") -> dict[str, int]:
    """Discovered (prunable) groups per kind: planned groups plus those compress left dense afterwards
    because the kept channels of fused neighbours did not fit one reshape."""
    out = {k: report.count(k) for k in (KINDS if granularity == "channel" else HEAD_KINDS)}
    for s in report.skipped:
        if s.kind in out and any(RECONCILED in r for r in s.reasons):
            out[s.kind] += 1
    return out


def match_truth(built: Built, report, granularity: str) -> list[str]:
    """Raise unless the report's group counts are the ground truth (or a known bug's deviation from it);
    return the names of the known bugs that explained a deviation."""
    got = counts(report, granularity)
    want = built.truth.expected_counts(granularity)
    if got == want:
        return []
    for bug in KNOWN_BUGS:
        if bug.applies(built.spec) and got == bug.expected(built.spec, built.truth, granularity):
            return [bug.name]
    raise _fail(
        built,
        f"discovered group counts at {granularity} granularity {got} != ground truth {want}\n  groups: "
        f"{[(g.kind, g.params) for g in report.groups]}\n  skipped: "
        f"{[(s.kind, s.params[:4], s.reasons[:2]) for s in report.skipped]}",
    )


def report_shape(report):
    return [(g.kind, [(m.dim, m.size, m.removed) for m in g.members]) for g in report.groups]


def removed_triples(report) -> list[tuple[str, int, tuple[int, ...]]]:
    return [(n, d, i) for (n, d), i in report.removed.items()]


def compress(model, inputs, sparsity, granularity="channel"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ecospa_fx.compress(model, inputs, sparsity, round_to=1, granularity=granularity, verify=False)


# ------------------------------------------------------------------------------------------ checks


def check_discovery_and_identity(built: Built) -> list[str]:
    """Zero sparsity: nothing removed, same function; the channel-granularity groups match the ground
    truth (one qk, vo, ffn group per attention / FFN module; qk skipped where a norm over head_dim is).
    Returns the names of known bugs that explained a deviation."""
    model, inputs, truth = built.model, built.inputs, built.truth
    c0 = compress(model, inputs, 0.0)
    report = c0.ecospa_report
    if report.removed:
        raise _fail(built, f"zero sparsity removed channels: {report.removed}")
    with torch.no_grad():
        diff = max_abs_diff(c0(*inputs), model(*inputs))
    if not diff < IDENTITY_ATOL:
        raise _fail(built, f"zero sparsity is not the identity: max abs diff {diff:.3e}")
    explained = match_truth(built, report, "channel")
    skipped_qk = [s for s in report.skipped if s.kind == "qk"]
    if truth.qk_skipped and len(skipped_qk) < truth.qk_skipped:
        raise _fail(
            built,
            f"expected >= {truth.qk_skipped} qk groups reported skipped (norm over head_dim), got "
            f"{[(s.params, s.reasons) for s in skipped_qk]}",
        )
    for s in report.skipped:
        if not s.reasons or not all(isinstance(r, str) and r for r in s.reasons):
            raise _fail(built, f"skipped group without a reason: {s}")
    return explained


def check_oracle(built: Built, sparsity: float, granularity: str):
    """compress(verify=False) == the dense model with the removed indices zeroed; shapes shrank by exactly
    the removed indices; the user's model is untouched; protected channels are never removed."""
    model, inputs, truth = built.model, built.inputs, built.truth
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        compressed = compress(model, inputs, sparsity, granularity)
    except ecospa_fx.EcospaError as err:
        raise _fail(built, f"compress(sparsity={sparsity}, granularity={granularity!r}) raised {err!r}") from err
    report = compressed.ecospa_report
    for name, p in model.named_parameters():
        if not torch.equal(p, before[name]):
            raise _fail(built, f"compress modified the user's parameter {name}")
    params = dict(compressed.named_parameters(remove_duplicate=False))
    for (name, dim), idx in report.removed.items():
        if name not in params:
            raise _fail(built, f"report names {name}, which the compressed module does not have")
        if params[name].shape[dim] != before[name].shape[dim] - len(idx):
            raise _fail(
                built,
                f"{name} dim {dim}: {tuple(before[name].shape)} -> {tuple(params[name].shape)} but the "
                f"report removed {len(idx)} indices",
            )
        if any(not 0 <= i < before[name].shape[dim] for i in idx):
            raise _fail(built, f"{name} dim {dim}: removed indices out of range: {idx}")
    kinds = {g.kind for g in report.groups}
    allowed = {"qk", "vo", "ffn"} if granularity == "channel" else {"head", "ffn"}
    if not kinds <= allowed:
        raise _fail(built, f"group kinds {kinds} at granularity {granularity!r}")
    if granularity == "head":
        match_truth(built, report, "head")
    if granularity == "channel":
        for prot in truth.protected:
            hit = set(report.removed.get((prot.param, prot.dim), ())) & prot.indices
            if hit:
                raise _fail(built, f"pruned protected channels {sorted(hit)} of {prot.param}[{prot.dim}]: {prot.why}")
    if sparsity >= 0.5 and truth.ffn_modules and not any(g.kind == "ffn" and g.units_removed for g in report.groups):
        raise _fail(built, f"sparsity {sparsity} removed no FFN channel: {report.summary()}")
    reference = masked_copy(model, removed_triples(report))
    with torch.no_grad():
        try:
            got = compressed(*inputs)
        except Exception as err:
            raise _fail(
                built,
                f"compressed module fails on the example inputs (sparsity {sparsity}, {granularity}): "
                f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
            ) from err
        diff = max_abs_diff(got, reference(*inputs))
        for probe in probe_inputs(inputs, PROBES, seed=built.spec.seed):  # the example may be lucky (t = 0)
            diff = max(diff, max_abs_diff(compressed(*probe), reference(*probe)))
    if not diff < ORACLE_ATOL:
        raise _fail(
            built,
            f"mask oracle violated at sparsity {sparsity} ({granularity}): max abs diff {diff:.3e}\n  removed: "
            f"{report.removed}",
        )
    return compressed


def check_renamed(built: Built, sparsity: float, granularity: str, compressed) -> None:
    """Renaming every submodule / parameter changes nothing in the report but the names."""
    other = compress(renamed(built.model), built.inputs, sparsity, granularity).ecospa_report
    mine = compressed.ecospa_report
    if report_shape(mine) != report_shape(other):
        raise _fail(
            built,
            f"renamed model gives a different report:\n  original: {report_shape(mine)}\n  renamed:  "
            f"{report_shape(other)}",
        )
    if [s.kind for s in mine.skipped] != [s.kind for s in other.skipped]:
        raise _fail(built, f"renamed model skips different groups: {mine.skipped} vs {other.skipped}")


def onnx_run(module, inputs) -> list[np.ndarray]:
    """torch.onnx.export(dynamo=True) then onnxruntime on ``inputs``."""
    import onnxruntime as ort

    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, inputs, dynamo=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        program.save(path)
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        feeds = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs, strict=True)}
        return sess.run(None, feeds)


def check_onnx(built: Built, compressed) -> str:
    """The compressed module exports to ONNX and onnxruntime matches it. When even the dense model does not
    export, that is the exporter's limit, not ours: returns a note instead of failing."""
    inputs = built.inputs
    try:
        outs = onnx_run(compressed, inputs)
    except Exception as err:  # the exporter's own limits show up on the dense model too
        try:
            onnx_run(built.model, inputs)
        except Exception:
            return f"dense model does not export either ({type(err).__name__})"
        raise _fail(built, f"compressed model does not export to ONNX, the dense one does: {err!r}") from err
    with torch.no_grad():
        ref = compressed(*inputs)
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    for o, r in zip(outs, ref, strict=True):
        diff = float(np.abs(o - r.numpy()).max())
        if not diff < ONNX_ATOL:
            raise _fail(built, f"onnxruntime differs from the compressed module by {diff:.3e}")
    return "ok"
