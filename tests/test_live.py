"""`pulsepipe live`: heart rate that follows a changing truth, BVP equal to offline flow mode, no-face
gaps, one-line errors, a stalled URL reconnected once, an unplugged camera, loopback by default, frames
dropped (not queued) when behind, and the page in a real browser (slow)."""
from __future__ import annotations

import asyncio
import dataclasses
import http.server
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import model
from chromium_page import ChromiumPage, find_chromium
from pipelines import cli, live_source
from pipelines.errors import JobError
from pipelines.live import CSV_HEADER, live_rows, load_flow_model
from pipelines.live_flow import LiveEstimator
from pipelines.live_server import Board, PageServer
from pipelines.live_source import FrameFeed, Source, open_source
from transforms import synth
from transforms.face import FaceDetector, FaceTracker
from transforms.signal import heart_rate
from transforms.video import iter_frames

SIZE = (320, 240)
WINDOW_S = 10.0


def write_recording(path: Path, seconds: float, *, change_bpm: float = 0.0, blank: tuple[float, float] | None = None,
                    seed: int = 4):
    """A synthetic face video whose HR ramps by change_bpm; frames in `blank` (s) show no face. Returns its spec
    and ground truth."""
    difficulty = dataclasses.replace(synth.EASY, name="live", hr_change_bpm=(abs(change_bpm),) * 2, hr_shapes=("ramp",))
    (spec,) = synth.recording_specs(1, seconds, seed, size=SIZE, difficulty=difficulty)
    onsets = synth.beat_onsets(spec)
    frames = synth.render_frames(spec, synth.face_scene(), onsets)
    if blank is not None:
        grey = np.full((SIZE[1], SIZE[0], 3), 90, np.uint8)
        frames = (grey if blank[0] <= k / spec.fps < blank[1] else f for k, f in enumerate(frames))
    synth.write_video(path, frames, spec.fps, synth.parse_codec("h264-lossless"))
    return spec, synth.ground_truth(spec, onsets)


def run_live(video: Path, record: Path) -> np.ndarray:
    """`pulsepipe live --no-browser --record --as-fast-as-possible` in a subprocess; the CSV as (n, 5) floats."""
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "live", "--source", str(video), "--no-browser",
                           "--record", str(record), "--as-fast-as-possible", "--port", "0"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = record.read_text().splitlines()
    assert tuple(lines[0].split(",")) == CSV_HEADER
    return np.array([[float(v) if v else np.nan for v in line.split(",")] for line in lines[1:]])


def window_truth(truth, t_end: float) -> float:
    """The true HR of the window ending at t_end, by the recipe the live HR uses, on the contact PPG."""
    inside = (truth.t_s > t_end - WINDOW_S) & (truth.t_s <= t_end)
    return heart_rate(truth.ppg[inside], synth.PPG_RATE_HZ)[0]


@pytest.fixture(scope="module")
def ramp(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ramp")
    spec, truth = write_recording(folder / "ramp.mp4", 22, change_bpm=20)
    return folder / "ramp.mp4", spec, truth, run_live(folder / "ramp.mp4", folder / "ramp.csv")


def test_recorded_heart_rate_follows_a_changing_truth(ramp):
    _, spec, truth, rows = ramp
    t, hr, face = rows[:, 0], rows[:, 2], rows[:, 4]
    assert len(rows) == spec.n_frames and face.all()
    assert np.isnan(hr[t < WINDOW_S - 0.05]).all()  # no rate before one whole window
    updates = np.flatnonzero(np.diff(hr[t >= WINDOW_S], prepend=np.nan) != 0) + np.searchsorted(t, WINDOW_S)
    assert len(updates) >= 10  # once a second
    true = np.array([window_truth(truth, t[i]) for i in updates])
    assert np.ptp(true) > 5  # the truth does move over these windows
    assert np.abs(hr[updates] - true).max() < 3.0, np.c_[t[updates], hr[updates], true]


def test_per_frame_bvp_equals_offline_flow_mode_on_the_same_crops(ramp):
    video, _, _, rows = ramp
    with FaceDetector() as detector:
        tracker = FaceTracker(detector, every=5)
        crops = np.stack([tracker(frame, t)[0] for t, frame in iter_frames(video, lazy=True)])
    me = model.load("me-rppg", "rlap")
    bvp, _ = model.flow_frames(me.params, crops, me.init_state(), cfg=me.cfg)
    np.testing.assert_allclose(rows[:, 1], np.asarray(bvp), rtol=2e-6, atol=2e-6)


def test_a_face_that_vanishes_is_marked_and_the_rate_recovers(tmp_path):
    gap = (8.0, 11.0)
    spec, truth = write_recording(tmp_path / "gap.mp4", 24, blank=gap, seed=6)
    rows = run_live(tmp_path / "gap.mp4", tmp_path / "gap.csv")
    t, bvp, hr, face = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 4].astype(bool)
    # the tracker holds a lost face for up to 1 s and re-detects within 5 frames
    assert not face[(t >= gap[0] + 1.1) & (t < gap[1])].any()
    assert face[(t < gap[0]) | (t >= gap[1] + 0.2)].all()
    assert np.isnan(bvp[~face]).all() and np.isfinite(bvp[face]).all()  # marked, never guessed
    # no rate while more than a tenth of the window is gap (updated each second)
    assert np.isnan(hr[(t >= gap[0] + 3.5) & (t < gap[1] + 8.5)]).all()
    after = np.flatnonzero(np.isfinite(hr) & (t > gap[1]))
    assert len(after) and t[after[0]] < gap[1] + WINDOW_S + 1.5
    last = len(t) - 1
    assert abs(hr[last] - window_truth(truth, t[last])) < 3.0


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("source, says", [
    ("/nonexistent/clip.mp4", "/nonexistent/clip.mp4: no such file or directory"),
    ("97", "camera 97: cannot be opened"),
    ("http://127.0.0.1:{port}/stream.mp4", "http://127.0.0.1:{port}/stream.mp4: cannot be opened (Connection refused)"),
])
def test_unopenable_sources_end_with_one_line(source, says, capfd):
    port = _closed_port()
    source, says = source.format(port=port), says.format(port=port)
    assert cli.main(["live", "--source", source, "--no-browser", "--port", "0"]) == 2
    err = capfd.readouterr().err.strip()
    assert err == f"pulsepipe live: error: {says}" or (err.startswith(f"pulsepipe live: error: {says}")
                                                        and "\n" not in err), err


def test_a_stalled_source_ends_with_one_error():
    class Hangs(Source):
        name, realtime = "rtsp://camera.local/stream", True

        def frames(self):
            time.sleep(60)
            yield

    feed = FrameFeed(Hangs(), stall_s=0.3)
    started = time.monotonic()
    with pytest.raises(JobError, match="stalled: no frame for 0.3 s"):
        feed.get()
    assert time.monotonic() - started < 2


def test_a_camera_that_vanishes_mid_run_ends_with_one_line(ramp, monkeypatch, capfd):
    frames = iter_frames(str(ramp[0]))  # what the camera shows before it is unplugged: 40 frames of a face

    class Unplugged:
        def __init__(self, index):
            self.left = 40

        def isOpened(self):
            return True

        def grab(self):
            self.left -= 1
            return self.left >= 0

        def retrieve(self):
            return True, np.ascontiguousarray(next(frames)[1][..., ::-1])  # BGR, as OpenCV gives

        def release(self):
            pass

    monkeypatch.setattr(live_source.cv2, "VideoCapture", Unplugged)
    assert cli.main(["live", "--source", "0", "--no-browser", "--port", "0"]) == 2
    err = capfd.readouterr().err.strip()
    assert err.splitlines()[-1] == "pulsepipe live: error: camera 0: stopped delivering frames (disconnected?)", err


class StallingServer:
    """Serves one file over HTTP on 127.0.0.1; each of the first `stalls` requests sends half of it and then
    nothing (the connection stays open), the next ones all of it."""

    def __init__(self, body: bytes, stalls: int):
        self.requests, self.release = 0, threading.Event()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                owner.requests += 1
                self.send_response(200)
                self.send_header("Content-Type", "video/mp2t")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                stall = owner.requests <= stalls
                self.wfile.write(body[:len(body) // 2] if stall else body)
                self.wfile.flush()
                if stall:
                    owner.release.wait(30)

            def log_message(self, *_):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/stream.ts"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def stream_ts(tmp_path_factory):
    """An MPEG-TS of 90 small frames at 30 fps (TS streams without seeking, as a live source does)."""
    path = tmp_path_factory.mktemp("stream") / "stream.ts"
    frames = (np.full((48, 64, 3), 40 + k, np.uint8) for k in range(90))
    n = synth.write_video(path, frames, 30.0, synth.parse_codec("h264-crf18"))
    return path.read_bytes(), n


def test_a_url_that_stalls_reconnects_once_and_its_clock_goes_on(stream_ts, monkeypatch):
    body, n = stream_ts
    monkeypatch.setattr(live_source, "STALL_S", 1.0)  # FFmpeg's read timeout
    server = StallingServer(body, stalls=1)
    try:
        source = open_source(server.url)
        frames = list(source.frames())
        source.close()
    finally:
        server.close()
    assert server.requests == 2, "one reconnect"
    levels = np.array([f.image.mean() for f in frames])  # frame k of the file is 40 + k, give or take the codec
    (restart,) = np.flatnonzero(np.diff(levels) < -5)  # one place where the reopened file starts again
    k = int(restart) + 1
    assert 0 < k < n and abs(levels[k] - 41) < 2, "the first connection's frames, then the file again"
    assert len(frames) == k + n - 1  # its first frame falls on the last time before the stall: dropped
    assert np.allclose(np.diff([f.t for f in frames]), 1 / 30, atol=1e-3), "one clock across the reconnect"


def test_a_url_that_stalls_again_after_its_reconnect_ends_with_one_error(stream_ts, monkeypatch):
    monkeypatch.setattr(live_source, "STALL_S", 1.0)
    server = StallingServer(stream_ts[0], stalls=2)
    try:
        source = open_source(server.url)
        with pytest.raises(JobError, match=f"^{server.url}: stalled or broken after a reconnect"):
            for _ in source.frames():
                pass
        source.close()
    finally:
        server.close()
    assert server.requests == 2


def test_the_page_binds_loopback_by_default_and_serves_its_files():
    args = cli.build_parser().parse_args(["live", "--source", "0"])
    server = PageServer(Board(), args.host, 0)
    try:
        assert args.host == "127.0.0.1" and server.host == "127.0.0.1"
        page = urllib.request.urlopen(server.url, timeout=5).read().decode()
        assert "live.js" in page
        assert "EventSource" in urllib.request.urlopen(server.url + "live.js", timeout=5).read().decode()
    finally:
        server.close()


def test_a_slow_consumer_drops_and_counts_frames_and_steps_across_the_gap(ramp, monkeypatch):
    video = ramp[0]
    steps_dt = []
    real_step = model.flow_step

    def spy(params, frame, state, dt, cfg):
        steps_dt.append(dt)
        return real_step(params, frame, state, dt, cfg=cfg)

    me = load_flow_model("rlap")  # compiled first, as the command does, so the first frame is not late
    monkeypatch.setattr(model, "flow_step", spy)
    with FaceDetector() as detector:
        estimator = LiveEstimator(me, detector)
        slow_step = estimator.step

        def slow(t, frame):  # an injected slow stage: 100 ms a frame against 33 ms between frames
            time.sleep(0.1)
            return slow_step(t, frame)

        estimator.step = slow
        feed = FrameFeed(open_source(str(video), paced=True), capacity=2)
        try:
            rows = list(live_rows(feed, estimator, Board(), duration=3.0))
        finally:
            feed.close()
    t = np.array([r.t for r in rows])
    read = round(t[-1] * 30) + 1  # frames the source had delivered by the last row
    assert rows[-1].dropped > 0.5 * read
    assert abs(len(rows) + rows[-1].dropped - read) <= 3  # all accounted for (a few may wait in the mailbox)
    assert np.diff(t).max() > 2.5 / 30  # gaps in the timestamps, not a queue
    assert max(steps_dt[1:]) == pytest.approx(np.diff(t).max(), abs=1e-9)  # dt passed across the gap


def _free_port() -> int:
    return _closed_port()


@pytest.mark.slow
def test_the_page_in_headless_chromium_shows_an_updating_rate_and_a_waveform(ramp, tmp_path):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium)")
    port = _free_port()
    live = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "live", "--source", str(ramp[0]), "--no-browser",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    async def watch():
        async with ChromiumPage(chromium, f"http://127.0.0.1:{port}/", tmp_path / "profile") as page:
            seen, drawn = set(), 0
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and (len(seen) < 3 or not drawn):
                await asyncio.sleep(0.5)
                hr = await page.evaluate("document.getElementById('hr').textContent")
                drawn = int(await page.evaluate("document.getElementById('wave').dataset.drawn") or 0)
                if hr and hr != "--":
                    seen.add(hr)
            return seen, drawn

    try:
        deadline = time.monotonic() + 60
        while True:  # the server listens once the model is loaded
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except OSError:
                assert live.poll() is None and time.monotonic() < deadline, live.stderr.read() if live.poll() else ""
                time.sleep(0.3)
        seen, drawn = asyncio.run(watch())
    finally:
        live.terminate()
        live.wait(timeout=30)
    assert len(seen) >= 3, seen  # the rate shown changed at least twice
    assert all(40 <= float(v) <= 160 for v in seen)
    assert drawn > 100  # points of the waveform on the canvas
