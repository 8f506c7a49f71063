"""Streaming video decode with bounded memory: video files (PyAV) and folders of image frames.

Frames come out upright (the container's display matrix is applied, as the published implementation does)
as RGB uint8, in blocks of at most `block` frames, with real timestamps in seconds from each frame's
pts * time_base, relative to the first frame. Nothing holds more than one block.

    info = probe("clip.mp4")
    for timestamps, frames in iter_blocks("clip.mp4", block=64):   # (n,) float64, (n, H, W, 3) uint8
        ...

An image folder (PURE-style datasets) is a directory of PNG/JPG frames sorted naturally by name
("2.png" before "10.png"); its timestamps come from `fps` or from the caller's per-frame `timestamps`.

Every failure to read a source is a `VideoError` whose message is one line, "PATH: reason".
Local paths only: callers copy remote URIs to a local file first.
"""
from __future__ import annotations

import contextvars
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Sequence

import av
import cv2
import numpy as np

from transforms.errors import ItemFailed

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
TRUNCATION_TOLERANCE_S = 0.5  # decoded video may fall this far short of the header's duration (or 3 frames)


_DECODE_THREADS = contextvars.ContextVar("decode_threads", default=0)


@contextmanager
def decode_threads(n: int):
    """Decode video with `n` threads inside this block; 0 (the default) lets FFmpeg use every core.

    A job that already runs one worker per core decodes single-threaded (`decode_threads(1)`): more threads
    would only contend with the other workers (8 recordings on 2 cores: 1.6x faster with 2 workers than
    with 1 this way, 1.4x with threaded decodes).
    """
    if n < 0:
        raise ValueError(f"decode threads must be >= 0, got {n}")
    token = _DECODE_THREADS.set(n)
    try:
        yield
    finally:
        _DECODE_THREADS.reset(token)


class VideoError(ItemFailed):
    """A source that cannot be read; str() is one line, "PATH: reason"."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = " ".join(str(reason).split())  # one line, whatever the library said
        super().__init__(f"{self.path}: {self.reason}")


@dataclass(frozen=True)
class VideoInfo:
    """What a source holds, read from its headers (and its first frame, for the rotation)."""

    path: str
    frames: int  # container's frame count, else duration * fps rounded: an estimate for some containers
    fps: float  # average frame rate; the given fps for image folders (0.0 when only timestamps were given)
    duration_s: float
    width: int  # upright, after rotation
    height: int
    rotation: int  # counter-clockwise degrees of the display matrix (0, 90, 180, 270)
    codec: str  # codec name, or "image/png" style for image folders


def probe(path: str | os.PathLike, *, fps: float | None = None,
          timestamps: Sequence[float] | None = None) -> VideoInfo:
    """Headers of a video file or image folder; `fps`/`timestamps` only apply to image folders."""
    path = Path(path)
    _check_exists(path)
    if path.is_dir():
        files = _image_files(path)
        times = _folder_timestamps(path, len(files), fps, timestamps)
        height, width = _read_image(path, files[0], 0).shape[:2]
        duration = float(times[-1]) if len(files) > 1 else 0.0
        return VideoInfo(str(path), len(files), float(fps or 0.0), duration, width, height, 0,
                         "image/" + files[0].suffix.lower().lstrip("."))
    with _open(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps_ = float(rate) if rate else 0.0
        if stream.duration is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base  # microseconds
        else:
            duration = 0.0
        frames = stream.frames or int(round(duration * fps_))
        try:
            first = next(container.decode(stream))
        except StopIteration:
            raise VideoError(path, "no decodable video frame") from None
        except av.FFmpegError as e:
            raise VideoError(path, f"decode failed at frame 0 ({_ffmpeg_reason(e)})") from None
        rotation = _rotation(first)
        width, height = (first.height, first.width) if rotation in (90, 270) else (first.width, first.height)
        return VideoInfo(str(path), frames, fps_, duration, width, height, rotation, stream.codec_context.name)


class YUVFrame:
    """A decoded 8-bit 4:2:0 frame that becomes RGB only where it is read: `frame[y0:y1, x0:x1]` converts
    that region (a face crop reads a sixth of the frame), `np.asarray(frame)` the whole. `shape` is the RGB
    shape (H, W, 3). The conversion is BT.601 limited range, what FFmpeg applies to untagged video (the
    frames that get here), by OpenCV: within 3 levels of FFmpeg's own (1.2 on average), at a fraction of
    the cost of converting every whole frame.
    """

    __slots__ = ("_frame", "_planes", "shape")

    def __init__(self, frame: av.VideoFrame):
        self._frame = frame  # owns the plane buffers the views below read
        self._planes = [np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, :p.width] for p in frame.planes]
        self.shape = (frame.height, frame.width, 3)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        rgb = self._rgb(0, self.shape[0], 0, self.shape[1])
        return rgb if dtype is None else rgb.astype(dtype)

    def __getitem__(self, key) -> np.ndarray:
        if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, slice) and k.step in (None, 1)
                                                                   for k in key)):
            return np.asarray(self)[key]
        (y0, y1, _), (x0, x1, _) = (k.indices(n) for k, n in zip(key, self.shape[:2]))
        return self._rgb(y0, max(y0, y1), x0, max(x0, x1))

    def _rgb(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        if y1 <= y0 or x1 <= x0:
            return np.zeros((max(y1 - y0, 0), max(x1 - x0, 0), 3), np.uint8)
        # whole chroma samples: widen the region to even bounds, convert, cut the widening off again
        ey0, ex0 = y0 & ~1, x0 & ~1
        ey1, ex1 = y1 + (y1 & 1), x1 + (x1 & 1)
        y, u, v = self._planes
        i420 = np.concatenate([y[ey0:ey1, ex0:ex1].ravel(), u[ey0 // 2:ey1 // 2, ex0 // 2:ex1 // 2].ravel(),
                               v[ey0 // 2:ey1 // 2, ex0 // 2:ex1 // 2].ravel()])
        rgb = cv2.cvtColor(i420.reshape(-1, ex1 - ex0), cv2.COLOR_YUV2RGB_I420)
        return rgb[y0 - ey0:y1 - ey0, x0 - ex0:x1 - ex0]

    @staticmethod
    def takes(frame: av.VideoFrame) -> bool:
        """Frames this class converts as FFmpeg would: 4:2:0 of even size, untagged or BT.601, limited range."""
        return (frame.format.name == "yuv420p" and frame.width % 2 == 0 and frame.height % 2 == 0
                and frame.colorspace in (2, 5, 6) and frame.color_range in (0, 1))


def iter_frames(path: str | os.PathLike, *, start: int = 0, fps: float | None = None,
                timestamps: Sequence[float] | None = None, lazy: bool = False
                ) -> Iterator[tuple[float, np.ndarray | YUVFrame]]:
    """One (timestamp_s, frame (H, W, 3) uint8 RGB upright) per frame, from frame index `start` on.

    Timestamps are relative to the source's first frame (also when `start` > 0) and strictly increasing.
    `fps`/`timestamps` give the times of an image folder's frames and are required for one.
    lazy: frames of 4:2:0 video come as `YUVFrame`s, converted to RGB only where they are read (for
    consumers that read a region of most frames, like the face tracker); other frames are arrays.
    """
    path = Path(path)
    _check_exists(path)
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    if path.is_dir():
        yield from _iter_folder(path, fps, timestamps, start)
    else:
        yield from _iter_video(path, start, lazy)


def iter_blocks(path: str | os.PathLike, block: int = 64, *, start: int = 0, fps: float | None = None,
                timestamps: Sequence[float] | None = None, lazy: bool = False
                ) -> Iterator[tuple[np.ndarray, np.ndarray | list]]:
    """Blocks of (timestamps_s float64 (n,), frames uint8 (n, H, W, 3)) with 1 <= n <= block.

    Only the last block is shorter. Each block is a fresh array, so a consumer may keep it.
    lazy: frames as `iter_frames(lazy=True)` gives them, in a list of n (no block array is filled).
    """
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    if lazy:
        yield from _lazy_blocks(iter_frames(path, start=start, fps=fps, timestamps=timestamps, lazy=True), block)
        return
    times: list[float] = []
    buf: np.ndarray | None = None
    for t, frame in iter_frames(path, start=start, fps=fps, timestamps=timestamps):
        if buf is None or buf.shape[1:] != frame.shape:
            if buf is not None and times:  # frame size changed mid-stream: close the block at the change
                yield np.array(times), buf[: len(times)]
                times = []
            buf = np.empty((block, *frame.shape), np.uint8)
        buf[len(times)] = frame
        times.append(t)
        if len(times) == block:
            yield np.array(times), buf
            times, buf = [], np.empty_like(buf)
    if times:
        yield np.array(times), buf[: len(times)].copy()  # copy: don't hand out a mostly unused buffer


def _lazy_blocks(frames, block: int) -> Iterator[tuple[np.ndarray, list]]:
    times, out = [], []
    for t, frame in frames:
        times.append(t)
        out.append(frame)
        if len(out) == block:
            yield np.array(times), out
            times, out = [], []
    if out:
        yield np.array(times), out


# ---- video files ----

def _check_exists(path: Path) -> None:
    if not path.exists():
        raise VideoError(path, "no such file or directory")
    if path.is_file() and path.stat().st_size == 0:
        raise VideoError(path, "empty file (0 bytes)")


def _open(path: Path) -> av.container.InputContainer:
    """Open a container that has a video stream, or raise VideoError."""
    try:
        container = av.open(str(path), mode="r")
    except av.FFmpegError as e:
        raise VideoError(path, f"not a readable video container ({_ffmpeg_reason(e)})") from None
    if not container.streams.video:
        container.close()
        raise VideoError(path, "no video stream")
    return container


def _ffmpeg_reason(e: av.FFmpegError) -> str:
    return e.strerror or str(e)  # strerror: FFmpeg's words without the path repeated


def _rotation(frame: av.VideoFrame) -> int:
    """Counter-clockwise degrees of the frame's display matrix, in 0, 90, 180, 270."""
    return int(round(frame.rotation / 90)) % 4 * 90


def _iter_video(path: Path, start: int, lazy: bool = False) -> Iterator[tuple[float, np.ndarray | YUVFrame]]:
    with _open(path) as container:
        stream = container.streams.video[0]
        threads = _DECODE_THREADS.get()
        # frame + slice threads, as many as asked (0: one per core): the decode is the costly part
        stream.thread_type = "AUTO" if threads != 1 else "NONE"
        stream.codec_context.thread_count = threads
        rate = stream.average_rate or stream.guessed_rate or Fraction(30)
        declared_s = _declared_span(container, stream, float(rate))
        pts0: int | None = None
        last_t = -np.inf
        index = 0
        frames = container.decode(stream)
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                break
            except av.FFmpegError as e:
                raise VideoError(path, f"truncated or corrupt stream: decode failed at frame {index} "
                                       f"({_ffmpeg_reason(e)})") from None
            if frame.pts is None:  # raw elementary streams carry no pts: fall back to the frame rate
                t = float(index / rate)
            else:
                pts0 = frame.pts if pts0 is None else pts0
                t = float((frame.pts - pts0) * frame.time_base)  # exact Fraction, then one rounding
            if t <= last_t:
                raise VideoError(path, f"non-monotonic timestamps at frame {index}: "
                                       f"{t:.6f} s after {last_t:.6f} s")
            last_t = t
            if index >= start:  # frames before start are decoded (timestamps, checks) but not converted
                k = _rotation(frame) // 90
                if lazy and not k and YUVFrame.takes(frame):
                    yield t, YUVFrame(frame)
                else:
                    rgb = frame.to_ndarray(format="rgb24")  # same conversion as the published process_video
                    yield t, np.ascontiguousarray(np.rot90(rgb, k)) if k else rgb
            index += 1
        if index == 0:
            raise VideoError(path, "no decodable video frame")
        decoded_s = last_t + 1 / float(rate)
        if declared_s - decoded_s > max(TRUNCATION_TOLERANCE_S, 3 / float(rate)):
            raise VideoError(path, f"truncated stream: decoded {index} frames ({decoded_s:.2f} s) "
                                   f"of a declared {declared_s:.2f} s")


def _declared_span(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
                   fps: float) -> float:
    """Seconds of video the headers promise: the longer of the stream duration and frame count / fps.

    A truncated file keeps its header (Matroska: duration; AVI: frame count; MP4 with the index first:
    both), so decoding far less than this means the stream was cut. The frame count alone is not used:
    AVI counts dropped (empty) frames, which decode to nothing.
    """
    spans = [stream.frames / fps] if stream.frames and fps else []
    if stream.duration is not None:
        spans.append(float(stream.duration * stream.time_base))
    elif container.duration is not None and len(container.streams) == 1:  # else audio may be longer
        spans.append(container.duration / av.time_base)
    return max(spans, default=0.0)


# ---- image folders ----

def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _image_files(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise VideoError(folder, f"no image frames ({', '.join(IMAGE_SUFFIXES)}) in folder")
    return sorted(files, key=lambda p: _natural_key(p.name))


def _folder_timestamps(folder: Path, n: int, fps: float | None,
                       timestamps: Sequence[float] | None) -> np.ndarray:
    """Per-frame seconds relative to the first frame, from the caller's list or from fps."""
    if timestamps is not None:
        times = np.asarray(timestamps, np.float64)
        if times.shape != (n,):
            raise VideoError(folder, f"{len(times)} timestamps given for {n} image frames")
        bad = np.flatnonzero(np.diff(times) <= 0)
        if bad.size:
            raise VideoError(folder, f"non-monotonic timestamps at frame {bad[0] + 1}")
        return times - times[0]
    if not fps or fps <= 0:
        raise ValueError(f"{folder}: an image folder needs fps > 0 or per-frame timestamps")
    return np.arange(n) / float(fps)


def _read_image(folder: Path, file: Path, index: int) -> np.ndarray:
    bgr = cv2.imread(str(file), cv2.IMREAD_COLOR)  # drops alpha, 16-bit becomes 8-bit
    if bgr is None:
        raise VideoError(folder, f"unreadable image at frame {index}: {file.name}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _iter_folder(folder: Path, fps: float | None, timestamps: Sequence[float] | None,
                 start: int) -> Iterator[tuple[float, np.ndarray]]:
    files = _image_files(folder)
    times = _folder_timestamps(folder, len(files), fps, timestamps)
    for index in range(start, len(files)):
        yield float(times[index]), _read_image(folder, files[index], index)
