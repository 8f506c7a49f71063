"""`pulsepipe infer`: one video to a heart rate, its outputs, and one-line errors for bad input."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import skimage.data

from pipelines.infer import infer_models
from pipelines.predictors import ModelSet
from ground_truth import true_hr
from transforms import synth
from transforms.errors import ItemFailed
from transforms.resample import resample_signal
from transforms.signal import postprocess_bvp


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    cohort = synth.write_cohort(out, subjects=1, seconds=8, seed=11)
    return out / cohort["recordings"][0]["video"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, timeout=300)


def write_frames(path: Path, frames, fps: float = 30.0) -> Path:
    synth.write_video(path, frames, fps, synth.parse_codec("h264-lossless"))
    return path


def test_every_model_recovers_the_true_rate_in_one_decode_pass(recording):
    truth = true_hr(recording.parent / "ppg.csv")
    results = infer_models(str(recording), ["me-chunk", "me-flow", "pos", "chrom", "green"])
    for name, result in results.items():
        assert len(result.bvp) == len(result.timestamps) == 240, name
        assert result.face_fraction == 1.0
        assert abs(result.hr_bpm - truth) < 5.0, (name, result.hr_bpm, truth)
    # chunk mode follows the true pulse waveform, not only its rate (within 5 frames of transit delay)
    ppg = np.loadtxt(recording.parent / "ppg.csv", delimiter=",", skiprows=1)
    t = results["me-chunk"].timestamps
    truth = postprocess_bvp(resample_signal(ppg[:, 0], ppg[:, 1], t), 30.0)[30:-30]
    chunk = postprocess_bvp(results["me-chunk"].bvp, 30.0)
    best = max(np.corrcoef(chunk[30 + k: len(chunk) - 30 + k], truth)[0, 1] for k in range(-5, 6))
    assert best > 0.8


def test_cli_prints_hr_and_writes_csv_and_png(recording, tmp_path):
    done = run_cli("infer", str(recording), "--model", "pos", "--out", str(tmp_path), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "HR " in done.stdout and "SQI " in done.stdout
    rows = list(csv.reader(open(tmp_path / "video.bvp.csv")))
    assert rows[0] == ["t_s", "bvp"] and len(rows) == 241
    assert np.allclose([float(r[0]) for r in rows[1:]], np.arange(240) / 30.0, atol=1e-5)
    assert (tmp_path / "video.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_image_folder_gives_the_same_rate_as_the_video(recording, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    with av.open(str(recording)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            frame.to_image().save(folder / f"frame{i}.png")
    from_video = infer_models(str(recording), ["pos"])["pos"].hr_bpm
    from_folder = infer_models(str(folder), ["pos"], image_fps=30.0)["pos"].hr_bpm
    assert abs(from_video - from_folder) < 0.5


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def astronaut_frames(n: int):
    face = skimage.data.astronaut()[:480, :, :]
    for _ in range(n):
        yield face


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda d: write_bytes(d / "empty.mp4", b""), "empty"),
        (lambda d: write_bytes(d / "noise.mp4", np.random.default_rng(0).bytes(50_000)), "not a readable"),
        (lambda d: d / "missing.mp4", "no such file"),
        (lambda d: write_frames(d / "blank.mp4", (np.full((240, 320, 3), 90, np.uint8) for _ in range(90))), "no face"),
        (lambda d: write_frames(d / "short.mp4", astronaut_frames(45)), "at least 2 s"),
        (lambda d: write_frames(d / "still.mp4", astronaut_frames(90)), "pos finds no pulse"),  # a photo: flat BVP
    ],
    ids=["zero-length", "corrupt", "missing", "no-face", "under-2s", "still-photo"],
)
def test_bad_input_is_one_line_naming_the_file_with_exit_code_2(tmp_path, make, reason):
    path = make(tmp_path)
    done = run_cli("infer", str(path), "--model", "pos", "--out", str(tmp_path), "--no-progress")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert str(path) in lines[0] and reason in lines[0], lines[0]


def test_truncated_video_is_reported(recording, tmp_path):
    data = recording.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    done = run_cli("infer", str(cut), "--model", "pos", "--out", str(tmp_path), "--no-progress")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert str(cut) in done.stderr.strip().splitlines()[0]


def test_unknown_weights_and_models_are_clear_errors():
    with pytest.raises((ValueError, FileNotFoundError), match="nope"):
        ModelSet(["me-chunk"], weights="nope")
    with pytest.raises(ValueError, match="unknown model"):
        ModelSet(["me-turbo"])


def test_no_face_raises_item_failed(tmp_path):
    path = write_frames(tmp_path / "blank.mp4", (np.zeros((120, 160, 3), np.uint8) for _ in range(90)))
    with pytest.raises(ItemFailed, match="no face"):
        infer_models(str(path), ["pos"])
