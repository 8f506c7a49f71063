"""`pulsepipe train --workers 2`: two Ray Train workers, one `jax.distributed` process each, train exactly
as one process does (slow: Ray, two workers compiling the step)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.test_train_job import QUICK, write_pulse_root

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _train(data, run, config, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", "train", "--input", str(data), "--output", str(run),
                           "--config", str(config), "--steps", "2", "--no-progress", *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


def test_two_ray_train_workers_take_the_steps_of_one_process_bit_for_bit(tmp_path):
    data = tmp_path / "data"
    write_pulse_root(data)
    config = tmp_path / "quick.yaml"
    config.write_text(yaml.safe_dump({**QUICK, "micro_batch": 1}))  # one sequence per process and pass
    local, ray = tmp_path / "local", tmp_path / "ray"
    for run, extra in ((local, ()), (ray, ("--workers", "2"))):
        done = _train(data, run, config, *extra)
        assert done.returncode == 0, done.stderr[-3000:]
    assert "training in 2 Ray Train workers" in done.stdout + done.stderr
    assert "in 2 processes" in done.stdout + done.stderr  # process 0's own account reached the driver
    with np.load(local / "checkpoint.npz") as a, np.load(ray / "checkpoint.npz") as b:
        assert a.files == b.files
        for k in a.files:
            if k != "__meta__":
                np.testing.assert_array_equal(a[k], b[k])

    def losses(run):
        return [r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["kind"] == "step"]

    assert losses(ray) == losses(local) and len(losses(ray)) == 2
    assert json.loads((ray / "config.json").read_text()) == json.loads((local / "config.json").read_text())
    assert (ray / "best.weights.h5").is_file() and not (ray / ".pulsepipe.lock").exists()


def test_a_batch_that_does_not_split_over_the_workers_is_refused_before_ray_starts(tmp_path):
    data = tmp_path / "data"
    write_pulse_root(data)
    config = tmp_path / "odd.yaml"
    config.write_text(yaml.safe_dump({**QUICK, "batch_size": 3, "micro_batch": 0}))
    done = _train(data, tmp_path / "run", config, "--workers", "2")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"pulsepipe train: error: {config}: batch_size 3 does not split into 2 processes' equal parts of whole "
        "micro-batches (the whole part); use a multiple of 2"]
    assert not (tmp_path / "run").exists()
