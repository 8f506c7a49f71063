"""Refresh the model on new data: preprocess, augment, retrain from the champion, gate, register.

One run (one process, each job called through its Python entry point) goes through phases; a failure in
any of them is one line (exit 2), recorded in the registry's history with the phase and the reason, and
leaves the champion as it was:
  1. preprocess  each dataset incrementally into WORK/<name>/pre (unchanged recordings skipped)
  2. split       the held-out subjects: REGISTRY/split.json, or at the first version chosen by
                 sha256("heldout", seed, dataset, subject) < fraction (at least one held out, one trained) and
                 frozen; subjects that arrive later always go to training, so every candidate is judged on
                 the same subjects (their new recordings join the held-out set: both models see them)
  3. augment     each dataset into WORK/<name>/aug (incremental; the held-out subjects' copies are made but,
                 like the subjects, never trained on)
  4. held-out    WORK/heldout: a manifest of the held-out subjects' recordings, shards hard-linked (copied
                 where links cannot be made) from the preprocess roots
  5. train       only if the recipe changed since the champion (the training data's fingerprint, with the
                 held-out subjects excluded, `transforms.sequences.data_fingerprint`, the train settings,
                 train_steps) and no candidate of this recipe was already rejected: warm-started from the
                 champion (version 1: from `first_init`, published:rlap by default, trained like any other);
                 in WORK/runs/<key>, keyed by recipe and init, so a killed refresh resumes it (`--resume`, bit
                 for bit) or, without a checkpoint yet, starts it again
  6. evaluate    champion and candidate together on WORK/heldout (metrics with bootstrap intervals)
  7. gate        promote when candidate metric + margin < champion's on every held-out dataset (a candidate
                 with no score on a dataset is rejected); version 1 only needs a score
  8. register    REGISTRY/models/<version>/ (pipelines.registry), the champion pointer replaced atomically
                 when promoted, and a history row. Rejected candidates are registered too (a record of which
                 data made which model) but never become champion.
Nothing new: phases 1-4 find nothing to do, the run says "nothing changed" and adds only its history row.
Two refreshes on one registry: the second is refused naming the first (`--wait-for-lock` waits).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import fsspec
import yaml

from pipelines import preprocess as preprocess_job
from pipelines import train as train_job
from pipelines.augment import run_augment
from pipelines.engines import EngineOptions, add_engine_arguments, engine_options
from pipelines.errors import JobError
from pipelines.evaluate import EvaluateSettings, run_evaluate
from pipelines.lock import add_lock_argument, claimed_output
from pipelines.refresh_report import gate_rows, refresh_html
from pipelines.registry import HISTORY, Registry
from pipelines.settings import Rule, check, choice, number, optional, whole
from pipelines.shard_job import manifest_rows
from transforms import sequences
from transforms.datasets import LAYOUTS
from transforms.manifest import config_hash, manifest_uri, write_manifest

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "refresh.yaml"
PASSES_PIPELINE_ARGS = True  # unknown --options go to Beam, as preprocess's do
_TEXT = Rule(lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty string")
_NAME = Rule(lambda v: isinstance(v, str) and v.replace("-", "").replace("_", "").isalnum(),
             "a name of letters, digits, - and _")
_SECTION = Rule(lambda v: isinstance(v, dict), "a mapping of settings")
RULES = {
    "datasets": Rule(lambda v: isinstance(v, list) and bool(v), "a list of {name, layout, uri}, at least one"),
    "work": optional(_TEXT), "registry": optional(_TEXT), "preprocess": _SECTION, "augment": _SECTION,
    "train": _SECTION, "train_steps": optional(whole(1)), "train_workers": optional(whole(1)),
    "first_init": choice(*train_job.INITS), "heldout": _SECTION, "gate": _SECTION, "evaluate": _SECTION,
}
SECTION_RULES = {
    "augment": {"extra": number(minimum=0), "seed": whole(0)},
    "heldout": {"fraction": number(above=0, below=1), "seed": whole(0)},
    "gate": {"metric": choice("mae", "rmse", "mape"), "margin": number(minimum=0)},
    "evaluate": {"bootstrap": whole(1), "seed": whole(0), "recordings_per_call": whole(1)},
}
DATASET_RULES = {"name": _NAME, "layout": choice(*LAYOUTS), "uri": _TEXT}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Defaults and the config's keys: configs/refresh.yaml. The registry's champion loads wherever "
                "weights do: evaluate --model me-chunk:REGISTRY, infer --weights REGISTRY, live --model REGISTRY.")
    p.add_argument("--config", required=True, metavar="FILE", help="the refresh's YAML (datasets, work, registry, ...)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config and say what a run would do (recordings to preprocess, whether it would "
                        "train), changing nothing")
    add_lock_argument(p)
    add_engine_arguments(p, gpus=True)


# ---- the config ------------------------------------------------------------------------------------------

def load_config(path: str) -> dict:
    """The defaults of configs/refresh.yaml overridden by the YAML at `path` (sections key by key), every value
    checked, the train and preprocess settings by their jobs' rules; JobError naming the file and the key."""
    defaults = yaml.safe_load(DEFAULT_CONFIG.read_text())
    try:
        with fsspec.open(path, "r") as f:
            override = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise JobError(f"{path}: cannot read the config: {' '.join(str(e).split())}") from None
    if not isinstance(override, dict):
        raise JobError(f"{path}: expected settings as YAML keys and values, got {type(override).__name__}")
    cfg = check({**defaults, **override}, RULES, path)
    for key in ("work", "registry"):
        if cfg[key] is None:
            raise JobError(f"{path}: setting {key} is missing")
    if "://" in cfg["work"] and not cfg["work"].startswith("file://"):
        raise JobError(f"{path}: work: expected a local folder (train runs and h5 weights are local files), "
                       f"got {cfg['work']!r}")
    cfg["work"] = cfg["work"].removeprefix("file://")
    for section, rules in SECTION_RULES.items():
        cfg[section] = check({**defaults[section], **cfg[section]}, rules, f"{path}: {section}")
    for k, ds in enumerate(cfg["datasets"]):
        check(ds if isinstance(ds, dict) else {"name": ds}, DATASET_RULES, f"{path}: datasets[{k}]")
    names = [ds["name"] for ds in cfg["datasets"]]
    if len(set(names)) != len(names):
        raise JobError(f"{path}: datasets: names repeat ({', '.join(names)}); each names its folder under work")
    cfg["preprocess"] = check({**preprocess_job.load_config(None), **cfg["preprocess"]}, preprocess_job.RULES,
                              f"{path}: preprocess")
    train_defaults = yaml.safe_load(train_job.DEFAULT_CONFIG.read_text())
    cfg["train"] = check({**train_defaults, **cfg["train"]}, train_job.RULES, f"{path}: train")
    train_job.check_batching(cfg["train"], f"{path}: train", cfg["train_workers"] or 1)
    return cfg


# ---- the data: roots, held-out split, held-out view, fingerprint ---------------------------------------------

def roots(cfg: dict, name: str) -> tuple[str, str]:
    """A dataset's preprocess and augment output roots under the work root."""
    base = Path(cfg["work"]) / name
    return str(base / "pre"), str(base / "aug")


def training_roots(cfg: dict) -> tuple[str, ...]:
    """Every dataset's preprocess root and, where augment made one, its augment root: train's --input."""
    out = []
    for ds in cfg["datasets"]:
        pre, aug = roots(cfg, ds["name"])
        out += [pre] + ([aug] if manifest_rows(aug) else [])
    return tuple(out)


def choose_heldout(subjects: set[tuple[str, str]], fraction: float, seed: int) -> dict:
    """The held-out subjects by stable hash (at least one held out and one trained); JSON for split.json."""
    if len(subjects) < 2:
        raise JobError(f"{len(subjects)} subject(s) with recordings: a refresh needs at least 2, one to hold out "
                       "for evaluation and one to train on")
    ranked = sorted(subjects, key=lambda k: sequences.unit_hash("heldout", seed, *k))
    held = [k for k in ranked if sequences.unit_hash("heldout", seed, *k) < fraction] or ranked[:1]
    held = held[:len(ranked) - 1]
    return {"method": 'sha256("heldout", seed, dataset, subject_id) < fraction', "fraction": fraction, "seed": seed,
            "frozen": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "subjects": sorted([list(k) for k in held]), "new_subjects": "train"}


def write_heldout_view(cfg: dict, heldout: set[tuple[str, str]]) -> str:
    """WORK/heldout: the held-out subjects' manifest rows of every dataset, their shards linked in; the
    manifest rewritten only when it changes (evaluate keys its resumable parts on it). Returns its root."""
    view = Path(cfg["work"]) / "heldout"
    rows, wanted = [], set()
    for ds in cfg["datasets"]:
        pre = Path(roots(cfg, ds["name"])[0])
        for r in manifest_rows(str(pre)):
            if (r["dataset"], r["subject_id"]) not in heldout:
                continue
            if r["shard"]:
                shard = f"shards/{ds['name']}/{Path(r['shard']).name}"
                _link(pre / r["shard"], view / shard)
                wanted.add(view / shard)
                r = {**r, "shard": shard}
            rows.append(r)
    for old in (view / "shards").glob("*/*") if (view / "shards").is_dir() else ():
        if old not in wanted:
            old.unlink()
    fs = fsspec.filesystem("file")
    if manifest_rows(str(view)) != rows:
        write_manifest(rows, manifest_uri(str(view)), fs)
    return str(view)


def _link(src: Path, dst: Path) -> None:
    """dst the same file as src: a hard link, or a copy where the disk takes none; redone when src was replaced."""
    if dst.exists() and (os.path.samefile(src, dst) or (dst.stat().st_size, dst.stat().st_mtime) ==
                         (src.stat().st_size, src.stat().st_mtime)):
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}")
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def training_fingerprint(inputs: tuple[str, ...], heldout: set[tuple[str, str]]) -> str:
    """The data fingerprint train will record for these inputs with the held-out subjects excluded."""
    return sequences.data_fingerprint(sequences.without_subjects(sequences.load_manifests(inputs), heldout))


def recipe_of(cfg: dict, fingerprint: str) -> dict:
    """What a candidate is made of besides its starting weights: a change in any of it trains a new one."""
    return {"data_fingerprint": fingerprint, "train": cfg["train"], "train_steps": cfg["train_steps"]}


def _changes(before: list[dict], after: list[dict]) -> dict:
    """Recordings new, changed (fingerprint) and gone between two manifests of a root, and new subjects."""
    old = {(r["dataset"], r["recording_id"]): r for r in before}
    new = {(r["dataset"], r["recording_id"]): r for r in after}
    subjects_before = {(r["dataset"], r["subject_id"]) for r in before}
    return {"new": len(new.keys() - old.keys()), "gone": len(old.keys() - new.keys()),
            "changed": sum(old[k]["fingerprint"] != new[k]["fingerprint"] for k in new.keys() & old.keys()),
            "ok": sum(r["status"] == "ok" for r in after),
            "new_subjects": sorted({r["subject_id"] for r in after} - {s for _, s in subjects_before})}


# ---- one run ----------------------------------------------------------------------------------------------

class Refresh:
    """One refresh run on a locked registry: `run()` returns its history row, or raises JobError having
    recorded the failed phase."""

    def __init__(self, cfg: dict, opts: EngineOptions, registry: Registry, log=print):
        self.cfg, self.opts, self.reg, self.log = cfg, opts, registry, log
        self.work = Path(cfg["work"])
        self.phase = "start"
        self.row = {"refresh_id": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6],
                    "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                    "command": " ".join(sys.argv)[:300], "champion_before": registry.champion()}
        self.row["champion_after"] = self.row["champion_before"]

    def run(self) -> dict:
        started = time.perf_counter()
        try:
            self._phases()
        except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - every failure is recorded, then said
            reason = str(e) if isinstance(e, JobError) else f"{type(e).__name__}: {' '.join(str(e).split())}"
            self.row.update(status="failed", decision="failed", phase=self.phase, reason=reason,
                            champion_after=self.reg.champion(), seconds=time.perf_counter() - started)
            self.reg.append_history(self.row)
            raise JobError(f"{self.phase} failed: {reason}; the champion is unchanged "
                           f"({self.row['champion_before'] or 'none yet'}); recorded in {self.reg.uri}/{HISTORY}"
                           ) from None
        self.row.update(status="ok", seconds=time.perf_counter() - started)
        self.reg.append_history(self.row)
        self.log(f"refresh {self.row['refresh_id']}: {self.row['decision']}: {self.row['reason']} "
                 f"({self.row['seconds']:.1f} s)")
        return self.row

    def _phases(self) -> None:
        cfg, cpu = self.cfg, dataclasses.replace(self.opts, num_gpus=0.0)  # only evaluate runs a model
        self.phase = "preprocess"
        changes = {}
        for ds in cfg["datasets"]:
            pre = roots(cfg, ds["name"])[0]
            before = manifest_rows(pre)
            after = preprocess_job.run_preprocess(ds["layout"], ds["uri"], pre, cfg["preprocess"], cpu, self.log)
            changes[ds["name"]] = _changes(before, after)
        self.row["changes_json"] = json.dumps(changes, sort_keys=True)
        self.row["recordings_added"] = sum(c["new"] + c["changed"] for c in changes.values())
        self.phase = "split"
        split = self._split()
        heldout = {tuple(k) for k in split["subjects"]}
        if cfg["augment"]["extra"] > 0:
            self.phase = "augment"
            for ds in cfg["datasets"]:
                pre, aug = roots(cfg, ds["name"])
                run_augment(pre, aug, cpu, extra=cfg["augment"]["extra"], seed=cfg["augment"]["seed"], log=self.log)
        self.phase = "held-out view"
        view = write_heldout_view(cfg, heldout)
        inputs = training_roots(cfg)
        recipe = recipe_of(cfg, training_fingerprint(inputs, heldout))
        self.row["data_fingerprint"] = recipe["data_fingerprint"]
        champion, recipe_key = self.row["champion_before"], config_hash(recipe)
        same = self._same_recipe(champion, recipe_key)
        if same:
            self.row.update(decision="nothing changed", reason=same)
            return
        self.phase = "train"
        init = str(self.reg.local_folder(champion, self.work / "registry-cache")) if champion else cfg["first_init"]
        run_key = config_hash({**recipe, "init": champion or cfg["first_init"], "heldout": split["subjects"]})[:16]
        run_dir = self._train(inputs, init, heldout, self.work / "runs" / run_key)
        self.phase = "evaluate"
        models = ([f"me-chunk:{init}"] if champion else []) + [f"me-chunk:{run_dir}"]
        eval_dir = self.work / "evaluations" / run_key
        ev = cfg["evaluate"]
        if (run_dir / "best.weights.h5").is_file():
            metrics = run_evaluate(EvaluateSettings(view, str(eval_dir), models=tuple(models), n_boot=ev["bootstrap"],
                                                    seed=ev["seed"], recordings_per_call=ev["recordings_per_call"]),
                                   self.opts, self.log)["metrics"]
        else:  # no validation scored its output (it diverged): nothing to evaluate, the gate rejects it
            metrics = []
        self.phase = "gate"
        gate = gate_rows(metrics, models[-1], models[0] if champion else None, cfg["gate"])
        if not gate:
            gate = [{"dataset": "all", "candidate": None, "candidate_lo": None, "candidate_hi": None,
                     "candidate_row": {}, "champion": None, "champion_lo": None, "champion_hi": None,
                     "champion_row": {}}]
        promote, reason = decide(gate, champion, cfg["gate"])
        self.phase = "register"
        version = self.reg.next_version()
        self.row.update(candidate=version, decision="promoted" if promote else "kept", reason=reason,
                        champion_after=version if promote else champion,
                        report=f"{self.reg.uri}/models/{version}/refresh.html", **_history_metrics(gate))
        info = {"version": version, "parent": champion or cfg["first_init"], "recipe": recipe,
                "recipe_key": recipe_key, "run_key": run_key, "inputs": list(inputs), "decision": self.row["decision"],
                "reason": reason, "gate": gate, "refresh_id": self.row["refresh_id"], "changes": changes,
                "heldout_subjects": split["subjects"], "created": self.row["started"]}
        html = refresh_html(self.row, changes, gate, split, cfg["gate"])
        self.reg.add_version(version, Path(run_dir), eval_dir, html, info)
        if not self.reg.split():
            self.reg.freeze_split(split)
        if promote:
            self.reg.promote(version)
        shutil.rmtree(run_dir, ignore_errors=True)  # registered: the run folder's work is done
        shutil.rmtree(eval_dir, ignore_errors=True)

    def _split(self) -> dict:
        """The frozen split, or the one the first version will freeze (the same on every run until then)."""
        frozen = self.reg.split()
        if frozen:
            return frozen
        subjects = {(r["dataset"], r["subject_id"]) for ds in self.cfg["datasets"]
                    for r in manifest_rows(roots(self.cfg, ds["name"])[0]) if r["status"] == "ok"}
        return choose_heldout(subjects, self.cfg["heldout"]["fraction"], self.cfg["heldout"]["seed"])

    def _same_recipe(self, champion: str | None, recipe_key: str) -> str | None:
        """Why nothing needs training, or None: the champion was made by this recipe, or a candidate of it
        trained from this champion was already rejected."""
        if champion and (self.reg.info(champion) or {}).get("recipe_key") == recipe_key:
            return f"the champion {champion} was trained on this data with these settings"
        for v in self.reg.versions():
            info = self.reg.info(v)
            if info["decision"] == "kept" and info["recipe_key"] == recipe_key and info["parent"] == (
                    champion or self.cfg["first_init"]):
                return f"candidate {v} of this data and settings was already rejected"
        return None

    def _train(self, inputs, init: str, heldout: set, run_dir: Path) -> Path:
        """Train the candidate in run_dir: continue a killed run's checkpoint, keep a finished run, or start."""
        done = (run_dir / "model_card.json").is_file()
        resume = not done and (run_dir / "checkpoint.npz").is_file()
        if done:
            self.log(f"{run_dir}: trained by an earlier, interrupted refresh: kept")
            return run_dir
        if run_dir.exists() and not resume:
            shutil.rmtree(run_dir)  # stopped before its first checkpoint: nothing to continue
        self.log(f"training {'(resumed) ' if resume else ''}from {init} in {run_dir}")
        request = train_job.TrainRequest(inputs, str(run_dir), self.cfg["train"], init, self.cfg["train_steps"],
                                         resume, progress=False, exclude_subjects=tuple(sorted(heldout)))
        if self.cfg["train_workers"]:
            train_job.run_train_on_ray(request, self.cfg["train_workers"], self.opts.ray_address, self.log)
        else:
            train_job.run_train(request, self.log)
        return run_dir


def decide(gate: list[dict], champion: str | None, rule: dict) -> tuple[bool, str]:
    """(promote, why) from gate_rows' per-dataset comparison."""
    metric, margin = rule["metric"], rule["margin"]
    unscored = [g["dataset"] for g in gate if g["candidate"] is None]
    if unscored:
        return False, f"the candidate has no held-out {metric} on {', '.join(unscored)} (its output could not be scored)"
    if not champion:
        return True, "first version: no champion yet"
    worse = [g for g in gate if g["champion"] is not None and not g["candidate"] + margin < g["champion"]]
    said = "; ".join(f"{g['dataset']}: candidate {g['candidate']:.3f} vs champion {g['champion']:.3f}" for g in gate)
    if worse:
        return False, f"not better on {', '.join(g['dataset'] for g in worse)} ({metric}, margin {margin:g}): {said}"
    return True, f"lower held-out {metric} (margin {margin:g}): {said}"


def _history_metrics(gate: list[dict]) -> dict:
    """The history's metric columns: those of the dataset closest to failing the gate (MAE columns hold the
    gate's metric)."""
    scored = [g for g in gate if g["candidate"] is not None]
    if not scored:
        return {}
    g = max(scored, key=lambda g: g["candidate"] - (g["champion"] if g["champion"] is not None else g["candidate"]))
    return {"candidate_mae": g["candidate"], "candidate_mae_lo": g["candidate_lo"], "candidate_mae_hi": g["candidate_hi"],
            "champion_mae": g["champion"], "champion_mae_lo": g["champion_lo"], "champion_mae_hi": g["champion_hi"]}


# ---- the dry run and the command ----------------------------------------------------------------------------

def dry_run(cfg: dict, registry: Registry, log=print) -> dict:
    """What a run would do, changing nothing: recordings to preprocess per dataset, and whether it trains."""
    todo_total = 0
    for ds in cfg["datasets"]:
        pre = roots(cfg, ds["name"])[0]
        records = preprocess_job.list_recordings(ds["layout"], ds["uri"])
        cfg_hash = config_hash(preprocess_job.hashed_config(ds["layout"], cfg["preprocess"]))
        todo, kept = preprocess_job.plan(records, manifest_rows(pre), fsspec.core.url_to_fs(ds["uri"])[0], cfg_hash,
                                         pre if manifest_rows(pre) else None)
        todo_total += len(todo)
        log(f"{ds['name']} ({ds['layout']}, {ds['uri']}): {len(records)} recordings, {len(todo)} to preprocess, "
            f"{len(kept)} unchanged")
    champion = registry.champion()
    log(f"registry {registry.uri}: champion {champion or 'none yet'}, {len(registry.versions())} versions")
    if todo_total or not champion:
        verdict = f"would preprocess {todo_total} recordings, then train from {champion or cfg['first_init']} if the training data changed"
    else:
        heldout = {tuple(k) for k in (registry.split() or {"subjects": []})["subjects"]}
        key = config_hash(recipe_of(cfg, training_fingerprint(training_roots(cfg), heldout)))
        verdict = ("nothing changed" if (registry.info(champion) or {}).get("recipe_key") == key
                   else f"the train settings changed: would train from {champion}")
    log(f"dry run: {verdict}")
    return {"decision": "dry run", "reason": verdict}


def run_refresh(cfg: dict, opts: EngineOptions, dry: bool = False, wait: bool = False, log=print) -> dict:
    """The whole refresh on the registry `cfg` names, holding its lock; returns the history row."""
    registry = Registry(cfg["registry"])
    if dry:
        return dry_run(cfg, registry, log)
    with claimed_output(cfg["registry"], wait, log):  # never two refreshes interleaved on one registry
        return Refresh(cfg, opts, registry, log).run()


def main(args: argparse.Namespace) -> int:
    run_refresh(load_config(args.config), engine_options(args), args.dry_run, args.wait_for_lock)
    return 0
