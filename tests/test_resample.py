"""Resampling onto the 30 fps grid: identity at 30 fps, exact linear values, streaming equals one shot,
nearest for masks and boxes, and label resampling."""
from __future__ import annotations

import math

import numpy as np
import pytest

from transforms.resample import GAP_SPACINGS, Resampler, longest_bridged_s, resample_signal


def push_in_chunks(resampler, t, x, sizes):
    """Push (t, x) in consecutive chunks of the given sizes, then flush; returns all the output."""
    outs, grids, start = [], [], 0
    for size in sizes:
        grid, out = resampler.push(t[start:start + size], x[start:start + size])
        grids.append(grid), outs.append(out)
        start += size
    grid, out = resampler.flush()
    grids.append(grid), outs.append(out)
    return np.concatenate(grids), np.concatenate(outs)


def test_uniform_30fps_is_bit_exact_identity():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (100, 36, 36, 3), np.uint8)
    for t in (np.arange(100) / 30, np.round(np.arange(100) / 30, 3)):  # exact, and Matroska's 1 ms steps
        grid, out = push_in_chunks(Resampler(30), t, frames, [7, 64, 1, 28])
        np.testing.assert_array_equal(out, frames)
        np.testing.assert_allclose(grid, np.arange(100) / 30)


def test_25fps_linear_values_and_count():
    t = np.arange(50) / 25  # 1.96 s
    ramp = (np.arange(50) * 4.0)[:, None, None] * np.ones((1, 2, 3))  # value 100 * t: linear in time
    grid, out = Resampler(30).push(t, ramp.astype(np.uint8))
    assert len(grid) == math.floor(t[-1] * 30) + 1 == 59
    np.testing.assert_array_equal(out[:, 0, 0], np.rint(100 * grid).astype(np.uint8))
    assert out.dtype == np.uint8 and out.shape == (59, 2, 3)


def test_streaming_equals_one_shot_on_variable_rate():
    rng = np.random.default_rng(3)
    t = 5.0 + np.cumsum(rng.uniform(0.015, 0.06, 300))  # 17-67 fps, not starting at 0
    frames = rng.integers(0, 256, (300, 4, 4, 3), np.uint8)
    grid_one, out_one = Resampler(30).push(t, frames)
    grid, out = push_in_chunks(Resampler(30), t, frames, [1, 2, 50, 64, 64, 119])
    np.testing.assert_array_equal(out, out_one)
    np.testing.assert_array_equal(grid, grid_one)
    assert len(out) == math.floor((t[-1] - t[0]) * 30) + 1
    np.testing.assert_allclose(np.diff(grid), 1 / 30)
    assert grid[0] == t[0]


def test_nearest_for_masks_and_boxes():
    t = np.array([0.0, 0.1, 0.2])
    found = np.array([True, False, True])
    boxes = np.array([[0.0, 10, 0, 10], [np.nan] * 4, [5.0, 15, 5, 15]])
    grid, found30 = Resampler(30, method="nearest").push(t, found)
    _, boxes30 = Resampler(30, method="nearest").push(t, boxes)
    # grid 0, 1/30, 2/30, 0.1, 4/30, 5/30, 0.2: nearest source 0, 0, 1 (0.0667 nearer 0.1), 1, 1, 2, 2
    np.testing.assert_array_equal(found30, [True, True, False, False, False, True, True])
    np.testing.assert_array_equal(boxes30[[0, 6]], boxes[[0, 2]])
    assert np.isnan(boxes30[2:5]).all()
    with pytest.raises(TypeError, match="nearest"):
        Resampler(30).push(t, found)


def test_linear_float_boxes_keep_precision():
    t = np.array([0.0, 0.1])
    boxes = np.array([[0.0, 10.0, 0.0, 10.0], [3.0, 13.0, 3.0, 13.0]])
    _, out = Resampler(30).push(t, boxes)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out[:, 0], [0, 1, 2, 3])


def test_rejects_non_increasing_timestamps():
    resampler = Resampler(30)
    resampler.push(np.array([0.0, 0.1]), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="strictly increasing"):
        resampler.push(np.array([0.1]), np.zeros((1, 3)))


def test_flush_resets_for_a_new_stream():
    resampler = Resampler(30)
    t = np.arange(10) / 30
    first = resampler.push(t, np.arange(10.0))
    resampler.flush()
    second = resampler.push(t + 7.0, np.arange(10.0))  # a new stream: its own grid origin
    np.testing.assert_array_equal(second[1], first[1])
    np.testing.assert_allclose(second[0], first[0] + 7.0)


def test_resample_signal_linear_with_nan_outside():
    t_src = np.linspace(0.0, 2.0, 121)  # a 60 Hz label
    y = np.sin(2 * np.pi * t_src)
    t_dst = np.arange(-1, 70) / 30
    out = resample_signal(t_src, y, t_dst)
    inside = (t_dst >= 0) & (t_dst <= 2.0)
    np.testing.assert_allclose(out[inside], np.interp(t_dst[inside], t_src, y))
    assert np.isnan(out[~inside]).all() and (~inside).sum() == 10
    with pytest.raises(ValueError):
        resample_signal(t_src[::-1], y, t_dst)


def test_resample_signal_leaves_a_time_gap_nan_instead_of_a_straight_line():
    t_src = np.arange(0, 600) / 60  # 10 s of a 60 Hz label
    y = np.sin(2 * np.pi * 1.2 * t_src)
    kept = (t_src < 3.0) | (t_src > 4.5)  # the sensor dropped out for 1.5 s: samples left out
    t_dst = np.arange(300) / 30
    out = resample_signal(t_src[kept], y[kept], t_dst)
    gap = (t_dst > t_src[kept][t_src[kept] < 3.0][-1]) & (t_dst < t_src[kept][t_src[kept] > 4.5][0])
    assert gap.sum() == 46 and np.isnan(out[gap]).all()  # frames 90-135: 2.98 s < t < 4.52 s
    np.testing.assert_allclose(out[~gap], np.interp(t_dst[~gap], t_src[kept], y[kept]))


def test_resample_signal_leaves_a_run_of_nans_nan_and_keeps_the_samples_around_it():
    t_src = np.arange(0, 120) / 60
    y = np.cos(t_src)
    y[40:55] = np.nan
    t_dst = np.arange(60) / 30
    out = resample_signal(t_src, y, t_dst)
    across = (t_dst > t_src[39]) & (t_dst < t_src[55])
    assert np.isnan(out[across]).all()
    np.testing.assert_allclose(out[~across], np.interp(t_dst[~across], t_src, y))
    assert out[t_dst == t_src[38]] == y[38] and np.isfinite(out[~across]).all()  # sample times keep their values


def test_resample_signal_bridges_a_dropped_sample_and_honours_max_gap():
    t_src = np.delete(np.arange(100) / 50, [30, 60, 61])  # one sample missing, then two: 2 and 3 spacings
    y = t_src * 2.0  # linear: bridged values are exact
    t_dst = np.arange(59) / 30
    assert longest_bridged_s(t_src) == pytest.approx(GAP_SPACINGS / 50)
    np.testing.assert_allclose(resample_signal(t_src, y, t_dst), 2 * t_dst)  # 3 spacings are still bridged
    out = resample_signal(t_src, y, t_dst, max_gap_s=2.5 / 50)  # now the two missing ones make a gap
    inside = (t_dst > 59 / 50) & (t_dst < 62 / 50)
    assert inside.sum() == 2 and np.isnan(out[inside]).all()
    np.testing.assert_allclose(out[~inside], 2 * t_dst[~inside])


def test_resample_signal_by_blocks_with_the_gap_limit_computed_once_equals_one_shot():
    rng = np.random.default_rng(7)
    t_src = np.cumsum(rng.uniform(0.014, 0.02, 700))
    t_src = t_src[(t_src < 4) | (t_src > 5)]
    y = rng.normal(size=len(t_src))
    t_dst = np.arange(0, 10, 1 / 30)
    whole = resample_signal(t_src, y, t_dst)
    limit = longest_bridged_s(t_src)
    blocks = np.concatenate([resample_signal(t_src, y, t_dst[k:k + 64], limit) for k in range(0, len(t_dst), 64)])
    np.testing.assert_array_equal(blocks, whole)
    assert np.isnan(whole[(t_dst > 4.02) & (t_dst < 5)]).all()
