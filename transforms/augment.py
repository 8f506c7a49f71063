"""Time-scale augmentation: replay a 30 fps recording faster or slower to move its heart rate.

A recording played `factor` times faster shows, at output frame k (30 fps), the source at time
t0 + k / 30 * factor: its pulse, and so its heart rate, is multiplied by `factor`. The paper
(ME-rPPG, Sec. 4) adds ~30% extra training data this way so that heart rates cover 30-180 BPM.

    scaler = TimeScaler(1.5)                            # streaming, one source frame carried between blocks
    for seg in read_segments(uri, fs):
        t, frames, found, boxes, bvp, extra = scaler.push(seg.timestamps, seg.frames, seg.face_found,
                                                          seg.face_box, seg.bvp, seg.extra_crops)
    picks = choose_factors({"rec1": 72.0, ...}, n_extra=10, hr_range=(30, 180), seed=0)

Interpolation is `transforms.resample.Resampler`'s, fed the source timestamps divided by `factor`.
Engine-free: numpy only.
"""
from __future__ import annotations

import math

import numpy as np

from transforms.resample import FPS, Resampler
from transforms.signal import BPM_RANGE

# Snap only float rounding of t / factor onto a source frame: a real blend weight is never this small.
SNAP_S = 1e-6
BIN_BPM = 10.0  # width of the heart-rate bins choose_factors fills
FACTOR_RANGE = (0.5, 2.0)
AUGMENTED_MARK = "@x"  # an augmented recording's id: <source id>@x<factor>


def augmented_id(source_id: str, factor: float) -> str:
    return f"{source_id}{AUGMENTED_MARK}{factor:.3f}"


class TimeScaler:
    """Streaming time-scaling of one recording's 30 fps blocks; the output is the same however it is split.

    push(timestamps (n,), frames (n, H, W, 3) uint8, face_found (n,), boxes (n, 4), bvp (n,) or None,
    extra {size: (n, size, size, 3) uint8} crops at other sizes or None) returns the output frames the
    block completes: (timestamps (m,) float64 on t0 + k / fps, frames (m, H, W, 3) uint8, face_found (m,)
    bool, boxes (m, 4) float32, bvp (m,) float32 or None, extra {size: (m, size, size, 3) uint8}), where t0
    is the first source timestamp: the tuple `transforms.shards.SegmentBuilder.push` takes. Frames (at
    every size) and bvp are blended linearly between the two source frames around each output time (uint8
    rounded); boxes are the nearest source frame's. An output frame is a face frame only when every source
    frame blended into it is: otherwise its crops are zeros and its box NaN, as the shard schema has it for
    frames without a face. The extra sizes must be the same for every block.
    A source of T frames on the 30 fps grid gives floor((T - 1) / factor) + 1 frames; factor 1 gives
    the source back bit-exact.
    """

    def __init__(self, factor: float, fps: float = FPS):
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"factor must be a positive number, got {factor}")
        self.factor, self.fps = float(factor), float(fps)
        self._frames = Resampler(fps, snap_s=SNAP_S)
        self._found = Resampler(fps, snap_s=SNAP_S)  # linear on 0/1: exactly 1 only between two face frames
        self._boxes = Resampler(fps, method="nearest", snap_s=SNAP_S)
        self._bvp = Resampler(fps, snap_s=SNAP_S)
        self._extra: dict[int, Resampler] | None = None  # per extra crop size, made at the first block
        self._t0: float | None = None
        self._n_out = 0

    def push(self, timestamps, frames, face_found, boxes, bvp=None, extra=None):
        t_src = np.asarray(timestamps, np.float64)
        if self._t0 is None and len(t_src):
            self._t0 = float(t_src[0])
        t = t_src / self.factor  # the Resampler's 30 fps grid on these times samples the source every factor/30 s
        _, frames_out = self._frames.push(t, frames)
        _, found_mix = self._found.push(t, np.asarray(face_found, np.float32))
        _, boxes_out = self._boxes.push(t, np.asarray(boxes, np.float32))
        bvp_out = None if bvp is None else self._bvp.push(t, np.asarray(bvp, np.float32))[1]
        extra_out = {size: rs.push(t, extra[size])[1] for size, rs in self._extra_resamplers(extra or {}).items()}
        found_out = found_mix == 1.0
        if not found_out.all():  # the Resampler's non-empty outputs are fresh arrays (fancy indexing or a blend)
            for crops in (frames_out, *extra_out.values()):
                crops[~found_out] = 0
            boxes_out[~found_out] = np.nan
        m = len(frames_out)
        # same formula as the Resampler's grid (t0 + k / fps), so factor 1 returns the source timestamps as is
        t_out = (self._t0 if self._t0 is not None else 0.0) + np.arange(self._n_out, self._n_out + m) / self.fps
        self._n_out += m
        return t_out, frames_out, found_out, boxes_out, bvp_out, extra_out

    def _extra_resamplers(self, extra: dict) -> dict[int, Resampler]:
        if self._extra is None:  # the first block fixes the sizes
            self._extra = {size: Resampler(self.fps, snap_s=SNAP_S) for size in sorted(extra)}
        if sorted(extra) != list(self._extra):
            raise ValueError(f"extra crop sizes changed from {list(self._extra)} to {sorted(extra)}")
        return self._extra


def hr_bins(hr_range, bin_bpm: float = BIN_BPM) -> np.ndarray:
    """Edges (n_bins + 1,) of bin_bpm-wide bins from hr_range[0]; the last bin ends at hr_range[1]."""
    lo, hi = (float(v) for v in hr_range)
    if not 0 < lo < hi:
        raise ValueError(f"hr_range must be (low, high) with 0 < low < high, got {hr_range}")
    n_bins = math.ceil((hi - lo) / bin_bpm - 1e-9)
    return np.minimum(lo + bin_bpm * np.arange(n_bins + 1), hi)


def hr_histogram(hrs, hr_range, bin_bpm: float = BIN_BPM) -> np.ndarray:
    """Counts (n_bins,) of heart rates in each bin of hr_bins; rates outside hr_range are not counted."""
    edges = hr_bins(hr_range, bin_bpm)
    return np.histogram(np.asarray(list(hrs), np.float64), bins=edges)[0]  # numpy's last bin is closed


def choose_factors(hrs: dict[str, float], n_extra: int, hr_range=BPM_RANGE, seed: int = 0,
                   factor_range=FACTOR_RANGE, bin_bpm: float = BIN_BPM) -> list[tuple[str, float]]:
    """Pick n_extra (recording_id, factor) pairs whose target rates hr * factor even out the HR histogram.

    Greedy, one pick at a time, over bin_bpm-wide bins of hr_range (15 bins of 10 BPM for 30-180),
    starting from the histogram of the source rates:
      1. the bin to fill is the emptiest one (counting sources and the picks so far) that some source
         can reach with a factor inside factor_range; ties are broken at random;
      2. the source is the one picked least often so far among those that reach the bin (ties at
         random), so copies spread over recordings instead of piling on one;
      3. the factor is drawn uniformly among the multiples of 0.001 (the precision of augmented ids)
         that put hr * factor inside the bin and inside factor_range, excluding 1.0 and any factor
         that source already got (ids must be unique).
    Deterministic for a given seed: sources are visited in sorted id order and every random choice
    comes from numpy's default_rng(seed). Returns the picks in the order made; fewer than n_extra only
    when no source can reach any bin with a fresh factor. Sources with a non-finite or non-positive
    rate are ignored.
    """
    f_lo, f_hi = (float(v) for v in factor_range)
    if not 0 < f_lo <= f_hi:
        raise ValueError(f"factor_range must be (low, high) with 0 < low <= high, got {factor_range}")
    edges = hr_bins(hr_range, bin_bpm)
    ids = sorted(k for k, v in hrs.items() if np.isfinite(v) and v > 0)
    rates = np.array([hrs[k] for k in ids], np.float64)
    counts = hr_histogram(rates, hr_range, bin_bpm)
    # milli-factor range per (source, bin): integers m with hr * m / 1000 in the bin, m / 1000 in factor_range
    m_min, m_max = math.ceil(f_lo * 1000 - 1e-9), math.floor(f_hi * 1000 + 1e-9)
    m_lo = np.maximum(m_min, np.ceil(edges[None, :-1] * 1000 / rates[:, None] - 1e-9))  # (sources, bins)
    # bins are half-open [lo, hi) except the last, which holds hr_range's upper end
    m_hi = np.ceil(edges[None, 1:] * 1000 / rates[:, None] - 1e-9) - 1
    m_hi[:, -1] = np.floor(edges[-1] * 1000 / rates + 1e-9)
    m_hi = np.minimum(m_max, m_hi)
    n_free = np.maximum(0, m_hi - m_lo + 1).astype(int)  # (sources, bins) factors still free
    n_free -= (m_lo <= 1000) & (1000 <= m_hi)  # factor 1.0 would be a plain copy of the source
    rng = np.random.default_rng(seed)
    used: list[set[int]] = [{1000} for _ in ids]
    n_picked = np.zeros(len(ids), int)
    picks = []
    for _ in range(max(0, int(n_extra))):
        open_bins = np.flatnonzero((n_free > 0).any(axis=0))
        if not len(open_bins):
            break
        b = int(rng.choice(open_bins[counts[open_bins] == counts[open_bins].min()]))
        sources = np.flatnonzero(n_free[:, b] > 0)
        i = int(rng.choice(sources[n_picked[sources] == n_picked[sources].min()]))
        free = np.setdiff1d(np.arange(int(m_lo[i, b]), int(m_hi[i, b]) + 1), sorted(used[i]), assume_unique=True)
        m = int(rng.choice(free))
        used[i].add(m)
        n_free[i, b] -= 1  # bins are disjoint: m lies in bin b only
        n_picked[i] += 1
        counts[b] += 1
        picks.append((ids[i], m / 1000))
    return picks
