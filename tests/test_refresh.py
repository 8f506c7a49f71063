"""`pulsepipe refresh` end to end on synthetic data: registry, idempotence, the gate, faults, refusals."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from model.weights import load_initial_state, load_params, weights_path
from pipelines.cli import main as cli
from pipelines.engines import EngineOptions
from pipelines.errors import JobError
from pipelines.refresh import load_config, run_refresh
from pipelines.registry import Registry

ROOT = Path(__file__).resolve().parent.parent
OPTS = EngineOptions("beam", workers=1)
TRAIN = {"seq_len": 160, "batch_size": 2, "micro_batch": 1, "epochs": 1, "validate_every": 1000,
         "checkpoint_every": 1}


def synth(out: Path, subjects: int, seed: int, first_id: int = 1) -> None:
    """A tiny synthetic cohort in out/, its subjects numbered from first_id (s001, ... or s101, ...)."""
    tmp = out.parent / f".synth-{seed}"
    assert cli(["synth", str(tmp), "--subjects", str(subjects), "--seconds", "12", "--seed", str(seed),
                "--size", "160x120"]) == 0
    out.mkdir(parents=True, exist_ok=True)
    for k in range(subjects):
        old, new = f"s{k + 1:03d}", f"s{first_id + k:03d}"
        (tmp / old / f"{old}-r01").rename(tmp / old / f"{new}-r01")
        (tmp / old).rename(out / new)
    shutil.rmtree(tmp)


def write_config(base: Path, **changes) -> Path:
    cfg = {"datasets": [{"name": "lab", "layout": "synthetic", "uri": str(base / "ds")}],
           "work": str(base / "work"), "registry": str(base / "registry"), "augment": {"extra": 0.3},
           "train": TRAIN, "train_steps": 2, "heldout": {"fraction": 0.3, "seed": 2}, "evaluate": {"bootstrap": 50},
           **changes}
    path = base / "refresh.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def refresh(config: Path, **changes) -> dict:
    cfg = load_config(str(config))
    for key, value in changes.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    return run_refresh(cfg, OPTS, log=lambda *_: None)


def snapshot(registry: Path) -> dict:
    """Every file of the registry and its bytes (the lock left out)."""
    return {str(p.relative_to(registry)): p.read_bytes() for p in sorted(registry.rglob("*"))
            if p.is_file() and p.name != ".pulsepipe.lock"}


@pytest.fixture(scope="module")
def first_two(tmp_path_factory):
    """Run 1 on a new registry, then run 2 with nothing new; (base folder, their history rows, the registry
    after run 1).

    Run 2 re-lists the data (preprocess and augment find nothing to do) but may neither train nor evaluate: both
    raise if they are called."""
    base = tmp_path_factory.mktemp("refresh")
    synth(base / "ds", 6, seed=0)
    config = write_config(base)
    first = refresh(config)
    after_first = snapshot(base / "registry")

    def forbidden(*_, **__):
        raise AssertionError("run 2 did work although nothing changed")

    with pytest.MonkeyPatch.context() as mp:
        for target in ("run_evaluate", "train_job.run_train", "train_job.run_train_on_ray"):
            mp.setattr("pipelines.refresh." + target, forbidden)
        second = refresh(config)
    return base, first, second, after_first


# ---- the config -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes, named", [
    ({"gate": {"margin": -1}}, "margin"),
    ({"train": {"lr": "fast"}}, "lr"),
    ({"heldout": {"fraction": 1.5}}, "fraction"),
    ({"datasets": [{"name": "lab", "layout": "nope", "uri": "/x"}]}, "layout"),
    ({"registry": None}, "registry"),
    ({"colour": "blue"}, "colour"),
    ({"train": {"batch_size": 3, "micro_batch": 2}}, "micro_batch"),
])
def test_a_bad_config_value_is_one_line_naming_the_key_and_exit_2(tmp_path, capsys, changes, named):
    config = write_config(tmp_path, **changes)
    assert cli(["refresh", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err and str(config) in err
    assert not (tmp_path / "registry").exists() and not (tmp_path / "work").exists()  # before any work


# ---- end to end -------------------------------------------------------------------------------------------

def test_run_1_creates_the_registry_and_version_1_trained_without_the_held_out_subjects(first_two):
    base, first, _, _ = first_two
    reg = Registry(str(base / "registry"))
    assert (first["decision"], reg.champion(), reg.versions()) == ("promoted", "v0001", ["v0001"])
    version = base / "registry/models/v0001"
    for name in ("best.weights.h5", "best.state.npz", "model_card.json", "metrics.parquet", "report.html",
                 "refresh.html", "refresh.json"):
        assert (version / name).is_file(), name
    held = {tuple(k) for k in reg.split()["subjects"]}
    assert 1 <= len(held) < 6
    card = json.loads((version / "model_card.json").read_text())
    config = json.loads((version / "config.json").read_text())  # the train run's: what it left out
    assert {tuple(k) for k in config["exclude_subjects"]} == held
    assert card["data_fingerprint"] == first["data_fingerprint"] == reg.info("v0001")["recipe"]["data_fingerprint"]
    assert card["lineage"] == {"init": "published:rlap"}
    gate = reg.info("v0001")["gate"]
    assert gate[0]["candidate"] is not None and gate[0]["candidate_lo"] <= gate[0]["candidate"] <= gate[0]["candidate_hi"]
    assert "first version" in (version / "refresh.html").read_text()


def test_run_2_with_nothing_new_changes_nothing_and_says_so(first_two):
    base, _, second, after_first = first_two
    assert second["decision"] == "nothing changed" and second["champion_after"] == "v0001"
    now = snapshot(base / "registry")
    assert {k: v for k, v in now.items() if k != "history.parquet"} == \
        {k: v for k, v in after_first.items() if k != "history.parquet"}
    history = Registry(str(base / "registry")).history()
    assert [h["decision"] for h in history] == ["promoted", "nothing changed"]


def test_evaluate_takes_the_registry_as_its_champion(first_two, tmp_path, capsys):
    base = first_two[0]
    registry, version = base / "registry", base / "registry/models/v0001"
    assert weights_path(registry) == version / "best.weights.h5"
    states = [jax.tree.leaves(load_initial_state(None, w)) for w in (registry, version)]
    assert all(np.array_equal(a, b) for a, b in zip(*states))
    assert cli(["evaluate", "--input", str(base / "work/heldout"), "--output", str(tmp_path / "ev"),
                "--model", f"me-chunk:{registry}", f"me-chunk:{version}", "--workers", "1", "--bootstrap", "20"]) == 0
    rows = [r for r in pq.read_table(tmp_path / "ev/metrics.parquet").to_pylist() if r["level"] == "cohort"]
    assert len(rows) == 2 and rows[0]["mae"] == rows[1]["mae"]  # the same weights by both names
    assert rows[0]["mae"] == pytest.approx(Registry(str(registry)).info("v0001")["gate"][0]["candidate"])


def test_a_failing_phase_is_recorded_and_leaves_the_champion(first_two, tmp_path, capsys):
    base = first_two[0]
    shutil.copytree(base / "registry", tmp_path / "registry")
    config = write_config(tmp_path, work=str(base / "work"),
                          datasets=[{"name": "lab", "layout": "synthetic", "uri": str(tmp_path / "gone")}])
    assert cli(["refresh", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "preprocess failed" in err[0] and "champion is unchanged (v0001)" in err[0]
    reg = Registry(str(tmp_path / "registry"))
    last = reg.history()[-1]
    assert (reg.champion(), last["status"], last["phase"]) == ("v0001", "failed", "preprocess")
    assert str(tmp_path / "gone") in last["reason"]


def test_a_second_refresh_on_a_held_registry_is_refused_naming_the_first(tmp_path, capsys):
    registry = tmp_path / "registry"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from pipelines.lock import claimed_output\n"
        f"with claimed_output({str(registry)!r}):\n    print('held', flush=True); time.sleep(60)"), "first-refresh"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        synth(tmp_path / "ds", 2, seed=0)
        assert cli(["refresh", "--config", str(write_config(tmp_path))]) == 2
        err = capsys.readouterr().err
        assert "in use by another run" in err and f"pid {holder.pid}" in err and "first-refresh" in err
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert not (tmp_path / "work").exists()  # refused before any work


# ---- slow: new data, the gate, a killed run -------------------------------------------------------------------

@pytest.mark.slow
def test_new_subjects_are_preprocessed_alone_trained_gated_and_a_diverging_candidate_is_kept_out(tmp_path):
    base = tmp_path
    synth(base / "ds", 6, seed=0)
    config = write_config(base)
    refresh(config)
    shards = {p: p.stat().st_mtime_ns for p in (base / "work/lab/pre/shards").rglob("*.parquet")}
    synth(base / "ds", 2, seed=5, first_id=101)
    third = refresh(config)
    changes = json.loads(third["changes_json"])["lab"]
    assert (changes["new"], changes["changed"], changes["new_subjects"]) == (2, 0, ["s101", "s102"])
    assert all(p.stat().st_mtime_ns == t for p, t in shards.items())  # the old recordings were not redone
    reg = Registry(str(base / "registry"))
    assert third["candidate"] == "v0002" and third["decision"] in ("promoted", "kept") and third["reason"]
    gate = reg.info("v0002")["gate"][0]
    assert gate["champion"] is not None and gate["candidate"] is not None
    assert (gate["candidate"] < gate["champion"]) == (third["decision"] == "promoted")
    assert {tuple(k) for k in reg.split()["subjects"]}.isdisjoint({("synthetic", "s101"), ("synthetic", "s102")})
    champion = reg.champion()
    assert reg.info("v0002")["parent"] == "v0001"

    synth(base / "ds", 2, seed=6, first_id=201)
    worse = refresh(config, train={"lr": 10.0})
    assert (worse["decision"], worse["candidate"], reg.champion()) == ("kept", "v0003", champion)
    assert "not better" in worse["reason"] or "could not be scored" in worse["reason"]
    again = refresh(config, train={"lr": 10.0})  # the rejected recipe is not trained again
    assert again["decision"] == "nothing changed" and reg.versions() == ["v0001", "v0002", "v0003"]


@pytest.mark.slow
def test_a_refresh_killed_mid_train_leaves_the_registry_and_the_next_run_ends_as_an_undisturbed_one(tmp_path):
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    for base in (killed, straight):
        synth(base / "ds", 6, seed=0)
        write_config(base, train_steps=4)
    refresh(straight / "refresh.yaml")

    child = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "refresh", "--config",
                              str(killed / "refresh.yaml"), "--workers", "1"], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list((killed / "work/runs").glob("*/checkpoint.npz")) and child.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    reg = Registry(str(killed / "registry"))
    assert (reg.champion(), reg.versions(), reg.history()) == (None, [], [])

    resumed = refresh(killed / "refresh.yaml")
    assert resumed["decision"] == "promoted" and reg.champion() == "v0001"
    a, b = (load_params(str(base / "registry/models/v0001")) for base in (killed, straight))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert reg.info("v0001")["gate"] == Registry(str(straight / "registry")).info("v0001")["gate"]


def test_the_dry_run_changes_nothing(tmp_path, capsys):
    synth(tmp_path / "ds", 2, seed=0)
    config = write_config(tmp_path)
    assert cli(["refresh", "--config", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 to preprocess" in out and "champion none yet" in out
    assert not (tmp_path / "registry").exists() and not (tmp_path / "work").exists()


def test_load_config_reads_the_documented_defaults(tmp_path):
    cfg = load_config(str(write_config(tmp_path)))
    assert cfg["gate"] == {"metric": "mae", "margin": 0.0} and cfg["first_init"] == "published:rlap"
    with pytest.raises(JobError, match="work: expected a local folder"):
        load_config(str(write_config(tmp_path, work="gs://bucket/work")))


# ---- scheduling: infra/refresh/ ------------------------------------------------------------------------------

def test_the_cronjob_runs_refresh_on_the_ray_clusters_image_at_the_packages_version():
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    cron_job, claim = yaml.safe_load_all((ROOT / "infra/refresh/cronjob.yaml").read_text())
    assert cron_job["kind"] == "CronJob" and claim["kind"] == "PersistentVolumeClaim"
    for doc in (cron_job, claim):
        assert doc["metadata"]["labels"]["app.kubernetes.io/version"] == version
    (container,) = cron_job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    cluster = yaml.safe_load((ROOT / "infra/ray/raycluster.yaml").read_text())["spec"]
    assert container["image"] == cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    command = container["command"]
    assert command[:2] == ["pulsepipe", "refresh"] and command[command.index("--engine") + 1] == "ray"
    assert command[command.index("--ray-address") + 1].startswith("ray://pulsepipe-head-svc")
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["name"] == "ray-head"
    assert all("value" not in e or "KEY" not in e["name"] for e in container.get("env", []))  # no secrets inline


def test_the_single_machine_schedules_run_refresh():
    import configparser

    cron = [line for line in (ROOT / "infra/refresh/crontab").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert len(cron) == 1 and len(cron[0].split()) > 5 and "pulsepipe refresh --config" in cron[0]
    for name, section, key in (("pulsepipe-refresh.service", "Service", "ExecStart"),
                               ("pulsepipe-refresh.timer", "Timer", "OnCalendar")):
        unit = configparser.ConfigParser(strict=False, interpolation=None)
        unit.read_string((ROOT / "infra/refresh" / name).read_text())
        assert unit.has_option(section, key), name
    service = configparser.ConfigParser(strict=False, interpolation=None)
    service.read_string((ROOT / "infra/refresh/pulsepipe-refresh.service").read_text())
    assert "pulsepipe refresh --config" in service["Service"]["ExecStart"]
