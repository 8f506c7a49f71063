"""`pulsepipe evaluate`: the same metrics from Beam and Ray, failures kept with reasons, accurate on synthetic data."""
from __future__ import annotations

import os
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines import cli
from pipelines import evaluate as job
from pipelines.engines import EngineOptions
from pipelines.evaluate import METRICS_SCHEMA, EvaluateSettings, EvaluateStep, buckets, run_evaluate, work_items
from pipelines.preprocess import load_config, run_preprocess
from transforms import synth
from transforms.manifest import read_manifest

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
    return out, run_evaluate(EvaluateSettings(str(shards), str(out), MODELS, [6.0], n_boot=200),
                             EngineOptions("beam", workers=2), log=lambda *_: None)


def test_beam_and_ray_give_identical_metrics(tmp_path, shards, beam_eval):
    beam_out, _ = beam_eval
    run_evaluate(EvaluateSettings(str(shards), str(tmp_path), MODELS, [6.0], n_boot=200),
                 EngineOptions("ray", workers=2), log=lambda *_: None)
    metrics = [pq.read_table(out / "metrics.parquet") for out in (beam_out, tmp_path)]
    assert metrics[0].equals(metrics[1], check_metadata=True)  # the run's settings too
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


def test_the_report_lists_failures_and_the_run_and_shows_each_models_worst(beam_eval):
    out, result = beam_eval
    text = (out / "report.html").read_text()
    failed = next(r for r in result["predictions"] if r["status"] == "failed")
    assert failed["recording_id"] in text and "cannot read the shard" in text
    for word in ("<td>bootstrap seed</td><td>0</td>", "<td>models</td><td>me-chunk:rlap pos</td>",
                 "<td>windows (s)</td><td>6</td>", "<td>beam, CPU</td>", "<td>7 of 8</td>"):
        assert word in text, word
    assert pq.read_schema(out / "metrics.parquet").metadata[b"pulsepipe:bootstrap seed"] == b"0"
    shown = {m for m in MODELS if f"waveforms of {m} on" in text}
    assert shown == set(MODELS)  # the main model's worst too, not only the worst model's


def test_a_run_where_every_recording_fails_still_finishes(tmp_path, shards):
    broken = tmp_path / "pre"
    broken.mkdir()
    (broken / "manifest.parquet").write_bytes((shards / "manifest.parquet").read_bytes())  # shards/ is missing
    result = run_evaluate(EvaluateSettings(str(broken), str(tmp_path / "eval"), ["pos"], [6.0], n_boot=10),
                          EngineOptions("beam", workers=1), log=lambda *_: None)
    assert {r["status"] for r in result["predictions"]} == {"failed"} and result["metrics"] == []
    assert pq.read_schema(tmp_path / "eval" / "metrics.parquet").remove_metadata() == METRICS_SCHEMA
    text = (tmp_path / "eval" / "report.html").read_text()
    assert "0 of 8" in text and text.count("cannot read the shard") == 8


def _bucket(shards, n=2) -> dict:
    items = work_items(read_manifest(str(shards / "manifest.parquet"), fsspec.filesystem("file")))
    return {"index": 0, "recordings": [i for i in items if i["reason"] is None][:n]}


def test_flat_ground_truth_fails_its_recording_alone(tmp_path, shards, monkeypatch):
    bucket = _bucket(shards)
    flat_shard = bucket["recordings"][0]["shard"]
    real = job.read_segments

    def flat_truth(uri, fs, columns=None):
        for seg in real(uri, fs, columns):
            yield seg._replace(bvp=np.full_like(seg.bvp, 0.5)) if uri.endswith(flat_shard) else seg

    monkeypatch.setattr(job, "read_segments", flat_truth)
    rows = EvaluateStep(str(shards), str(tmp_path), ["pos"], [6.0])(bucket)["rows"]
    assert [r["status"] for r in rows] == ["failed", "ok"]
    assert flat_shard in rows[0]["reason"] and "ground-truth BVP is flat" in rows[0]["reason"]


def test_one_models_bad_output_fails_its_row_alone(tmp_path, shards, monkeypatch):
    step = EvaluateStep(str(shards), str(tmp_path), ["pos", "green"], [6.0])
    feed = step.models.feed

    def green_says_nan(streams):
        fed = feed(streams)
        finish = fed.predictors["green"].finish
        fed.predictors["green"].finish = lambda keep=None: [np.full_like(b, np.nan) for b in finish(keep)]
        return fed

    monkeypatch.setattr(step.models, "feed", green_says_nan)
    rows = step(_bucket(shards))["rows"]
    assert [(r["model"], r["status"]) for r in rows] == [("pos", "ok"), ("green", "failed")] * 2
    assert all("green: cannot score its output" in r["reason"] and "NaN" in r["reason"]
               for r in rows if r["status"] == "failed")


@pytest.mark.parametrize("args, said", [
    (["--model", "me-turbo"], "unknown model 'me-turbo'"),
    (["--model", "me-chunk:/nowhere/w.h5"], "/nowhere/w.h5: no such weights file"),
    (["--model", "me-chunk:{manifest}"], "cannot read ME-rPPG weights"),
    (["--input", "{missing}"], "no manifest.parquet"),
])
def test_bad_requests_end_with_one_line_before_any_engine_starts(tmp_path, shards, capsys, args, said):
    paths = {"manifest": str(shards / "manifest.parquet"), "missing": str(tmp_path / "nothing")}
    argv = ["evaluate", "--input", str(shards), "--output", str(tmp_path / "out")] + [a.format(**paths) for a in args]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pulsepipe evaluate: error: ") and said in err and len(err.splitlines()) == 1, err


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
    gpu = run_evaluate(EvaluateSettings(str(shards), str(tmp_path), MODELS, [6.0], n_boot=200, recordings_per_call=8),
                       EngineOptions(engine, workers=1, num_gpus=1), log=lambda *_: None)
    for r in gpu["predictions"]:
        c = cpu[(r["recording_id"], r["model"])]
        assert r["status"] == c["status"]
        if r["status"] == "ok":
            assert abs(r["hr_pred"] - c["hr_pred"]) < 0.5, (r, c)


def test_cpu_workers_set_jax_to_its_cpu_platform(tmp_path):
    # on a machine with CUDA JAX, a worker not given a GPU would otherwise take one and 75% of its memory
    import subprocess
    import sys

    code = ("import jax; from pipelines.evaluate import EvaluateStep; "
            f"EvaluateStep({str(tmp_path)!r}, {str(tmp_path)!r}, ['me-chunk'], [10.0], gpus={{}}); "
            "print(jax.config.jax_platforms)")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    for gpus, platforms in ((False, "cpu"), (True, "None")):
        done = subprocess.run([sys.executable, "-c", code.format(gpus)], capture_output=True, text=True, timeout=120,
                              env=env)
        assert done.stdout.strip() == platforms, done.stderr


def test_models_are_taken_after_one_flag_or_one_flag_each():
    from pipelines.cli import build_parser

    args, extra = build_parser().parse_known_args(["evaluate", "--input", "in", "--output", "out", "--model",
                                                   "me-chunk:pure", "green", "--model", "pos"])
    assert args.models == ["me-chunk:pure", "green", "pos"] and extra == []  # none left for Beam's options
