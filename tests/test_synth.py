"""The synthetic cohort: deterministic, laid out as documented, and its videos carry the truth on skin only."""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import subprocess
import sys
import weakref
from pathlib import Path

import av
import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy.signal import butter, filtfilt, periodogram

from pipelines import synth as synth_cli
from transforms import synth
from transforms.signal import hr_windows, postprocess_bvp

SIZE = (320, 240)
SECONDS = 4.0
HARD_SECONDS = 8.0  # longer than the 5 s the HR range averages over, so a ramp or a step shows in it
REPO = Path(__file__).resolve().parents[1]


def decode(path) -> np.ndarray:
    """All frames of a video, (T, H, W, 3) uint8 RGB."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def read_ppg(path) -> np.ndarray:
    """ppg.csv as (n, 2): t_s, ppg."""
    return np.loadtxt(path, delimiter=",", skiprows=1)


def bandpass(x: np.ndarray, fps: float) -> np.ndarray:
    b, a = butter(3, [0.6, 4.0], "band", fs=fps)  # 36-240 BPM
    return filtfilt(b, a, x)


def periodogram_hr(x: np.ndarray, rate: float) -> float:
    """Heart rate (BPM) at the periodogram's peak in 36-180 BPM."""
    f, power = periodogram(x - x.mean(), fs=rate, nfft=1 << 16)
    band = (f >= 0.6) & (f <= 3.0)
    return float(60.0 * f[band][np.argmax(power[band])])


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    synth.write_cohort(out, subjects=2, seconds=SECONDS, seed=3, size=SIZE)
    return out


@pytest.fixture(scope="module")
def cohort_again(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort_again")
    synth.write_cohort(out, subjects=2, seconds=SECONDS, seed=3, size=SIZE)
    return out


def hard_cohort(out):
    synth.write_cohort(out, subjects=2, seconds=HARD_SECONDS, seed=3, size=SIZE, difficulty="hard")
    return out


@pytest.fixture(scope="module")
def hard(tmp_path_factory):
    return hard_cohort(tmp_path_factory.mktemp("hard"))


def assert_same_cohort(a, b):
    """Same cohort.json, and per recording the same ppg.csv and meta.json bytes and the same decoded frames."""
    assert (a / "cohort.json").read_bytes() == (b / "cohort.json").read_bytes()
    for rec in json.loads((a / "cohort.json").read_text())["recordings"]:
        folder = f"{rec['subject_id']}/{rec['recording_id']}"
        assert (a / folder / "ppg.csv").read_bytes() == (b / folder / "ppg.csv").read_bytes()
        assert (a / folder / "meta.json").read_bytes() == (b / folder / "meta.json").read_bytes()
        np.testing.assert_array_equal(decode(a / rec["video"]), decode(b / rec["video"]))


# ---------------------------------------------------------------------------------------- determinism


def test_same_seed_gives_same_bytes_and_frames(cohort, cohort_again):
    assert_same_cohort(cohort, cohort_again)


def test_hard_is_deterministic_per_seed(hard, tmp_path):
    assert_same_cohort(hard, hard_cohort(tmp_path))


def test_easy_draws_what_the_cohort_always_drew(tmp_path):
    """Values and truth bytes of the cohort as written before difficulties existed (seed 3, 2 x 2 x 4 s)."""
    a, b = synth.recording_specs(2, 4, seed=3, recordings_per_subject=2)[:2]
    assert (a.subject.hr_bpm, a.subject.skin_tone) == (105.139, 0.2368)
    assert (a.target_hr_bpm, a.pulse_amplitude, a.motion_shift_px, a.motion_scale, a.light_drift,
            a.noise_sigma_dn) == (105.139, 0.00875, 2.437, 0.0132, 0.032, 1.114)
    assert (b.target_hr_bpm, b.pulse_amplitude, b.motion_shift_px, b.noise_sigma_dn) == (108.729, 0.01107, 1.623, 1.519)
    assert (b.hr_shape, b.hr_change_bpm, b.motion_rotation_deg, b.shake_px, b.flicker) == ("steady", 0.0, 0.0, 0.0, 0.0)
    np.testing.assert_allclose(synth.beat_onsets(b)[:3], [-1.04669925, -0.52197383, 0.03019976], atol=1e-8)
    synth.write_ppg_csv(tmp_path / "ppg.csv", synth.ground_truth(b))
    digest = hashlib.sha256((tmp_path / "ppg.csv").read_bytes()).hexdigest()
    assert digest == "a5bdcbf58babe54f8284d2246d83c96f99b2c334e4e3258fffb07d5fc19ae786"
    assert synth.EASY == synth.difficulty_named("easy") and synth.EASY.codec is None  # lossless by layout


def test_different_seed_gives_different_cohort(cohort, tmp_path):
    synth.write_cohort(tmp_path, subjects=1, seconds=SECONDS, seed=4, size=SIZE)
    folder = "s001/s001-r01"
    assert (cohort / folder / "ppg.csv").read_bytes() != (tmp_path / folder / "ppg.csv").read_bytes()
    assert not np.array_equal(decode(cohort / folder / "video.mp4"), decode(tmp_path / folder / "video.mp4"))


def test_specs_depend_only_on_seed_and_indices():
    a = synth.recording_specs(3, 10, seed=11, recordings_per_subject=2)
    b = synth.recording_specs(3, 10, seed=11, recordings_per_subject=2)
    assert a == b
    assert len({s.recording_id for s in a}) == 6
    assert a[0].target_hr_bpm == a[0].subject.hr_bpm  # first session at the resting rate
    assert abs(a[1].target_hr_bpm - a[1].subject.hr_bpm) <= 8.0


# ---------------------------------------------------------------------------------------------- layouts


def test_synthetic_layout_files_parse(cohort):
    index = json.loads((cohort / "cohort.json").read_text())
    assert index["seed"] == 3 and index["layout"] == "synthetic"
    assert index["parameters"]["codec"] == "h264-lossless" and index["package_version"]
    assert [r["recording_id"] for r in index["recordings"]] == ["s001-r01", "s002-r01"]
    for rec in index["recordings"]:
        folder = cohort / rec["subject_id"] / rec["recording_id"]
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["recording_id"] == rec["recording_id"] and meta["subject_id"] == rec["subject_id"]
        assert meta["true_mean_hr_bpm"] == rec["true_mean_hr_bpm"]
        assert meta["fps"] == 30.0 and meta["seed"] == 3
        for key in ("skin_tone", "skin_gain_rgb"):
            assert key in meta["subject"]
        for key in ("motion_shift_px", "motion_scale", "light_drift", "noise_sigma_dn", "pulse_amplitude"):
            assert key in meta["recording"]

        with open(folder / "ppg.csv") as f:
            assert f.readline().strip() == "t_s,ppg"
        t, ppg = read_ppg(folder / "ppg.csv").T
        assert np.all(np.diff(t) > 0)
        np.testing.assert_allclose(np.diff(t), 1 / synth.PPG_RATE_HZ, atol=1e-6)  # its own rate
        assert t[0] == 0.0 and t[-1] >= SECONDS - 1 / synth.PPG_RATE_HZ - 1e-6
        assert np.ptp(ppg) > 0.5

        assert meta["video"] == rec["video"] == f"{rec['subject_id']}/{rec['recording_id']}/video.mp4"
        frames = decode(folder / "video.mp4")
        assert frames.shape == (meta["n_frames"], SIZE[1], SIZE[0], 3) == (120, 240, 320, 3)


def as_json(difficulty: synth.Difficulty) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(difficulty)))  # tuples as JSON lists


def test_metadata_records_the_difficulty(cohort, hard):
    for folder, difficulty in ((cohort, synth.EASY), (hard, synth.HARD)):
        index = json.loads((folder / "cohort.json").read_text())
        assert index["difficulty"] == as_json(difficulty)
        for rec in index["recordings"]:
            meta = json.loads((folder / rec["subject_id"] / rec["recording_id"] / "meta.json").read_text())
            assert meta["difficulty"] == as_json(difficulty) and "difficulty" not in meta["recording"]
            assert meta["true_hr_range_bpm"] == rec["true_hr_range_bpm"]
            lo, hi = rec["true_hr_range_bpm"]
            assert lo - 0.5 <= rec["true_mean_hr_bpm"] <= hi + 0.5
    index = json.loads((hard / "cohort.json").read_text())
    assert index["parameters"]["codec"] == synth.HARD.codec == "h264-crf17"  # the difficulty's codec
    for rec in index["recordings"]:
        recording = json.loads((hard / rec["subject_id"] / rec["recording_id"] / "meta.json").read_text())["recording"]
        assert recording["hr_shape"] in synth.HR_SHAPES and abs(recording["hr_change_bpm"]) >= 5.0
        assert recording["motion_rotation_deg"] > 0 and recording["shake_px"] > 0 and recording["flicker"] > 0
        lo, hi = rec["true_hr_range_bpm"]
        assert hi - lo > 1.0  # the truth moves, and the metadata says so


def test_difficulty_knobs_are_checked(tmp_path):
    for bad, match in (({"motion_shift_px": (3.0, 1.0)}, "motion_shift_px"), ({"flicker": (-0.1, 0.1)}, "flicker"),
                       ({"skin_tone": (0.5, 1.5)}, "skin_tone"), ({"hr_shapes": ("zigzag",)}, "hr_shapes"),
                       ({"codec": "h265"}, "unknown codec")):
        with pytest.raises(ValueError, match=match):
            synth.Difficulty("bad", **bad)
    with pytest.raises(dataclasses.FrozenInstanceError):
        synth.HARD.codec = None
    with pytest.raises(ValueError, match="unknown difficulty"):
        synth.write_cohort(tmp_path, 1, 1, 0, difficulty="insane")


def test_ubfc_layout(tmp_path):
    cohort = synth.write_cohort(tmp_path, subjects=2, seconds=3, seed=5, layout="ubfc-rppg", size=SIZE)
    assert sorted(p.name for p in tmp_path.glob("subject*")) == ["subject1", "subject2"]
    for n, rec in enumerate(cohort["recordings"], start=1):
        lines = (tmp_path / f"subject{n}" / "ground_truth.txt").read_text().strip().split("\n")
        assert len(lines) == 3
        ppg, hr, t = (np.array([float(v) for v in line.split()]) for line in lines)
        assert len(ppg) == len(hr) == len(t) == 3 * synth.PPG_RATE_HZ
        assert np.all(np.diff(t) > 0) and t[0] == 0.0
        assert np.all((hr > 30) & (hr < 200))
        assert abs(hr.mean() - rec["true_mean_hr_bpm"]) < 1.0  # the HR line averages to the truth
        with av.open(str(tmp_path / f"subject{n}" / "vid.avi")) as container:
            assert container.streams.video[0].codec_context.name == "ffv1"
            assert sum(1 for _ in container.decode(video=0)) == 90
    with pytest.raises(ValueError, match="one recording per subject"):
        synth.write_cohort(tmp_path / "x", subjects=1, seconds=1, seed=0, layout="ubfc-rppg", recordings_per_subject=2)


# ---------------------------------------------------------------------------------------------- truth


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_heart_rates_span_the_range(seed):
    hrs = [synth.ground_truth(s).mean_hr_bpm for s in synth.recording_specs(8, 20, seed)]
    assert min(hrs) <= 55 and max(hrs) >= 145
    assert all(38 <= hr <= 162 for hr in hrs)


def test_true_hr_matches_the_ppg_periodogram():
    for spec in synth.recording_specs(8, 20, seed=9):
        truth = synth.ground_truth(spec)
        assert abs(periodogram_hr(truth.ppg, synth.PPG_RATE_HZ) - truth.mean_hr_bpm) <= 2.0, spec.recording_id


def changing(shape: str) -> synth.Difficulty:
    """EASY with the HR moving 30 BPM from start to end in every recording, as a `shape`."""
    return dataclasses.replace(synth.EASY, name=f"easy-{shape}", hr_change_bpm=(30.0, 30.0), hr_shapes=(shape,))


@pytest.mark.parametrize("shape", synth.HR_SHAPES)
def test_hr_shapes_keep_the_mean_and_the_range(shape):
    for spec in synth.recording_specs(6, 30, seed=1, difficulty=changing(shape)):
        hr = spec.hr_at(np.arange(30000) / 1000)  # 1 ms steps over [0, 30 s)
        assert abs(hr.mean() - spec.target_hr_bpm) < 0.05
        assert hr[-1] - hr[0] == pytest.approx(spec.hr_change_bpm, abs=0.01)
        assert synth.HR_RANGE_BPM[0] <= hr.min() and hr.max() <= synth.HR_RANGE_BPM[1]  # clipped near the ends
        assert spec.hr_at(-5.0) == hr[0] and spec.hr_at(40.0) == pytest.approx(hr[-1], abs=0.01)


@pytest.mark.parametrize("shape", synth.HR_SHAPES)
def test_changing_hr_is_in_the_truth(shape):
    """The truth PPG's HR on sliding 10 s windows follows the ramp or the steps the beats were drawn around."""
    full = [s for s in synth.recording_specs(4, 60, seed=5, difficulty=changing(shape)) if abs(s.hr_change_bpm) == 30]
    assert len(full) >= 2  # HRs near the ends of the range get a smaller change
    for spec in full:
        truth = synth.ground_truth(spec)
        centres, bpm = hr_windows(postprocess_bvp(truth.ppg, synth.PPG_RATE_HZ), synth.PPG_RATE_HZ, 10, 2)
        if shape == "steps":  # a window across a step holds two rates: score the ones inside a step
            third = spec.seconds / 3
            inside = np.floor((centres - 5) / third) == np.floor((centres + 5) / third)
            centres, bpm = centres[inside], bpm[inside]
        expected = spec.hr_at(centres)  # a ramp's mean over a window is its value at the centre
        errors = np.abs(bpm - expected)
        assert np.median(errors) < 1.5 and errors.max() < 6.0, (spec.recording_id, errors)
        assert np.corrcoef(bpm, expected)[0, 1] > 0.9
        assert abs(truth.mean_hr_bpm - spec.target_hr_bpm) < 0.05  # the mean is kept while the HR moves
        lo, hi = truth.hr_range_bpm
        assert 0.7 * 30 < hi - lo < 1.3 * 30


def test_skin_carries_the_pulse_and_the_background_does_not(cohort):
    scene = synth.face_scene()
    to_output = synth.crop_to_output(SIZE)[:2]
    # Skin well inside the face, so head motion of a few pixels keeps it on skin.
    skin = cv2.warpAffine(scene.skin, to_output, SIZE) > 0.99
    skin = cv2.erode(skin.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    assert skin.sum() > 1000
    for rec in json.loads((cohort / "cohort.json").read_text())["recordings"]:
        folder = cohort / rec["subject_id"] / rec["recording_id"]
        meta = json.loads((folder / "meta.json").read_text())
        frames = decode(cohort / meta["video"]).astype(np.float32)
        fps = meta["fps"]
        t = np.arange(len(frames)) / fps
        t_ppg, ppg = read_ppg(folder / "ppg.csv").T
        truth = bandpass(np.interp(t - meta["recording"]["pulse_delay_s"], t_ppg, ppg), fps)
        green_skin = bandpass(frames[:, skin, 1].mean(axis=1), fps)
        green_backdrop = bandpass(frames[:, 10:40, 250:290, 1].reshape(len(frames), -1).mean(axis=1), fps)

        # Skin darkens as the PPG rises (blood absorbs light), so the green trace follows -PPG.
        assert np.corrcoef(-green_skin, truth)[0, 1] > 0.9
        gain_skin = np.dot(green_skin, truth) / np.dot(truth, truth)  # DN per PPG unit
        gain_backdrop = np.dot(green_backdrop, truth) / np.dot(truth, truth)
        assert abs(gain_backdrop) < 0.1 * abs(gain_skin)
        assert abs(np.corrcoef(green_backdrop, truth)[0, 1]) < 0.5


# ---------------------------------------------------------------------------------------------- video


def test_frames_are_rendered_and_written_one_at_a_time(tmp_path):
    spec = synth.recording_specs(1, 1.0, seed=0, size=(128, 96))[0]
    frames = synth.render_frames(spec, synth.face_scene())
    assert inspect.isgenerator(frames)  # lazy: nothing rendered before the writer asks

    alive_at_each_pull = []
    refs = []

    def watched():
        for frame in frames:  # frames hold no reference cycles: refcounting frees them at once
            alive_at_each_pull.append(sum(ref() is not None for ref in refs))
            refs.append(weakref.ref(frame))
            yield frame

    n = synth.write_video(tmp_path / "v.mp4", watched(), spec.fps, synth.parse_codec("h264-lossless"))
    assert n == spec.n_frames == 30
    # The writer keeps at most the frame it is encoding: earlier frames are freed, not collected.
    assert max(alive_at_each_pull) <= 1


@pytest.mark.parametrize("codec", ["h264-lossless", "ffv1"])
def test_lossless_codecs_round_trip_exactly(tmp_path, codec):
    spec = synth.recording_specs(1, 0.2, seed=1, size=(96, 64))[0]
    frames = list(synth.render_frames(spec, synth.face_scene()))
    path = tmp_path / f"v.{synth.parse_codec(codec).extension}"
    synth.write_video(path, iter(frames), spec.fps, synth.parse_codec(codec))
    np.testing.assert_array_equal(decode(path), np.stack(frames))


def test_codec_names():
    assert synth.parse_codec("h264-crf18").av_codec == "libx264"
    assert not synth.parse_codec("h264-crf18").lossless
    for bad in ("h265", "h264-crf99", "h264-crf"):
        with pytest.raises(ValueError):
            synth.parse_codec(bad)


def test_other_frame_rates(tmp_path):
    cohort = synth.write_cohort(tmp_path, subjects=1, seconds=2, seed=0, fps=25, size=(160, 120))
    rec = cohort["recordings"][0]
    with av.open(str(tmp_path / rec["video"])) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == 25
        times = np.array([frame.time for frame in container.decode(stream)])
    assert len(times) == rec["n_frames"] == 50
    np.testing.assert_allclose(times, np.arange(50) / 25, atol=1e-6)  # frame k at k / fps, as the truth assumes


# ------------------------------------------------------------------------------------------ command


def test_command_line(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = synth_cli.run([str(out), "--subjects", "2", "--seconds", "1", "--seed", "2", "--size", "160x120"])
    assert rc == 0
    captured = capsys.readouterr()
    assert captured.err.count("BPM") == 2 and "[2/2] s002-r01" in captured.err
    assert "wrote 2 recordings of 2 subjects" in captured.out
    assert json.loads((out / "cohort.json").read_text())["parameters"]["width"] == 160
    assert "(synthetic, easy, h264-lossless" in captured.out


def test_command_line_hard(tmp_path, capsys):
    out = tmp_path / "cli"
    assert synth_cli.run([str(out), "--subjects", "1", "--seconds", "6", "--size", "160x120", "--difficulty", "hard"]) == 0
    captured = capsys.readouterr()
    assert "(synthetic, hard, h264-crf17" in captured.out
    assert any(f"({shape} " in captured.err for shape in synth.HR_SHAPES)  # the HR's range on the progress line
    assert json.loads((out / "cohort.json").read_text())["difficulty"]["name"] == "hard"
    assert synth_cli.run([str(tmp_path / "ffv1"), "--subjects", "1", "--seconds", "1", "--size", "160x120",
                          "--difficulty", "hard", "--codec", "ffv1"]) == 0  # --codec wins over the difficulty's
    assert json.loads((tmp_path / "ffv1" / "cohort.json").read_text())["parameters"]["codec"] == "ffv1"


# ------------------------------------------------------------------------------------------ difficulty


@pytest.mark.slow
def test_hard_separates_the_baselines_from_me_rppg(tmp_path):
    """The claim the hard preset is tuned for (README), end to end on 4 subjects x 20 s: ME-rPPG's cohort MAE in
    single digits, GREEN's, CHROM's and POS's each at least twice it and 3 BPM above. About a minute on 2 cores."""
    synth.write_cohort(tmp_path / "cohort", subjects=4, seconds=20, seed=0, difficulty="hard")

    def pulsepipe(*args: str) -> None:
        subprocess.run([sys.executable, "-m", "pipelines.cli", *args, "--workers", "1"], cwd=REPO, check=True,
                       capture_output=True, timeout=600)

    pulsepipe("preprocess", "--layout", "synthetic", "--input", str(tmp_path / "cohort"), "--output",
              str(tmp_path / "shards"))
    models = ("me-chunk:rlap", "green", "chrom", "pos")
    pulsepipe("evaluate", "--input", str(tmp_path / "shards"), "--output", str(tmp_path / "eval"),
              *(a for m in models for a in ("--model", m)), "--bootstrap", "50")
    rows = pq.read_table(tmp_path / "eval" / "metrics.parquet").to_pylist()
    mae = {r["model"]: r["mae"] for r in rows if r["level"] == "cohort" and r["window_s"] is None}
    assert set(mae) == set(models)
    assert mae["me-chunk:rlap"] < 10.0, mae
    for baseline in models[1:]:
        assert mae[baseline] >= max(2 * mae["me-chunk:rlap"], mae["me-chunk:rlap"] + 3.0), mae


def test_command_line_help_and_errors(capsys):
    with pytest.raises(SystemExit) as exit_help:
        synth_cli.run(["--help"])
    assert exit_help.value.code == 0 and "--subjects" in capsys.readouterr().out
    for bad in (["o", "--codec", "h265"], ["o", "--size", "320"], ["o", "--subjects", "0"], ["o", "--difficulty", "x"]):
        with pytest.raises(SystemExit) as exit_bad:
            synth_cli.run(bad)
        assert exit_bad.value.code == 2
