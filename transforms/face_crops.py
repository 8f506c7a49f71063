"""One recording to 30 fps face crops, streaming: decode, track the face, resample by timestamps.

Crops are taken at the source rate (the tracker sees every real frame) and then resampled, so a 25 fps
or variable-rate source becomes exact 30 fps without ever holding the video: memory is one decode block.
Each model's crop size (`sizes`: 36 for ME-rPPG, 128 for PhysMamba) is cut from the original frame with
the tracker's box and `cv2.resize(INTER_AREA)`, as the published `Model` resizes the same box to its
model's input: never one crop resized into another.
"""
from __future__ import annotations

import os
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from transforms.face import FaceDetector, FaceTracker, crop_face, track_faces
from transforms.resample import FPS, Resampler
from transforms.shards import CROP_SIZE
from transforms.video import VideoError, iter_blocks, probe


class CropBlock(NamedTuple):
    timestamps: np.ndarray  # (n,) float64 seconds on the 30 fps grid
    crops: np.ndarray  # (n, 36, 36, 3) uint8, zeros where no face
    face_found: np.ndarray  # (n,) bool
    boxes: np.ndarray  # (n, 4) float64 crop box (y0, y1, x0, x1) in source pixels, NaN where no face
    sized: dict[int, np.ndarray]  # {size: (n, size, size, 3) uint8} at each size asked for, zeros where no face


def iter_face_crops(
    path: str | os.PathLike, *, detect_every: int = 5, image_fps: float | None = FPS,
    timestamps: Sequence[float] | None = None, block: int = 64, detector: FaceDetector | None = None,
    progress: bool = False, sizes: Sequence[int] = (CROP_SIZE,),
) -> Iterator[CropBlock]:
    """Blocks of 30 fps face crops for one video file or image folder (`sized` at each of `sizes`).

    image_fps / timestamps: frame times of an image folder (ignored for video files, which carry their own).
    detector: a FaceDetector to reuse across recordings; one is opened and closed here otherwise.
    Raises transforms.video.VideoError for unreadable input.
    """
    folder_times = {}
    if os.path.isdir(path):
        folder_times = dict(fps=None if timestamps is not None else image_fps, timestamps=timestamps)
    bar = _progress_bar(path, folder_times) if progress else None
    own_detector = detector is None
    detector = FaceDetector() if own_detector else detector
    try:
        blocks = iter_blocks(path, block, lazy=True, **folder_times)
        for out in face_crops(blocks, detector, detect_every=detect_every, sizes=sizes):
            if bar is not None:
                bar.update(len(out.timestamps))
            yield out
    finally:
        if own_detector:
            detector.close()
        if bar is not None:
            bar.close()


def face_crops(blocks: Iterable[tuple[np.ndarray, np.ndarray]], detector: FaceDetector, *,
               detect_every: int = 5, sizes: Sequence[int] = (CROP_SIZE,)) -> Iterator[CropBlock]:
    """30 fps CropBlocks from source blocks of (timestamps_s (n,), frames (n, H, W, 3) uint8 RGB, or the
    lazy frames of `iter_blocks(lazy=True)`); `sized` holds the crops at each of `sizes`."""
    tracker = FaceTracker(detector, every=detect_every, size=CROP_SIZE)
    sizes = tuple(dict.fromkeys(sizes))
    side_rs = Resampler(FPS, method="nearest")
    crops_rs = {s: Resampler(FPS, method="linear") for s in {tracker.size, *sizes}}
    for t, frames in blocks:
        for t, crops, found, boxes in track_faces([(t, frames)], tracker):  # one block: frames still at hand
            sized = {s: crops if s == tracker.size else _crops_at(frames, found, boxes, s) for s in crops_rs}
            pushed = {s: rs.push(t, sized[s]) for s, rs in crops_rs.items()}
            out = _resampled(pushed, side_rs.push(t, _side(found, boxes)), tracker.size, sizes)
            if out is not None:
                yield out
    out = _resampled({s: rs.flush() for s, rs in crops_rs.items()}, side_rs.flush(), tracker.size, sizes)
    if out is not None:
        yield out


def _crops_at(frames, found: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """(n, size, size, 3) crops of the frames by the tracker's boxes (its ints), zeros where no face."""
    out = np.zeros((len(found), size, size, 3), np.uint8)
    for i in np.flatnonzero(found):
        out[i] = crop_face(frames[i], tuple(int(v) for v in boxes[i]), size)
    return out


def _side(found: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    # face_found and the box travel together through one nearest-neighbour resampler
    return np.concatenate([found[:, None].astype(np.float64), boxes], axis=1)


def _resampled(crops_out: dict, side_out, tracker_size: int, sizes: tuple[int, ...]) -> CropBlock | None:
    t, side = side_out
    if len(t) == 0:
        return None
    found = side[:, 0] > 0.5
    # a grid frame blended from a face frame and a no-face frame is not a clean crop: drop its face flag
    crops = {s: np.where(found[:, None, None, None], c, 0).astype(np.uint8) for s, (_, c) in crops_out.items()}
    return CropBlock(t, crops[tracker_size], found, side[:, 1:], {s: crops[s] for s in sizes})


def _progress_bar(path, folder_times):
    from tqdm import tqdm

    try:  # the bar counts 30 fps output frames, whatever the source rate
        info = probe(path, **folder_times)
        total = int(info.duration_s * FPS) + 1 if info.duration_s > 0 else info.frames
    except VideoError:  # the decode itself reports it, with its reason
        total = None
    return tqdm(total=total, unit="frame", desc=os.path.basename(str(path).rstrip("/")), leave=False)
