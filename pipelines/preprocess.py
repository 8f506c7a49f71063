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
import yaml

from pipelines.engines import add_engine_arguments, engine_options, run_step
from pipelines.errors import JobError
from transforms.datasets import LAYOUTS, Recording, TruthError, adapter
from transforms.face import FaceDetector
from transforms.face_crops import FPS, face_crops
from transforms.manifest import (by_recording, config_hash, fill_row, fingerprint, read_manifest,
                                 remove_stale_shards, source_stats, up_to_date, write_manifest)
from transforms.resample import resample_signal
from transforms.shards import SegmentBuilder, ShardWriter
from transforms.video import VideoError, decode_threads

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "preprocess.yaml"
PASSES_PIPELINE_ARGS = True  # unknown --options go to Beam (e.g. --runner=DataflowRunner --project=...)


class RecordingFailed(Exception):
    """A recording that cannot be preprocessed; str is 'SOURCE: reason'."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layout", required=True, choices=LAYOUTS, help="on-disk layout of the dataset")
    p.add_argument("--input", required=True, help="dataset root: a local path or any fsspec URI (gs://...)")
    p.add_argument("--output", required=True, help="output root: shards/ and manifest.parquet go here")
    p.add_argument("--config", help=f"YAML overriding the defaults in {DEFAULT_CONFIG.relative_to(DEFAULT_CONFIG.parent.parent)}")
    add_engine_arguments(p)


def load_config(path: str | None) -> dict:
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    if path:
        try:
            with fsspec.open(path, "r") as f:
                override = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise JobError(f"{path}: cannot read the config: {' '.join(str(e).split())}") from None  # YAML's: 4 lines
        if not isinstance(override, dict):
            raise JobError(f"{path}: expected settings as YAML keys and values, got {type(override).__name__}")
        unknown = sorted(set(override) - set(config))
        if unknown:
            raise JobError(f"{path}: unknown settings {', '.join(unknown)}; known: {', '.join(sorted(config))}")
        config.update(override)
    return config


def shard_path(rec: Recording) -> str:
    return f"shards/{rec.dataset}/{rec.recording_id}.parquet"


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
                raise RecordingFailed(rec.problem)
            with decode_threads(self.decode_threads):
                return self._process(rec, item)

        return fill_row(row, work, (RecordingFailed, VideoError, TruthError), rec.video)

    def _process(self, rec: Recording, item: dict) -> dict:
        truth = self.adapter.read_truth(rec, self.in_fs)
        cfg = self.config
        video_stat = next(s for s in item["stats"] if s[0] == rec.video) if item["stats"] else (rec.video, 0, None)
        meta = {"recording_id": rec.recording_id, "subject_id": rec.subject_id, "dataset": rec.dataset,
                "source_uri": rec.video, "source_size": video_stat[1], "source_mtime": video_stat[2] or "",
                "config_hash": item["config_hash"], "package_version": _package_version()}
        target = f"{self.out_root.rstrip('/')}/{shard_path(rec)}"
        source = _SourceCounter()
        n_frames = n_face = n_segments = 0
        with _local_copies(rec, self.in_fs) as local:
            blocks = source.count(self.adapter.frame_blocks(rec, local, cfg["block_frames"]))
            builder = SegmentBuilder(meta, cfg["segment_frames"])
            with ShardWriter(target, self.out_fs) as writer:
                for block in face_crops(blocks, self.detector, detect_every=cfg["detect_every"]):
                    bvp = None if truth is None else resample_signal(truth.t_s, truth.ppg, block.timestamps)
                    rows = builder.push(block.timestamps, block.crops, block.face_found, block.boxes, bvp)
                    writer.write_rows(rows)
                    n_frames += len(block.timestamps)
                    n_face += int(block.face_found.sum())
                    n_segments += len(rows)
                rows = builder.finish()
                writer.write_rows(rows)
                n_segments += len(rows)
                # checks that need the whole recording: raising here aborts the shard, nothing is left behind
                self._check(rec, source, n_frames, n_face, truth)
        return {"n_source_frames": source.n, "n_frames": n_frames, "duration_s": n_frames / FPS,
                "n_segments": n_segments, "face_fraction": n_face / n_frames, "shard": shard_path(rec)}

    def _check(self, rec: Recording, source: "_SourceCounter", n_frames: int, n_face: int, truth) -> None:
        cfg = self.config
        if n_frames / FPS < cfg["min_seconds"]:
            raise RecordingFailed(f"{rec.video}: {n_frames / FPS:.2f} s long; at least {cfg['min_seconds']:g} s needed")
        if source.fps < cfg["min_source_fps"]:
            raise RecordingFailed(f"{rec.video}: source frame rate {source.fps:.1f} fps is below "
                                  f"{cfg['min_source_fps']:g} fps")
        if n_face == 0:
            raise RecordingFailed(f"{rec.video}: no face found in any of {n_frames} frames")
        if truth is not None:
            covered = np.clip(min(truth.t_s[-1], source.last_t) - max(truth.t_s[0], 0.0), 0, None)
            if covered < cfg["min_truth_coverage"] * source.last_t:
                raise RecordingFailed(f"{rec.video}: ground truth covers {covered:.1f} s of the "
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


class _local_copies:
    """Local paths for a recording's files: the files themselves when local, else a temp copy removed after."""

    def __init__(self, rec: Recording, fs):
        self.rec, self.fs, self.tmp = rec, fs, None

    def __enter__(self) -> dict[str, str]:
        if _is_local(self.fs):
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


def _is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _package_version() -> str:
    from pipelines.cli import package_version

    return package_version()


# ---- the driver -------------------------------------------------------------------------------------

def plan(records: list[Recording], previous: list[dict], fs, cfg_hash: str):
    """Split listed recordings into work items and kept manifest rows (unchanged since the last run)."""
    before = by_recording(previous)
    todo, kept = [], []
    for rec in records:
        try:
            stats = source_stats(list(rec.files), fs)
        except FileNotFoundError as e:
            stats, rec = [], dataclasses.replace(rec, problem=rec.problem or f"{e.filename or rec.video}: missing file")
        fp = fingerprint(stats, cfg_hash)
        old = before.get((rec.dataset, rec.recording_id))
        if up_to_date(old, fp):
            kept.append(old)
        else:
            todo.append({"recording": dataclasses.asdict(rec), "stats": stats, "fingerprint": fp, "config_hash": cfg_hash})
    return todo, kept


def run_preprocess(layout: str, input_uri: str, output_uri: str, config: dict, opts, log=print) -> list[dict]:
    """The whole job; returns the manifest rows it wrote."""
    started = time.perf_counter()
    in_fs, root = fsspec.core.url_to_fs(input_uri)
    out_fs, out_root = fsspec.core.url_to_fs(output_uri)
    module = adapter(layout)
    try:
        records = module.list_recordings(root, in_fs)
    except FileNotFoundError as e:
        raise JobError(str(e)) from None
    if not records:
        raise JobError(f"{input_uri}: no {layout} recordings found; the layout is {module.LAYOUT}")
    manifest_uri = f"{out_root.rstrip('/')}/manifest.parquet"
    previous = read_manifest(manifest_uri, out_fs)
    cfg_hash = config_hash({"layout": layout, **config})
    todo, kept = plan(records, previous, in_fs, cfg_hash)
    log(f"{len(records)} recordings in {input_uri} ({layout}): {len(kept)} unchanged, {len(todo)} to process "
        f"on {opts.engine}")
    out_fs.makedirs(out_root, exist_ok=True)
    # one worker per core (a cluster, or a local run with --workers filling the cores): single-threaded
    # decodes; fewer local workers than cores: let each decode use threads
    threads = 0 if opts.local and min(opts.local_workers, len(todo)) < (os.cpu_count() or 1) else 1
    done = run_step(PreprocessStep, {"layout": layout, "input_uri": input_uri, "output_uri": output_uri,
                                     "config": config, "decode_threads": threads}, todo, opts, output_uri)
    rows = kept + done
    remove_stale_shards(previous, rows, out_fs, out_root)
    write_manifest(rows, manifest_uri, out_fs)
    log(summary(kept, done, time.perf_counter() - started))
    return rows



def summary(kept: list[dict], done: list[dict], seconds: float) -> str:
    ok = [r for r in done if r["status"] == "ok"]
    failed = [r for r in done if r["status"] == "failed"]
    frames = sum(r["n_frames"] or 0 for r in ok)
    lines = [f"{'done':>8}{'skipped':>9}{'failed':>8}{'frames':>10}{'time (s)':>10}",
             f"{len(ok):>8}{len(kept):>9}{len(failed):>8}{frames:>10}{seconds:>10.1f}"]
    lines += [f"failed: {r['recording_id']}: {r['reason']}" for r in failed]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    # failed recordings are results (dead letters in the manifest), not a failure of the job
    run_preprocess(args.layout, args.input, args.output, load_config(args.config), engine_options(args))
    return 0
