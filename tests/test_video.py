"""Video decode: containers and codecs, real timestamps (25 fps, variable rate), rotation, image folders,
bounded blocks, and one-line VideoErrors for every way a source can be unreadable."""
from __future__ import annotations

import math
import wave
from fractions import Fraction

import av
import cv2
import numpy as np
import pytest

from transforms.resample import Resampler
from transforms.video import VideoError, YUVFrame, decode_threads, iter_blocks, iter_frames, probe

H, W = 48, 64


def make_frames(n: int, h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    """(n, h, w, 3) uint8: smooth moving gradients plus a marker, easy on lossy codecs, asymmetric."""
    y, x = np.mgrid[0:h, 0:w]
    frames = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        frames[i, ..., 0] = (x * 255 // w + 3 * i + seed) % 256
        frames[i, ..., 1] = y * 255 // h
        frames[i, ..., 2] = 40
    frames[:, : h // 4, : w // 4] = 255  # white top-left corner: shows which way is up
    return frames


def write_video(path, frames, *, codec="libx264", pix_fmt="yuv420p", rate=30, pts_ms=None, rotation=None,
                options=None, colorspace=None):
    """Encode frames (n, h, w, 3) RGB; pts_ms sets each frame's time by hand (variable frame rate);
    colorspace tags the stream (FFmpeg's AVColorSpace number, e.g. 1 for BT.709)."""
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        if colorspace is not None:
            stream.codec_context.colorspace = colorspace
        if pts_ms is not None:
            stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = int(pts_ms[i]), Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def read_all(path, **kw):
    blocks = list(iter_blocks(path, **kw))
    return np.concatenate([t for t, _ in blocks]), np.concatenate([f for _, f in blocks])


@pytest.mark.parametrize("name, codec, pix_fmt, max_error, time_atol", [
    ("h264.mp4", "libx264", "yuv420p", 8.0, 1e-9),
    ("h264.mov", "libx264", "yuv420p", 8.0, 1e-9),
    ("ffv1.mkv", "ffv1", "bgr0", 0.0, 5e-4),  # lossless RGB: exact; Matroska keeps times in 1 ms steps
    ("mjpeg.avi", "mjpeg", "yuvj420p", 8.0, 1e-9),
])
def test_containers_decode_rgb_frames_with_timestamps(tmp_path, name, codec, pix_fmt, max_error, time_atol):
    src = make_frames(20)
    path = write_video(tmp_path / name, src, codec=codec, pix_fmt=pix_fmt)
    t, frames = read_all(path)
    assert frames.shape == src.shape and frames.dtype == np.uint8
    np.testing.assert_allclose(t, np.arange(20) / 30, atol=time_atol)
    assert np.abs(frames.astype(int) - src).mean() <= max_error
    _, resampled = Resampler(30).push(t, frames)  # a 30 fps source passes the resampler unchanged
    np.testing.assert_array_equal(resampled, frames)
    info = probe(path)
    assert (info.width, info.height, info.rotation, info.frames) == (W, H, 0, 20)
    assert info.fps == pytest.approx(30) and info.duration_s == pytest.approx(20 / 30, abs=0.04)


def test_25fps_timestamps_and_resampled_count(tmp_path):
    path = write_video(tmp_path / "25.mp4", make_frames(50), rate=25)
    t, frames = read_all(path)
    np.testing.assert_allclose(t, np.arange(50) / 25, atol=1e-9)
    resampler = Resampler(30)
    grid, out = resampler.push(t, frames)
    duration = t[-1] - t[0]  # 1.96 s
    assert len(out) == math.floor(duration * 30) + 1 == 59
    np.testing.assert_allclose(grid, np.arange(59) / 30)
    assert len(resampler.flush()[1]) == 0


@pytest.mark.parametrize("name, codec, pix_fmt", [("vfr.mp4", "libx264", "yuv420p"), ("vfr.mkv", "ffv1", "bgr0")])
def test_variable_frame_rate_keeps_real_timestamps(tmp_path, name, codec, pix_fmt):
    pts_ms = np.concatenate([[0], np.cumsum(np.random.default_rng(1).integers(20, 60, 39))])  # 17-50 fps
    path = write_video(tmp_path / name, make_frames(40), codec=codec, pix_fmt=pix_fmt, pts_ms=pts_ms)
    t, _ = read_all(path, block=16)
    np.testing.assert_allclose(t, pts_ms / 1000, atol=1e-9)
    _, out = Resampler(30).push(t, _)
    assert len(out) == math.floor(t[-1] * 30) + 1


@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_rotation_metadata_gives_upright_frames(tmp_path, degrees):
    upright = make_frames(3)
    stored = np.rot90(upright, -degrees // 90, axes=(1, 2))  # what a turned camera records
    path = write_video(tmp_path / f"rot{degrees}.mkv", stored, codec="ffv1", pix_fmt="bgr0", rotation=degrees)
    _, frames = read_all(path)
    np.testing.assert_array_equal(frames, upright)
    info = probe(path)
    assert (info.rotation, info.width, info.height) == (degrees, W, H)


def test_rotation_in_mp4(tmp_path):
    upright = make_frames(3)
    path = write_video(tmp_path / "rot.mp4", np.rot90(upright, -1, axes=(1, 2)), rotation=90)
    _, frames = read_all(path)
    assert frames.shape == upright.shape and np.abs(frames.astype(int) - upright).mean() < 8


def test_lazy_frames_convert_regions_exactly_as_the_whole_and_close_to_ffmpeg(tmp_path):
    frames = make_frames(20, h=96, w=128)
    path = write_video(tmp_path / "h264.mp4", frames)
    t_eager, eager = read_all(path, block=8)
    blocks = list(iter_blocks(path, block=8, lazy=True))
    assert [len(f) for _, f in blocks] == [8, 8, 4]
    t_lazy = np.concatenate([t for t, _ in blocks])
    lazy = [f for _, fs in blocks for f in fs]
    np.testing.assert_array_equal(t_lazy, t_eager)
    assert all(isinstance(f, YUVFrame) and f.shape == (96, 128, 3) for f in lazy)
    for frame, ffmpeg in zip(lazy, eager):
        whole = np.asarray(frame)
        assert whole.dtype == np.uint8 and np.abs(whole.astype(int) - ffmpeg).mean() < 2  # BT.601 both ways
        for y0, y1, x0, x1 in [(13, 77, 31, 100), (14, 76, 30, 101), (95, 96, 127, 128)]:
            np.testing.assert_array_equal(frame[y0:y1, x0:x1], whole[y0:y1, x0:x1])  # odd edges included


def test_lazy_frames_of_rotated_rgb_or_bt709_video_are_plain_arrays(tmp_path):
    # YUVFrame converts as FFmpeg does only for untagged or BT.601 limited-range 4:2:0: the rest stay FFmpeg's
    upright = make_frames(3)
    rotated = write_video(tmp_path / "rot.mp4", np.rot90(upright, -1, axes=(1, 2)), rotation=90)
    rgb = write_video(tmp_path / "rgb.mkv", upright, codec="ffv1", pix_fmt="bgr0")
    bt709 = write_video(tmp_path / "bt709.mp4", upright, colorspace=1)
    for path in (rotated, rgb, bt709):
        (_, frames), = list(iter_blocks(path, lazy=True))
        assert all(isinstance(f, np.ndarray) for f in frames)
        np.testing.assert_array_equal(np.stack(frames), read_all(path)[1])


def test_single_threaded_decode_gives_the_same_frames(tmp_path):
    path = write_video(tmp_path / "h264.mp4", make_frames(40, h=96, w=128))
    t, frames = read_all(path)
    with decode_threads(1):
        t1, frames1 = read_all(path)
    np.testing.assert_array_equal(t1, t)
    np.testing.assert_array_equal(frames1, frames)
    with pytest.raises(ValueError), decode_threads(-1):
        pass


def test_blocks_are_bounded_and_start_skips(tmp_path):
    path = write_video(tmp_path / "long.mkv", make_frames(200), codec="ffv1", pix_fmt="bgr0")
    blocks = list(iter_blocks(path, block=64))
    assert [f.shape for _, f in blocks] == [(64, H, W, 3)] * 3 + [(8, H, W, 3)]
    assert all(len(t) == len(f) for t, f in blocks)
    t, frames = read_all(path, block=64, start=150)
    assert len(frames) == 50 and t[0] == pytest.approx(150 / 30)
    first_t, first = next(iter_frames(path, start=150))
    np.testing.assert_array_equal(first, frames[0])


def test_image_folder_natural_order_and_timestamps(tmp_path):
    src = make_frames(10)
    for i, img in enumerate(src, start=1):  # frame1.png ... frame10.png: natural order, not "1, 10, 2"
        cv2.imwrite(str(tmp_path / f"frame{i}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    (tmp_path / "notes.txt").write_text("not a frame")
    t, frames = read_all(tmp_path, block=4, fps=30)
    np.testing.assert_array_equal(frames, src)
    np.testing.assert_allclose(t, np.arange(10) / 30)
    own = 100.0 + np.cumsum(np.full(10, 0.04))  # PURE-style absolute per-frame times
    t, _ = read_all(tmp_path, timestamps=own)
    np.testing.assert_allclose(t, own - own[0])
    info = probe(tmp_path, fps=30)
    assert (info.frames, info.width, info.height, info.codec) == (10, W, H, "image/png")
    with pytest.raises(ValueError, match="fps"):
        next(iter_frames(tmp_path))
    with pytest.raises(VideoError, match="9 timestamps given for 10"):
        next(iter_frames(tmp_path, timestamps=own[:9]))
    with pytest.raises(VideoError, match="non-monotonic timestamps at frame 5"):
        next(iter_frames(tmp_path, timestamps=np.r_[own[:5], own[3:8]]))


def assert_video_error(path, reason):
    with pytest.raises(VideoError) as caught:
        for _ in iter_blocks(path):
            pass
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    assert reason in message, message
    return caught.value


def test_errors_name_the_path_and_the_reason(tmp_path):
    assert_video_error(tmp_path / "missing.mp4", "no such file")
    (tmp_path / "empty.mp4").write_bytes(b"")
    assert_video_error(tmp_path / "empty.mp4", "empty file")
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    assert_video_error(tmp_path / "noise.mp4", "not a readable video container")
    with wave.open(str(tmp_path / "audio.wav"), "wb") as audio:
        audio.setnchannels(1), audio.setsampwidth(2), audio.setframerate(8000)
        audio.writeframes(bytes(1600))
    assert_video_error(tmp_path / "audio.wav", "no video stream")
    (tmp_path / "folder").mkdir()
    assert_video_error(tmp_path / "folder", "no image frames")
    with pytest.raises(VideoError, match="empty file"):
        probe(tmp_path / "empty.mp4")


def test_truncated_files(tmp_path):
    noise = np.random.default_rng(0).integers(0, 40, (60, H, W, 3), np.uint8)
    frames = make_frames(60) // 2 + noise  # every frame costs bytes, so half a file holds some frames
    for name, options in [("index_last.mp4", None), ("index_first.mp4", {"movflags": "faststart"})]:
        whole = write_video(tmp_path / name, frames, options=options).read_bytes()
        (tmp_path / f"half_{name}").write_bytes(whole[: len(whole) // 2])
    # MP4 with its index at the end: the first half has no index, the container itself is unreadable.
    assert_video_error(tmp_path / "half_index_last.mp4", "not a readable video container")
    # Index first: frames decode until the data stops, short of the duration the header declares.
    error = assert_video_error(tmp_path / "half_index_first.mp4", "truncated stream: decoded")
    assert "of a declared 2.00 s" in error.reason
    whole = write_video(tmp_path / "whole.mkv", frames, codec="ffv1", pix_fmt="bgr0").read_bytes()
    (tmp_path / "half.mkv").write_bytes(whole[: len(whole) // 2])
    assert_video_error(tmp_path / "half.mkv", "truncated stream: decoded")
