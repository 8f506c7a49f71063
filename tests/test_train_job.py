"""`pulsepipe train` as a job: run folder, resume bit for bit, refusals, weights that load everywhere."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import fsspec
import numpy as np
import pytest
import yaml

from pipelines.cli import main as cli
from pipelines.settings import load_settings
from pipelines.train import DEFAULT_CONFIG, RULES, TrainRequest, run_train
from transforms.manifest import write_manifest
from transforms.resample import FPS
from transforms.shards import shard_path, write_recording

N_FRAMES = 480  # 16 s: three 160-frame sequences per recording
QUICK = {"seq_len": 160, "batch_size": 2, "micro_batch": 1, "val_fraction": 0.25, "validate_every": 1000,
         "checkpoint_every": 1000}


def write_pulse_root(root, subjects: int = 4, seed: int = 0) -> None:
    """An output root like preprocess's: one recording per subject, a uniform skin patch whose colour pulses
    with the truth at the subject's heart rate, camera noise on top."""
    fs = fsspec.filesystem("file")
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(subjects):
        rec, subject = f"s{s:03d}-r01", f"s{s:03d}"
        t = np.arange(N_FRAMES) / FPS
        bvp = np.sin(2 * np.pi * (1.0 + 0.25 * s) * t).astype(np.float32)
        skin = np.array([180.0, 120.0, 100.0]) + rng.normal(0, 5, 3)
        pixels = skin + 3.0 * bvp[:, None] * np.array([0.33, 0.77, 0.53])  # (T, 3)
        frames = pixels[:, None, None, :] + rng.normal(0, 2, (N_FRAMES, 36, 36, 3))
        frames = np.clip(np.rint(frames), 0, 255).astype(np.uint8)
        meta = {"recording_id": rec, "subject_id": subject, "dataset": "synthetic", "source_uri": f"{rec}.mp4",
                "source_size": 1, "source_mtime": "0", "config_hash": "test", "package_version": "test"}
        boxes = np.zeros((N_FRAMES, 4), np.float32)
        shard = shard_path("synthetic", rec)
        counts = write_recording(f"{root}/{shard}", fs, meta, [(t, frames, np.ones(N_FRAMES, bool), boxes, bvp)],
                                 segment_frames=200)
        rows.append({"recording_id": rec, "subject_id": subject, "dataset": "synthetic", "source_uri": f"{rec}.mp4",
                     "status": "ok", "reason": None, "n_frames": counts.n_frames, "n_segments": counts.n_segments,
                     "fingerprint": f"fp-{rec}", "config_hash": "test", "shard": shard, "metadata_json": "{}"})
    write_manifest(rows, f"{root}/manifest.parquet", fs)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pulse")
    write_pulse_root(root)
    return root


def settings(**changes) -> dict:
    return {**load_settings(DEFAULT_CONFIG, None, RULES), **QUICK, **changes}


def request(data_root, run, **kwargs) -> TrainRequest:
    config = kwargs.pop("config", settings())
    return TrainRequest((str(data_root),), str(run), config, progress=False, **kwargs)


def read_log(run) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def checkpoint_arrays(run) -> dict:
    with np.load(run / "checkpoint.npz") as f:
        return {k: f[k] for k in f.files}


def test_a_resumed_run_in_a_new_process_is_bit_identical_to_one_never_stopped(data_root, tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_train(request(data_root, straight, steps=2), log=lambda *_: None)
    run_train(request(data_root, stopped, steps=1), log=lambda *_: None)
    config = tmp_path / "quick.yaml"
    config.write_text(yaml.safe_dump(QUICK))
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "train", "--input", str(data_root), "--output",
                           str(stopped), "--config", str(config), "--steps", "2", "--resume", "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = checkpoint_arrays(straight), checkpoint_arrays(stopped)
    meta = lambda arrays: json.loads(bytes(arrays.pop("__meta__")).decode())  # noqa: E731
    meta_a, meta_b = meta(a), meta(b)
    assert a.keys() == b.keys()
    for k in a:  # parameters, optimiser state, step and rng
        assert np.array_equal(a[k], b[k]), k
    # the stopped run validated at its stop too, so only its record of the best differs
    assert {k: meta_a[k] for k in ("step", "position")} == {k: meta_b[k] for k in ("step", "position")}
    losses = lambda run: [(r["step"], r["loss"]) for r in read_log(run) if r["kind"] == "step"]  # noqa: E731
    assert losses(straight) == losses(stopped) and len(losses(straight)) == 2


def test_ctrl_c_saves_a_checkpoint_of_whole_steps_that_resume_continues_bit_for_bit(data_root, tmp_path):
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    config = tmp_path / "quick.yaml"
    config.write_text(yaml.safe_dump(QUICK))
    train = [sys.executable, "-m", "pipelines.cli", "train", "--input", str(data_root), "--config", str(config),
             "--no-progress"]
    proc = subprocess.Popen([*train, "--output", str(stopped), "--steps", "50"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (stopped / "log.jsonl").is_file() or not (stopped / "log.jsonl").read_text():  # a step is done
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended or never stepped"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)  # held until the step under way ends
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 2, err[-3000:]
    assert "interrupted: saving a checkpoint when this step ends" in err
    done = re.fullmatch(r"pulsepipe train: error: interrupted at step (\d+); the checkpoint is saved: run the same "
                        r"command with --resume to continue", err.strip().splitlines()[-1])
    assert done, err[-3000:]
    n = int(done.group(1))
    assert 1 <= n < 50 and [r["step"] for r in read_log(stopped) if r["kind"] == "step"] == list(range(1, n + 1))
    from pipelines.train import standing_checkpoint  # what a second Ctrl-C would have said

    assert standing_checkpoint(stopped) == f"the checkpoint of step {n} stands, which --resume continues"
    assert standing_checkpoint(tmp_path) == "no checkpoint is saved yet"
    run_train(request(data_root, stopped, steps=n + 1, resume=True), log=lambda *_: None)
    run_train(request(data_root, straight, steps=n + 1), log=lambda *_: None)
    a, b = checkpoint_arrays(straight), checkpoint_arrays(stopped)
    a.pop("__meta__"), b.pop("__meta__")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    losses = lambda run: [r["loss"] for r in read_log(run) if r["kind"] == "step"]  # noqa: E731
    assert losses(stopped) == losses(straight)


def test_a_first_ctrl_c_is_held_for_the_step_and_a_second_stops_at_once(capfd):
    from pipelines.train import _interrupt_between_steps

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, as in a CLI run
    with _interrupt_between_steps() as interrupted:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # the handler runs between bytecodes, here at once
        except KeyboardInterrupt:
            pytest.fail("the first Ctrl-C was not held")
        assert interrupted == [signal.SIGINT], "held: the step goes on"
        assert "saving a checkpoint when this step ends" in capfd.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
    assert signal.signal(signal.SIGINT, before) is signal.default_int_handler, "the handler is put back"


def test_resume_refuses_changed_settings_or_data_and_a_used_folder_needs_resume(data_root, tmp_path, capsys):
    run = tmp_path / "run"
    run_train(request(data_root, run, steps=1), log=lambda *_: None)
    with pytest.raises(Exception, match="not empty; pass --resume"):
        run_train(request(data_root, run, steps=2), log=lambda *_: None)
    with pytest.raises(Exception, match=r"different settings \(lr\);"):
        run_train(request(data_root, run, steps=2, resume=True, config=settings(lr=5e-4)), log=lambda *_: None)
    changed = tmp_path / "changed"
    write_pulse_root(changed, subjects=5)
    with pytest.raises(Exception, match=r"different inputs, data \(the inputs' manifests\);"):
        run_train(TrainRequest((str(changed),), str(run), settings(), steps=2, resume=True, progress=False),
                  log=lambda *_: None)
    with pytest.raises(Exception, match="holds no checkpoint.npz"):
        run_train(request(data_root, tmp_path / "new", steps=1, resume=True), log=lambda *_: None)


@pytest.mark.parametrize("line, key", [("seq_len: 100", "seq_len"), ("lr: -1", "lr"), ("loss: l1", "loss"),
                                       ("batch_size: two", "batch_size"), ("epoch: 3", "unknown settings epoch"),
                                       ("micro_batch: 5", "micro_batch 5 does not divide batch_size 32")])
def test_a_bad_setting_is_one_line_naming_the_key_and_exit_2(data_root, tmp_path, capsys, line, key):
    config = tmp_path / "bad.yaml"
    config.write_text(line + "\n")
    assert cli(["train", "--input", str(data_root), "--output", str(tmp_path / "run"), "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0] and str(config) in err[0]
    assert not (tmp_path / "run").exists(), "nothing is made before the request is checked"


def test_lr_zero_keeps_the_published_model_and_its_weights_load_everywhere(data_root, tmp_path):
    import jax

    import model
    from model.weights import load_initial_state, load_params
    from pipelines.predictors import check_models

    run = tmp_path / "run"
    result = run_train(request(data_root, run, steps=2, config=settings(lr=0.0)), log=lambda *_: None)
    assert result["best"]["step"] is not None
    for got, want in zip(jax.tree.leaves(load_params(run)), jax.tree.leaves(load_params("rlap"))):
        assert np.array_equal(got, want)
    for got, want in zip(jax.tree.leaves(load_initial_state(weights=run)), jax.tree.leaves(load_initial_state())):
        assert np.array_equal(got, want)
    check_models([f"me-chunk:{run}", f"me-flow:{run}"])  # what evaluate checks before its workers start
    assert model.load(weights=run).cfg == model.load().cfg
    card = json.loads((run / "model_card.json").read_text())
    assert card["lineage"] == {"init": "published:rlap"} and card["settings"]["lr"] == 0.0
    assert (run / "curves.png").stat().st_size > 0
    assert {r["kind"] for r in read_log(run)} == {"step", "validation"}


def test_early_stopping_ends_the_run_after_patience_validations_without_a_better_mae(data_root, tmp_path):
    # lr 0: every validation scores the same MAE, which is not better, so each after the first is stale
    run, lines = tmp_path / "run", []
    config = settings(lr=0.0, validate_every=1, early_stop_patience=2)
    result = run_train(request(data_root, run, steps=10, config=config), log=lines.append)
    assert result["steps"] == 3 and result["best"]["step"] == 1
    validations = [r for r in read_log(run) if r["kind"] == "validation"]
    assert [r["step"] for r in validations] == [1, 2, 3] and len({r["mae"] for r in validations}) == 1
    assert lines[-1].startswith("early stop: 2 validations without a better MAE; trained to step 3")
    assert json.loads((run / "model_card.json").read_text())["step"] == 3


def test_a_reduced_architecture_trains_from_scratch_and_its_run_loads_as_that_network(data_root, tmp_path):
    import model
    from model.config import architecture
    from pipelines.predictors import check_models

    reduced = {"filters": 8, "d_state": 16, "head_width": 8, "n_blocks": 2}
    run = tmp_path / "run"
    run_train(request(data_root, run, steps=1, init="scratch", config=settings(architecture=reduced)),
              log=lambda *_: None)
    me = model.load(weights=run)
    assert {k: architecture(me.cfg)[k] for k in reduced} == reduced
    bvp, _ = model.apply_chunk(me.params, np.zeros((160, 36, 36, 3), np.uint8), me.init_state(), cfg=me.cfg)
    assert bvp.shape == (160,) and np.isfinite(bvp).all()
    check_models([f"me-chunk:{run}"])
    card = json.loads((run / "model_card.json").read_text())
    assert card["settings"]["architecture"] == reduced


@pytest.mark.parametrize("architecture, init, why", [
    ({"filters": 8}, "published:rlap", "another network than the settings' architecture (differs in filters)"),
    ({"filter": 8}, "scratch", "architecture: unknown fields filter;"),
    ({"filters": 0}, "scratch", "architecture: expected a mapping of names to a whole number, 1 or more"),
])
def test_an_architecture_the_init_cannot_fill_is_refused_before_any_work(data_root, tmp_path, capsys,
                                                                         architecture, init, why):
    config = tmp_path / "arch.yaml"
    config.write_text(yaml.safe_dump({"architecture": architecture}))
    assert cli(["train", "--input", str(data_root), "--output", str(tmp_path / "run"), "--config", str(config),
                "--init", init]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and why in err[0], err
    assert not (tmp_path / "run").exists()


def test_an_interrupted_checkpoint_write_leaves_the_previous_one(tmp_path):
    import jax.numpy as jnp

    from model.checkpoint import checkpoint_meta, load_checkpoint, save_checkpoint

    fs = fsspec.filesystem("file")
    uri = str(tmp_path / "checkpoint.npz")
    state = {"w": jnp.arange(4.0), "step": jnp.int32(3)}
    save_checkpoint(uri, fs, state, {"step": 3})

    class Killed(BaseException):
        pass

    real_open = fs.open

    def open_then_die(path, mode="rb", **kw):
        f = real_open(path, mode, **kw)
        if "w" in mode:
            f.write(b"half a checkpoint")
            raise Killed
        return f

    fs.open = open_then_die
    with pytest.raises(Killed):
        save_checkpoint(uri, fs, {"w": jnp.zeros(4), "step": jnp.int32(9)}, {"step": 9})
    fs.open = real_open
    got, meta = load_checkpoint(uri, fs, state)
    assert meta == {"step": 3} == checkpoint_meta(uri, fs) and np.array_equal(got["w"], np.arange(4.0))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.npz"], "no temp file is left"
