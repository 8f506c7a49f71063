"""Frames for `pulsepipe live`: a camera, a video file or a stream URL, read on its own thread.

    source = open_source("clip.mp4", paced=True)     # JobError, one line, if it cannot be opened
    feed = FrameFeed(source)                          # reading starts; at most `capacity` frames wait
    while (frame := feed.get()) is not None:          # JobError for a camera gone, a stream stalled
        ...                                           # frame.t (source clock), frame.image, frame.decode_s

A real-time source (a camera, a URL, a paced file) never waits for the consumer: when the mailbox is full
its oldest frame is dropped and counted (`FrameFeed.dropped`), so memory and latency stay bounded and the
consumer sees the gap in the timestamps. An unpaced file (`--as-fast-as-possible`) waits instead: every
frame is processed, as fast as the consumer goes.
"""
from __future__ import annotations

import collections
import os
import threading
import time
from typing import Iterator, NamedTuple

import av
import cv2
import numpy as np

from pipelines.errors import JobError
from transforms.video import VideoError, YUVFrame, iter_frames, probe

STALL_S = 5.0  # no frame for this long: a URL reconnects once, any other source ends with an error


class Frame(NamedTuple):
    t: float  # seconds on the source's own clock, from its first frame
    image: np.ndarray | YUVFrame  # (H, W, 3) uint8 RGB, upright
    decode_s: float  # seconds spent decoding it
    ready: float  # time.perf_counter() when it was decoded (and, for a paced file, due)


class Source:
    """One opened source: `frames()` yields Frames until it ends; errors are JobError naming it."""

    name: str
    realtime: bool  # True: frames come on their own clock and are dropped when the consumer is behind

    def frames(self) -> Iterator[Frame]:
        raise NotImplementedError

    def close(self) -> None:
        pass


def open_source(spec: str, *, paced: bool = True) -> Source:
    """A camera index ("0"), a stream URL (anything with "://" that FFmpeg opens) or a video file.

    paced: play a file at its own frame rate, as a camera would deliver it (False: as fast as it decodes).
    """
    if spec.strip().isdigit():
        return CameraSource(int(spec))
    if "://" in spec and not os.path.exists(spec):
        return UrlSource(spec)
    return FileSource(spec, paced)


class FileSource(Source):
    def __init__(self, path: str, paced: bool):
        try:
            probe(path)  # a missing, empty or unreadable file fails here, before anything starts
        except VideoError as e:
            raise JobError(str(e)) from None
        self.name, self.realtime, self._paced = path, paced, paced

    def frames(self) -> Iterator[Frame]:
        start = None
        frames = iter_frames(self.name, lazy=True)
        while True:
            t0 = time.perf_counter()
            try:
                t, image = next(frames)
            except StopIteration:
                return
            except VideoError as e:
                raise JobError(str(e)) from None
            decode_s = time.perf_counter() - t0
            start = t0 - t if start is None else start
            if self._paced:  # the frame is due at its own time after the first one
                time.sleep(max(0.0, start + t - time.perf_counter()))
            yield Frame(t, image, decode_s, time.perf_counter())


class CameraSource(Source):
    """An OpenCV camera; timestamps are the arrival times (drivers' own clocks are not reliable)."""

    def __init__(self, index: int):
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)  # it logs each backend it tries
        self._cap = cv2.VideoCapture(index)
        self.name, self.realtime = f"camera {index}", True
        if not self._cap.isOpened():
            raise JobError(f"{self.name}: cannot be opened (no such camera, or another program holds it)")

    def frames(self) -> Iterator[Frame]:
        start = None
        while True:
            if not self._cap.grab():  # waits for the next frame
                raise JobError(f"{self.name}: stopped delivering frames (disconnected?)")
            arrived = time.perf_counter()
            ok, bgr = self._cap.retrieve()
            if not ok:
                raise JobError(f"{self.name}: a frame could not be decoded (disconnected?)")
            start = arrived if start is None else start
            yield Frame(arrived - start, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), time.perf_counter() - arrived,
                        time.perf_counter())

    def close(self) -> None:
        self._cap.release()


class UrlSource(Source):
    """A stream FFmpeg opens (rtsp://, http://, ...): a read that stalls for STALL_S reconnects once."""

    def __init__(self, url: str):
        self.name, self.realtime = url, True
        self._container = self._open()

    def _open(self) -> av.container.InputContainer:
        try:
            container = av.open(self.name, timeout=(STALL_S, STALL_S))
        except (av.FFmpegError, OSError) as e:
            raise JobError(f"{self.name}: cannot be opened ({getattr(e, 'strerror', None) or e})") from None
        if not container.streams.video:
            container.close()
            raise JobError(f"{self.name}: no video stream")
        return container

    def frames(self) -> Iterator[Frame]:
        offset, last_t, reconnected = 0.0, -np.inf, False
        while True:
            stream, pts0 = self._container.streams.video[0], None
            frames = self._container.decode(stream)
            try:
                while True:
                    t0 = time.perf_counter()
                    try:
                        frame = next(frames)
                    except StopIteration:
                        return
                    pts0 = frame.pts if pts0 is None else pts0
                    t = offset + float((frame.pts - pts0) * frame.time_base) if frame.pts is not None else t0
                    if t <= last_t:  # a reconnected stream restarts its clock: keep ours increasing
                        continue
                    last_t = t
                    yield Frame(t, frame.to_ndarray(format="rgb24"), time.perf_counter() - t0, time.perf_counter())
            except (av.FFmpegError, OSError) as e:
                if reconnected:
                    raise JobError(f"{self.name}: stalled or broken after a reconnect "
                                   f"({getattr(e, 'strerror', None) or e})") from None
                reconnected, offset = True, max(last_t, 0.0)
                self._container.close()
                self._container = self._open()

    def close(self) -> None:
        self._container.close()


class FrameFeed:
    """A source read on a daemon thread into a mailbox of at most `capacity` frames (see the module doc)."""

    def __init__(self, source: Source, capacity: int = 2, stall_s: float = STALL_S):
        self.source, self.dropped = source, 0
        # a URL may spend two read timeouts and a reopen before its reader gives up
        self._stall_s = stall_s * 3 if isinstance(source, UrlSource) else stall_s
        self._frames: collections.deque = collections.deque()
        self._capacity = capacity
        self._done = False
        self._error: JobError | None = None
        self._stop = False
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._read, name="live-source", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for frame in self.source.frames():
                with self._cv:
                    while not self.source.realtime and len(self._frames) >= self._capacity and not self._stop:
                        self._cv.wait()
                    if self._stop:
                        return
                    if len(self._frames) >= self._capacity:  # real time: the oldest frame gives way
                        self._frames.popleft()
                        self.dropped += 1
                    self._frames.append(frame)
                    self._cv.notify_all()
        except JobError as e:
            self._error = e
        except Exception as e:  # noqa: BLE001 - whatever a decoder raises ends the run with one line
            self._error = JobError(f"{self.source.name}: {type(e).__name__}: {e}")
        finally:
            with self._cv:
                self._done = True
                self._cv.notify_all()

    def get(self) -> Frame | None:
        """The oldest waiting frame; None once the source has ended. JobError: the source failed, or gave
        no frame for the stall time."""
        with self._cv:
            if not self._cv.wait_for(lambda: self._frames or self._done, timeout=self._stall_s):
                raise JobError(f"{self.source.name}: stalled: no frame for {self._stall_s:g} s")
            if self._frames:
                frame = self._frames.popleft()
                self._cv.notify_all()
                return frame
            if self._error is not None:
                raise self._error
            return None

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=1.0)
        if not self._thread.is_alive():  # a reader stuck in a driver keeps its source; the process ends it
            self.source.close()
