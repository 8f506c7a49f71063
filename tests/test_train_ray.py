"""`pulsepipe train --workers 2`: two Ray Train workers, one `jax.distributed` process each, train exactly
as one process does (slow: Ray, two workers compiling the step)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
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


def test_ctrl_c_stops_the_workers_in_one_line_naming_the_checkpoint_that_stands(tmp_path):
    data = tmp_path / "data"
    write_pulse_root(data)
    config = tmp_path / "quick.yaml"
    config.write_text(yaml.safe_dump({**QUICK, "checkpoint_every": 2}))
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "train", "--input", str(data), "--output", str(run),
                             "--config", str(config), "--steps", "40", "--no-progress", "--workers", "2"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 400
        while not (run / "log.jsonl").is_file() or len((run / "log.jsonl").read_text().splitlines()) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended or never stepped"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 2, err[-3000:]
    with np.load(run / "checkpoint.npz") as f:
        step = json.loads(bytes(f["__meta__"]).decode())["step"]
    assert step >= 2 and step % 2 == 0  # one of checkpoint_every's
    assert err.strip().splitlines()[-1] == (f"pulsepipe train: error: interrupted: the training workers are stopped; "
                                            f"the checkpoint of step {step} stands, which --resume continues")
    assert not (run / ".pulsepipe.lock").exists()
