"""Resampling onto the model's fixed frame grid (30 fps) by timestamps, streaming with bounded memory.

Any source rate, variable ones included, goes onto the grid t0 + k / fps (t0: the first source
timestamp), for every k with t0 + k / fps <= t_last (+ snap_s). A source of duration D = t_last - t0
therefore gives floor(D * fps) + 1 grid frames; a uniform 30 fps source comes back unchanged, bit-exact.

    frames_rs = Resampler(30)                      # frames or 36x36 crops: linear between neighbours
    found_rs = Resampler(30, method="nearest")     # masks and boxes: the nearest source frame
    for t, crops, found in blocks:
        t30, crops30 = frames_rs.push(t, crops)
        _, found30 = found_rs.push(t, found)       # same timestamps in, same grid out

Labels sampled on their own clock go through `resample_signal`.
"""
from __future__ import annotations

import math

import numpy as np

FPS = 30.0  # the model frame rate: every recording is resampled onto this grid, every model reads it
GAP_SPACINGS = 3.0  # a label interval over this many median sample spacings is a dropout, not bridged


class Resampler:
    """Streaming resampler of (timestamps (n,), values (n, ...)) onto the grid t0 + k / fps.

    method: "linear" blends the two source frames around each grid time (float math, rounded back to
    the input's integer dtype); "nearest" takes the closer one (ties: the earlier), for any dtype.
    snap_s: a grid time this close to a source frame takes that frame as is. Container timestamps are
    quantised to their time base (1 ms in Matroska), so 30 fps sources land within 0.5 ms of the grid;
    snapping keeps them bit-exact instead of blending in 1% of a neighbour.
    Memory: one source frame is carried between pushes; a push allocates its output (and, for
    "linear", float copies of the two neighbours of each output frame).
    """

    def __init__(self, fps: float = FPS, *, method: str = "linear", snap_s: float = 1e-3):
        if fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        if method not in ("linear", "nearest"):
            raise ValueError(f"method must be 'linear' or 'nearest', got {method!r}")
        if not 0 <= snap_s < 0.5 / fps:
            raise ValueError(f"snap_s must be in [0, half a grid step), got {snap_s}")
        self.fps = float(fps)
        self.method = method
        self.snap_s = float(snap_s)
        self._reset()

    def _reset(self) -> None:
        self._t0: float | None = None  # first source timestamp: the grid's origin
        self._next_k = 0  # index of the next grid frame to emit
        self._last_t: float | None = None  # the last source frame, carried to the next push
        self._last: np.ndarray | None = None

    def push(self, timestamps: np.ndarray, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Add source frames; returns the grid frames they complete.

        timestamps: (n,) seconds, strictly increasing across pushes. frames: (n, ...) any dtype.
        Returns (grid_timestamps float64 (m,), frames_out (m, ...) of frames' dtype and trailing shape).
        """
        t = np.asarray(timestamps, np.float64)
        x = np.asarray(frames)
        if t.ndim != 1 or len(t) != len(x):
            raise ValueError(f"timestamps {t.shape} and frames {x.shape} need the same length")
        if self.method == "linear" and x.dtype == np.bool_:
            raise TypeError("boolean arrays cannot be blended: use Resampler(method='nearest')")
        if len(t) == 0:
            return np.empty(0), x[:0]
        if self._last is not None:
            if x.shape[1:] != self._last.shape:
                raise ValueError(f"frame shape changed from {self._last.shape} to {x.shape[1:]}")
            t = np.concatenate([[self._last_t], t])
            x = np.concatenate([self._last[None], x])
        if np.any(np.diff(t) <= 0):
            raise ValueError("timestamps must be strictly increasing")
        if self._t0 is None:
            self._t0 = float(t[0])
        self._last_t, self._last = float(t[-1]), x[-1].copy()

        # Grid frames at or before the last source time (within snap) are complete now.
        k_end = math.floor((t[-1] + self.snap_s - self._t0) * self.fps) + 1
        ks = np.arange(self._next_k, max(k_end, self._next_k))
        self._next_k += len(ks)
        grid = self._t0 + ks / self.fps  # (m,)
        left = np.clip(np.searchsorted(t, grid, side="right") - 1, 0, len(t) - 1)
        right = np.minimum(left + 1, len(t) - 1)
        gap = t[right] - t[left]
        w = np.divide(grid - t[left], gap, out=np.zeros_like(grid), where=gap > 0)
        w[grid - t[left] <= self.snap_s] = 0.0
        w[(t[right] - grid <= self.snap_s) & (right > left)] = 1.0
        if self.method == "nearest" or np.all((w == 0) | (w == 1)):
            return grid, x[np.where(w > 0.5, right, left)]
        return grid, _blend(x[left], x[right], w)

    def flush(self) -> tuple[np.ndarray, np.ndarray]:
        """End of stream: the grid frames still owed (none: every grid time up to the last source frame
        was emitted by push, and none lies past it) and a reset, so the resampler can take a new stream."""
        shape = () if self._last is None else self._last.shape
        dtype = np.uint8 if self._last is None else self._last.dtype
        self._reset()
        return np.empty(0), np.empty((0, *shape), dtype)


def _blend(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(1 - w) a + w b per leading index; integer dtypes are rounded back, floats keep their precision."""
    work = np.result_type(a.dtype, np.float32)  # float32 for uint8 frames, float64 stays float64
    w = w.astype(work).reshape(-1, *([1] * (a.ndim - 1)))  # (m, 1, ...) broadcast over trailing dims
    out = a.astype(work) + (b.astype(work) - a) * w
    if np.issubdtype(a.dtype, np.integer):
        return np.rint(out).astype(a.dtype)  # between two values of the dtype: no clipping needed
    return out.astype(a.dtype)


def longest_bridged_s(t_src: np.ndarray) -> float:
    """The longest interval between label samples that resample_signal bridges: GAP_SPACINGS median
    spacings (inf for fewer than two samples). Computed once per label, it spares each block the median."""
    spacing = np.diff(np.asarray(t_src, np.float64))
    return float(GAP_SPACINGS * np.median(spacing)) if len(spacing) else math.inf


def resample_signal(t_src: np.ndarray, y_src: np.ndarray, t_dst: np.ndarray, max_gap_s: float | None = None
                    ) -> np.ndarray:
    """Linear interpolation of a label y_src (n,) sampled at t_src (n,) onto t_dst (m,) -> float64 (m,).

    NaN outside [t_src[0], t_src[-1]] (no extrapolation) and across gaps, which are never bridged by a
    straight line: between two samples further apart than max_gap_s (default `longest_bridged_s(t_src)`;
    sensors log a dropout by leaving samples out) and next to NaN samples. At a finite sample's own time,
    its value.
    """
    t_src = np.asarray(t_src, np.float64)
    y_src = np.asarray(y_src, np.float64)
    if t_src.ndim != 1 or t_src.shape != y_src.shape:
        raise ValueError(f"t_src {t_src.shape} and y_src {y_src.shape} must be the same 1-D shape")
    if np.any(np.diff(t_src) <= 0):
        raise ValueError("t_src must be strictly increasing")
    if len(t_src) == 0:
        return np.full(np.shape(t_dst), np.nan)
    t_dst = np.asarray(t_dst, np.float64)
    out = np.interp(t_dst, t_src, y_src, left=np.nan, right=np.nan)
    if len(t_src) < 2:
        return out
    limit = longest_bridged_s(t_src) if max_gap_s is None else max_gap_s
    left = np.clip(np.searchsorted(t_src, t_dst, side="right") - 1, 0, len(t_src) - 2)  # interval of each t_dst
    t0, t1 = t_src[left], t_src[left + 1]
    gap = (t1 - t0 > limit) | np.isnan(y_src[left]) | np.isnan(y_src[left + 1])
    out[gap & (t_dst > t0) & (t_dst < t1)] = np.nan  # strictly inside: a sample's own time keeps its value
    return out
