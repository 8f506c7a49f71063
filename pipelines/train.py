"""Train ME-rPPG on preprocessed shards: whole-video sequences, resumable, data-parallel.

Reads the shards of `pulsepipe preprocess` and `augment`; each training sequence runs with the state
carried across its 160-frame chunks, memory flat in its length; a resumed run is bit-identical to one never
stopped; batches are split over this machine's devices (model.train does the numerics, transforms.sequences
the data).

RUN_DIR (a local folder) holds:
  config.json     the settings, the data side's fixed choices, the inputs and --init: what --resume checks
  split.json      the subjects on each side of the train/validation split
  log.jsonl       a line per step (loss, lr, grad norm, frames/s) and per validation (HR MAE, recordings)
  checkpoint.npz  the whole train state and the data position, replaced atomically every checkpoint_every
                  steps and at the end
  best.weights.h5 + best.state.npz + best.json: the weights with the lowest validation HR MAE, which
                  `evaluate --model me-chunk:RUN_DIR` and `infer --weights RUN_DIR` load
  curves.png, model_card.json (data fingerprint, settings, seeds, versions, metrics, lineage)
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np

from pipelines.arguments import whole_number
from pipelines.errors import JobError
from pipelines.lock import LOCK_NAME, claimed_output
from pipelines.settings import choice, load_settings, mapping, number, optional, whole
from transforms import sequences
from transforms.manifest import canonical_json, config_hash, package_version

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "train.yaml"
INITS = ("published:rlap", "published:pure", "scratch")
RULES = {
    "seed": whole(0), "val_fraction": number(minimum=0, below=1), "seq_len": whole(160, multiple_of=160),
    "batch_size": whole(1), "micro_batch": whole(0), "epochs": whole(1), "min_valid_fraction": number(above=0, maximum=1),
    "loss": choice("mse", "neg_pearson"), "lr": number(minimum=0), "b1": number(minimum=0, below=1),
    "b2": number(minimum=0, below=1), "eps": number(above=0), "schedule": choice("constant", "cosine"),
    "warmup_steps": whole(0), "clip_norm": optional(number(above=0)), "dropout": number(minimum=0, below=1),
    "architecture": optional(mapping(whole(1))), "precision": choice("float32", "bfloat16"), "checkpoint_every": whole(1), "validate_every": whole(1),
    "early_stop_patience": optional(whole(1)),
}
RUN_FILES = {"config": "config.json", "split": "split.json", "log": "log.jsonl", "checkpoint": "checkpoint.npz",
             "curves": "curves.png", "card": "model_card.json", "best": "best.json"}
VALIDATION_BATCH = 4  # validation recordings per device call


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Defaults: configs/train.yaml. The best weights load wherever published ones do: "
                "evaluate --model me-chunk:RUN_DIR, infer --weights RUN_DIR. Interrupted (Ctrl-C), a run saves a "
                "checkpoint when the step under way ends (a second Ctrl-C stops at once, without saving); --resume "
                "continues it exactly, and refuses if the settings or the data changed.")
    p.add_argument("--input", dest="inputs", action="append", required=True, metavar="URI",
                   help="output root of `pulsepipe preprocess` or `augment` (manifest.parquet, shards/); repeatable")
    p.add_argument("--output", required=True, metavar="RUN_DIR", help="run folder (created; must be new unless --resume)")
    p.add_argument("--config", help="YAML overriding the defaults of configs/train.yaml")
    p.add_argument("--init", default="published:rlap",
                   help="starting weights: published:rlap (default), published:pure, scratch (Keras's initialisers) "
                        "or a training run folder (its best weights)")
    p.add_argument("--steps", type=whole_number(1), metavar="N",
                   help="stop after this many steps in all (default: the config's epochs); with --resume, the total")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--workers", type=whole_number(1), metavar="N",
                   help="train in N processes on Ray Train (JaxTrainer), each its part of every batch, on this "
                        "machine's Ray or the cluster at --ray-address; RUN_DIR and the inputs must be reachable "
                        "from every worker (a shared file system, or fsspec URIs for the inputs)")
    p.add_argument("--ray-address", metavar="HOST:PORT",
                   help="the Ray cluster for --workers (default: Ray started on this machine)")


@dataclass(frozen=True)
class TrainRequest:
    inputs: tuple[str, ...]
    output: str  # RUN_DIR
    config: dict  # checked settings (RULES)
    init: str = "published:rlap"
    steps: int | None = None  # total steps to stop at; None: the config's epochs
    resume: bool = False
    progress: bool = True
    exclude_subjects: tuple[tuple[str, str], ...] = ()  # (dataset, subject_id) never trained on: held out


# ---- check the request: settings, inputs, run folder ------------------------------------------------

def network(cfg: dict):
    """The MEConfig the settings' `architecture` asks for (None: the published network); JobError naming
    a field that is not one of the network's."""
    from model.config import ARCHITECTURE_FIELDS, ME

    changes = cfg["architecture"] or {}
    unknown = sorted(set(changes) - set(ARCHITECTURE_FIELDS))
    if unknown:
        raise JobError(f"architecture: unknown fields {', '.join(unknown)}; known: {', '.join(ARCHITECTURE_FIELDS)}")
    return dataclasses.replace(ME, **changes)


def check_init(init: str, net) -> None:
    """JobError unless --init names weights of the network `net` (an MEConfig) or scratch."""
    from model.config import ME, architecture
    from model.weights import weights_config

    if init == "scratch":
        return
    if init in INITS:
        held = ME
    elif (Path(init) / "best.weights.h5").is_file():
        held = weights_config(init)
    else:
        raise JobError(f"--init {init}: expected {', '.join(INITS)} or a training run folder holding "
                       "best.weights.h5")
    if architecture(held) != architecture(net):
        changed = sorted(k for k, v in architecture(net).items() if architecture(held)[k] != v)
        raise JobError(f"--init {init}: its weights are of another network than the settings' architecture "
                       f"(differs in {', '.join(changed)}); start such a network with --init scratch")


def check_batching(cfg: dict, where: str, processes: int = 1, local_devices: int | None = None) -> None:
    """JobError unless the batch splits: into micro-batches, over `processes` (each takes an equal part, its
    micro-batches whole) and, given local_devices, over each process's devices."""
    batch, micro = cfg["batch_size"], cfg["micro_batch"]
    if micro and batch % micro:
        raise JobError(f"{where}: micro_batch {micro} does not divide batch_size {batch}")
    if batch % processes or (micro and (batch // processes) % micro):
        raise JobError(f"{where}: batch_size {batch} does not split into {processes} processes' equal parts of "
                       f"whole micro-batches ({micro or 'the whole part'}); use a multiple of {processes * (micro or 1)}")
    per_pass = micro or batch // processes
    if local_devices and per_pass % local_devices:
        raise JobError(f"{where}: micro_batch {micro} (0: the batch's part per process, {batch // processes}) does "
                       f"not split over this machine's {local_devices} devices; use a multiple of {local_devices}")


def check_run_folder(request: TrainRequest) -> Path:
    run = Path(request.output)
    if run.exists() and not run.is_dir():
        raise JobError(f"--output {run}: is a file, not a run folder")
    checkpoint = run / RUN_FILES["checkpoint"]
    if request.resume and not checkpoint.is_file():
        raise JobError(f"--resume: {run} holds no {RUN_FILES['checkpoint']} to continue from")
    if not request.resume and run.is_dir() and any(p.name != LOCK_NAME for p in run.iterdir()):
        raise JobError(f"--output {run}: the folder is not empty; pass --resume to continue its run, "
                       "or name a new folder")
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise JobError(f"--output {run}: cannot create the run folder ({e.strerror})") from None
    return run


def run_config(request: TrainRequest, data: "sequences.TrainingData") -> dict:
    """What the run is, in full: the settings, the data side's fixed choices, the inputs, --init and the data
    fingerprint. Its hash (without `steps`, a stopping point) is what --resume checks."""
    config = {"settings": request.config, "data": sequences.DATA_SETTINGS, "inputs": list(request.inputs),
              "init": request.init, "data_fingerprint": data.fingerprint}
    if request.exclude_subjects:  # only when given: run folders made before it keep their config
        config["exclude_subjects"] = sorted([list(k) for k in request.exclude_subjects])
    return config


def check_resume(run: Path, config: dict) -> None:
    """JobError, saying what changed, if the run folder's config differs from this request's."""
    before, now = json.loads((run / RUN_FILES["config"]).read_text()), json.loads(canonical_json(config))
    if before == now:
        return
    names = {"settings": "settings", "init": "--init", "inputs": "inputs", "data": "data settings",
             "data_fingerprint": "data (the inputs' manifests)", "exclude_subjects": "excluded subjects"}
    changed = []
    for key, name in names.items():
        if before.get(key) != now.get(key):
            if key == "settings":
                keys = sorted(k for k in set(before[key]) | set(now[key]) if before[key].get(k) != now[key].get(k))
                name = f"settings ({', '.join(keys)})"
            changed.append(name)
    raise JobError(f"--resume: {run} was trained with different {', '.join(changed)}; resume with the same, "
                   "or train into a new folder")


def training_data(request: TrainRequest):
    cfg = request.config
    try:
        data = sequences.build_training_data(request.inputs, seq_len=cfg["seq_len"], val_fraction=cfg["val_fraction"],
                                             seed=cfg["seed"], min_valid_fraction=cfg["min_valid_fraction"],
                                             exclude_subjects=request.exclude_subjects)
    except (ValueError, FileNotFoundError) as e:
        raise JobError(str(e)) from None
    if len(data.index) < cfg["batch_size"]:
        raise JobError(f"{len(data.index)} training sequences of {cfg['seq_len']} frames, fewer than one batch of "
                       f"{cfg['batch_size']}; lower seq_len or batch_size, or add data ({_counts_line(data.counts)})")
    return data


def _counts_line(counts) -> str:
    return ", ".join(f"{k.removeprefix('n_').replace('_', ' ')} {v}" for k, v in counts._asdict().items())


# ---- init: the starting weights and the train state -------------------------------------------------

def starting_weights(init: str, seed: int, net):
    """(params, the inference state that goes with them, lineage) for --init, of the network `net` (checked
    by check_init). Published and run-folder weights keep their inference state (so a learning rate of 0
    reproduces their evaluation exactly); weights from Keras's initialisers start inference from zeros, as
    training does."""
    from model.initializers import init_params
    from model.state import MEState
    from model.weights import load_initial_state, load_params

    if init == "scratch":
        import jax

        return init_params(jax.random.key(seed), net), MEState.zeros(1, net), {"init": "scratch", "seed": seed}
    weights = init.removeprefix("published:")
    lineage = {"init": init}
    if init not in INITS:  # a run folder: its own lineage comes along
        card = Path(init) / RUN_FILES["card"]
        lineage["parent"] = json.loads(card.read_text()).get("lineage") if card.is_file() else None
    return load_params(weights, net), load_initial_state(net, weights), lineage


def hyper_parameters(cfg: dict, total_steps: int):
    from model.train import TrainHParams

    return TrainHParams(lr=cfg["lr"], b1=cfg["b1"], b2=cfg["b2"], eps=cfg["eps"], schedule=cfg["schedule"],
                        warmup_steps=cfg["warmup_steps"], total_steps=total_steps, clip_norm=cfg["clip_norm"],
                        loss=cfg["loss"], dropout=cfg["dropout"], compute_dtype=cfg["precision"],
                        batch_size=cfg["batch_size"], micro_batch=cfg["micro_batch"])


# ---- validation: whole recordings in chunk mode, HR by evaluate's recipe ------------------------------

def validate(me, recordings, batch: int = VALIDATION_BATCH) -> dict:
    """HR MAE (BPM) of `me` (an MEModel) over the validation recordings, scored as `pulsepipe evaluate` scores
    them (chunk mode over the whole recording, `transforms.signal.heart_rate` of prediction and truth)."""
    from pipelines.evaluate import RecordingTruth, recording_truth, shard_blocks
    from pipelines.predictors import MEPredictor, feed
    from transforms import signal
    from transforms.resample import FPS

    errors, failed = [], []
    for k in range(0, len(recordings), batch):
        group = recordings[k:k + batch]
        streams = [shard_blocks(r.shard_uri, fsspec.core.url_to_fs(r.shard_uri)[0]) for r in group]
        fed = feed({"me": MEPredictor(me, "chunk", len(group))}, streams)
        truths = [recording_truth(r.shard_uri, read) for r, read in zip(group, fed.reads)]
        bvps = fed.predictors["me"].finish([isinstance(t, RecordingTruth) for t in truths])
        for rec, truth, bvp in zip(group, truths, bvps):
            if not isinstance(truth, RecordingTruth):
                failed.append(truth)
                continue
            if not np.isfinite(bvp).all():  # diverged weights: unscored, as a flat output is, not a crash
                errors.append(np.nan)
                continue
            hr, _ = signal.heart_rate(bvp, FPS, usable=truth.usable)
            errors.append(abs(hr - truth.hr_true) if np.isfinite(hr) else np.nan)
    scored = [e for e in errors if np.isfinite(e)]
    return {"mae": float(np.mean(scored)) if scored else None, "n_scored": len(scored),
            "n_flat": len(errors) - len(scored), "n_failed": len(failed), "failed": failed[:5]}


# ---- the run ------------------------------------------------------------------------------------------

class _Log:
    """log.jsonl, appended line by line; on resume, cut back to the checkpoint's step (what came after it
    is done again, exactly)."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool = True):
        self.path, self._file = path, None
        if not enabled:  # a process of a multi-process run other than the first: it writes nothing
            return
        if resume_step is not None and path.is_file():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        self._file = open(path, "a")

    def write(self, record: dict) -> None:
        if self._file:
            self._file.write(json.dumps(record, sort_keys=True) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file:
            self._file.close()


def run_train(request: TrainRequest, log=print, claim: bool = True) -> dict:
    """The whole job, in this process, or as one process of a `jax.distributed` run (each its part of every
    batch; process 0 writes the run folder); returns {"steps", "best": {"mae", "step"}, "run": RUN_DIR}.
    claim: take the run folder's lock (a multi-process run's driver takes it instead)."""
    import jax

    import model
    from model.train import data_mesh
    from pipelines.predictors import use_compile_cache

    model.keep_freed_memory()  # before JAX starts its threads

    cfg = request.config
    check_init(request.init, network(cfg))
    mesh = data_mesh()
    check_batching(cfg, "the settings", jax.process_count(), mesh.devices.size)
    # process 0 makes and writes the run folder; the others of a multi-process run only read it
    run = check_run_folder(request) if jax.process_index() == 0 else Path(request.output)
    data = training_data(request)
    config = run_config(request, data)
    if request.resume:
        check_resume(run, config)
    use_compile_cache()  # the training step's compiles take seconds each: a resumed run reuses them
    per_epoch = sequences.batches_per_epoch(len(data.index), cfg["batch_size"])
    total = request.steps or cfg["epochs"] * per_epoch
    log(f"{len(data.index)} training sequences of {cfg['seq_len']} frames ({data.counts.n_train_recordings} "
        f"recordings), {data.counts.n_val_recordings} validation recordings; {per_epoch} steps per epoch of "
        f"{cfg['batch_size']}, training to step {total} on {mesh.devices.size * jax.process_count()} device(s)"
        + (f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""))
    # one run per folder (two resumes must never interleave); a multi-process run's driver holds it for all
    with claimed_output(str(run), log=log) if claim else contextlib.nullcontext():
        return _Trainer(request, run, data, config, mesh, per_epoch, log).train(total)


class _Trainer:
    """One run's loop: steps, checkpoints, validations, the best weights; everything a resume needs is in
    the checkpoint."""

    def __init__(self, request: TrainRequest, run: Path, data, config: dict, mesh, per_epoch: int, log):
        import jax
        from jax.sharding import NamedSharding, PartitionSpec

        from model.train import init_train_state, model_config

        self.request, self.run, self.data, self.mesh, self.per_epoch, self.log = request, run, data, mesh, per_epoch, log
        self.part = (jax.process_index(), jax.process_count())  # this process's part of every batch
        self.writes = self.part[0] == 0  # only process 0 writes the run folder
        cfg = request.config
        self.hp = hyper_parameters(cfg, cfg["epochs"] * per_epoch)
        self.model_cfg = model_config(self.hp, network(cfg))
        params, self.inference_state, self.lineage = starting_weights(request.init, cfg["seed"], self.model_cfg)
        state = init_train_state(params, self.hp, cfg["seed"], mesh)
        self.meta = {"position": [0, 0], "best": {"mae": None, "step": None}, "stale_validations": 0}
        if request.resume:
            from model.checkpoint import load_checkpoint

            state, self.meta = load_checkpoint(str(run / RUN_FILES["checkpoint"]), fsspec.filesystem("file"), state)
            state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
        elif self.writes:
            (run / RUN_FILES["config"]).write_text(canonical_json(config) + "\n")
            (run / RUN_FILES["split"]).write_text(json.dumps(data.split, indent=1) + "\n")
        self.state = state
        self.step = int(state["step"])
        self.config_hash = config_hash(config)
        self.journal = _Log(run / RUN_FILES["log"], self.step if request.resume else None, self.writes)

    # --- the loop

    def train(self, total: int) -> dict:
        cfg = self.request.config
        start = sequences.DataPosition(*self.meta["position"])
        batches = sequences.iter_batches(self.data.index, cfg["batch_size"], cfg["seed"], start=start, part=self.part)
        bar = _progress_bar(total, self.step, self.request.progress and self.writes)
        try:
            with _interrupt_between_steps() as interrupted:
                stop = self._steps(total, batches, bar, interrupted)
        except KeyboardInterrupt:  # a second Ctrl-C: at once, nothing saved
            bar.close()
            self.journal.close()
            raise JobError(f"interrupted twice at step {self.step}: stopped without saving; "
                           f"{standing_checkpoint(self.run)}") from None
        bar.close()
        if interrupted:
            self._checkpoint()
            self.journal.close()
            raise JobError(f"interrupted at step {self.step}; the checkpoint is saved: run the same command with "
                           "--resume to continue")
        if self.meta["best"]["step"] is None:  # no validation yet: measure the final weights
            self._validate(self.meta["position"][0])
        self._checkpoint()
        self.journal.close()
        self._finish(stop)
        return {"steps": self.step, "best": self.meta["best"], "run": str(self.run)}

    def _steps(self, total: int, batches, bar, interrupted: list) -> str | None:
        """Whole steps (and their validations and checkpoints) until `total`, a Ctrl-C (`interrupted` fills)
        or an early stop; returns why it stopped early, or None."""
        from model.train import shard_batch, train_step

        cfg, stop = self.request.config, None
        while self.step < total and stop is None and not interrupted:
            batch = next(batches)
            started = time.perf_counter()
            self.state, metrics = train_step(self.state, shard_batch(batch.arrays, self.mesh), self.hp,
                                             self.model_cfg)
            metrics = {k: float(v) for k, v in metrics.items()}  # waits for the step: the time is honest
            seconds = time.perf_counter() - started
            self.step += 1
            self.meta["position"] = list(batch.next)
            frames = cfg["batch_size"] * cfg["seq_len"]  # of the whole batch, every process's part
            self.journal.write({"kind": "step", "step": self.step, "epoch": batch.position.epoch,
                                **metrics, "frames_per_s": round(frames / seconds, 1)})
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
            if self.step % cfg["validate_every"] == 0 or batch.next.epoch != batch.position.epoch:
                stop = self._validate(batch.position.epoch)
            if self.step % cfg["checkpoint_every"] == 0:
                self._checkpoint()
        return stop

    def _validate(self, epoch: int) -> str | None:
        """Validate the current weights; keep them if best. Returns why to stop early, or None."""
        from model import MEModel

        me = MEModel(self.model_cfg, self.state["params"], self.inference_state)
        result = validate(me, list(self.data.validation))
        self.journal.write({"kind": "validation", "step": self.step, "epoch": epoch, **result})
        best = self.meta["best"]
        if result["mae"] is not None and (best["mae"] is None or result["mae"] < best["mae"]):
            self.meta["best"] = {"mae": result["mae"], "step": self.step}
            self.meta["stale_validations"] = 0
            self._save_best(result)
        else:
            self.meta["stale_validations"] += 1
        self.log(f"step {self.step}: validation HR MAE {_bpm(result['mae'])} over {result['n_scored']} recordings "
                 f"(best {_bpm(self.meta['best']['mae'])} at step {self.meta['best']['step']})")
        patience = self.request.config["early_stop_patience"]
        if patience and self.meta["stale_validations"] >= patience:
            return f"early stop: {patience} validations without a better MAE"
        return None

    def _save_best(self, result: dict) -> None:
        import jax

        if not self.writes:
            return
        from model.weights import save_run_weights

        save_run_weights(self.run, jax.device_get(self.state["params"]), self.inference_state, self.model_cfg)
        (self.run / RUN_FILES["best"]).write_text(json.dumps({"step": self.step, **result}, sort_keys=True) + "\n")

    def _checkpoint(self) -> None:
        from model.checkpoint import save_checkpoint

        if not self.writes:
            return
        meta = {**self.meta, "step": self.step, "config_hash": self.config_hash,
                "data_fingerprint": self.data.fingerprint}
        save_checkpoint(str(self.run / RUN_FILES["checkpoint"]), fsspec.filesystem("file"), self.state, meta)

    # --- the end

    def _finish(self, stop: str | None) -> None:
        if not self.writes:
            return
        write_curves(self.run / RUN_FILES["log"], self.run / RUN_FILES["curves"])
        card = model_card(self)
        (self.run / RUN_FILES["card"]).write_text(json.dumps(card, indent=1, sort_keys=True) + "\n")
        best = self.meta["best"]
        self.log((f"{stop}; " if stop else "") + f"trained to step {self.step}; best validation HR MAE "
                 f"{_bpm(best['mae'])} at step {best['step']}: evaluate --model me-chunk:{self.run}")


@contextlib.contextmanager
def _interrupt_between_steps():
    """A Ctrl-C (SIGINT) during a step is held until the step ends: the list yielded fills, and the loop saves
    a checkpoint of whole steps (one taken mid-step would pair a donated or updated state with the old data
    position). A second Ctrl-C raises KeyboardInterrupt at once. Off the main thread (a Ray Train worker),
    signals are not this process's to take: nothing changes. The notice goes straight to file descriptor 2:
    a handler that printed while the loop was printing would make Python's buffered stream raise."""
    interrupted: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield interrupted
        return

    def hold(signum, _frame):
        interrupted.append(signum)
        signal.signal(signal.SIGINT, previous)
        os.write(2, b"interrupted: saving a checkpoint when this step ends (Ctrl-C again to stop without saving)\n")

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


def standing_checkpoint(run: Path) -> str:
    """What a run stopped without saving leaves: the step of the checkpoint in its folder, if any."""
    from model.checkpoint import checkpoint_meta

    saved = run / RUN_FILES["checkpoint"]
    if not saved.is_file():
        return "no checkpoint is saved yet"
    step = checkpoint_meta(str(saved), fsspec.filesystem("file"))["step"]
    return f"the checkpoint of step {step} stands, which --resume continues"


def _bpm(mae: float | None) -> str:
    return "-" if mae is None else f"{mae:.2f} BPM"


def _progress_bar(total: int, done: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="step", file=sys.stderr, disable=not enabled, dynamic_ncols=True)


def model_card(trainer: _Trainer) -> dict:
    from importlib.metadata import version

    return {"model": "me-rppg", "step": trainer.step, "best": trainer.meta["best"],
            "data_fingerprint": trainer.data.fingerprint, "inputs": list(trainer.request.inputs),
            "data_counts": trainer.data.counts._asdict(), "settings": trainer.request.config,
            "data_settings": sequences.DATA_SETTINGS, "seed": trainer.request.config["seed"],
            "config_hash": trainer.config_hash, "lineage": trainer.lineage,
            "versions": {"pulsepipe": package_version(), **{p: version(p) for p in ("jax", "jaxlib", "optax", "numpy")}}}


def write_curves(log_path: Path, png_path: Path) -> None:
    """Training loss and validation HR MAE against step, from log.jsonl."""
    from matplotlib.figure import Figure

    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    vals = [r for r in records if r["kind"] == "validation" and r["mae"] is not None]
    fig = Figure(figsize=(10, 4), constrained_layout=True)
    loss_ax, mae_ax = fig.subplots(1, 2)
    loss_ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8)
    loss_ax.set(title="training loss", xlabel="step", ylabel="loss")
    mae_ax.plot([r["step"] for r in vals], [r["mae"] for r in vals], marker="o")
    mae_ax.set(title="validation HR MAE", xlabel="step", ylabel="BPM")
    for ax in (loss_ax, mae_ax):
        ax.grid(alpha=0.3)
    fig.savefig(png_path, dpi=100)


def run_train_on_ray(request: TrainRequest, workers: int, ray_address: str | None = None, log=print) -> dict:
    """run_train in `workers` Ray Train workers, one process of a `jax.distributed` run each. The request is
    checked here first, as run_train checks it, so a bad one ends before any worker starts; the driver holds
    the run folder's lock for them all."""
    from pipelines.engines.ray_train import Interrupted, run_workers

    cfg = request.config
    check_init(request.init, network(cfg))
    check_batching(cfg, "the settings", workers)
    run = check_run_folder(request)
    data = training_data(request)
    if request.resume:
        check_resume(run, run_config(request, data))
    request = dataclasses.replace(request, output=str(run.resolve()), progress=False)  # workers: no bar
    log(f"training in {workers} Ray Train workers" + (f" on the cluster at {ray_address}" if ray_address else ""))
    with claimed_output(str(run), log=log):
        try:
            return run_workers(_train_in_worker, {"request": request}, workers, ray_address)
        except Interrupted as e:  # the workers saved what their checkpoint_every saved
            raise JobError(f"{e}; {standing_checkpoint(run)}") from None


def _train_in_worker(config: dict) -> dict:
    """One Ray Train worker's part: run_train as one process of the run; process 0 speaks."""
    import jax

    speaks = jax.process_index() == 0
    return run_train(config["request"], log=print if speaks else (lambda *_: None), claim=False)


def main(args: argparse.Namespace) -> int:
    config = load_settings(DEFAULT_CONFIG, args.config, RULES)
    check_batching(config, args.config or str(DEFAULT_CONFIG), args.workers or 1)
    if args.ray_address and not args.workers:
        raise JobError("--ray-address is for --workers N: name how many training processes to start")
    # local paths made absolute: what config.json records, and what workers in other folders open
    inputs = tuple(u if "://" in u else str(Path(u).resolve()) for u in args.inputs)
    request = TrainRequest(inputs, args.output, config, args.init, args.steps, args.resume, not args.no_progress)
    if args.workers:
        run_train_on_ray(request, args.workers, args.ray_address)
    else:
        run_train(request)
    return 0
