"""`pulsepipe evaluate`: the same metrics from Beam and Ray, failures kept with reasons, accurate on synthetic data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.engines import EngineOptions
from pipelines.evaluate import buckets, run_evaluate, work_items
from pipelines.preprocess import load_config, run_preprocess
from transforms import synth

MODELS = ("me-chunk:rlap", "pos")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    cohort = tmp_path_factory.mktemp("cohort")
    synth.write_cohort(cohort, subjects=4, seconds=12, seed=2, recordings_per_subject=2, size=(256, 192))
    out = tmp_path_factory.mktemp("pre")
    run_preprocess("synthetic", str(cohort), str(out), load_config(None), EngineOptions("beam", workers=2), log=lambda *_: None)
    # one recording's shard is damaged after preprocessing: its inference must fail, not vanish
    victim = sorted(out.glob("shards/**/*.parquet"))[-1]
    victim.write_bytes(b"PAR1 this is not a parquet file")
    return out


@pytest.fixture(scope="module")
def beam_eval(tmp_path_factory, shards):
    out = tmp_path_factory.mktemp("eval-beam")
    return out, run_evaluate(str(shards), str(out), MODELS, [6.0], EngineOptions("beam", workers=2),
                             n_boot=200, log=lambda *_: None)


def test_beam_and_ray_give_identical_metrics(tmp_path, shards, beam_eval):
    beam_out, _ = beam_eval
    run_evaluate(str(shards), str(tmp_path), MODELS, [6.0], EngineOptions("ray", workers=2), n_boot=200, log=lambda *_: None)
    assert pq.read_table(beam_out / "metrics.parquet").equals(pq.read_table(tmp_path / "metrics.parquet"))
    assert pq.read_table(beam_out / "predictions.parquet").equals(pq.read_table(tmp_path / "predictions.parquet"))


def test_every_recording_and_model_is_in_the_predictions(beam_eval):
    out, result = beam_eval
    table = pq.read_table(out / "predictions.parquet").to_pylist()
    assert len(table) == 8 * len(MODELS)
    failed = [r for r in table if r["status"] == "failed"]
    assert len(failed) == len(MODELS) and all("not a parquet" in r["reason"] or "Parquet" in r["reason"]
                                              or "parquet" in r["reason"] for r in failed), failed
    ok = [r for r in table if r["status"] == "ok"]
    for r in ok:
        assert len(r["bvp_pred"]) == len(r["bvp_true"]) == r["n_frames"] == 360
        assert r["windows"] and all(w["length_s"] == 6.0 for w in r["windows"])


def test_me_chunk_is_accurate_and_metrics_have_every_level(beam_eval):
    out, result = beam_eval
    ok = [r for r in result["predictions"] if r["status"] == "ok"]
    errors = [abs(r["hr_pred"] - r["hr_true"]) for r in ok if r["model"] == "me-chunk:rlap"]
    assert np.mean(errors) <= 2.0, errors
    levels = {m["level"] for m in result["metrics"]}
    assert {"recording", "subject", "cohort"} <= levels
    cohort = [m for m in result["metrics"] if m["level"] == "cohort" and m["model"] == "me-chunk:rlap"]
    assert len(cohort) == 1 and cohort[0]["mae_lo"] <= cohort[0]["mae"] <= cohort[0]["mae_hi"]
    assert (out / "report.html").exists()


def test_recordings_that_failed_preprocessing_come_along_failed():
    manifest = [
        {"recording_id": "a", "subject_id": "s1", "dataset": "d", "metadata_json": "{}", "shard": "shards/d/a.parquet",
         "n_frames": 300, "status": "ok", "reason": None},
        {"recording_id": "b", "subject_id": "s1", "dataset": "d", "metadata_json": "{}", "shard": None,
         "n_frames": None, "status": "failed", "reason": "b.mp4: no face found"},
    ]
    items = {i["recording_id"]: i for i in work_items(manifest)}
    assert items["a"]["reason"] is None
    assert items["b"]["reason"] == "preprocessing failed: b.mp4: no face found"
    assert [i["recording_id"] for i in work_items(manifest)] == ["a", "b"]  # longest first


def test_buckets_hold_recordings_of_similar_length_and_every_recording_once():
    items = [{"recording_id": str(n), "n_frames": n} for n in (1000, 990, 900, 800, 700, 300, 290, 0, 0)]
    got = buckets(items, size=3, min_fill=0.75)
    assert [[i["n_frames"] for i in b["recordings"]] for b in got] == [
        [1000, 990, 900], [800, 700], [300, 290], [0, 0]]
    assert [b["index"] for b in got] == [0, 1, 2, 3]
    assert [i for b in buckets(items, size=1) for i in b["recordings"]] == items


def _has_gpu() -> bool:
    import jax

    return jax.default_backend() == "gpu"


@pytest.mark.skipif(_has_gpu(), reason="this machine has a GPU: the request would be met")
def test_gpus_asked_for_and_absent_is_one_clear_line(shards, tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "evaluate", "--input", str(shards), "--output",
                           str(tmp_path), "--model", "pos", "--gpus-per-worker", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "GPU" in done.stderr and "--gpus-per-worker" in done.stderr, done.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("engine", ["ray", "beam"])
def test_on_a_gpu_the_metrics_match_the_cpu_run(tmp_path, shards, beam_eval, engine):
    # run with `pytest -m gpu` on a machine with JAX's CUDA plugin (pip install -e '.[gpu]')
    assert _has_gpu()
    cpu = {(r["recording_id"], r["model"]): r for r in beam_eval[1]["predictions"]}
    gpu = run_evaluate(str(shards), str(tmp_path), MODELS, [6.0],
                       EngineOptions(engine, workers=1, num_gpus=1), n_boot=200, recordings_per_call=8,
                       log=lambda *_: None)
    for r in gpu["predictions"]:
        c = cpu[(r["recording_id"], r["model"])]
        assert r["status"] == c["status"]
        if r["status"] == "ok":
            assert abs(r["hr_pred"] - c["hr_pred"]) < 0.5, (r, c)
