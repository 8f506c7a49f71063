"""Runs that survive their faults: bad settings and job-level problems refused in one line before any
work, verified skips, failures that keep the last good shard, one writer per output root, a bounded
connect to an unreachable Ray cluster.

Jobs run on Beam's FnApiRunner in this process without crash isolation (`in_memory`, `isolate=False`: a
step can be patched to fail) over a tiny synthetic cohort; each test works on a copy of one baseline output and checks N rows for N inputs, the
reasons, byte-identical shards where nothing should change, and no temp, probe or lock file left.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec
import pytest

from pipelines import cli, lock
from pipelines.engines import EngineOptions
from pipelines.errors import JobError
from pipelines.evaluate import work_items
from pipelines.preprocess import PreprocessStep, load_config, run_preprocess
from transforms import synth
from transforms.errors import ItemFailed
from transforms.manifest import read_manifest

REPO = Path(__file__).resolve().parent.parent
IN_PROCESS = EngineOptions("beam", workers=1, pipeline_args=("--direct_running_mode=in_memory",), isolate=False)
N = 3  # recordings in the cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    synth.write_cohort(out, subjects=N, seconds=3, seed=11, size=(160, 120))
    return out


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, cohort) -> Path:
    out = tmp_path_factory.mktemp("baseline")
    preprocess(cohort, out)
    return out


@pytest.fixture
def out(tmp_path, baseline) -> Path:
    """A copy of the baseline output to run on again."""
    shutil.copytree(baseline, tmp_path / "out")
    return tmp_path / "out"


def preprocess(src, out, config=None, **kwargs) -> tuple[list[dict], list[str]]:
    logs = []
    rows = run_preprocess("synthetic", str(src), str(out), config or load_config(None), IN_PROCESS, log=logs.append,
                          **kwargs)
    return rows, logs


def shards(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("shards/**/*.parquet"))}


def manifest(out: Path) -> list[dict]:
    return read_manifest(str(out / "manifest.parquet"), fsspec.filesystem("file"))


def without_timing(rows):
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]


def assert_clean(out: Path) -> None:
    """No temp shard, probe, lock or engine file left anywhere under the output."""
    hidden = [str(p.relative_to(out)) for p in out.rglob(".*")]
    assert not hidden, hidden


def one_error_line(capsys, job: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"pulsepipe {job}: error: "), err
    return err


def config_file(tmp_path: Path, **settings) -> str:
    path = tmp_path / "config.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in settings.items()))
    return str(path)


def fail_some(monkeypatch, fail) -> None:
    """PreprocessStep fails the recordings for which fail(rec) returns a reason (ItemFailed), or raises it."""
    original = PreprocessStep._process

    def process(self, rec, item):
        why = fail(rec)
        if isinstance(why, Exception):
            raise why
        if why:
            raise ItemFailed(f"{rec.video}: {why}")
        return original(self, rec, item)

    monkeypatch.setattr(PreprocessStep, "_process", process)


def test_the_baseline_holds_every_recording(baseline):
    rows = manifest(baseline)
    assert len(rows) == N and {r["status"] for r in rows} == {"ok"}
    assert all(r["shard_bytes"] == (baseline / r["shard"]).stat().st_size for r in rows)
    assert all(r["source_fingerprint"] and r["latest_failure"] is None for r in rows)
    assert_clean(baseline)


# ---- settings and job-level problems: one line, exit 2, before any engine, nothing touched -------------

@pytest.mark.parametrize("key, value", [
    ("segment_frames", '"abc"'), ("segment_frames", "-5"), ("detect_every", "0"), ("block_frames", "2.5"),
    ("min_seconds", "-1"), ("min_source_fps", ".nan"), ("min_truth_coverage", "1.5"), ("detect_every", "true"),
])
def test_a_bad_setting_is_one_line_naming_the_key_and_touches_nothing(out, tmp_path, capsys, cohort, key, value):
    before, rows = shards(out), manifest(out)
    config = config_file(tmp_path, **{key: value})
    argv = ["preprocess", "--layout", "synthetic", "--input", str(cohort), "--output", str(out), "--config", config]
    assert cli.main(argv) == 2
    err = one_error_line(capsys, "preprocess")
    assert err.startswith(f"pulsepipe preprocess: error: {config}: {key}: expected "), err
    assert shards(out) == before and manifest(out) == rows
    assert_clean(out)


def test_a_bad_setting_from_a_caller_is_refused_too(out, cohort):
    with pytest.raises(JobError, match="^config: segment_frames: expected a whole number, 1 or more, got 0$"):
        preprocess(cohort, out, {**load_config(None), "segment_frames": 0})


@pytest.mark.parametrize("option, values", [("--hr-range", ["180", "30"]), ("--hr-range", ["60", "60"]),
                                            ("--factor-range", ["2", "0.5"])])
def test_augment_ranges_must_rise(tmp_path, capsys, baseline, option, values):
    argv = ["augment", "--input", str(baseline), "--output", str(tmp_path / "aug"), option, *values]
    assert cli.main(argv) == 2
    err = one_error_line(capsys, "augment")
    assert f"error: {option}: expected 2 values, each a number above 0, in increasing order" in err
    assert not (tmp_path / "aug").exists()


JOBS = {  # job: argv before --output, given the cohort and a preprocessed output
    "preprocess": lambda cohort, pre: ["preprocess", "--layout", "synthetic", "--input", str(cohort)],
    "augment": lambda cohort, pre: ["augment", "--input", str(pre)],
    "evaluate": lambda cohort, pre: ["evaluate", "--input", str(pre), "--model", "pos"],
}


@pytest.mark.parametrize("job", JOBS)
@pytest.mark.parametrize("where, said", [
    ("a-file", "is a file; the output must be a folder"),
    ("/sys/pulsepipe-test/out", "cannot create the output folder"),  # /sys refuses writes even to root
    ("/sys", "cannot write to the output folder"),
])
def test_an_output_that_cannot_be_written_is_one_line(tmp_path, capsys, cohort, baseline, job, where, said):
    output = tmp_path / where if where == "a-file" else Path(where)
    if where == "a-file":
        output.write_text("not a folder")
    assert cli.main([*JOBS[job](cohort, baseline), "--output", str(output)]) == 2
    assert f"error: {output}: {said}" in one_error_line(capsys, job)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_one_line(tmp_path, capsys, cohort):
    output = tmp_path / "ro"
    output.mkdir()
    output.chmod(0o555)
    assert cli.main([*JOBS["preprocess"](cohort, None), "--output", str(output)]) == 2
    assert "cannot write to the output folder" in one_error_line(capsys, "preprocess")


def damage(path: Path) -> bytes:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path.read_bytes()


@pytest.mark.parametrize("job", ["preprocess", "augment"])
def test_a_damaged_output_manifest_is_named_and_nothing_is_deleted(out, tmp_path, capsys, cohort, baseline, job):
    before, damaged = shards(out), damage(out / "manifest.parquet")
    assert cli.main([*JOBS[job](cohort, baseline), "--output", str(out)]) == 2
    assert f"error: {out}/manifest.parquet: not a readable manifest" in one_error_line(capsys, job)
    assert shards(out) == before and (out / "manifest.parquet").read_bytes() == damaged
    assert_clean(out)


@pytest.mark.parametrize("job", ["augment", "evaluate"])
def test_a_damaged_input_manifest_is_named(out, tmp_path, capsys, cohort, job):
    damage(out / "manifest.parquet")
    assert cli.main([*JOBS[job](cohort, out), "--output", str(tmp_path / "result")]) == 2
    assert f"error: {out}/manifest.parquet: not a readable manifest" in one_error_line(capsys, job)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_ray_address_fails_at_once_in_one_line(out, tmp_path, capsys, cohort):
    before, rows = shards(out), manifest(out)
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    argv = ["preprocess", "--layout", "synthetic", "--input", str(cohort), "--output", str(out), "--engine", "ray",
            "--ray-address", address, "--config", config_file(tmp_path, detect_every=3)]  # work to do
    started = time.monotonic()
    assert cli.main(argv) == 2
    assert time.monotonic() - started < 30
    err = one_error_line(capsys, "preprocess")
    assert f"--ray-address {address}: nothing answers there" in err and "RAY_AUTH_MODE=token" in err
    assert shards(out) == before and manifest(out) == rows
    assert_clean(out)


def test_a_ray_address_that_never_answers_fails_within_the_bound(tmp_path, cohort):
    with socket.socket() as silent:  # accepts connections, never speaks Ray
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        code = ("import sys, pipelines.engines.ray as r; r.CONNECT_TIMEOUT_S = 3.0; from pipelines import cli; "
                "sys.exit(cli.main(sys.argv[1:]))")
        started = time.monotonic()
        argv = ["preprocess", "--layout", "synthetic", "--input", str(cohort), "--output", str(tmp_path / "out"),
                "--engine", "ray", "--ray-address", address]
        done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 2, done.stderr
    assert time.monotonic() - started < 60
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "no Ray cluster answered within 3 s" in errors[0], errors
    assert "RAY_AUTH_MODE=token" in errors[0]


# ---- verified skips ----------------------------------------------------------------------------------

def test_a_shard_deleted_or_truncated_after_its_run_is_made_again(out, cohort, baseline):
    first, second = sorted(out.glob("shards/**/*.parquet"))[:2]
    first.unlink()
    damage(second)
    rows, logs = preprocess(cohort, out)
    assert f"{N - 2} unchanged, 2 to process" in logs[0]
    assert len(rows) == N and {r["status"] for r in rows} == {"ok"}
    assert shards(out) == shards(baseline)
    assert without_timing(manifest(out)) == without_timing(manifest(baseline))
    assert_clean(out)


def test_an_interrupted_run_with_another_config_leaves_no_shard_under_an_old_row(out, tmp_path, cohort, baseline):
    # what a run with min_seconds 1 leaves when killed after one recording: its shard, the old manifest.
    # The frames are the same; only the config hash inside tells them apart
    other = tmp_path / "other"
    preprocess(cohort, other, {**load_config(None), "min_seconds": 1.0})
    victim = sorted(shards(out))[0]
    shutil.copy(other / victim, out / victim)
    rows, logs = preprocess(cohort, out)
    assert f"{N - 1} unchanged, 1 to process" in logs[0]
    assert shards(out) == shards(baseline)
    assert without_timing(manifest(out)) == without_timing(manifest(baseline))
    assert_clean(out)


# ---- failures keep the last good shard; a run that fails alike changes nothing -------------------------

def test_a_recording_that_fails_keeps_its_previous_shard_until_a_run_succeeds(out, cohort, baseline, monkeypatch):
    old = {r["recording_id"]: r for r in manifest(baseline)}
    victim = sorted(old)[0]
    fail_some(monkeypatch, lambda rec: "decoder crashed" if rec.recording_id == victim else None)
    config = {**load_config(None), "detect_every": 3}
    rows, logs = preprocess(cohort, out, config)
    assert f"0 unchanged, {N} to process" in logs[0]
    by_id = {r["recording_id"]: r for r in manifest(out)}
    assert len(by_id) == N and {r["status"] for r in by_id.values()} == {"ok"}
    kept = by_id[victim]
    assert kept["latest_failure"].endswith(": decoder crashed")
    assert without_timing([{**kept, "latest_failure": None}]) == without_timing([old[victim]])
    assert (out / kept["shard"]).read_bytes() == shards(baseline)[kept["shard"]]
    assert all(by_id[k]["config_hash"] != old[k]["config_hash"] for k in by_id if k != victim)
    assert f"failed: {victim}: " in logs[-1] and "its previous shard is kept" in logs[-1]
    assert next(i for i in work_items(list(by_id.values())) if i["recording_id"] == victim)["reason"] is None
    assert_clean(out)

    monkeypatch.undo()  # the fault is gone: the next run retries it alone, and replaces the shard
    rows, logs = preprocess(cohort, out, config)
    assert f"{N - 1} unchanged, 1 to process" in logs[0]
    again = {r["recording_id"]: r for r in manifest(out)}[victim]
    assert again["latest_failure"] is None and again["config_hash"] == by_id[sorted(by_id)[1]]["config_hash"]
    assert (out / again["shard"]).read_bytes() != shards(baseline)[again["shard"]]
    assert_clean(out)


def test_a_run_whose_every_recording_fails_alike_changes_nothing(out, cohort, monkeypatch):
    before, manifest_bytes = shards(out), (out / "manifest.parquet").read_bytes()
    fail_some(monkeypatch, lambda rec: RuntimeError("libavcodec.so.60: cannot open shared object file"))
    with pytest.raises(JobError, match=f"^all {N} recordings to make failed the same way, so this run changed "
                                       r"nothing \(no shard removed, the manifest as it was\): .*libavcodec"):
        preprocess(cohort, out, {**load_config(None), "detect_every": 3})
    assert shards(out) == before and (out / "manifest.parquet").read_bytes() == manifest_bytes
    assert_clean(out)


def test_new_recordings_that_fail_alike_are_dead_letters_not_a_job_fault(tmp_path, cohort, monkeypatch):
    fail_some(monkeypatch, lambda rec: "cannot decode: moov atom not found")  # say, every upload truncated
    rows, logs = preprocess(cohort, tmp_path / "out")
    assert len(manifest(tmp_path / "out")) == N and {r["status"] for r in rows} == {"failed"}
    assert all(r["reason"].endswith("moov atom not found") for r in rows)
    assert_clean(tmp_path / "out")


# ---- one writer per output root ---------------------------------------------------------------------

def test_a_second_run_on_a_held_output_is_refused_naming_the_holder(out, capsys, cohort):
    before = shards(out)
    with lock.OutputLock(str(out)):
        assert cli.main(["preprocess", "--layout", "synthetic", "--input", str(cohort), "--output", str(out)]) == 2
    err = one_error_line(capsys, "preprocess")
    assert f"{out}: in use by another run (pid {os.getpid()} on {socket.gethostname()}, started " in err
    assert "--wait-for-lock" in err and shards(out) == before
    assert_clean(out)


def test_two_concurrent_runs_one_refused_one_waiting(tmp_path, capsys, cohort, monkeypatch):
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "preprocess", "--layout", "synthetic", "--input",
                              str(cohort), "--output", str(out), "--workers", "1"],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / lock.LOCK_NAME).exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        argv = ["preprocess", "--layout", "synthetic", "--input", str(cohort), "--output", str(out)]
        assert cli.main(argv) == 2
        assert f"in use by another run (pid {first.pid} on " in one_error_line(capsys, "preprocess")
        monkeypatch.setattr(lock, "WAIT_POLL_S", 0.2)
        rows, logs = preprocess(cohort, out, wait_for_lock=True)
        assert first.wait(timeout=300) == 0, first.communicate()
    finally:
        if first.poll() is None:
            first.kill()
    assert logs[0].startswith(f"waiting for the output, held by pid {first.pid} on ")
    assert f"{N} unchanged, 0 to process" in logs[1]
    assert len(manifest(out)) == N and {r["status"] for r in rows} == {"ok"}
    assert_clean(out)


def write_lock(root: Path, **holder) -> Path:
    path = root / lock.LOCK_NAME
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": "then",
                                "command": "pulsepipe preprocess ...", "heartbeat": time.time(), **holder}))
    return path


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("holder", [
    {"pid": "dead"},  # this host, the process is gone
    {"pid_start": "0"},  # this host, the pid now belongs to another process (this one)
    {"host": "elsewhere", "heartbeat": time.time() - lock.STALE_S - 60},  # another host, silent too long
])
def test_a_lock_left_by_a_dead_run_is_cleared(tmp_path, holder):
    write_lock(tmp_path, **{**holder, "pid": dead_pid()} if holder.get("pid") == "dead" else holder)
    logs = []
    with lock.OutputLock(str(tmp_path), log=logs.append) as held:
        assert json.loads((tmp_path / lock.LOCK_NAME).read_text())["token"] == held.holder["token"]
    assert logs[0].startswith("clearing the lock of a run that is gone") and not (tmp_path / lock.LOCK_NAME).exists()
    assert_clean(tmp_path)


@pytest.mark.parametrize("holder", [{"host": "elsewhere"}, {"pid": 1}])
def test_a_live_holder_keeps_its_lock(tmp_path, holder):
    path = write_lock(tmp_path, **holder)
    with pytest.raises(JobError, match=f"in use by another run \\(pid {holder.get('pid', os.getpid())} on "
                                       f"{holder.get('host', socket.gethostname())}, started then: pulsepipe"):
        lock.OutputLock(str(tmp_path)).__enter__()
    assert path.exists()


def test_a_lock_file_being_written_counts_as_held_until_it_is_old(tmp_path):
    path = tmp_path / lock.LOCK_NAME
    path.write_bytes(b"")
    with pytest.raises(JobError, match="unreadable lock file, 0 bytes"):
        lock.OutputLock(str(tmp_path)).__enter__()
    old = time.time() - lock.STALE_S - 60
    os.utime(path, (old, old))
    with lock.OutputLock(str(tmp_path), log=lambda *_: None):
        pass
    assert not path.exists()


def test_waiting_for_a_lock_takes_it_when_released(tmp_path):
    first = lock.OutputLock(str(tmp_path)).__enter__()
    threading.Timer(0.5, first.__exit__, (None, None, None)).start()
    logs = []
    started = time.monotonic()
    with lock.OutputLock(str(tmp_path), wait=True, log=logs.append, poll_s=0.05):
        assert time.monotonic() - started >= 0.5
    assert logs == [f"waiting for the output, held by pid {os.getpid()} on {socket.gethostname()}, started "
                    f"{first.holder['started']}: {first.holder['command']}"]
    assert_clean(tmp_path)


def test_the_holder_refreshes_its_heartbeat_and_never_removes_another_runs_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "HEARTBEAT_S", 0.05)
    path = tmp_path / lock.LOCK_NAME
    with lock.OutputLock(str(tmp_path)):
        beat = json.loads(path.read_text())["heartbeat"]
        deadline = time.monotonic() + 10
        while json.loads(path.read_text())["heartbeat"] == beat:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        monkeypatch.setattr(lock, "HEARTBEAT_S", 1000.0)
        time.sleep(0.2)  # the beat now waits: the takeover below cannot land between its read and its write
        write_lock(tmp_path, host="elsewhere", token="theirs")  # taken over meanwhile (we were thought dead)
    assert json.loads(path.read_text())["token"] == "theirs"


def test_the_lock_on_an_object_store_is_created_only_if_absent():
    root = f"memory://pulsepipe-lock-{os.getpid()}"
    fs = fsspec.filesystem("memory")
    try:
        with lock.OutputLock(root):
            with pytest.raises(JobError, match="in use by another run"):
                lock.OutputLock(root).__enter__()
        assert not fs.exists(f"{root}/{lock.LOCK_NAME}")
    finally:
        if fs.exists(root):
            fs.rm(root, recursive=True)
