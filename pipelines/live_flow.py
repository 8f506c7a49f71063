"""One frame at a time for `pulsepipe live`: face crop, an ME-flow step, and the sliding-window heart rate.

    est = LiveEstimator(me, detector)                 # me: model.load(...); detector: transforms.face.FaceDetector
    r = est.step(t, frame)                            # FrameResult: BVP (NaN without a face), box, stage times
    hr, sqi = est.heart_rate()                        # over the last window_s seconds; NaN until it is usable

Crops are made as preprocess makes them (transforms.face.FaceTracker: detect every k frames, box smoothed
in between, INTER_AREA to 36x36), but at the source's own frames: the model steps with dt taken from each
frame's timestamp, so a dropped frame or a 25 fps camera needs no resampling. Memory is constant: the
state, the tracker and one window of (t, BVP) samples.
"""
from __future__ import annotations

import collections
import time
from typing import NamedTuple

import numpy as np

import model
from transforms import signal
from transforms.face import FaceDetector, FaceTracker
from transforms.resample import FPS, resample_signal

WINDOW_S = 10.0  # heart-rate window
MIN_FACE_FRACTION = 0.9  # of the window with a face before it has a rate (evaluate's windows: the same)


class FrameResult(NamedTuple):
    t: float
    bvp: float  # NaN where there is no face: never guessed
    face: bool
    box: tuple[float, float, float, float] | None  # crop box (y0, y1, x0, x1) in frame pixels
    face_s: float  # seconds in the tracker (detection or smoothing, and the crop)
    model_s: float  # seconds in the ME-flow step (0 without a face)


class LiveEstimator:
    """ME-flow over a stream of frames with its state carried; see the module doc."""

    def __init__(self, me: model.MEModel, detector: FaceDetector, *, detect_every: int = 5,
                 window_s: float = WINDOW_S):
        self.me, self.window_s = me, window_s
        self.tracker = FaceTracker(detector, every=detect_every)
        self._state = None  # None: no face since the last one, the next face starts from the initial state
        self._last_t: float | None = None  # time of the frame the model last stepped on
        self._window: collections.deque = collections.deque()  # (t, bvp) of the last window_s seconds

    def step(self, t: float, frame) -> FrameResult:
        t0 = time.perf_counter()
        crop, face, box = self.tracker(frame, t)
        t1 = time.perf_counter()
        bvp = np.nan
        if face:
            if self._state is None:
                # after a gap the face's colour statistics and the pulse's phase are new: start afresh,
                # as a recording does, rather than from a state that remembers the face before the gap
                self._state, dt = self.me.init_state(), 1 / FPS
            else:
                dt = t - self._last_t  # across dropped frames too
            y, self._state = model.flow_step(self.me.params, crop, self._state, dt, cfg=self.me.cfg)
            bvp, self._last_t = float(y), t
        else:
            self._state = None
        t2 = time.perf_counter()
        self._window.append((t, bvp))
        while self._window[0][0] < t - self.window_s - 1.0:  # a second spare: the window's first frame
            self._window.popleft()
        return FrameResult(t, bvp, face, tuple(box) if face else None, t1 - t0, t2 - t1)

    def heart_rate(self) -> tuple[float, float]:
        """(HR BPM, SQI) of the last window_s seconds on the 30 fps grid, by evaluate's recipe
        (`signal.heart_rate`, no-face samples silenced); (NaN, NaN) while less than MIN_FACE_FRACTION of
        the window has a face (or before a whole window has passed)."""
        t, bvp = np.array(self._window).T if self._window else (np.zeros(0), np.zeros(0))
        if not len(t) or t[-1] - t[0] < self.window_s - 1 / FPS:
            return np.nan, np.nan
        grid = t[-1] - np.arange(int(round(self.window_s * FPS)))[::-1] / FPS  # ends on the newest frame
        y = resample_signal(t, bvp, grid)  # NaN next to no-face samples and across long gaps
        usable = np.isfinite(y)
        if usable.mean() < MIN_FACE_FRACTION:
            return np.nan, np.nan
        return signal.heart_rate(np.where(usable, y, 0.0), FPS, usable=usable)
