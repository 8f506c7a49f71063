"""`pulsepipe preprocess` on Beam and on Ray: identical shards and manifests, dead letters, incremental re-runs."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.engines import EngineOptions
from pipelines.preprocess import load_config, run_preprocess
from transforms import synth
from transforms.manifest import read_manifest
from transforms.shards import read_segments

SIZE = (256, 192)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    synth.write_cohort(out, subjects=3, seconds=4, seed=5, size=SIZE)
    return out


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory, cohort) -> Path:
    """Two good videos beside a corrupt, a truncated, an empty and a face-less one."""
    root = tmp_path_factory.mktemp("messy")
    good = sorted(cohort.glob("*/*/video.*"))
    for i, video in enumerate(good[:2]):
        shutil.copy(video, root / f"good{i}{video.suffix}")
    data = good[2].read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (root / "corrupt.mp4").write_bytes(np.random.default_rng(1).bytes(40_000))
    (root / "empty.mp4").write_bytes(b"")
    synth.write_video(root / "noface.mp4", (np.full((SIZE[1], SIZE[0], 3), 80, np.uint8) for _ in range(90)),
                      30.0, synth.parse_codec("h264-lossless"))
    return root


def run(layout, src, out, engine="beam", config=None, log=lambda *_: None):
    return run_preprocess(layout, str(src), str(out), config or load_config(None), EngineOptions(engine, workers=2), log=log)


def shard_contents(out: Path) -> dict:
    """Every shard's rows as plain bytes and scalars, keyed by shard path: what both engines must agree on."""
    fs = fsspec.filesystem("file")
    contents = {}
    for path in sorted(out.glob("shards/**/*.parquet")):
        segs = list(read_segments(str(path), fs))
        contents[str(path.relative_to(out))] = [
            (s.recording_id, s.segment_index, s.start_frame, s.frames.tobytes(), s.face_found.tobytes(),
             None if s.bvp is None else s.bvp.tobytes(), s.timestamps.tobytes()) for s in segs]
    return contents


def without_timing(rows):
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]


@pytest.fixture(scope="module")
def beam_out(tmp_path_factory, cohort):
    out = tmp_path_factory.mktemp("beam")
    run("synthetic", cohort, out, "beam")
    return out


def test_beam_and_ray_write_identical_shards_and_manifests(tmp_path, cohort, beam_out):
    run("synthetic", cohort, tmp_path, "ray")
    assert shard_contents(beam_out) == shard_contents(tmp_path)
    fs = fsspec.filesystem("file")
    assert without_timing(read_manifest(str(beam_out / "manifest.parquet"), fs)) == \
        without_timing(read_manifest(str(tmp_path / "manifest.parquet"), fs))


@pytest.mark.parametrize("engine", ["beam", pytest.param("ray", marks=pytest.mark.slow)])  # Ray: see test_engines
def test_console_shows_every_recording_and_no_engine_noise(engine, tmp_path, cohort):
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "preprocess", "--layout", "synthetic", "--input",
                           str(cohort), "--output", str(tmp_path), "--engine", engine],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = (done.stdout + done.stderr).splitlines()
    progress = sorted(line for line in lines if "synthetic/" in line)
    assert progress == [f"  synthetic/s00{i}-r01: ok, 120 frames" for i in (1, 2, 3)], lines  # no prefix, none lost
    assert f"3 recordings in {cohort} (synthetic): 0 unchanged, 3 to process on {engine}" in lines
    noise = [line for line in lines if any(w in line for w in ("Traceback", "INFO", "core_worker", "\x1b["))]
    assert not noise, noise


def test_shards_hold_every_frame_with_ground_truth(beam_out, cohort):
    fs = fsspec.filesystem("file")
    rows = read_manifest(str(beam_out / "manifest.parquet"), fs)
    assert [r["status"] for r in rows] == ["ok"] * 3
    for r in rows:
        segs = list(read_segments(str(beam_out / r["shard"]), fs))
        assert sum(s.n_frames for s in segs) == r["n_frames"] == 120  # 4 s at 30 fps
        assert [s.segment_index for s in segs] == list(range(len(segs)))
        assert all(s.fps == 30 for s in segs) and segs[0].frames.shape[1:] == (36, 36, 3)
        bvp = np.concatenate([s.bvp for s in segs])
        assert np.isfinite(bvp).all()
        ppg = np.loadtxt(cohort / Path(r["source_uri"]).relative_to(cohort).parent / "ppg.csv", delimiter=",", skiprows=1)
        t = np.concatenate([s.timestamps for s in segs])
        np.testing.assert_allclose(bvp, np.interp(t, ppg[:, 0], ppg[:, 1]), atol=1e-5)


def test_row_groups_let_engines_split_work(beam_out):
    for path in beam_out.glob("shards/**/*.parquet"):
        assert pq.ParquetFile(path).metadata.num_row_groups >= 1


def test_bad_files_become_failed_rows_and_good_ones_are_kept(tmp_path, messy_folder):
    rows = {r["recording_id"]: r for r in run("folder", messy_folder, tmp_path, "beam")}
    assert len(rows) == 6, "N recordings in, N manifest rows out"
    assert rows["good0.mp4"]["status"] == rows["good1.mp4"]["status"] == "ok"
    reasons = {k: r["reason"] for k, r in rows.items() if r["status"] == "failed"}
    assert set(reasons) == {"truncated.mp4", "corrupt.mp4", "empty.mp4", "noface.mp4"}
    assert "no face" in reasons["noface.mp4"] and "empty" in reasons["empty.mp4"]
    assert all(str(messy_folder) in reason for reason in reasons.values()), reasons
    assert sorted(p.name for p in tmp_path.glob("shards/**/*.parquet")) == ["good0.mp4.parquet", "good1.mp4.parquet"]


def test_rerun_skips_unchanged_redoes_changed_and_retries_failed(tmp_path, cohort):
    src = tmp_path / "src"
    shutil.copytree(cohort, src)
    out = tmp_path / "out"
    first = {r["recording_id"]: r for r in run("synthetic", src, out)}
    logs = []
    second = run("synthetic", src, out, log=logs.append)
    assert "3 unchanged, 0 to process" in logs[0]
    assert without_timing(second) == without_timing(first.values())

    # break one recording, touch nothing else: only that one is redone, and it fails
    victim = sorted(src.glob("*/*/video.*"))[0]
    good_bytes = victim.read_bytes()
    victim.write_bytes(b"not a video")
    logs.clear()
    third = {r["recording_id"]: r for r in run("synthetic", src, out, log=logs.append)}
    assert "2 unchanged, 1 to process" in logs[0]
    broken = next(k for k, r in third.items() if r["status"] == "failed")
    assert not (out / first[broken]["shard"]).exists(), "a failed recording leaves no stale shard"

    # mend it: the failed row is retried and the shard is back
    victim.write_bytes(good_bytes)
    logs.clear()
    fourth = {r["recording_id"]: r for r in run("synthetic", src, out, log=logs.append)}
    assert "1 to process" in logs[0] and fourth[broken]["status"] == "ok"

    # a config change redoes everything
    logs.clear()
    run("synthetic", src, out, config={**load_config(None), "detect_every": 3}, log=logs.append)
    assert "0 unchanged, 3 to process" in logs[0]


@pytest.mark.parametrize("text, said", [
    (None, "cannot read the config"),
    ("detect_every: [unclosed", "cannot read the config"),
    ("- a list", "expected settings as YAML keys and values"),
    ("detect_evry: 3", "unknown settings detect_evry"),
])
def test_a_bad_config_is_one_line_naming_the_file(tmp_path, capsys, text, said):
    from pipelines import cli

    config = tmp_path / "config.yaml"
    if text is not None:
        config.write_text(text)
    argv = ["preprocess", "--layout", "synthetic", "--input", str(tmp_path), "--output", str(tmp_path / "out"),
            "--config", str(config)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"pulsepipe preprocess: error: {config}: {said}") and len(err.splitlines()) == 1, err


def test_an_input_without_recordings_is_one_line_saying_what_the_layout_wants(tmp_path, capsys):
    from pipelines import cli

    (tmp_path / "DATASET_2" / "subject1").mkdir(parents=True)  # the parent of the dataset's root
    for root, said in ((tmp_path, "no ubfc-rppg recordings found; the layout is ROOT/<subject>/ holding vid.avi"),
                       (tmp_path / "nowhere", "no such dataset folder")):
        argv = ["preprocess", "--layout", "ubfc-rppg", "--input", str(root), "--output", str(tmp_path / "out")]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"pulsepipe preprocess: error: {root}: {said}") and len(err.splitlines()) == 1, err
