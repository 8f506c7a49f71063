"""Real-time pulse waveform and heart rate from a camera, a stream or a video file (ME-rPPG flow mode).

Each frame: decode, track the face (detect every k frames, box smoothed between), crop 36x36, one ME-flow
step with the state carried and dt from the frame's own timestamp. Every second: the heart rate and the
signal quality of the last 10 s. A page on http://127.0.0.1:8765/ shows the waveform, heart rate, quality,
the face box on a preview, per-stage latency and dropped frames (server-sent events); it is served with
--no-browser too, which prints a status line instead of opening a browser. Frames without a face are
marked "no face", never guessed. When processing falls behind a real-time source (camera, URL, a file
played at its own rate), frames are dropped and counted, never queued. --record writes one CSV row per
frame (t_s, bvp, hr_bpm, sqi, face), flushed every second. A source that cannot be opened, a camera that
disappears or a stream that stalls (a URL reconnects once) ends the run with one line and exit code 2.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
import time
import webbrowser
from contextlib import ExitStack
from typing import Iterator, NamedTuple

import cv2
import numpy as np

from pipelines.arguments import positive_number, whole_number
from pipelines.errors import JobError
from pipelines.live_flow import LiveEstimator
from pipelines.live_server import Board, PageServer
from pipelines.live_source import FrameFeed, open_source
from pipelines.predictors import check_models, parse_models, use_compile_cache

HR_EVERY_S = 1.0  # heart-rate update, seconds of the source's clock
REPORT_EVERY_S = 1.0  # status line, CSV flush and page status, wall seconds
PREVIEW_EVERY_S = 0.5  # preview frame for the page, wall seconds
PREVIEW_WIDTH = 320
CSV_HEADER = ("t_s", "bvp", "hr_bpm", "sqi", "face")


class LiveRow(NamedTuple):
    """One processed frame, as the CSV, the page and the benchmark see it."""
    t: float
    bvp: float  # NaN: no face
    hr_bpm: float  # the latest window's; NaN until one is usable
    sqi: float
    face: bool
    latency_s: tuple[float, float, float, float]  # decode, face, model, total (decode start to the page)
    dropped: int  # frames dropped so far


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", required=True,
                   help="a camera index (0), a video file, or a stream URL FFmpeg opens (rtsp://, http://)")
    p.add_argument("--model", default="me-flow:rlap",
                   help="me-flow:rlap, me-flow:pure, or a weights file or `pulsepipe train` run folder "
                        "(default: me-flow:rlap)")
    p.add_argument("--port", type=whole_number(0), default=8765, help="port of the page (default 8765; 0: any free one)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the page listens on (default 127.0.0.1, this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--record", metavar="OUT.csv", help="write t_s, bvp, hr_bpm, sqi, face per frame to this CSV")
    p.add_argument("--duration", type=positive_number("a duration in seconds"),
                   help="stop after this many seconds of the source (default: until it ends, or Ctrl-C)")
    p.add_argument("--no-browser", action="store_true",
                   help="do not open a browser; print a status line each second (the page is still served)")
    p.add_argument("--as-fast-as-possible", action="store_true",
                   help="read a video file unpaced, every frame, as fast as it is processed (for benchmarks); "
                        "by default a file plays at its own frame rate, as a camera would")
    p.add_argument("--detect-every", type=whole_number(1), default=5,
                   help="run face detection every k frames, smoothing the box between (default: 5)")


def me_flow_weights(spec: str) -> str:
    """The ME weights a --model value names (me-flow:W, or W alone); JobError for another model or a weights
    file that cannot be read, before anything starts."""
    name = spec if spec.startswith("me-") else f"me-flow:{spec}"
    try:
        ((kind, weights),) = parse_models([name]).values()
        if kind != "me-flow":
            raise ValueError(f"live runs ME-rPPG flow mode only; got {spec!r} (use me-flow:rlap, me-flow:pure or a path)")
        check_models([name])
    except ValueError as e:
        raise JobError(f"--model: {e}") from None
    return weights


def load_flow_model(weights: str):
    """The ME-rPPG model with flow_step compiled (one step on a blank frame), so the first frame is not late."""
    import model

    use_compile_cache()
    me = model.load("me-rppg", weights=weights)
    y, _ = model.flow_step(me.params, np.zeros(me.cfg.frame_shape, np.uint8), me.init_state(), 1 / 30, cfg=me.cfg)
    y.block_until_ready()
    return me


def live_rows(feed: FrameFeed, estimator: LiveEstimator, board: Board, duration: float | None = None,
              source_name: str = "") -> Iterator[LiveRow]:
    """The frame loop: each frame of `feed` through `estimator`, published on `board`, yielded as a LiveRow."""
    hr = sqi = math.nan
    next_hr_t = None
    next_preview = time.perf_counter()
    frames, started = 0, time.perf_counter()
    while (frame := feed.get()) is not None:
        if duration is not None and frame.t > duration:
            break
        r = estimator.step(frame.t, frame.image)
        latency = (frame.decode_s, r.face_s, r.model_s, time.perf_counter() - (frame.ready - frame.decode_s))
        board.push_sample(r.t, r.bvp, r.face, latency)  # the value is on the page's feed: the latency ends here
        frames += 1
        # everything below happens after the frame's value is out, once per second or half second
        next_hr_t = r.t + HR_EVERY_S if next_hr_t is None else next_hr_t
        if r.t >= next_hr_t:
            hr, sqi = estimator.heart_rate()
            next_hr_t += HR_EVERY_S * max(1, math.floor((r.t - next_hr_t) / HR_EVERY_S) + 1)
        now = time.perf_counter()
        if now >= next_preview:
            board.preview = preview_jpeg(frame.image)
            next_preview = now + PREVIEW_EVERY_S
        board.status = {"source": source_name, "t": r.t, "hr_bpm": None if math.isnan(hr) else round(hr, 2),
                        "sqi": None if math.isnan(sqi) else round(sqi, 3), "face": r.face,
                        "box": r.box, "frame_size": [frame.image.shape[1], frame.image.shape[0]],
                        "frames": frames, "dropped": feed.dropped, "fps": frames / max(now - started, 1e-9)}
        yield LiveRow(r.t, r.bvp, hr, sqi, r.face, latency, feed.dropped)


def preview_jpeg(image) -> bytes:
    """A small JPEG of the frame for the page."""
    rgb = np.asarray(image)
    h, w = rgb.shape[:2]
    small = cv2.resize(rgb, (PREVIEW_WIDTH, max(1, round(h * PREVIEW_WIDTH / w))), interpolation=cv2.INTER_AREA)
    return cv2.imencode(".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 75])[1].tobytes()


def _number(v: float, digits: int) -> str:
    return "" if math.isnan(v) else f"{v:.{digits}f}"


def _status_line(row: LiveRow) -> str:
    hr = "--" if math.isnan(row.hr_bpm) else f"{row.hr_bpm:5.1f}"
    sqi = "--" if math.isnan(row.sqi) else f"{row.sqi:.2f}"
    return (f"t {row.t:7.1f} s  HR {hr} BPM  SQI {sqi}  {'face   ' if row.face else 'NO FACE'}  "
            f"dropped {row.dropped}  latency {row.latency_s[3] * 1e3:5.1f} ms")


def main(args: argparse.Namespace) -> int:
    from transforms.face import FaceDetector

    weights = me_flow_weights(args.model)
    with ExitStack() as stack:
        source = open_source(args.source, paced=not args.as_fast_as_possible)
        stack.callback(source.close)
        record = None
        if args.record:
            try:
                record = stack.enter_context(open(args.record, "w", newline=""))
            except OSError as e:
                raise JobError(f"--record {args.record}: cannot write ({e.strerror})") from None
        board = Board()
        try:
            server = PageServer(board, args.host, args.port)
        except OSError as e:
            raise JobError(f"cannot serve the page on {args.host}:{args.port} ({e.strerror or e})") from None
        stack.callback(server.close)
        me = load_flow_model(weights)
        detector = stack.enter_context(FaceDetector())
        print(f"pulsepipe live: {source.name} -> {server.url}", file=sys.stderr, flush=True)
        if not args.no_browser:
            webbrowser.open(server.url)
        writer = csv.writer(record) if record else None
        if writer:
            writer.writerow(CSV_HEADER)
        feed = FrameFeed(source)
        stack.callback(feed.close)
        estimator = LiveEstimator(me, detector, detect_every=args.detect_every)
        tty = sys.stderr.isatty()
        next_report = time.perf_counter() + REPORT_EVERY_S
        row, frames, faces = None, 0, 0
        try:
            for row in live_rows(feed, estimator, board, args.duration, source.name):
                frames, faces = frames + 1, faces + row.face
                if writer:
                    writer.writerow((f"{row.t:.6f}", _number(row.bvp, 9), _number(row.hr_bpm, 2),
                                     _number(row.sqi, 3), int(row.face)))
                if time.perf_counter() >= next_report:
                    next_report = time.perf_counter() + REPORT_EVERY_S
                    if record:
                        record.flush()  # a crash loses at most the last second of rows
                    if args.no_browser:
                        print(_status_line(row), end="\r" if tty else "\n", file=sys.stderr, flush=True)
        except KeyboardInterrupt:  # the usual way to stop a camera
            pass
        if tty and args.no_browser:
            print(file=sys.stderr)
        last = "no heart rate yet" if row is None or math.isnan(row.hr_bpm) else f"last HR {row.hr_bpm:.1f} BPM"
        print(f"{source.name}: {frames} frames, face in {faces}, dropped {feed.dropped}, {last}"
              + (f"; wrote {args.record}" if args.record else ""))
    return 0
