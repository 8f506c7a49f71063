"""PhysMamba in the jobs: crops at each model's size through preprocess, shards and augment; PhysMamba's
predictor over lockstep blocks as the published `process_video` runs it; evaluate and infer with it."""
from __future__ import annotations

import types
from pathlib import Path

import cv2
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import evaluate as job
from pipelines.engines import EngineOptions
from pipelines.errors import JobError
from pipelines.predictors import PhysMambaPredictor, check_models, feed, model_crop_sizes
from pipelines.preprocess import hashed_config, load_config, run_preprocess
from transforms import synth
from transforms.augment import TimeScaler
from transforms.face import FaceDetector
from transforms.face_crops import face_crops
from transforms.manifest import config_hash
from transforms.shards import (SCHEMA, SegmentBuilder, ShardWriter, read_segments, shard_crop_sizes,
                               write_recording)
from transforms.video import iter_blocks

META = {"recording_id": "r1", "subject_id": "s1", "dataset": "synthetic", "source_uri": "v.mp4", "source_size": 1,
        "source_mtime": "0", "config_hash": "c", "package_version": "0"}
# sha256 of the defaults of configs/preprocess.yaml as they were before crop_sizes existed, with layout
# "synthetic": shards made then must stay up to date (a changed default redoes every recording, on purpose).
DEFAULT_SYNTHETIC_HASH = "18a9a2e1520d76c636965d5657a5e0eece5c7c5236eaf344672f13167bb67434"


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    cohort = synth.write_cohort(out, subjects=1, seconds=2, seed=3, size=(256, 192))
    return out / cohort["recordings"][0]["video"]


def _recording(n: int, sizes=(36, 128), seed: int = 0):
    """Arrays of a 30 fps recording: t, crops at each size ({size: (n, s, s, 3)}), found, boxes, bvp."""
    rng = np.random.default_rng(seed)
    found = np.ones(n, bool)
    found[n // 2:n // 2 + 5] = False
    crops = {s: rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8) * found[:, None, None, None].astype(np.uint8)
             for s in sizes}
    boxes = np.where(found[:, None], rng.uniform(0, 100, (n, 4)), np.nan)
    return np.arange(n) / 30.0, crops, found, boxes, np.sin(np.arange(n) / 5.0)


# ---- crops at each size ------------------------------------------------------------------------------

def test_each_size_is_cut_from_the_frame_by_the_same_box(video):
    """36 and 128 crops from one tracking pass: each is cv2.resize(INTER_AREA) of the source frame's box."""
    frames = np.concatenate([f for _, f in iter_blocks(str(video), 64)])
    with FaceDetector() as detector:
        blocks = list(face_crops(iter_blocks(str(video), 64), detector, sizes=(36, 128)))
        alone = list(face_crops(iter_blocks(str(video), 64), detector))  # the default: 36 only
    crops36, crops128 = (np.concatenate([b.sized[s] for b in blocks]) for s in (36, 128))
    boxes, found = np.concatenate([b.boxes for b in blocks]), np.concatenate([b.face_found for b in blocks])
    assert found.mean() > 0.9 and len(found) == len(frames)  # a 30 fps source: one output frame per frame
    np.testing.assert_array_equal(crops36, np.concatenate([b.crops for b in alone]))  # 36 unchanged by 128
    for i in np.flatnonzero(found)[::7]:
        y0, y1, x0, x1 = boxes[i].astype(int)
        for size, crops in ((36, crops36), (128, crops128)):
            want = cv2.resize(frames[i, y0:y1, x0:x1], (size, size), interpolation=cv2.INTER_AREA)
            np.testing.assert_array_equal(crops[i], want)
    assert not crops128[~found].any()


def test_default_config_keeps_its_hash_and_bad_crop_sizes_name_the_key(tmp_path):
    cfg = load_config(None)
    assert cfg["crop_sizes"] == [36]
    assert config_hash(hashed_config("synthetic", cfg)) == DEFAULT_SYNTHETIC_HASH
    assert config_hash(hashed_config("synthetic", {**cfg, "crop_sizes": [36, 128]})) != DEFAULT_SYNTHETIC_HASH
    for bad in ("[128]", "[36, 64]", "[36, 36]", "36", "[36, true]"):
        path = tmp_path / "c.yaml"
        path.write_text(f"crop_sizes: {bad}\n")
        with pytest.raises(JobError, match=r"crop_sizes: expected a list of distinct values from 36, 128, "
                                           r"including 36") as e:
            load_config(str(path))
        assert "\n" not in str(e.value)


# ---- shards ------------------------------------------------------------------------------------------

def test_shards_hold_every_size_and_name_them_in_the_footer(tmp_path):
    fs, uri = fsspec.filesystem("file"), str(tmp_path / "a.parquet")
    t, crops, found, boxes, bvp = _recording(130)
    blocks = [(t[a:a + 40], crops[36][a:a + 40], found[a:a + 40], boxes[a:a + 40], bvp[a:a + 40],
               {128: crops[128][a:a + 40]}) for a in range(0, 130, 40)]
    write_recording(uri, fs, META, blocks, segment_frames=50, row_group_bytes=2**20)
    segs = list(read_segments(uri, fs))
    np.testing.assert_array_equal(np.concatenate([s.crops(128) for s in segs]), crops[128])
    np.testing.assert_array_equal(np.concatenate([s.crops(36) for s in segs]), crops[36])
    assert shard_crop_sizes(uri, fs) == (36, 128)
    meta = pq.ParquetFile(uri).metadata  # a 50-frame row of 128 crops (2.4 MB) is a row group of its own
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [1, 1, 1]
    only = list(read_segments(uri, fs, columns=["frames_128"]))  # one size read alone
    assert only[0].frames is None and only[0].crops(128).shape == (50, 128, 128, 3)
    builder = SegmentBuilder(META, 50)
    builder.push(t[:5], crops[36][:5], found[:5], boxes[:5], None, {128: crops[128][:5]})
    with pytest.raises(ValueError, match="extra crop sizes changed"):
        builder.push(t[5:9], crops[36][5:9], found[5:9], boxes[5:9])
    with pytest.raises(ValueError, match=r"no column"):
        SegmentBuilder(META, 50).push(t[:5], crops[36][:5], found[:5], boxes[:5], None, {64: crops[36][:5]})


def _old_shard(uri: str, fs, n: int = 100) -> np.ndarray:
    """A shard as schema segments/1 wrote it (no frames_128, no crop sizes in the footer); its 36 crops."""
    t, crops, found, boxes, bvp = _recording(n, sizes=(36,))
    row = SegmentBuilder(META, n).push(t, crops[36], found, boxes, bvp)[0]
    old = pa.schema([f for f in SCHEMA if f.name != "frames_128"], metadata={"pulsepipe.schema": "segments/1"})
    with fs.open(uri, "wb") as f:
        pq.write_table(pa.Table.from_pylist([{k: row[k] for k in old.names}], schema=old), f)
    return crops[36]


def test_shards_of_the_old_schema_stay_readable(tmp_path):
    fs, uri = fsspec.filesystem("file"), str(tmp_path / "old.parquet")
    crops36 = _old_shard(uri, fs)
    (seg,) = read_segments(uri, fs)
    np.testing.assert_array_equal(seg.frames, crops36)
    assert seg.frames_128 is None and seg.crops(128) is None and seg.extra_crops == {}
    (seg,) = read_segments(uri, fs, columns=["frames_128", "face_found"])  # a column it lacks: None
    assert seg.frames_128 is None and seg.face_found.shape == (100,)
    assert shard_crop_sizes(uri, fs) is None
    (block,) = job.shard_blocks(uri, fs)  # ME-rPPG and the baselines read it as before
    np.testing.assert_array_equal(block.crops[36], crops36)
    with pytest.raises(job.ItemFailed, match=r"old.parquet has no 128x128 crops: re-run preprocess with "
                                             r"crop_sizes including 128"):
        list(job.shard_blocks(uri, fs, (128,)))


def test_time_scaling_carries_every_size_alike():
    t, crops, found, boxes, bvp = _recording(200)
    out = TimeScaler(1.37).push(t, crops[36], found, boxes, bvp, {128: crops[128]})
    alone = TimeScaler(1.37).push(t, crops[128], found, boxes, bvp)  # the 128 crops as the main frames
    np.testing.assert_array_equal(out[5][128], alone[1])
    assert not out[5][128][~out[2]].any() and (~out[2]).any()  # blends with a no-face frame: zeros
    # streamed over uneven blocks, the same
    scaler, parts = TimeScaler(1.37), []
    for a, b in ((0, 3), (3, 90), (90, 200)):
        parts.append(scaler.push(t[a:b], crops[36][a:b], found[a:b], boxes[a:b], bvp[a:b], {128: crops[128][a:b]}))
    np.testing.assert_array_equal(np.concatenate([p[5][128] for p in parts]), out[5][128])


def test_augment_writes_every_size_the_source_has(tmp_path):
    from pipelines.augment import AugmentStep

    fs = fsspec.filesystem("file")
    t, crops, found, boxes, bvp = _recording(120)
    src = tmp_path / "in" / "shards" / "synthetic" / "r1.parquet"
    write_recording(str(src), fs, META, [(t, crops[36], found, boxes, bvp, {128: crops[128]})], segment_frames=50)
    item = {"source": {"recording_id": "r1", "subject_id": "s1", "dataset": "synthetic", "source_uri": "v.mp4",
                       "shard": "shards/synthetic/r1.parquet", "fingerprint": "f", "config_hash": "c",
                       "metadata_json": "{}", "n_frames": 120},
            "factor": 0.8, "source_hr": 60.0, "recording_id": "r1@x0.800", "config_hash": "c2", "fingerprint": "f2"}
    row = AugmentStep(str(tmp_path / "in"), str(tmp_path / "out"), segment_frames=50)(item)
    assert row["status"] == "ok", row["reason"]
    uri = str(tmp_path / "out" / row["shard"])
    segs = list(read_segments(uri, fs))
    want = TimeScaler(0.8).push(t, crops[128], found, boxes, bvp)[1]
    np.testing.assert_array_equal(np.concatenate([s.crops(128) for s in segs]), want)
    assert shard_crop_sizes(uri, fs) == (36, 128)


# ---- the PhysMamba predictor -------------------------------------------------------------------------

def _stand_in(calls):
    """A stand-in for model.physmamba_chunk whose every output depends on the whole chunk (so padding
    shows), recording the batch shape of each call."""
    def chunk(params, frames):
        calls.append(frames.shape)
        x = np.asarray(frames, np.float64)
        return x.mean(axis=(2, 3, 4)) + 0.01 * x.mean(axis=(1, 2, 3, 4))[:, None] + np.arange(128) / 1000
    return chunk


def _process_video(run, frames: np.ndarray, found: np.ndarray) -> np.ndarray:
    """The published `process_video` loop, on one recording: 128-frame chunks, the last one padded by
    repeating its final frame and flag, outputs masked by the flags, only the real ones kept."""
    out = []
    for a in range(0, len(frames), 128):
        f, m = frames[a:a + 128], found[a:a + 128]
        n = len(f)
        f = np.concatenate([f, np.repeat(f[-1:], 128 - n, 0)])
        m = np.concatenate([m, np.repeat(m[-1:], 128 - n, 0)])
        out.append((run(None, np.where(m[:, None, None, None], f, 0)[None])[0] * m)[:n])
    return np.concatenate(out)


def test_physmamba_runs_chunks_of_all_streams_per_call_as_the_reference_pads(monkeypatch):
    import model

    calls = []
    monkeypatch.setattr(model, "physmamba_chunk", _stand_in(calls))
    rng = np.random.default_rng(4)
    lengths = (300, 128, 250)  # a partial last chunk across a lockstep block's end, an exact one, another
    streams = []
    for n in lengths:
        frames = rng.integers(0, 256, (n, 128, 128, 3), dtype=np.uint8)
        found = rng.random(n) > 0.1
        streams.append((frames, found))
    pm = types.SimpleNamespace(cfg=model.PhysMambaConfig(), params=None)
    blocks = [[({128: f[a:a + 70], 36: f[a:a + 70, :36, :36]}, m[a:a + 70]) for a in range(0, len(f), 70)]
              for f, m in streams]
    fed = feed({"pm": PhysMambaPredictor(pm, len(streams))}, blocks)
    got = fed.predictors["pm"].finish()
    assert calls == [(3, 128, 128, 128, 3)] * 3  # ceil(300 / 128) chunks, each one call for all three
    for (frames, found), bvp in zip(streams, got):
        want = _process_video(_stand_in([]), frames, found)
        assert len(bvp) == len(frames)
        np.testing.assert_allclose(bvp, want, rtol=1e-12)


def test_model_names_weights_and_crop_sizes():
    assert model_crop_sizes(["me-chunk:pure", "physmamba:rlap", "physmamba", "pos"]) == {
        "me-chunk:pure": 36, "physmamba:rlap": 128, "physmamba": 128, "pos": 36}
    check_models(["physmamba:pure"])
    with pytest.raises(ValueError, match="/nowhere/p.h5: no such weights file"):
        check_models(["physmamba:/nowhere/p.h5"])
    with pytest.raises(ValueError, match="unknown model 'pos:rlap'"):
        check_models(["pos:rlap"])


# ---- evaluate and infer ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    synth.write_cohort(out, subjects=2, seconds=6, seed=8, size=(256, 192))
    return out


def _preprocess(cohort: Path, out: Path, crop_sizes) -> Path:
    run_preprocess("synthetic", str(cohort), str(out), {**load_config(None), "crop_sizes": crop_sizes},
                   EngineOptions("beam", workers=1), log=lambda *_: None)
    return out


def test_evaluate_refuses_physmamba_on_shards_without_128_crops(tmp_path, cohort):
    shards = _preprocess(cohort, tmp_path / "pre", [36])
    settings = job.EvaluateSettings(str(shards), str(tmp_path / "eval"), ("me-chunk:rlap", "physmamba:rlap"))
    with pytest.raises(JobError, match=r"physmamba:rlap: 2 of 2 recordings: .*\.parquet has no 128x128 crops: "
                                       r"re-run preprocess with crop_sizes including 128"):
        job.check_request(settings)
    assert len(job.check_request(job.EvaluateSettings(str(shards), str(tmp_path / "eval"), ("pos",)))) == 2


@pytest.mark.slow
def test_evaluate_reports_physmamba_beside_me_rppg(tmp_path, cohort):
    shards = _preprocess(cohort, tmp_path / "pre", [36, 128])
    models = ("me-chunk:rlap", "physmamba:rlap", "physmamba:pure")
    out = tmp_path / "eval"
    job.run_evaluate(job.EvaluateSettings(str(shards), str(out), models, [6.0], n_boot=50),
                     EngineOptions("beam", workers=1), log=lambda *_: None)
    predictions = pq.read_table(out / "predictions.parquet").to_pylist()
    assert {(r["model"], r["status"]) for r in predictions} == {(m, "ok") for m in models}
    assert all(len(r["bvp_pred"]) == r["n_frames"] == 180 for r in predictions)
    cohort_rows = [r for r in pq.read_table(out / "metrics.parquet").to_pylist() if r["level"] == "cohort"]
    assert {r["model"] for r in cohort_rows} == set(models)
    assert all(np.isfinite(r["mae"]) for r in cohort_rows)
    report = (out / "report.html").read_text()
    assert all(m in report for m in models)


@pytest.mark.slow
def test_infer_physmamba_gives_a_heart_rate(tmp_path):
    """A heart rate from a face video, and the BVP the published loop gives on the same 128x128 crops.

    The synthetic face is not what PhysMamba was trained on: its rate here is often a harmonic of the
    true one (ME-rPPG's is checked in test_infer.py), so only the rate's presence is asserted."""
    import model
    from pipelines.infer import infer_video
    from transforms.face_crops import iter_face_crops
    from transforms.signal import BPM_RANGE

    cohort = synth.write_cohort(tmp_path, subjects=1, seconds=10, seed=11)
    path = str(tmp_path / cohort["recordings"][0]["video"])
    result = infer_video(path, model="physmamba", weights="pure")
    assert len(result.bvp) == 300 and result.face_fraction == 1.0
    assert BPM_RANGE[0] <= result.hr_bpm <= BPM_RANGE[1] and 0 < result.sqi <= 1
    blocks = list(iter_face_crops(path, sizes=(128,)))
    crops, found = np.concatenate([b.sized[128] for b in blocks]), np.concatenate([b.face_found for b in blocks])
    pm = model.load("physmamba", weights="pure")
    want = _process_video(lambda _, x: np.asarray(model.physmamba_chunk(pm.params, x)), crops, found)
    np.testing.assert_allclose(result.bvp, want, atol=1e-5)
