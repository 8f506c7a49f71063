"""Preprocess a dataset: recordings to 30 fps face-crop shards with ground truth, a manifest, dead letters.

Written once as a step over one recording (PreprocessStep) and run on Beam or Ray (pipelines.engines).
The driver lists recordings, skips those whose source files and config are unchanged since the last
run, runs the step on the rest, and writes OUT/manifest.parquet: one row per listed recording, `ok` or
`failed` with its reason. N recordings in always gives N manifest rows out.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import fsspec
import numpy as np

from pipelines import shard_job
from pipelines.engines import add_engine_arguments, engine_options
from pipelines.errors import JobError
from pipelines.lock import add_lock_argument, claimed_output
from pipelines.settings import check, load_settings, number, some_of, whole
from transforms.datasets import LAYOUTS, Recording, adapter
from transforms.errors import ItemFailed
from transforms.face import FaceDetector
from transforms.face_crops import face_crops
from transforms.manifest import config_hash, fingerprint, package_version, source_fingerprint, source_stats
from transforms.resample import FPS, longest_bridged_s, resample_signal
from transforms.shards import CROP_SIZE, EXTRA_CROP_SIZES, is_local, shard_path, write_recording
from transforms.video import decode_threads

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "preprocess.yaml"
PASSES_PIPELINE_ARGS = True  # unknown --options go to Beam (e.g. --runner=DataflowRunner --project=...)
RULES = {  # every setting of configs/preprocess.yaml, checked before any engine starts
    "detect_every": whole(1), "segment_frames": whole(1), "block_frames": whole(1),
    "min_seconds": number(minimum=0), "min_source_fps": number(minimum=0),
    "min_truth_coverage": number(minimum=0, maximum=1),
    "crop_sizes": some_of(CROP_SIZE, *EXTRA_CROP_SIZES, required=(CROP_SIZE,)),  # 36 is the shards' `frames`
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layout", required=True, choices=LAYOUTS, help="on-disk layout of the dataset")
    p.add_argument("--input", required=True, help="dataset root: a local path or any fsspec URI (gs://...)")
    p.add_argument("--output", required=True, help="output root: shards/ and manifest.parquet go here")
    p.add_argument("--config", help=f"YAML overriding the defaults in {DEFAULT_CONFIG.relative_to(DEFAULT_CONFIG.parent.parent)}")
    add_lock_argument(p)
    add_engine_arguments(p)


def hashed_config(layout: str, config: dict) -> dict:
    """What the config hash covers: the layout and every setting, crop_sizes only when it is not the default
    [36]: a setting added later must not make shards made before it look out of date."""
    hashed = {"layout": layout, **config}
    if hashed.get("crop_sizes") == [CROP_SIZE]:
        del hashed["crop_sizes"]
    return hashed


def load_config(path: str | None) -> dict:
    """The defaults overridden by the YAML at `path`, each value checked (RULES); JobError naming the file
    and the key."""
    return load_settings(DEFAULT_CONFIG, path, RULES)


# ---- the step: one recording, on any engine ---------------------------------------------------------

class PreprocessStep:
    """One recording in, one manifest row out; writes the recording's shard under OUT atomically."""

    def __init__(self, layout: str, input_uri: str, output_uri: str, config: dict, decode_threads: int = 0):
        self.layout, self.config = layout, config
        self.decode_threads = decode_threads  # 1 when workers fill the cores; 0: FFmpeg's choice
        self.adapter = adapter(layout)
        self.in_fs, _ = fsspec.core.url_to_fs(input_uri)
        self.out_fs, self.out_root = fsspec.core.url_to_fs(output_uri)
        self.detector = FaceDetector()

    def close(self) -> None:
        self.detector.close()

    def __call__(self, item: dict) -> dict:
        rec = Recording(**{**item["recording"], "files": tuple(item["recording"]["files"])})
        row = {"recording_id": rec.recording_id, "subject_id": rec.subject_id, "dataset": rec.dataset,
               "source_uri": rec.video, "fingerprint": item["fingerprint"], "config_hash": item["config_hash"],
               "metadata_json": json.dumps(rec.metadata, sort_keys=True)}

        def work() -> dict:
            if rec.problem:
                raise ItemFailed(rec.problem)
            with decode_threads(self.decode_threads):
                return self._process(rec, item)

        return shard_job.fill_row(row, work, rec.video)

    def lost(self, item: dict, reason: str) -> dict:
        """The recording's row, failed with the reason: processing it killed the worker on every attempt
        (pipelines.engines.supervisor)."""
        video = item["recording"]["video"]
        return self({**item, "recording": {**item["recording"], "problem": f"{video}: {reason}"}})

    def _process(self, rec: Recording, item: dict) -> dict:
        truth = self.adapter.read_truth(rec, self.in_fs)
        cfg = self.config
        video_stat = next(s for s in item["stats"] if s[0] == rec.video) if item["stats"] else (rec.video, 0, None)
        meta = {"recording_id": rec.recording_id, "subject_id": rec.subject_id, "dataset": rec.dataset,
                "source_uri": rec.video, "source_size": video_stat[1], "source_mtime": video_stat[2] or "",
                "config_hash": item["config_hash"], "package_version": package_version()}
        shard = shard_path(rec.dataset, rec.recording_id)
        source, labels = _SourceCounter(), _TruthCounter(truth)
        with _local_copies(rec, self.in_fs) as local:
            frames = source.count(self.adapter.frame_blocks(rec, local, cfg["block_frames"]))
            sizes = cfg["crop_sizes"]
            blocks = ((b.timestamps, b.crops, b.face_found, b.boxes, labels.on(b.timestamps),
                       {s: b.sized[s] for s in sizes if s != CROP_SIZE})
                      for b in face_crops(frames, self.detector, detect_every=cfg["detect_every"], sizes=sizes))
            # checks that need the whole recording run before the shard appears: failing, they leave none
            counts = write_recording(f"{self.out_root.rstrip('/')}/{shard}", self.out_fs, meta, blocks,
                                     cfg["segment_frames"], check=lambda c: self._check(rec, source, c, labels))
        return {"n_source_frames": source.n, **shard_job.shard_fields(counts, self.out_fs, self.out_root, shard)}

    def _check(self, rec: Recording, source: "_SourceCounter", counts, labels: "_TruthCounter") -> None:
        cfg, n_frames = self.config, counts.n_frames
        if n_frames / FPS < cfg["min_seconds"]:
            raise ItemFailed(f"{rec.video}: {n_frames / FPS:.2f} s long; at least {cfg['min_seconds']:g} s needed")
        if source.fps < cfg["min_source_fps"]:
            raise ItemFailed(f"{rec.video}: source frame rate {source.fps:.1f} fps is below "
                             f"{cfg['min_source_fps']:g} fps")
        if counts.n_face == 0:
            raise ItemFailed(f"{rec.video}: no face found in any of {n_frames} frames")
        if labels.truth is not None and labels.n_covered < cfg["min_truth_coverage"] * n_frames:
            raise ItemFailed(f"{rec.video}: ground truth covers {labels.n_covered / FPS:.1f} s of the "
                             f"{source.last_t:.1f} s video")


class _SourceCounter:
    """Counts source frames and their time span as they stream past."""

    def __init__(self):
        self.n, self.last_t = 0, 0.0

    def count(self, blocks):
        for t, frames in blocks:
            self.n += len(t)
            self.last_t = float(t[-1])
            yield t, frames

    @property
    def fps(self) -> float:
        return (self.n - 1) / self.last_t if self.last_t > 0 else 0.0


class _TruthCounter:
    """The ground truth on each block's frame times (NaN outside it and across its gaps), counting the
    frames it covers."""

    def __init__(self, truth):
        self.truth, self.n_covered = truth, 0
        self.max_gap_s = None if truth is None else longest_bridged_s(truth.t_s)  # once, not per block

    def on(self, timestamps: np.ndarray) -> np.ndarray | None:
        if self.truth is None:
            return None
        bvp = resample_signal(self.truth.t_s, self.truth.ppg, timestamps, self.max_gap_s)
        self.n_covered += int(np.isfinite(bvp).sum())
        return bvp


class _local_copies:
    """Local paths for a recording's files: the files themselves when local, else a temp copy removed after."""

    def __init__(self, rec: Recording, fs):
        self.rec, self.fs, self.tmp = rec, fs, None

    def __enter__(self) -> dict[str, str]:
        if is_local(self.fs):
            return {uri: uri for uri in self.rec.files}
        self.tmp = tempfile.mkdtemp(prefix="pulsepipe-")
        local = {}
        for i, uri in enumerate(self.rec.files):
            dest = os.path.join(self.tmp, f"{i}-{os.path.basename(uri.rstrip('/'))}")
            self.fs.get(uri, dest, recursive=self.fs.isdir(uri))
            local[uri] = dest
        return local

    def __exit__(self, *exc) -> None:
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


# ---- the driver -------------------------------------------------------------------------------------

def plan(records: list[Recording], previous: list[dict], fs, cfg_hash: str, output_uri: str | None = None):
    """Split listed recordings into work items and kept manifest rows (unchanged since the last run, their
    shards under output_uri intact: `shard_job.plan`)."""
    candidates = []
    for rec in records:
        try:
            stats = source_stats(list(rec.files), fs)
        except FileNotFoundError as e:
            stats, rec = [], dataclasses.replace(rec, problem=rec.problem or f"{e.filename or rec.video}: missing file")
        candidates.append(((rec.dataset, rec.recording_id),
                           {"recording": dataclasses.asdict(rec), "stats": stats,
                            "fingerprint": fingerprint(stats, cfg_hash), "config_hash": cfg_hash,
                            "source_fingerprint": source_fingerprint(stats)}))
    return shard_job.plan(candidates, previous, output_uri)


def list_recordings(layout: str, input_uri: str) -> list[Recording]:
    """The layout's recordings under input_uri; JobError if there is none, or no such input."""
    in_fs, root = fsspec.core.url_to_fs(input_uri)
    module = adapter(layout)
    try:
        records = module.list_recordings(root, in_fs)
    except FileNotFoundError as e:
        raise JobError(str(e)) from None
    if not records:
        raise JobError(f"{input_uri}: no {layout} recordings found; the layout is {module.LAYOUT}")
    return records


def run_preprocess(layout: str, input_uri: str, output_uri: str, config: dict, opts, log=print,
                   wait_for_lock: bool = False) -> list[dict]:
    """The whole job; returns the manifest rows it wrote. Everything a run can be refused for (a setting, the
    input, the output, its manifest, another run holding it) is said before any engine starts."""
    started = time.perf_counter()
    check(config, RULES, "config")  # a dict from a caller other than the command line is checked too
    records = list_recordings(layout, input_uri)
    with claimed_output(output_uri, wait_for_lock, log):
        previous = shard_job.manifest_rows(output_uri)
        todo, kept = plan(records, previous, fsspec.core.url_to_fs(input_uri)[0],
                          config_hash(hashed_config(layout, config)), output_uri)
        log(f"{len(records)} recordings in {input_uri} ({layout}): {len(kept)} unchanged, {len(todo)} to process "
            f"on {opts.engine}")
        # one worker per core (a cluster, or a local run with --workers filling the cores): single-threaded
        # decodes; fewer local workers than cores: let each decode use threads
        threads = 0 if opts.local and min(opts.local_workers, len(todo)) < (os.cpu_count() or 1) else 1
        step_kwargs = {"layout": layout, "input_uri": input_uri, "output_uri": output_uri, "config": config,
                       "decode_threads": threads}
        rows, done = shard_job.run(PreprocessStep, step_kwargs, todo, kept, previous, opts, output_uri)
    log(summary(kept, done, rows, time.perf_counter() - started))
    return rows


def summary(kept: list[dict], done: list[dict], rows: list[dict], seconds: float) -> str:
    ok = [r for r in done if r["status"] == "ok"]
    return shard_job.summary({"done": len(ok), "skipped": len(kept), "failed": len(done) - len(ok),
                              "frames": sum(r["n_frames"] or 0 for r in ok), "time (s)": seconds}, done, rows=rows)


def main(args: argparse.Namespace) -> int:
    # failed recordings are results (dead letters in the manifest), not a failure of the job
    run_preprocess(args.layout, args.input, args.output, load_config(args.config), engine_options(args),
                   wait_for_lock=args.wait_for_lock)
    return 0
