"""Augment preprocessed shards by time-scaling: extra recordings whose heart rates fill 30-180 BPM.

Written once as a step over one (recording, factor) pair (AugmentStep) and run on Beam or Ray
(pipelines.engines). The driver reads the preprocess output's manifest, measures each ok recording's
heart rate from its ground-truth bvp, picks the (recording, factor) pairs that even out the heart-rate
histogram (transforms.augment.choose_factors), runs the step on them, and writes OUTPUT/manifest.parquet
with one row per augmented recording, `ok` or `failed` with its reason. OUTPUT holds only the new
recordings: train on INPUT and OUTPUT together. Same input, options and seed: same output; a re-run
keeps augmented recordings whose source and factor are unchanged.
"""
from __future__ import annotations

import argparse
import json
import posixpath
import time
from concurrent.futures import ThreadPoolExecutor

import fsspec
import numpy as np

from pipelines.engines import add_engine_arguments, engine_options, run_step
from pipelines.errors import JobError
from transforms.augment import BIN_BPM, FACTOR_RANGE, TimeScaler, choose_factors, hr_bins, hr_histogram
from transforms.manifest import (by_recording, config_hash, fill_row, read_manifest, remove_stale_shards,
                                 up_to_date, write_manifest)
from transforms.shards import FPS, SEGMENT_FRAMES, SegmentBuilder, ShardWriter, read_segments
from transforms.signal import heart_rate

PASSES_PIPELINE_ARGS = True  # unknown --options go to Beam (e.g. --runner=DataflowRunner --project=...)
METHOD = "time_scale/1"  # enters every fingerprint: bump it when the scaling itself changes
READ_THREADS = 8  # the driver reads only each shard's bvp column: I/O bound, threads are enough


class AugmentFailed(Exception):
    """An augmented recording that cannot be made; str is 'SOURCE: reason'."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = ("OUTPUT holds only the augmented recordings (shards/ and manifest.parquet), never copies of "
                "the originals: train on INPUT and OUTPUT together. Recordings without ground-truth bvp "
                "cannot be measured and are skipped.")
    p.add_argument("--input", required=True, help="output root of `pulsepipe preprocess` (manifest.parquet, shards/)")
    p.add_argument("--output", required=True,
                   help="output root for the augmented recordings only: shards/ and manifest.parquet go here")
    p.add_argument("--hr-range", type=float, nargs=2, default=(30.0, 180.0), metavar=("LOW", "HIGH"),
                   help="heart rates (BPM) the augmented set should cover evenly (default: 30 180)")
    p.add_argument("--extra", type=float, default=0.3,
                   help="augmented recordings as a fraction of the ok source recordings (default: 0.3, as the paper)")
    p.add_argument("--seed", type=int, default=0, help="seed of the factor choice: same seed, same output (default: 0)")
    p.add_argument("--factor-range", type=float, nargs=2, default=FACTOR_RANGE, metavar=("LOW", "HIGH"),
                   help="allowed time-scale factors; factor 2 plays a recording twice as fast (default: 0.5 2.0)")
    add_engine_arguments(p)


def shard_path(dataset: str, recording_id: str) -> str:
    return f"shards/{dataset}/{recording_id}.parquet"


def augmented_id(source_id: str, factor: float) -> str:
    return f"{source_id}@x{factor:.3f}"


# ---- the step: one (recording, factor), on any engine ------------------------------------------------

class AugmentStep:
    """One (source recording, factor) in, one manifest row out; writes the augmented shard atomically.

    Streams the source shard a row group at a time through a TimeScaler into a SegmentBuilder: memory is
    one source row group plus one output segment, whatever the recording's length.
    """

    def __init__(self, input_uri: str, output_uri: str, segment_frames: int = SEGMENT_FRAMES):
        self.in_fs, self.in_root = fsspec.core.url_to_fs(input_uri)
        self.out_fs, self.out_root = fsspec.core.url_to_fs(output_uri)
        self.segment_frames = segment_frames

    def __call__(self, item: dict) -> dict:
        src = item["source"]
        metadata = {**json.loads(src["metadata_json"] or "{}"), "augment_source": src["recording_id"],
                    "augment_scale": item["factor"], "source_hr_bpm": item["source_hr"],
                    "target_hr_bpm": round(item["source_hr"] * item["factor"], 3)}
        row = {"recording_id": item["recording_id"], "subject_id": src["subject_id"], "dataset": src["dataset"],
               "source_uri": src["source_uri"], "fingerprint": item["fingerprint"],
               "config_hash": item["config_hash"], "metadata_json": json.dumps(metadata, sort_keys=True)}
        return fill_row(row, lambda: self._process(item), (AugmentFailed,), src["shard"])

    def _process(self, item: dict) -> dict:
        src, factor = item["source"], item["factor"]
        source_uri = f"{self.in_root.rstrip('/')}/{src['shard']}"
        target = f"{self.out_root.rstrip('/')}/{shard_path(src['dataset'], item['recording_id'])}"
        scaler, builder, next_index = TimeScaler(factor), None, 0
        n_source = n_frames = n_face = n_segments = 0
        with ShardWriter(target, self.out_fs) as writer:
            for seg in read_segments(source_uri, self.in_fs):
                if seg.recording_id != src["recording_id"]:
                    continue
                if seg.segment_index != next_index:  # a gap would be scaled into a silent jump
                    raise AugmentFailed(f"{source_uri}: segment {next_index} of {src['recording_id']} missing")
                next_index += 1
                if builder is None:
                    builder = SegmentBuilder(self._meta(seg, item), self.segment_frames)
                t, frames, found, boxes, bvp = scaler.push(seg.timestamps, seg.frames, seg.face_found,
                                                           seg.face_box, seg.bvp)
                rows = builder.push(t, frames, found, boxes, bvp)
                writer.write_rows(rows)
                n_source += seg.n_frames
                n_frames += len(t)
                n_face += int(found.sum())
                n_segments += len(rows)
            if builder is None:
                raise AugmentFailed(f"{source_uri}: no segments of {src['recording_id']}")
            rows = builder.finish()
            writer.write_rows(rows)
            n_segments += len(rows)
        return {"n_source_frames": n_source, "n_frames": n_frames, "duration_s": n_frames / FPS,
                "n_segments": n_segments, "face_fraction": n_face / max(n_frames, 1),
                "shard": shard_path(src["dataset"], item["recording_id"])}

    @staticmethod
    def _meta(seg, item: dict) -> dict:
        # provenance stays the source video's: an augmented copy is traced back to what was filmed
        return {"recording_id": item["recording_id"], "subject_id": seg.subject_id, "dataset": seg.dataset,
                "source_uri": seg.source_uri, "source_size": seg.source_size, "source_mtime": seg.source_mtime,
                "config_hash": item["config_hash"], "package_version": _package_version(),
                "augment_scale": item["factor"]}


def _package_version() -> str:
    from pipelines.cli import package_version

    return package_version()


# ---- the driver -------------------------------------------------------------------------------------

def source_heart_rate(row: dict, fs, root: str) -> tuple[float | None, str | None]:
    """(HR in BPM, None) of an ok manifest row from its shard's ground-truth bvp, or (None, why not)."""
    uri = f"{root.rstrip('/')}/{row['shard']}"
    parts = [s.bvp for s in read_segments(uri, fs, columns=["recording_id", "bvp"])
             if s.recording_id == row["recording_id"]]
    if not parts or any(p is None for p in parts):
        return None, "no ground-truth bvp"
    bvp = np.concatenate(parts)
    finite = np.isfinite(bvp)  # truth may stop short of the video's ends (NaN there)
    try:
        hr = heart_rate(bvp, FPS, usable=finite)[0]
    except ValueError as e:
        return None, f"ground truth unusable: {e}"
    return (None, "ground truth is flat (nothing in 0.5-3 Hz)") if np.isnan(hr) else (hr, None)


def plan(picks, sources: dict[str, dict], hrs: dict[str, float], previous: list[dict]):
    """Work items for the picked (recording, factor) pairs, and the previous rows that can be kept."""
    before = by_recording(previous)
    todo, kept = [], []
    for source_id, factor in picks:
        src = sources[source_id]
        rec_id = augmented_id(source_id, factor)
        cfg = config_hash({"source_config_hash": src["config_hash"], "augment_scale": factor, "method": METHOD})
        fp = config_hash({"source_fingerprint": src["fingerprint"], "augment_scale": factor, "method": METHOD})
        old = before.get((src["dataset"], rec_id))
        if up_to_date(old, fp):
            kept.append(old)
            continue
        keep = ("recording_id", "subject_id", "dataset", "source_uri", "shard", "fingerprint", "config_hash",
                "metadata_json", "n_frames")
        todo.append({"source": {k: src[k] for k in keep}, "factor": factor, "source_hr": hrs[source_id],
                     "recording_id": rec_id, "config_hash": cfg, "fingerprint": fp})
    return todo, kept


def run_augment(input_uri: str, output_uri: str, opts, hr_range=(30.0, 180.0), extra: float = 0.3, seed: int = 0,
                factor_range=FACTOR_RANGE, segment_frames: int = SEGMENT_FRAMES, log=print) -> list[dict]:
    """The whole job; returns the manifest rows it wrote (augmented recordings only)."""
    started = time.perf_counter()
    in_fs, in_root = fsspec.core.url_to_fs(input_uri)
    out_fs, out_root = fsspec.core.url_to_fs(output_uri)
    if posixpath.normpath(in_root) == posixpath.normpath(out_root) and in_fs.protocol == out_fs.protocol:
        raise JobError("--output must differ from --input (its manifest would be replaced)")
    source_rows = read_manifest(f"{in_root.rstrip('/')}/manifest.parquet", in_fs)
    if not source_rows:
        raise JobError(f"no manifest.parquet in {input_uri}; run `pulsepipe preprocess` first")
    ok = [r for r in source_rows if r["status"] == "ok"]
    sources = {r["recording_id"]: r for r in ok}
    if len(sources) != len(ok):
        raise JobError("recording ids repeat across datasets in the input manifest")
    with ThreadPoolExecutor(READ_THREADS) as pool:
        measured = list(pool.map(lambda r: source_heart_rate(r, in_fs, in_root), ok))
    # rounded: last-digit differences between machines must not change the picks
    hrs = {r["recording_id"]: round(hr, 3) for r, (hr, _) in zip(ok, measured) if hr is not None}
    no_truth = [(r["recording_id"], why) for r, (hr, why) in zip(ok, measured) if hr is None]
    n_extra = int(round(extra * len(ok)))
    picks = choose_factors(hrs, n_extra, hr_range, seed, factor_range)

    manifest_uri = f"{out_root.rstrip('/')}/manifest.parquet"
    previous = read_manifest(manifest_uri, out_fs)
    todo, kept = plan(picks, sources, hrs, previous)
    log(f"{len(source_rows)} recordings in {input_uri} ({len(ok)} ok, {len(hrs)} with ground truth): "
        f"{len(picks)} augmented copies planned, {len(kept)} unchanged, {len(todo)} to make on {opts.engine}")
    out_fs.makedirs(out_root, exist_ok=True)
    done = run_step(AugmentStep, {"input_uri": input_uri, "output_uri": output_uri, "segment_frames": segment_frames},
                    todo, opts, output_uri)
    rows = kept + done
    remove_stale_shards(previous, rows, out_fs, out_root)
    write_manifest(rows, manifest_uri, out_fs)
    made = {r["recording_id"] for r in rows if r["status"] == "ok"}
    after = list(hrs.values()) + [hrs[s] * f for s, f in picks if augmented_id(s, f) in made]
    log(summary(len(source_rows), kept, done, no_truth, time.perf_counter() - started))
    log(histogram_table(list(hrs.values()), after, hr_range))
    return rows



def summary(n_in: int, kept: list[dict], done: list[dict], no_truth: list[tuple[str, str]], seconds: float,
            max_notes: int = 10) -> str:
    ok = [r for r in kept + done if r["status"] == "ok"]
    failed = [r for r in done if r["status"] == "failed"]
    frames = sum(r["n_frames"] or 0 for r in ok)
    lines = [f"{'in':>8}{'augmented':>11}{'kept':>7}{'no truth':>10}{'failed':>8}{'frames':>10}{'time (s)':>10}",
             f"{n_in:>8}{len(ok):>11}{len(kept):>7}{len(no_truth):>10}{len(failed):>8}{frames:>10}{seconds:>10.1f}"]
    lines += [f"skipped: {rec_id}: {why}" for rec_id, why in no_truth[:max_notes]]
    if len(no_truth) > max_notes:
        lines.append(f"skipped: ... and {len(no_truth) - max_notes} more without usable ground truth")
    lines += [f"failed: {r['recording_id']}: {r['reason']}" for r in failed]
    return "\n".join(lines)


def histogram_table(before, after, hr_range, bin_bpm: float = BIN_BPM, width: int = 40) -> str:
    """Text histogram of heart rates before and after augmentation, one line per bin of hr_range."""
    edges = hr_bins(hr_range, bin_bpm)
    n_before, n_after = hr_histogram(before, hr_range, bin_bpm), hr_histogram(after, hr_range, bin_bpm)
    scale = width / max(1, n_after.max(), n_before.max())
    lines = [f"{'HR (BPM)':>11}{'before':>8}{'after':>7}"]
    for lo, hi, b, a in zip(edges[:-1], edges[1:], n_before, n_after):
        lines.append(f"{lo:>5.0f}-{hi:<5.0f}{b:>8}{a:>7}  {'#' * round(b * scale)}{'+' * round((a - b) * scale)}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    # failed recordings are results (dead letters in the manifest), not a failure of the job
    run_augment(args.input, args.output, engine_options(args), tuple(args.hr_range), args.extra, args.seed,
                tuple(args.factor_range))
    return 0
