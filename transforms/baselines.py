"""Unsupervised rPPG baselines on per-frame mean skin colour: GREEN, CHROM and POS.

Each method maps `rgb`, the (T, 3) spatial mean of R, G, B over the face per frame (see `rgb_means`),
sampled at `fs` frames per second, to a pulse waveform of shape (T,). Rows of NaN (frames without a
face) are filled by linear interpolation in time first.

Polarity: every output rises with blood volume, like a contact PPG label. More blood absorbs more
light, so skin gets darker as the pulse rises; with the skin model of both papers,
C(t) = C0 * (1 + u_p * i(t)) with u_p = [0.33, 0.77, 0.53] and i(t) the pulsatile *intensity*
change, the outputs here correlate with -i(t). Papers' formulas are kept; a sign is flipped where
the formula's output would correlate with +i(t) (GREEN, POS), with a comment at the flip.
"""
from __future__ import annotations

import numpy as np

from transforms.signal import PULSE_BAND_HZ, bandpass

POS_PROJECTION = np.array([[0.0, 1.0, -1.0], [-2.0, 1.0, 1.0]])  # plane orthogonal to skin tone (1, 1, 1)
WINDOW_S = 1.6  # both papers: short enough to follow colour changes, long enough for one beat at 40 BPM


def rgb_means(frames, mask=None) -> np.ndarray:
    """Spatial mean colour per frame.

    frames: (T, H, W, 3) uint8 face crops. mask: optional (T,) bool, True where a face was found;
    rows of other frames are NaN. Returns (T, 3) float64 in 0-255 units, channels R, G, B.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must have shape (T, H, W, 3), got {frames.shape}")
    rgb = frames.mean(axis=(1, 2), dtype=np.float64)  # (T, 3)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (frames.shape[0],):
            raise ValueError(f"mask must have shape ({frames.shape[0]},), got {mask.shape}")
        rgb[~mask] = np.nan
    return rgb


def _fill_missing(rgb, min_len: int) -> np.ndarray:
    """Check `rgb` is (T, 3) with T >= min_len and fill NaN rows by linear interpolation in time."""
    rgb = np.array(rgb, dtype=np.float64)  # a copy: filled in place below
    if rgb.ndim != 2 or rgb.shape[1] != 3:
        raise ValueError(f"rgb must have shape (T, 3), got {rgb.shape}")
    if rgb.shape[0] < min_len:
        raise ValueError(f"rgb has {rgb.shape[0]} frames; need at least {min_len}")
    if np.isinf(rgb).any():
        raise ValueError("rgb has infinite values")
    valid = ~np.isnan(rgb).any(axis=1)
    if not valid.any():
        raise ValueError("rgb has no valid frame (every row has a NaN: no face found anywhere)")
    if not valid.all():
        frame_index = np.arange(rgb.shape[0])
        for channel in range(3):
            # np.interp holds the first/last valid value over leading/trailing gaps.
            rgb[~valid, channel] = np.interp(frame_index[~valid], frame_index[valid], rgb[valid, channel])
    return rgb


def _window_len(fs: float) -> int:
    if not fs > 0:
        raise ValueError(f"fs must be a positive frame rate, got {fs}")
    return max(2, int(np.ceil(WINDOW_S * fs)))


def _std_ratio(numerator: np.ndarray, denominator: np.ndarray, axis=None) -> np.ndarray:
    """std(numerator) / std(denominator), 0 where the denominator is flat (nothing to tune against)."""
    num, den = numerator.std(axis=axis), denominator.std(axis=axis)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _safe_mean(window: np.ndarray) -> np.ndarray:
    """Per-channel mean over axis -2; a black channel (mean 0) normalises by 1 instead of by 0."""
    mean = window.mean(axis=-2, keepdims=True)
    return np.where(mean > 0, mean, 1.0)


def green(rgb, fs: float) -> np.ndarray:
    """GREEN (Verkruysse et al. 2008): the green channel, which carries most of the pulse.

    rgb: (T, 3). Returns (T,): the green channel as relative change from its mean, negated so it rises
    with blood volume. No filtering here; `transforms.signal.postprocess_bvp` band-passes all methods.
    """
    rgb = _fill_missing(rgb, 2)
    green_channel = rgb[:, 1]
    mean = green_channel.mean()
    relative = green_channel / mean - 1.0 if mean > 0 else np.zeros_like(green_channel)
    return -relative  # darker skin = more blood


def chrom(rgb, fs: float, band_hz=PULSE_BAND_HZ) -> np.ndarray:
    """CHROM (de Haan & Jeanne 2013): chrominance signals with the specular part tuned out.

    rgb: (T, 3), T >= one window of 1.6 s. Per window of L = 1.6 s (even, half-overlapping):
    normalise each channel by its window mean, Xs = 3 Rn - 2 Gn, Ys = 1.5 Rn + Gn - 1.5 Bn,
    band-pass both to `band_hz`, S = Xf - alpha Yf with alpha = std(Xf) / std(Yf), then Hann-weighted
    overlap-add. A last window is aligned to the end so every frame is covered, and the sum is divided
    by the summed weights so the first and last half-window keep full amplitude. Returns (T,).
    """
    window_len = _window_len(fs)
    window_len += window_len % 2  # even, so half-overlapping windows tile exactly
    rgb = _fill_missing(rgb, window_len)
    n_frames = rgb.shape[0]
    hop = window_len // 2
    starts = list(range(0, n_frames - window_len + 1, hop))
    if starts[-1] != n_frames - window_len:
        starts.append(n_frames - window_len)
    frame_index = np.asarray(starts)[:, None] + np.arange(window_len)  # (n_win, L)
    windows = rgb[frame_index]  # (n_win, L, 3)
    normalised = windows / _safe_mean(windows)  # (n_win, L, 3)
    red, grn, blue = normalised[..., 0], normalised[..., 1], normalised[..., 2]  # (n_win, L) each
    xf = bandpass(3.0 * red - 2.0 * grn, fs, *band_hz, axis=1)
    yf = bandpass(1.5 * red + grn - 1.5 * blue, fs, *band_hz, axis=1)
    pulse = xf - _std_ratio(xf, yf, axis=1)[:, None] * yf  # (n_win, L)
    # Hann sampled at sample centres: sums to 1 at half overlap and is never 0 at a window's ends.
    weights = np.sin(np.pi * (np.arange(window_len) + 0.5) / window_len) ** 2
    pulse_sum = np.zeros(n_frames)
    weight_sum = np.zeros(n_frames)
    np.add.at(pulse_sum, frame_index, weights * pulse)
    np.add.at(weight_sum, frame_index, np.broadcast_to(weights, pulse.shape))
    return pulse_sum / weight_sum


def pos(rgb, fs: float) -> np.ndarray:
    """POS (Wang et al. 2017, Algorithm 1): plane-orthogonal-to-skin projection.

    rgb: (T, 3), T >= one window of l = 1.6 s. For every window of l frames (step 1): temporal
    normalisation Cn = C / mean(C), S = P Cn with P = [[0, 1, -1], [-2, 1, 1]],
    h = S1 + (std(S1) / std(S2)) S2, overlap-add h - mean(h). Each frame is then divided by the number
    of windows that cover it (l inside, fewer at the ends), so the edges are not faded. Returns (T,).
    """
    window_len = _window_len(fs)
    rgb = _fill_missing(rgb, window_len)
    n_frames = rgb.shape[0]
    windows = np.lib.stride_tricks.sliding_window_view(rgb, window_len, axis=0)  # (n_win, 3, l), a view
    windows = windows.transpose(0, 2, 1)  # (n_win, l, 3)
    pulse_sum = np.zeros(n_frames)
    windows_per_block = 4096  # bounds the normalised copy to a few MB however long the video
    for first in range(0, windows.shape[0], windows_per_block):
        block = windows[first:first + windows_per_block]  # (n_block, l, 3)
        normalised = block / _safe_mean(block)  # (n_block, l, 3)
        projected = normalised @ POS_PROJECTION.T  # (n_block, l, 2)
        s1, s2 = projected[..., 0], projected[..., 1]  # (n_block, l)
        h = s1 + _std_ratio(s1, s2, axis=1)[:, None] * s2
        h -= h.mean(axis=1, keepdims=True)
        # Window w covers frames w .. w+l-1: add its k-th sample to frame w+k for each k.
        for k in range(window_len):
            pulse_sum[first + k:first + k + h.shape[0]] += h[:, k]
    coverage = np.convolve(np.ones(windows.shape[0]), np.ones(window_len))  # windows covering each frame
    return -pulse_sum / coverage  # h rises with skin brightness; negate so it rises with blood volume


BASELINES = {"green": green, "chrom": chrom, "pos": pos}
