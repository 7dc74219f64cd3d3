"""Reshape algebra: carry axis labels through ``view``/``reshape``/``flatten``.

A reshape between ``in_shape`` and ``out_shape`` (same element count, row-major) is a sequence of
independent *segments*: a run of input axes whose product equals the product of a run of output axes.
Inside a segment the labelled input axes are merged into one flat contribution array
``flat[i1*n2*...+i2*... ] = arr1[i1] + arr2[i2] + ...`` and the output axes receive the additive
decomposition of ``flat``: ``out_k[j] = flat[j * stride_k] - flat[0]`` (plus ``flat[0]`` on the first
one). The decomposition is exact iff ``flat`` is additively separable over the output axes; otherwise
the segment mixes channels in a way no per-axis slice can express and the caller fails closed.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from passes.labels import AxisLabel, Labels


class NotSeparable(Exception):
    """A reshape segment cannot carry its labels as per-axis contributions."""


def reshape_segments(in_shape: list[int], out_shape: list[int]) -> list[tuple[list[int], list[int]]]:
    """Split a reshape into (input axes, output axes) runs with equal element counts.

    Size-1 axes are absorbed into the segment before them, so every segment is as small as possible.
    """
    segments: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(in_shape) or j < len(out_shape):
        ins: list[int] = []
        outs: list[int] = []
        pin = pout = 1
        while not ((ins or outs) and pin == pout):
            if i < len(in_shape) and (pin <= pout or j >= len(out_shape)):
                pin *= in_shape[i]
                ins.append(i)
                i += 1
            elif j < len(out_shape):
                pout *= out_shape[j]
                outs.append(j)
                j += 1
            else:
                break
        while i < len(in_shape) and in_shape[i] == 1:
            ins.append(i)
            i += 1
        while j < len(out_shape) and out_shape[j] == 1:
            outs.append(j)
            j += 1
        if pin != pout:
            raise NotSeparable(f"cannot align reshape {in_shape} -> {out_shape}")
        segments.append((ins, outs))
    return segments


def reshape_labels(labels: Labels, in_shape: list[int], out_shape: list[int]) -> Labels:
    """Labels of ``x.reshape(out_shape)`` given ``x``'s labels; raises NotSeparable when impossible."""
    labels = fold_constant_axes(labels)
    out: list[AxisLabel | None] = [None] * len(out_shape)
    for ins, outs in reshape_segments(in_shape, out_shape):
        labelled = [labels[a] for a in ins if labels[a] is not None]
        if any(lab.full for lab in labelled):  # head-block labels do not survive a merge with channels
            labelled = [lab for lab in labelled if lab.full]
            labels = tuple(lab if lab is None or lab.full or a not in ins else None for a, lab in enumerate(labels))
        if not labelled:
            continue
        spaces = {lab.space for lab in labelled}
        if len(spaces) != 1 or len({lab.full for lab in labelled}) != 1:
            raise NotSeparable("a reshape segment merges axes of different channel spaces")
        flat = _merge([labels[a] for a in ins], [in_shape[a] for a in ins])
        parts = _decompose(flat, [out_shape[b] for b in outs])
        template = labelled[0]
        zero_ok = all(lab.zero_ok for lab in labelled)
        for b, part in zip(outs, parts, strict=True):
            if np.any(part != 0):
                out[b] = replace(template, arr=part, zero_ok=zero_ok)
        if outs and all(out[b] is None for b in outs):  # a single channel: keep carrying it
            out[outs[0]] = replace(template, arr=parts[0], zero_ok=zero_ok)
        elif not outs:
            raise NotSeparable("a labelled segment vanishes in the reshape")
    return tuple(out)


def _merge(labels: list[AxisLabel | None], sizes: list[int]) -> np.ndarray:
    flat = np.zeros(sizes, dtype=np.int64)
    for k, (lab, n) in enumerate(zip(labels, sizes, strict=True)):
        if lab is None:
            continue
        shape = [1] * len(sizes)
        shape[k] = n
        flat = flat + lab.arr.reshape(shape)
    return flat.reshape(-1)


def _decompose(flat: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    grid = flat.reshape(sizes)
    base = int(flat[0])
    parts = []
    for k, n in enumerate(sizes):
        index = [0] * len(sizes)
        index[k] = slice(None)
        parts.append(np.asarray(grid[tuple(index)], dtype=np.int64).reshape(n) - base)
    recon = np.full(sizes, base, dtype=np.int64)
    for k, part in enumerate(parts):
        shape = [1] * len(sizes)
        shape[k] = sizes[k]
        recon = recon + part.reshape(shape)
    if not np.array_equal(recon, grid):
        raise NotSeparable("reshape mixes channels non-additively")
    varying = [k for k, part in enumerate(parts) if np.any(part != part[0])]
    single = [k for k, n in enumerate(sizes) if n == 1]
    home = varying[0] if varying else (single[0] if single else 0)
    parts[home] = parts[home] + base
    return parts


def fold_constant_axes(labels: Labels) -> Labels:
    """Move the constant contribution of labelled size-1 axes onto a sibling axis of the same space."""
    out = list(labels)
    for a, lab in enumerate(labels):
        if lab is None or len(lab.arr) != 1:
            continue
        sibling = next(
            (k for k, o in enumerate(out) if k != a and o is not None and o.space == lab.space and len(o.arr) > 1),
            None,
        )
        if sibling is not None:
            out[sibling] = replace(out[sibling], arr=out[sibling].arr + lab.arr[0])
            out[a] = None
    return tuple(out)
