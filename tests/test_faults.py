"""Faults of the run itself: workers killed mid-item, poison items that kill their worker every time, drivers
interrupted (SIGINT) or killed (SIGKILL) and then re-run, a changed config interrupted.

Workers are killed through the supervisor's test-only hook (PULSEPIPE_TEST_KILL, see
pipelines.engines.supervisor); drivers run as `pulsepipe` subprocesses killed once the journal (or
evaluate's parts folder) holds a finished item. Each test checks N rows for N inputs, the reasons,
byte-identical shards for the recordings the fault spared (against an undisturbed run) and no temp,
journal, part or lock file left once a run completes. Every subprocess has a timeout.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines import journal
from pipelines.engines import EngineOptions
from pipelines.evaluate import EvaluateSettings, run_evaluate
from pipelines.preprocess import load_config, run_preprocess
from pipelines.processes import descendants

from test_reliability import N, assert_clean, baseline, cohort, manifest, shards  # noqa: F401 - fixtures

REPO = Path(__file__).resolve().parent.parent
IN_PROCESS = EngineOptions("beam", workers=1, pipeline_args=("--direct_running_mode=in_memory",))
TIMEOUT_S = 300  # any one run, killed or not
DIED = "worker died while processing (signal 9) after 3 attempts"


@pytest.fixture(scope="module")
def ids(baseline) -> list[str]:
    return sorted(r["recording_id"] for r in manifest(baseline))


def rows_by_id(out: Path) -> dict[str, dict]:
    return {r["recording_id"]: {k: v for k, v in r.items() if k != "elapsed_s"} for r in manifest(out)}


def assert_unchanged_except(out: Path, baseline: Path, victims=()) -> None:
    """Every recording but the victims as in the undisturbed run: manifest row and shard bytes."""
    got, want = rows_by_id(out), rows_by_id(baseline)
    assert len(got) == N
    assert {k: v for k, v in got.items() if k not in victims} == {k: v for k, v in want.items() if k not in victims}
    spared = {s: b for s, b in shards(baseline).items() if not any(f"/{v}.parquet" in s for v in victims)}
    assert {s: b for s, b in shards(out).items() if s in spared} == spared


def preprocess_argv(cohort: Path, out: Path, *extra: str) -> list[str]:
    return ["preprocess", "--layout", "synthetic", "--input", str(cohort), "--output", str(out), "--workers", "1",
            *extra]


def pulsepipe(argv: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def interrupted(argv: list[str], finished, sig: int) -> None:
    """Run pulsepipe with argv, send sig to its driver once finished() is true, and wait until the driver and
    every process it started have ended."""
    driver = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *argv], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not finished():
            assert driver.poll() is None, f"the run ended before it was interrupted: {driver.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        started = descendants(driver.pid)  # its engine's workers and their supervised children
        driver.send_signal(sig)
        driver.wait(timeout=60)
        while any(os.path.exists(f"/proc/{pid}") for pid in started):  # they end with the driver, on their own
            assert time.monotonic() < deadline + 60, "processes of the killed run live on"
            time.sleep(0.1)
    finally:
        if driver.poll() is None:
            driver.kill()
        driver.stderr.close()


def records(out: Path) -> list[Path]:
    return sorted(out.glob(f"{journal.FOLDER}/*/*.json"))


# ---- workers killed ----------------------------------------------------------------------------------

ENGINES = ["beam", pytest.param("ray", marks=pytest.mark.slow)]


@pytest.mark.parametrize("engine", ENGINES)
def test_a_worker_killed_mid_item_is_retried_and_the_run_is_as_undisturbed(engine, tmp_path, cohort, baseline, ids,
                                                                            monkeypatch, capfd):
    out = tmp_path / "out"
    (out / "shards" / "synthetic").mkdir(parents=True)
    (out / "shards" / "synthetic" / f".tmp-0123-{ids[0]}.parquet").write_bytes(b"PAR1 half")  # a killed writer's
    monkeypatch.setenv("PULSEPIPE_TEST_KILL", f"{ids[1]}:1")  # its first attempt only
    rows = run_preprocess("synthetic", str(cohort), str(out), load_config(None), EngineOptions(engine, workers=2),
                          log=lambda *_: None)
    assert len(rows) == N and {r["status"] for r in rows} == {"ok"}
    assert ": worker died while processing (signal 9), attempt 1 of 3" in capfd.readouterr().err
    assert_unchanged_except(out, baseline)
    assert_clean(out)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_poison_recording_fails_alone_named_in_its_row(engine, tmp_path, cohort, baseline, ids, monkeypatch):
    out, victim = tmp_path / "out", ids[2]
    monkeypatch.setenv("PULSEPIPE_TEST_KILL", f"{victim}:9")  # kills its worker on every attempt
    logs = []
    rows = run_preprocess("synthetic", str(cohort), str(out), load_config(None), EngineOptions(engine, workers=2),
                          log=logs.append)
    assert len(rows) == N
    failed = rows_by_id(out)[victim]
    assert failed["status"] == "failed" and failed["shard"] is None
    assert failed["reason"] == f"{rows_by_id(baseline)[victim]['source_uri']}: {DIED}"
    assert f"failed: {victim}: " in logs[-1] and DIED in logs[-1]
    assert_unchanged_except(out, baseline, victims=[victim])
    assert not list(out.glob(f"shards/**/{victim}.parquet"))
    assert_clean(out)


@pytest.mark.slow
def test_a_poison_recording_fails_alone_in_augment(tmp_path, baseline, ids, monkeypatch):
    from pipelines.augment import run_augment

    clean = run_augment(str(baseline), str(tmp_path / "clean"), IN_PROCESS, extra=1.0, log=lambda *_: None)
    monkeypatch.setenv("PULSEPIPE_TEST_KILL", f"{ids[0]}:9")  # its augmented copies read it: they fail
    rows = run_augment(str(baseline), str(tmp_path / "out"), EngineOptions("beam", workers=2), extra=1.0,
                       log=lambda *_: None)
    assert len(rows) == len(clean) > 1
    failed = [r for r in rows if r["status"] == "failed"]
    assert failed and all(r["reason"].endswith(f"/{ids[0]}.parquet: {DIED}") for r in failed)
    ok = {r["recording_id"] for r in rows if r["status"] == "ok"}
    assert ok == {r["recording_id"] for r in clean} - {r["recording_id"] for r in failed}
    assert shards(tmp_path / "out") == {s: b for s, b in shards(tmp_path / "clean").items()
                                        if any(f"/{i}.parquet" in s for i in ok)}
    assert_clean(tmp_path / "out")


def predictions(out: Path):
    return pq.read_table(out / "predictions.parquet")


def evaluation(preprocessed: Path, out: Path, opts: EngineOptions) -> dict:
    settings = EvaluateSettings(str(preprocessed), str(out), models=("pos", "green"), windows=(2.0,), n_boot=20,
                                recordings_per_call=N)
    return run_evaluate(settings, opts, log=lambda *_: None)


def test_a_poison_recording_in_an_evaluate_bucket_fails_alone(tmp_path, baseline, ids, monkeypatch):
    evaluation(baseline, tmp_path / "clean", IN_PROCESS)
    victim = ids[1]
    monkeypatch.setenv("PULSEPIPE_TEST_KILL", f"{victim}:9")  # one bucket of all N: it dies, then each alone
    rows = evaluation(baseline, tmp_path / "out", EngineOptions("beam", workers=1))["predictions"]
    assert len(rows) == 2 * N
    failed = [r for r in rows if r["status"] == "failed"]
    assert {(r["recording_id"], r["model"]) for r in failed} == {(victim, "pos"), (victim, "green")}
    assert all(r["reason"].endswith(f"/{victim}.parquet: {DIED}") for r in failed)
    clean, got = predictions(tmp_path / "clean").to_pylist(), predictions(tmp_path / "out").to_pylist()
    assert [r for r in got if r["recording_id"] != victim] == [r for r in clean if r["recording_id"] != victim]
    assert_clean(tmp_path / "out")


# ---- drivers interrupted, then the same command again --------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGKILL, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_a_driver_killed_mid_run_resumes_redoing_only_unfinished_items(sig, tmp_path, cohort, baseline):
    out = tmp_path / "out"
    interrupted(preprocess_argv(cohort, out), lambda: len(records(out)) >= 1, sig)
    finished = len(records(out))
    assert 1 <= finished < N and not (out / "manifest.parquet").exists()
    done = pulsepipe(preprocess_argv(cohort, out))
    assert f"{finished} of {N} taken from the journal of an interrupted run" in done.stderr
    assert done.stderr.count(": ok, ") == N - finished, done.stderr  # one progress line per item redone
    assert_unchanged_except(out, baseline)
    assert_clean(out)


@pytest.mark.slow
def test_an_evaluate_driver_killed_mid_run_resumes_from_its_parts(tmp_path, baseline):
    evaluation(baseline, tmp_path / "clean", IN_PROCESS)
    out = tmp_path / "out"
    argv = ["evaluate", "--input", str(baseline), "--output", str(out), "--model", "pos", "--model", "green",
            "--windows", "2", "--bootstrap", "20", "--recordings-per-call", "1", "--workers", "1"]
    parts = lambda: sorted(out.glob(".prediction-parts-*/*.parquet"))  # noqa: E731
    interrupted(argv, lambda: len(parts()) >= 1, signal.SIGKILL)
    finished = len(parts())
    assert 1 <= finished < N and not (out / "predictions.parquet").exists()
    done = pulsepipe(argv)
    assert f"{N} recordings from {baseline} ({finished} done before, from the parts of an interrupted run)" in (
        done.stdout)
    assert done.stderr.count("(bucket of 1,") == N - finished, done.stderr
    assert predictions(out).equals(predictions(tmp_path / "clean"))
    assert pq.read_table(out / "metrics.parquet").equals(pq.read_table(tmp_path / "clean" / "metrics.parquet"))
    assert_clean(out)


def test_an_evaluate_rerun_with_another_request_starts_its_parts_afresh(tmp_path, baseline):
    out = tmp_path / "out"
    stale = out / ".prediction-parts-0123" / "part.parquet"  # what a killed run of another request left
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"not this request's")
    evaluation(baseline, out, IN_PROCESS)
    assert len(predictions(out)) == 2 * N
    assert_clean(out)


# ---- a changed config, interrupted ----------------------------------------------------------------------

def test_an_interrupted_changed_config_run_leaves_no_new_shard_under_an_old_row(tmp_path, cohort, baseline):
    out = tmp_path / "out"
    shutil.copytree(baseline, out)
    config = tmp_path / "changed.yaml"
    config.write_text("detect_every: 3\n")
    interrupted(preprocess_argv(cohort, out, "--config", str(config)), lambda: len(records(out)) >= 1,
                signal.SIGKILL)
    replaced = [s for s, b in shards(out).items() if b != shards(baseline)[s]]
    assert replaced, "the killed run replaced a shard"  # each whole: written under a temp name, then moved
    assert len(shards(out)) == N
    assert (out / "manifest.parquet").read_bytes() == (baseline / "manifest.parquet").read_bytes()
    done = pulsepipe(preprocess_argv(cohort, out))  # the old config again: the new shards are not kept
    assert f"{N - len(replaced)} unchanged, {len(replaced)} to process" in done.stdout
    assert sorted(line.split(":")[0].strip() for line in done.stderr.splitlines() if ": made again: " in line) == [
        f"synthetic/{Path(s).stem}" for s in replaced]
    assert_unchanged_except(out, baseline)
    assert_clean(out)
