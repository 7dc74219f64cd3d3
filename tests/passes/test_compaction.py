"""Compaction (``passes.compaction``): kept channels must form a dense box; slices are remapped onto it."""

from __future__ import annotations

import numpy as np
import pytest

from passes.compaction import CompactionError, compact_shape, kept_grid, new_sizes, remap_index, remap_slice
from passes.labels import AxisLabel, Space

H, D = 2, 8
OFFSET = 10  # the space does not start at global id 0: every lookup must add it
SPACES = [Space(id=0, size=H * D, offset=OFFSET, param="w", dim=0)]
HEAD_LABELS = (AxisLabel(0, D * np.arange(H)), AxisLabel(0, np.arange(D)))  # a [H, D] view of the space


def keep_per_head(*kept: set[int]) -> np.ndarray:
    """Global keep mask: head h keeps channel positions kept[h]; ids below OFFSET (another space) kept."""
    keep = np.zeros(OFFSET + H * D, dtype=bool)
    keep[:OFFSET] = True
    for h, positions in enumerate(kept):
        for d in positions:
            keep[OFFSET + h * D + d] = True
    return keep


def assert_selects_same(kept: tuple[set[int], ...], old: tuple[int, int, int], new: tuple[int, int, int]):
    """In every head, the new slice of the compacted row picks exactly the kept positions the old one did."""
    for positions in kept:
        row = sorted(positions)
        if not row:
            continue
        wanted = [d for d in range(*old) if d in positions]
        assert [row[i] for i in range(*slice(*new).indices(len(row)))] == wanted


# ---------------------------------------------------------------------------------- compact_shape
def test_compact_shape_gqa_like_rows_with_equal_counts():
    """Each KV head keeps its own channel set; equal counts compact to a dense [2, 2]."""
    mask = np.array([[1, 1, 0, 0], [0, 1, 0, 1]], dtype=bool)
    assert compact_shape(mask) == (2, 2)


def test_compact_shape_drops_fully_removed_rows():
    mask = np.array([[0, 0, 0, 0], [1, 0, 1, 0], [0, 1, 1, 0]], dtype=bool)
    assert compact_shape(mask) == (2, 2)


def test_compact_shape_unequal_counts_raise():
    mask = np.array([[1, 1, 1, 0], [0, 1, 0, 1]], dtype=bool)
    with pytest.raises(CompactionError, match="different numbers"):
        compact_shape(mask)


def test_compact_shape_nested_rows_must_agree():
    mask = np.array([[[1, 0], [0, 1]], [[1, 1], [0, 0]]], dtype=bool)  # (2, 1) vs (1, 2)
    with pytest.raises(CompactionError):
        compact_shape(mask)


# ---------------------------------------------------------------------------------- kept_grid / new_sizes
def test_kept_grid_reads_the_space_offset():
    keep = keep_per_head({0, 4}, {1, 5})
    grid = kept_grid(HEAD_LABELS, [0, 1], keep, OFFSET)
    expected = np.zeros((H, D), dtype=bool)
    expected[0, [0, 4]] = expected[1, [1, 5]] = True
    np.testing.assert_array_equal(grid, expected)


def test_new_sizes_shrinks_head_dim_and_keeps_unlabelled_axes():
    labels = (None, HEAD_LABELS[0], None, HEAD_LABELS[1])  # [B, H, S, D]
    keep = keep_per_head({0, 1, 4, 5}, {2, 3, 6, 7})  # per-head sets differ, counts agree
    assert new_sizes(labels, [3, H, 5, D], keep, SPACES) == [3, H, 5, 4]


def test_new_sizes_removes_whole_heads():
    labels = (None, HEAD_LABELS[0], None, HEAD_LABELS[1])
    keep = keep_per_head(set(), set(range(D)))
    assert new_sizes(labels, [3, H, 5, D], keep, SPACES) == [3, 1, 5, D]


def test_new_sizes_unchanged_when_everything_kept():
    labels = (None, HEAD_LABELS[0], None, HEAD_LABELS[1])
    keep = keep_per_head(set(range(D)), set(range(D)))
    assert new_sizes(labels, [3, H, 5, D], keep, SPACES) == [3, H, 5, D]


def test_new_sizes_unequal_per_head_counts_raise():
    labels = (None, HEAD_LABELS[0], None, HEAD_LABELS[1])
    keep = keep_per_head({0, 1, 2}, {0, 1})
    with pytest.raises(CompactionError):
        new_sizes(labels, [3, H, 5, D], keep, SPACES)


# ---------------------------------------------------------------------------------- remap_slice
@pytest.mark.parametrize(
    "kept",
    [
        ({1, 5, 3, 7}, {1, 5, 3, 7}),  # same pairs in every head
        ({0, 4, 1, 5}, {2, 6, 3, 7}),  # GQA: each KV head its own pairs
    ],
)
def test_remap_rotate_half_halves(kept):
    """rotate_half slices x[..., :D/2] and x[..., D/2:]; whole pairs (c, c+D/2) kept -> halves stay halves."""
    keep = keep_per_head(*kept)
    first = remap_slice(HEAD_LABELS, 1, (0, D // 2, 1), keep, SPACES)
    second = remap_slice(HEAD_LABELS, 1, (D // 2, D, 1), keep, SPACES)
    assert first == (0, 2, 1)
    assert second == (2, 4, 1)
    assert_selects_same(kept, (0, D // 2, 1), first)
    assert_selects_same(kept, (D // 2, D, 1), second)


@pytest.mark.parametrize(
    "kept",
    [
        ({0, 1, 4, 5}, {0, 1, 4, 5}),
        ({0, 1, 4, 5}, {2, 3, 6, 7}),  # GQA: different interleaved pairs per head
    ],
)
def test_remap_interleaved_even_odd(kept):
    """GPT-J rotary reads x[..., ::2] and x[..., 1::2]; pairs (2i, 2i+1) kept whole -> still ::2 / 1::2."""
    keep = keep_per_head(*kept)
    even = remap_slice(HEAD_LABELS, 1, (0, D, 2), keep, SPACES)
    odd = remap_slice(HEAD_LABELS, 1, (1, D, 2), keep, SPACES)
    assert even == (0, 3, 2)
    assert odd == (1, 4, 2)
    assert_selects_same(kept, (0, D, 2), even)
    assert_selects_same(kept, (1, D, 2), odd)


def test_remap_interleaved_with_broken_pair_raises():
    """Pair (2, 3) split: x[..., ::2] would have to pick compacted positions 0, 2, 3 (not a strided range)."""
    keep = keep_per_head({0, 1, 2, 4}, {0, 1, 2, 4})
    with pytest.raises(CompactionError, match="strided"):
        remap_slice(HEAD_LABELS, 1, (0, D, 2), keep, SPACES)


def test_remap_slice_that_picks_different_positions_per_head_raises():
    keep = keep_per_head({0, 1, 4, 5}, {0, 2, 4, 6})
    with pytest.raises(CompactionError, match="different kept positions"):
        remap_slice(HEAD_LABELS, 1, (0, 2, 1), keep, SPACES)


def test_remap_slice_over_fully_removed_space_is_empty():
    """Every channel of the axis removed (all rotary pairs of a partial rotary): the slice becomes empty
    instead of refusing the plan (zero-size tensors flow through the elementwise rotary math)."""
    keep = keep_per_head(set(), set())
    assert remap_slice(HEAD_LABELS, 1, (0, D // 2, 1), keep, SPACES) == (0, 0, 1)


def test_remap_slice_on_head_axis_counts_surviving_heads():
    """Slicing heads [1:2] after head 0 was removed entirely: it becomes [0:1]."""
    keep = keep_per_head(set(), set(range(D)))
    assert remap_slice(HEAD_LABELS, 0, (1, 2, 1), keep, SPACES) == (0, 1, 1)


def test_remap_strided_slice_whose_kept_positions_become_contiguous():
    keep = keep_per_head({0, 2, 4, 6}, {0, 2, 4, 6})
    assert remap_slice(HEAD_LABELS, 1, (0, D, 2), keep, SPACES) == (0, 4, 1)


# ---------------------------------------------------------------------------------- remap_index
def test_remap_index_follows_compaction():
    keep = keep_per_head({1, 3, 5, 7}, {1, 3, 5, 7})
    assert remap_index(HEAD_LABELS, 1, 5, keep, SPACES) == 2


def test_remap_index_of_removed_position_raises():
    keep = keep_per_head({1, 3, 5, 7}, {1, 3, 5, 7})
    with pytest.raises(CompactionError):
        remap_index(HEAD_LABELS, 1, 4, keep, SPACES)
