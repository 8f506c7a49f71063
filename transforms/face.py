"""Face detection (MediaPipe BlazeFace short-range, the published model file), the published crop
rule, and a tracker that turns a frame stream into stable 36x36 face crops.

    with FaceDetector() as detector:
        tracker = FaceTracker(detector)                 # one per recording; the detector is shared
        for t, frame in frames:
            crop, face_found, box = tracker(frame, t)   # (36, 36, 3) uint8, bool, (4,) float

The crop follows the published implementation (open-rppg `FaceDetector` and `Model.__update_frame_box`):
from the BlazeFace box centre, 0.45 w left and right, 0.6 h up and 0.5 h down, rounded, clipped to the
frame, `frame[y0:y1, x0:x1]` resized to 36x36 with cv2.INTER_AREA. Crop boxes are (y0, y1, x0, x1):
the order of the slices they stand for.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterable, Iterator, NamedTuple

import cv2
import mediapipe as mp
import numpy as np
from mediapipe.tasks.python import BaseOptions, vision

from transforms.published_files import published_path
from transforms.resample import FPS

MODEL_FILE = "blaze_face_short_range.tflite"


class Box(NamedTuple):
    """A BlazeFace detection in pixels of the frame it was found in (x right, y down)."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float


class FaceDetector:
    """MediaPipe Tasks FaceDetector in IMAGE mode with the published BlazeFace short-range model.

    Holds a native graph: close it (`close()` or `with FaceDetector() as d:`).
    Thresholds are the published implementation's (score 0.5, NMS IoU 0.3).
    """

    def __init__(self, model_path: str | os.PathLike | None = None, *, min_score: float = 0.5,
                 nms_iou: float = 0.3):
        path = published_path(MODEL_FILE) if model_path is None else model_path
        options = vision.FaceDetectorOptions(
            base_options=BaseOptions(model_asset_path=str(path)),
            running_mode=vision.RunningMode.IMAGE,
            min_detection_confidence=min_score,
            min_suppression_threshold=nms_iou,
        )
        with _native_stderr_silenced():
            self._detector = vision.FaceDetector.create_from_options(options)

    def detect(self, frame_rgb: np.ndarray) -> Box | None:
        """The highest-scoring face in an RGB uint8 frame (H, W, 3), or None."""
        if self._detector is None:
            raise RuntimeError("FaceDetector is closed")
        image = mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(frame_rgb))
        with _native_stderr_silenced():  # LiteRT warns per call about its own input alignment
            detections = self._detector.detect(image).detections
        if not detections:
            return None
        best = max(detections, key=lambda d: d.categories[0].score)
        b = best.bounding_box
        return Box(float(b.origin_x), float(b.origin_y), float(b.origin_x + b.width),
                   float(b.origin_y + b.height), float(best.categories[0].score))

    def close(self) -> None:
        if self._detector is not None:
            with _native_stderr_silenced():
                self._detector.close()
            self._detector = None

    def __enter__(self) -> FaceDetector:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def _native_stderr_silenced():
    """Mute file descriptor 2 while MediaPipe's LiteRT starts or stops a graph.

    It prints a dozen INFO banners per detector from C++, with no switch to turn them off
    (google-ai-edge/mediapipe#5737); Python exceptions still propagate as usual.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


def crop_box(box: Box, frame_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """The published crop around a detection: (y0, y1, x0, x1) ints clipped to frame_shape (H, W, ...).

    Centre of the box, 0.45 w left and right, 0.6 h up, 0.5 h down; rounded half to even like the
    published `np.round`. May be empty (y1 <= y0 or x1 <= x0) for a box outside the frame.
    """
    height, width = frame_shape[:2]
    cx, cy = (box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2
    w, h = box.x1 - box.x0, box.y1 - box.y0
    y0, y1, x0, x1 = np.round([cy - 0.6 * h, cy + 0.5 * h, cx - 0.45 * w, cx + 0.45 * w]).astype(int)
    return (int(np.clip(y0, 0, height)), int(np.clip(y1, 0, height)),
            int(np.clip(x0, 0, width)), int(np.clip(x1, 0, width)))


def crop_face(frame: np.ndarray, crop: tuple[int, int, int, int], size: int = 36) -> np.ndarray:
    """frame[y0:y1, x0:x1] resized to (size, size, 3) with cv2.INTER_AREA (the published resize)."""
    y0, y1, x0, x1 = crop
    if y1 <= y0 or x1 <= x0:
        raise ValueError(f"empty crop {crop}")
    return cv2.resize(np.ascontiguousarray(frame[y0:y1, x0:x1]), (size, size), interpolation=cv2.INTER_AREA)


class _Kalman1D:
    """The published scalar Kalman filter (random-walk state), process noise scaled by (dt / 1/30)^2."""

    def __init__(self, value: float, process_noise: float, measurement_noise: float, error: float = 1.0):
        self.estimate, self.error = value, error
        self.q, self.r = process_noise, measurement_noise

    def update(self, measurement: float, dt: float) -> float:
        predicted_error = self.error + self.q * (dt * FPS) ** 2
        gain = predicted_error / (predicted_error + self.r)
        self.estimate += gain * (measurement - self.estimate)
        self.error = (1 - gain) * predicted_error
        return self.estimate


class FaceTracker:
    """Per-frame face crops for one recording: detect every `every` frames, smooth the crop box between.

    Follows the published `Model.__update_Kalman`: the crop box (y0, y1, x0, x1) of each detection feeds
    four 1-D Kalman filters (process noise 0.01, measurement noise 0.5), updated every frame with the
    latest detection; the crop moves to the filtered box only when its centre shifts by more than
    `move_fraction` of the box size, so small jitter never changes the crop (the model sees a still face).
    A face counts as lost once a detection fails and the last successful one is more than `lost_after_s`
    old; lost frames give face_found False, an all-zero crop and a NaN box, and the next detection starts
    afresh. Differences from the published code are listed in `__call__`.
    """

    def __init__(self, detector: FaceDetector, *, every: int = 5, size: int = 36, lost_after_s: float = 1.0,
                 process_noise: float = 0.01, measurement_noise: float = 0.5, move_fraction: float = 0.02):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.detector = detector
        self.every, self.size, self.lost_after_s = every, size, lost_after_s
        self.process_noise, self.measurement_noise = process_noise, measurement_noise
        self.move_fraction = move_fraction
        self._index = 0  # frames seen
        self._last_t: float | None = None
        self._filters: list[_Kalman1D] | None = None
        self._measured: np.ndarray | None = None  # (4,) latest detected crop box
        self._box: np.ndarray | None = None  # (4,) crop box in use
        self._seen_t = -np.inf  # time of the last successful detection
        self._last_failed = False  # did the latest detection attempt fail?

    def __call__(self, frame: np.ndarray, t: float | None = None) -> tuple[np.ndarray, bool, np.ndarray]:
        """One frame (H, W, 3) uint8 RGB at time t seconds (default: frame index / 30).

        Returns (crop (size, size, 3) uint8, face_found, crop box (y0, y1, x0, x1) float64 (4,), NaN if none).
        Differences from the published code, each on purpose: a failed detection keeps the face for up to
        `lost_after_s` (the published check compares pixel boxes with the 36x36 input size, so in effect any
        miss masks the frame); lost frames are zeros rather than the stale crop; the move test divides the
        centre shift by the box height/width (the published one divides by means of mixed coordinates);
        the filters restart on re-detection after a loss instead of dragging the crop from the old place.
        """
        t = self._index / FPS if t is None else float(t)
        dt = t - self._last_t if self._last_t is not None else 1 / FPS
        self._last_t = t
        if self._index % self.every == 0:
            self._detect(frame, t, dt)
        elif self._filters is not None:  # the published filter also steps on frames without detection
            for f, m in zip(self._filters, self._measured):
                f.update(m, dt)
        self._index += 1

        lost = self._box is None or (self._last_failed and t - self._seen_t > self.lost_after_s)
        if lost:
            self._filters = self._measured = self._box = None  # re-detection starts afresh
            return np.zeros((self.size, self.size, 3), np.uint8), False, np.full(4, np.nan)
        crop = tuple(int(v) for v in self._box)
        return crop_face(frame, crop, self.size), True, self._box.astype(np.float64)

    def _detect(self, frame: np.ndarray, t: float, dt: float) -> None:
        box = self.detector.detect(frame)
        crop = None if box is None else np.array(crop_box(box, frame.shape), np.float64)
        if crop is None or crop[1] <= crop[0] or crop[3] <= crop[2]:
            self._last_failed = True
            return
        self._last_failed, self._seen_t, self._measured = False, t, crop
        if self._filters is None:
            self._filters = [_Kalman1D(v, self.process_noise, self.measurement_noise) for v in crop]
            smoothed = crop
        else:
            smoothed = np.round([f.update(m, dt) for f, m in zip(self._filters, crop)])
        if self._box is None or self._moved(smoothed):
            self._box = smoothed

    def _moved(self, new: np.ndarray) -> bool:
        """Has the centre moved by more than move_fraction of the current box's height or width?"""
        (y0, y1, x0, x1), (ny0, ny1, nx0, nx1) = self._box, new
        shift_y = abs((ny0 + ny1) - (y0 + y1)) / 2 / max(y1 - y0, 1)
        shift_x = abs((nx0 + nx1) - (x0 + x1)) / 2 / max(x1 - x0, 1)
        return max(shift_y, shift_x) > self.move_fraction


def track_faces(blocks: Iterable[tuple[np.ndarray, np.ndarray]],
                tracker: FaceTracker) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Run a tracker over `iter_blocks` output: per block (timestamps (n,), crops (n, 36, 36, 3) uint8,
    face_found bool (n,), crop boxes float64 (n, 4))."""
    for timestamps, frames in blocks:
        if len(frames) == 0:
            continue
        results = [tracker(frame, t) for t, frame in zip(timestamps, frames)]
        crops, found, boxes = zip(*results)
        yield timestamps, np.stack(crops), np.array(found, bool), np.stack(boxes)
