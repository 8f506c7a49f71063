"""`pulsepipe train` learns: from scratch, and when fine-tuning the published weights (slow tests).

Both train on a hard synthetic cohort (`synth --difficulty hard`: head motion, flicker near the heart rate,
lossy video, heart rates that ramp or step) and are judged, as a user would judge them, by `pulsepipe
evaluate` on a second cohort of other subjects that training never saw.
"""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import yaml

from pipelines.cli import main as cli

pytestmark = pytest.mark.slow

SCRATCH = {  # a reduced network (about 1/20 of the published parameters) that a CPU trains in a minute or two
    "architecture": {"filters": 8, "d_state": 16, "head_width": 8},
    "seq_len": 320, "batch_size": 8, "micro_batch": 0, "lr": 3.0e-3, "loss": "neg_pearson", "dropout": 0.0,
    "val_fraction": 0.25, "validate_every": 5, "checkpoint_every": 1000,
}
FINE_TUNE = {"seq_len": 320, "batch_size": 4, "micro_batch": 2, "lr": 1.0e-4, "val_fraction": 0.25,
             "validate_every": 4, "checkpoint_every": 1000}


def _cohort(root, name: str, subjects: int, seed: int) -> str:
    videos, shards = root / f"{name}-videos", root / f"{name}-shards"
    assert cli(["synth", str(videos), "--subjects", str(subjects), "--seconds", "30", "--difficulty", "hard",
                "--size", "160x120", "--seed", str(seed)]) == 0
    assert cli(["preprocess", "--layout", "synthetic", "--input", str(videos), "--output", str(shards)]) == 0
    return str(shards)


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    root = tmp_path_factory.mktemp("learning")
    return root, _cohort(root, "train", 16, seed=3), _cohort(root, "held-out", 6, seed=12)


def _train(root, shards: str, name: str, settings: dict, init: str, steps: int) -> str:
    config, run = root / f"{name}.yaml", root / name
    config.write_text(yaml.safe_dump(settings))
    assert cli(["train", "--input", shards, "--output", str(run), "--config", str(config), "--init", init,
                "--steps", str(steps), "--no-progress"]) == 0
    return str(run)


def _recording_hrs(root, shards: str, name: str, models: list[str]) -> dict[str, dict[str, tuple[float, float]]]:
    """{model: {recording: (hr_pred, hr_true)}} from `pulsepipe evaluate` of the models on the shards."""
    out = root / f"eval-{name}"
    assert cli(["evaluate", "--input", shards, "--output", str(out), "--model", *models]) == 0
    rows = pq.read_table(out / "predictions.parquet", columns=["recording_id", "model", "status", "hr_pred",
                                                              "hr_true"]).to_pylist()
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    by_model = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["recording_id"]] = (r["hr_pred"], r["hr_true"])
    return by_model


def _mae(pairs) -> float:
    return sum(abs(p - t) for p, t in pairs) / len(pairs)


def test_a_reduced_network_trained_from_scratch_beats_a_constant_heart_rate_by_five_times(cohorts):
    root, train_shards, held_out = cohorts
    run = _train(root, train_shards, "scratch", SCRATCH, "scratch", steps=20)
    train_truth = [t for _, t in _recording_hrs(root, train_shards, "train-truth", ["green"])["green"].values()]
    held = _recording_hrs(root, held_out, "scratch", [f"me-chunk:{run}"])[f"me-chunk:{run}"]
    constant = sum(train_truth) / len(train_truth)  # the best a model blind to the video can do
    constant_mae = _mae([(constant, t) for _, t in held.values()])
    trained_mae = _mae(held.values())
    assert constant_mae > 5.0, constant_mae  # the held-out heart rates are spread: the bar means something
    assert trained_mae <= 0.2 * constant_mae, (trained_mae, constant_mae)


def test_fine_tuning_the_published_weights_does_not_make_held_out_mae_worse(cohorts):
    root, train_shards, held_out = cohorts
    run = _train(root, train_shards, "fine-tune", FINE_TUNE, "published:rlap", steps=8)
    hrs = _recording_hrs(root, held_out, "fine-tune", ["me-chunk:rlap", f"me-chunk:{run}"])
    assert set(hrs) == {"me-chunk:rlap", f"me-chunk:{run}"}, set(hrs)
    published, tuned = _mae(hrs["me-chunk:rlap"].values()), _mae(hrs[f"me-chunk:{run}"].values())
    assert tuned <= published + 0.2, (tuned, published)
