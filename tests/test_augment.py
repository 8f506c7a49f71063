"""Time-scale augmentation: closed-form scaling, streaming, the factor choice, and `augment` on Beam and Ray."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines import augment as job
from pipelines.engines import EngineOptions
from pipelines.errors import JobError
from shard_helpers import read_recording
from transforms.augment import TimeScaler, choose_factors, hr_histogram
from transforms.manifest import read_manifest, write_manifest
from transforms.resample import FPS
from transforms.shards import SCHEMA, SegmentBuilder, ShardWriter, read_segments, shard_path
from transforms.signal import heart_rate


def sine_recording(seconds: float, hr_bpm: float, size: int = 4, seed: int = 0, no_face=()):
    """(timestamps, frames, face_found, boxes, bvp) on the 30 fps grid: frame brightness and bvp pulse at hr_bpm.

    Frames are noise around the pulse; frames in `no_face` are zeros with NaN boxes, as preprocess writes them.
    """
    n = int(round(seconds * FPS))
    t = np.arange(n) / FPS
    pulse = np.sin(2 * np.pi * hr_bpm / 60 * t)
    noise = np.random.default_rng(seed).integers(-8, 9, (n, size, size, 3))
    frames = np.clip(128 + 60 * pulse[:, None, None, None] + noise, 0, 255).astype(np.uint8)
    found = np.ones(n, bool)
    found[list(no_face)] = False
    frames[~found] = 0
    boxes = np.tile(np.array([10, 46, 20, 56], np.float32), (n, 1))
    boxes[~found] = np.nan
    return t, frames, found, boxes, pulse.astype(np.float32)


# ---- TimeScaler ---------------------------------------------------------------------------------------

def time_scale(timestamps, frames, face_found, boxes, bvp, factor: float):
    """The whole recording through a TimeScaler in one block: the one-pass output streaming must equal."""
    return TimeScaler(factor).push(timestamps, frames, face_found, boxes, bvp)


def test_factor_1_5_turns_60_bpm_into_90_with_floor_frame_count():
    t, frames, found, boxes, bvp = sine_recording(10, 60)  # 1 Hz
    out_t, out_frames, out_found, out_boxes, out_bvp, _ = time_scale(t, frames, found, boxes, bvp, 1.5)
    assert len(out_t) == (len(t) - 1) // 1.5 + 1 == 200
    np.testing.assert_allclose(out_t, np.arange(200) / FPS)
    assert out_frames.dtype == np.uint8 and out_frames.shape == (200, 4, 4, 3)
    assert heart_rate(out_bvp, FPS)[0] == pytest.approx(90, abs=1)
    assert heart_rate(out_frames.mean(axis=(1, 2, 3)), FPS)[0] == pytest.approx(90, abs=1)
    # output frame k shows source time k / 30 * 1.5: frame 2 is source frame 3, frame 1 the mean of 1 and 2
    np.testing.assert_array_equal(out_frames[2], frames[3])
    np.testing.assert_array_equal(out_frames[1], np.rint((frames[1] / 2 + frames[2] / 2)).astype(np.uint8))
    np.testing.assert_allclose(out_bvp, np.sin(2 * np.pi * 1.5 * out_t), atol=0.02)


@pytest.mark.parametrize("factor", [0.5, 0.73, 2.0])
def test_frame_count_is_floor_of_scaled_length(factor):
    t, frames, found, boxes, bvp = sine_recording(3, 72)
    assert len(time_scale(t, frames, found, boxes, bvp, factor)[0]) == int((len(t) - 1) // factor) + 1


def test_factor_1_is_the_identity_bit_exact():
    source = sine_recording(4, 75, no_face=range(30, 37))
    source = (source[0] + 0.25, *source[1:])  # a grid that does not start at 0 comes back as is too
    for got, want in zip(time_scale(*source, 1.0), source):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def test_a_blend_of_face_and_no_face_is_no_face():
    t, frames, found, boxes, bvp = sine_recording(2, 60, no_face=[10])
    _, out_frames, out_found, out_boxes, _, _ = time_scale(t, frames, found, boxes, bvp, 1.5)
    # output k shows source frame 1.5 k: k = 7 blends source 10 (no face) and 11 half and half
    assert list(np.flatnonzero(~out_found)) == [7]
    assert not out_frames[7].any() and np.isnan(out_boxes[7]).all()
    assert out_found[[6, 8]].all() and np.isfinite(out_boxes[[6, 8]]).all()
    np.testing.assert_array_equal(out_boxes[8], boxes[12])


@pytest.mark.parametrize("factor", [0.61, 1.37])
def test_streaming_over_uneven_blocks_equals_one_pass(factor):
    source = sine_recording(5, 80, no_face=range(40, 44))
    whole = time_scale(*source, factor)
    scaler, parts, start = TimeScaler(factor), [], 0
    for size in (1, 7, 50, 3, 64, 2, 1000):
        parts.append(scaler.push(*(a[start:start + size] for a in source)))
        start += size
    for i, want in enumerate(whole[:5]):
        np.testing.assert_array_equal(np.concatenate([p[i] for p in parts]), want)


def test_bvp_may_be_absent():
    t, frames, found, boxes, _ = sine_recording(1, 60)
    assert time_scale(t, frames, found, boxes, None, 1.2)[4] is None


# ---- choose_factors -----------------------------------------------------------------------------------

def clustered_cohort(n=30, seed=3) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    return {f"s{i:02d}/r": float(hr) for i, hr in enumerate(rng.uniform(60, 100, n))}


def test_choose_factors_is_deterministic_by_seed():
    hrs = clustered_cohort()
    picks = choose_factors(hrs, 30, (30, 180), seed=7)
    assert picks == choose_factors(dict(reversed(list(hrs.items()))), 30, (30, 180), seed=7)
    assert picks != choose_factors(hrs, 30, (30, 180), seed=8)


def test_choose_factors_respects_the_ranges_and_gives_unique_ids():
    hrs = clustered_cohort()
    picks = choose_factors(hrs, 60, (40, 160), seed=1, factor_range=(0.6, 1.8))
    assert len(picks) == 60
    assert len({job.augmented_id(r, f) for r, f in picks}) == 60
    for rec, factor in picks:
        assert 0.6 <= factor <= 1.8 and factor != 1.0 and factor == round(factor, 3)
        assert 40 - 1e-6 <= hrs[rec] * factor <= 160 + 1e-6


def test_the_augmented_heart_rate_histogram_spans_30_to_180_bpm():
    hrs = clustered_cohort()  # every source between 60 and 100 BPM
    picks = choose_factors(hrs, 30, (30, 180), seed=0)  # extra 1.0
    targets = [hrs[r] * f for r, f in picks]
    assert (hr_histogram(targets, (30, 180)) > 0).sum() == 11, "the 11 bins without a source come first"
    after = hr_histogram(list(hrs.values()) + targets, (30, 180))
    assert len(after) == 15 and (after > 0).all(), after
    assert len({r for r, _ in picks}) >= 20, "copies spread over the sources"


def test_choose_factors_fills_the_emptiest_bins_first():
    hrs = clustered_cohort()
    empty = hr_histogram(list(hrs.values()), (30, 180)) == 0
    picks = choose_factors(hrs, int(empty.sum()), (30, 180), seed=2)
    assert (hr_histogram([hrs[r] * f for r, f in picks], (30, 180)) == empty).all()


def test_choose_factors_with_nothing_to_pick():
    assert choose_factors({}, 5, (30, 180), 0) == []
    assert choose_factors({"a": 70.0}, 0, (30, 180), 0) == []


# ---- the job on Beam and Ray ----------------------------------------------------------------------------

SOURCES = {  # recording_id: (subject, HR, seconds, bvp?)
    "s1-a": ("s1", 60.0, 8, True),
    "s1-b": ("s1", 75.0, 8, True),
    "s2-a": ("s2", 90.0, 6, True),
    "s3-a": ("s3", 105.0, 6, True),
    "s3-nobvp": ("s3", 80.0, 4, False),
}


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory) -> Path:
    """Preprocess-like output written directly: 5 ok recordings (one without truth) and one failed row."""
    root = tmp_path_factory.mktemp("preprocessed")
    fs = fsspec.filesystem("file")
    rows = []
    for i, (rec_id, (subject, hr, seconds, has_bvp)) in enumerate(SOURCES.items()):
        t, frames, found, boxes, bvp = sine_recording(seconds, hr, size=6, seed=i, no_face=range(50, 53))
        meta = {"recording_id": rec_id, "subject_id": subject, "dataset": "synthetic",
                "source_uri": f"/videos/{rec_id}.mkv", "source_size": 1000 + i, "source_mtime": "2024-01-01",
                "config_hash": "c0ffee", "package_version": "test"}
        builder = SegmentBuilder(meta, segment_frames=100)
        shard = shard_path("synthetic", rec_id)
        with ShardWriter(str(root / shard), fs, row_group_bytes=20_000) as w:
            for start in range(0, len(t), 64):  # blocks as preprocess pushes them
                block = [a[start:start + 64] for a in (t, frames, found, boxes)]
                w.write_rows(builder.push(*block, bvp[start:start + 64] if has_bvp else None))
            w.write_rows(builder.finish())
        rows.append({"recording_id": rec_id, "subject_id": subject, "dataset": "synthetic",
                     "source_uri": meta["source_uri"], "status": "ok", "n_frames": len(t), "shard": shard,
                     "fingerprint": f"fp-{rec_id}", "config_hash": "c0ffee", "metadata_json": "{}"})
    rows.append({"recording_id": "broken", "subject_id": "s4", "dataset": "synthetic", "source_uri": "/videos/b.mkv",
                 "status": "failed", "reason": "corrupt", "fingerprint": "fp-b", "config_hash": "c0ffee",
                 "metadata_json": "{}"})
    write_manifest(rows, str(root / "manifest.parquet"), fs)
    return root


def run(src, out, engine="beam", seed=0, log=lambda *_: None):
    return job.run_augment(str(src), str(out), EngineOptions(engine, workers=2), (30, 180), extra=1.0, seed=seed,
                           segment_frames=100, log=log)


def shard_contents(out: Path) -> dict:
    fs = fsspec.filesystem("file")
    return {str(p.relative_to(out)): [tuple(v.tobytes() if isinstance(v, np.ndarray) else v for v in s)
                                      for s in read_segments(str(p), fs)]
            for p in sorted(out.glob("shards/**/*.parquet"))}


def without_timing(rows):
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]


@pytest.fixture(scope="module")
def beam_run(tmp_path_factory, preprocessed):
    out = tmp_path_factory.mktemp("augmented-beam")
    logs = []
    rows = run(preprocessed, out, "beam", log=logs.append)
    return out, rows, logs


def test_augmented_shards_scale_the_heart_rate(beam_run, preprocessed):
    out, rows, logs = beam_run
    fs = fsspec.filesystem("file")
    assert len(rows) == 5, "extra 1.0 of 5 ok sources"
    assert all(r["status"] == "ok" for r in rows), rows
    for r in rows:
        source_id, scale = r["recording_id"].split("@x")
        subject, hr, seconds, _ = SOURCES[source_id]
        factor = float(scale)
        assert source_id != "s3-nobvp" and 0.5 <= factor <= 2.0
        assert r["subject_id"] == subject, "subject-level splits keep augmented copies with their subject"
        assert pq.read_schema(str(out / r["shard"])).equals(SCHEMA, check_metadata=True)
        rec = read_recording(str(out / r["shard"]), fs)
        segs = list(read_segments(str(out / r["shard"]), fs))
        assert [s.augment_scale for s in segs] == pytest.approx([factor] * len(segs), rel=1e-7)  # float32
        assert {s.subject_id for s in segs} == {subject} and {s.config_hash for s in segs} == {r["config_hash"]}
        assert r["n_frames"] == rec.n_frames == int((seconds * FPS - 1) // factor) + 1
        assert r["n_segments"] == len(segs) == -(-rec.n_frames // 100)
        assert r["n_source_frames"] == seconds * FPS
        np.testing.assert_allclose(rec.timestamps, np.arange(rec.n_frames) / FPS)
        assert heart_rate(rec.bvp, FPS)[0] == pytest.approx(hr * factor, abs=2)
    assert "s3-nobvp: no ground-truth bvp" in "\n".join(logs)
    assert "HR (BPM)" in logs[-1] and len(logs[-1].splitlines()) == 16


def test_beam_and_ray_write_identical_output(beam_run, preprocessed, tmp_path):
    out, rows, _ = beam_run
    ray_rows = run(preprocessed, tmp_path, "ray")
    assert without_timing(ray_rows) == without_timing(rows)
    assert shard_contents(tmp_path) == shard_contents(out)
    fs = fsspec.filesystem("file")
    assert without_timing(read_manifest(str(tmp_path / "manifest.parquet"), fs)) == \
        without_timing(read_manifest(str(out / "manifest.parquet"), fs))


def test_rerun_keeps_unchanged_and_a_new_seed_replaces_stale_shards(beam_run, preprocessed, tmp_path):
    out, rows, _ = beam_run
    shutil.copytree(out, tmp_path / "out")
    logs = []
    again = run(preprocessed, tmp_path / "out", log=logs.append)
    assert "5 unchanged, 0 to make" in logs[0]
    written = read_manifest(str(out / "manifest.parquet"), fsspec.filesystem("file"))  # float32 columns read back
    assert sorted(again, key=lambda r: r["recording_id"]) == written
    other = run(preprocessed, tmp_path / "out", seed=1)
    assert {r["recording_id"] for r in other} != {r["recording_id"] for r in rows}
    shards = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").glob("shards/**/*.parquet"))
    assert shards == sorted(r["shard"] for r in other)


def test_arguments_and_help_say_output_holds_only_new_recordings():
    p = argparse.ArgumentParser()
    job.add_arguments(p)
    args = p.parse_args(["--input", "in", "--output", "out"])
    assert (tuple(args.hr_range), args.extra, args.seed, args.engine) == ((30.0, 180.0), 0.3, 0, "beam")
    assert "only the augmented recordings" in p.format_help()
    with pytest.raises(JobError, match="must differ"):
        job.run_augment("/tmp/x", "/tmp/x/", EngineOptions())


def test_a_source_whose_truth_is_flat_or_has_gaps(monkeypatch):
    from transforms.shards import Segment

    t = np.arange(600) / FPS
    with_gap = np.sin(2 * np.pi * 1.5 * t)
    with_gap[200:230] = np.nan  # the sensor dropped out for a second
    truths = {"flat": np.full(600, 0.7), "gap": with_gap}
    blank = Segment(**dict.fromkeys(Segment._fields))
    monkeypatch.setattr(job, "read_segments", lambda uri, fs, columns=None: iter(
        [blank._replace(recording_id=uri.rsplit("/", 1)[1], bvp=truths[uri.rsplit("/", 1)[1]])]))
    assert job.source_heart_rate({"shard": "flat", "recording_id": "flat"}, None, "/x") == (
        None, "ground truth is flat (nothing in 0.5-3 Hz)")
    hr, why = job.source_heart_rate({"shard": "gap", "recording_id": "gap"}, None, "/x")
    assert why is None and hr == pytest.approx(90, abs=1)
