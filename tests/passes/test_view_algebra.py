"""Reshape algebra (``passes.view_algebra``): segments, label split/merge, separability, size-1 folding."""

from __future__ import annotations

import numpy as np
import pytest

from passes.labels import AxisLabel, in_whole_blocks
from passes.view_algebra import NotSeparable, fold_constant_axes, reshape_labels, reshape_segments


def lab(arr, space: int = 0) -> AxisLabel:
    return AxisLabel(space, np.asarray(arr, dtype=np.int64))


def channel_of_elements(labels, shape: list[int]) -> np.ndarray:
    """Channel id of every element under the additive rule (single-space labels only)."""
    grid = np.zeros(shape, dtype=np.int64)
    for axis, label in enumerate(labels):
        if label is None:
            continue
        view = [1] * len(shape)
        view[axis] = shape[axis]
        grid = grid + label.arr.reshape(view)
    return grid


# ---------------------------------------------------------------------------------- segments
@pytest.mark.parametrize(
    ("in_shape", "out_shape", "expected"),
    [
        ([2, 12], [2, 3, 4], [([0], [0]), ([1], [1, 2])]),  # split the channel axis into heads
        ([2, 3, 4], [2, 12], [([0], [0]), ([1, 2], [1])]),  # merge heads back
        ([2, 5, 16], [2, 5, 4, 4], [([0], [0]), ([1], [1]), ([2], [2, 3])]),
        ([2, 3, 1, 4], [6, 4], [([0, 1, 2], [0]), ([3], [1])]),  # size-1 joins the segment before it
        ([6], [2, 3, 1], [([0], [0, 1, 2])]),  # trailing size-1 output axis joins too
        ([6, 1], [1, 6], [([0, 1], [0, 1])]),
        ([2, 1, 8], [2, 8, 1], [([0, 1], [0]), ([2], [1, 2])]),
    ],
)
def test_reshape_segments_align_runs_of_equal_size(in_shape, out_shape, expected):
    segments = reshape_segments(in_shape, out_shape)
    assert segments == expected
    for ins, outs in segments:  # every segment moves the same number of elements
        assert np.prod([in_shape[a] for a in ins]) == np.prod([out_shape[b] for b in outs])
    assert [a for ins, _ in segments for a in ins] == list(range(len(in_shape)))
    assert [b for _, outs in segments for b in outs] == list(range(len(out_shape)))


@pytest.mark.parametrize(("in_shape", "out_shape"), [([6], [4]), ([2, 3], [3, 3]), ([8], [2, 2, 3])])
def test_reshape_segments_reject_mismatched_sizes(in_shape, out_shape):
    with pytest.raises(NotSeparable):
        reshape_segments(in_shape, out_shape)


# ---------------------------------------------------------------------------------- labels
def test_split_channel_axis_into_heads():
    n_heads, head_dim = 3, 4
    labels = (None, lab(np.arange(n_heads * head_dim)))
    out = reshape_labels(labels, [2, 12], [2, n_heads, head_dim])
    assert out[0] is None
    assert out[1].space == 0 and out[2].space == 0
    np.testing.assert_array_equal(out[1].arr, head_dim * np.arange(n_heads))
    np.testing.assert_array_equal(out[2].arr, np.arange(head_dim))
    # element (b, h, d) carries channel h*D + d
    np.testing.assert_array_equal(channel_of_elements(out, [2, 3, 4])[1], np.arange(12).reshape(3, 4))


def test_split_then_merge_is_identity():
    labels = (None, lab(np.arange(12)))
    split = reshape_labels(labels, [2, 12], [2, 3, 4])
    merged = reshape_labels(split, [2, 3, 4], [2, 12])
    assert merged[0] is None
    assert merged[1].space == 0 and merged[1].full
    np.testing.assert_array_equal(merged[1].arr, np.arange(12))


def test_split_of_a_slice_keeps_its_offset():
    """The second half of a channel axis (channels 4..7) viewed as [2, 2]."""
    out = reshape_labels((lab(np.arange(4, 8)),), [4], [2, 2])
    np.testing.assert_array_equal(channel_of_elements(out, [2, 2]), [[4, 5], [6, 7]])
    # the offset rides on the outer (head) axis; the inner axis stays a 0-based index within the block
    np.testing.assert_array_equal(out[0].arr, [4, 6])
    np.testing.assert_array_equal(out[1].arr, [0, 1])


def test_transpose_then_merge_is_a_permutation():
    """[H=2, D=3] transposed to [D, H] then flattened: element k carries channel (k % 2) * 3 + k // 2."""
    transposed = (lab([0, 1, 2]), lab([0, 3]))
    out = reshape_labels(transposed, [3, 2], [6])
    np.testing.assert_array_equal(out[0].arr, [0, 3, 1, 4, 2, 5])


def test_transpose_then_regroup_is_not_separable():
    """[D, H] regrouped as [2, 3]: channel of (a, b) is not f(a) + g(b), so no per-axis label exists."""
    transposed = (lab([0, 1, 2]), lab([0, 3]))
    with pytest.raises(NotSeparable):
        reshape_labels(transposed, [3, 2], [2, 3])


def test_merge_of_two_channel_spaces_is_not_separable():
    labels = (lab([0, 3], space=0), lab([0, 1, 2], space=1))
    with pytest.raises(NotSeparable):
        reshape_labels(labels, [2, 3], [6])


def test_different_spaces_in_different_segments_are_fine():
    labels = (lab([0, 1], space=0), lab(np.arange(6), space=1))
    out = reshape_labels(labels, [2, 6], [2, 2, 3])
    assert out[0].space == 0 and out[1].space == 1 and out[2].space == 1
    np.testing.assert_array_equal(out[0].arr, [0, 1])
    np.testing.assert_array_equal(channel_of_elements(out[1:], [2, 3]), np.arange(6).reshape(2, 3))


def test_head_block_label_does_not_survive_merge_with_channels():
    """A partial (head-block) label merged with full channels of another space is dropped, not mixed."""
    head = lab([0, 4]).partial(np.arange(4))
    labels = (head, lab([0, 1, 2], space=1))
    out = reshape_labels(labels, [2, 3], [6])
    assert out[0].space == 1 and out[0].full
    np.testing.assert_array_equal(out[0].arr, [0, 1, 2, 0, 1, 2])


# ---------------------------------------------------------------------------------- size-1 axes
def test_fold_moves_constant_size1_contribution_onto_sibling():
    labels = (lab([8]), None, lab(np.arange(4)))
    out = fold_constant_axes(labels)
    assert out[0] is None and out[1] is None
    np.testing.assert_array_equal(out[2].arr, np.arange(8, 12))


def test_fold_keeps_size1_axis_without_same_space_sibling():
    labels = (lab([8], space=0), lab(np.arange(4), space=1))
    out = fold_constant_axes(labels)
    np.testing.assert_array_equal(out[0].arr, [8])
    np.testing.assert_array_equal(out[1].arr, np.arange(4))


def test_reshape_drops_a_selected_head_axis_without_losing_its_channels():
    """Head 2 selected with keepdim ([1, D]) then flattened: channels 2*D .. 3*D-1."""
    labels = (lab([8]), lab(np.arange(4)))
    out = reshape_labels(labels, [1, 4], [4])
    np.testing.assert_array_equal(out[0].arr, np.arange(8, 12))


def test_constant_size1_axis_is_an_offset_not_a_block():
    """K split out of a fused [q0..q3 | k | v] projection as [B, 1, S, D]: its size-1 head axis carries the
    constant 32. That axis spans no block (extent 1 would divide every offset), so head_dim is not a head
    axis over it; the head axis over head_dim still is, and a constant beside head_dim changes nothing."""
    head, head_dim = lab([32]), lab(np.arange(8))
    assert not in_whole_blocks([head_dim], [head])  # was True: extent 1 divides everything
    assert not in_whole_blocks([head_dim], [lab([32, 32, 32, 32])])  # the same axis expanded over 4 q heads
    assert in_whole_blocks([head], [head_dim])  # the head axis over head_dim is still a head axis
    assert in_whole_blocks([lab([0, 8, 16, 24])], [head_dim, lab([32])])  # a constant beside head_dim: ignored


def test_single_channel_keeps_being_carried():
    out = reshape_labels((lab([3]),), [1], [1, 1])
    carried = [label for label in out if label is not None]
    assert len(carried) == 1
    np.testing.assert_array_equal(carried[0].arr, [3])
