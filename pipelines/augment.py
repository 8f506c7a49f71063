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
import itertools
import json
import posixpath
import time
from concurrent.futures import ThreadPoolExecutor

import fsspec
import numpy as np

from pipelines import shard_job
from pipelines.arguments import number_at_least, positive_number, whole_number
from pipelines.engines import add_engine_arguments, engine_options
from pipelines.errors import JobError
from pipelines.lock import add_lock_argument, claimed_output
from pipelines.settings import ascending, check, number, whole
from transforms.augment import (BIN_BPM, FACTOR_RANGE, TimeScaler, augmented_id, choose_factors, hr_bins,
                                hr_histogram)
from transforms.errors import ItemFailed
from transforms.manifest import config_hash, package_version
from transforms.resample import FPS
from transforms.shards import SEGMENT_FRAMES, read_segments, shard_path, write_recording
from transforms.signal import BPM_RANGE, heart_rate

PASSES_PIPELINE_ARGS = True  # unknown --options go to Beam (e.g. --runner=DataflowRunner --project=...)
METHOD = "time_scale/1"  # enters every fingerprint: bump it when the scaling itself changes
READ_THREADS = 8  # the driver reads only each shard's bvp column: I/O bound, threads are enough
OPTION_RULES = {  # what argparse cannot check alone, for any caller: ranges in order
    "--hr-range": ascending(number(above=0)), "--factor-range": ascending(number(above=0)),
    "--extra": number(minimum=0), "--seed": whole(0), "segment_frames": whole(1),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = ("OUTPUT holds only the augmented recordings (shards/ and manifest.parquet), never copies of "
                "the originals: train on INPUT and OUTPUT together. Recordings without ground-truth bvp "
                "cannot be measured and are skipped.")
    p.add_argument("--input", required=True, help="output root of `pulsepipe preprocess` (manifest.parquet, shards/)")
    p.add_argument("--output", required=True,
                   help="output root for the augmented recordings only: shards/ and manifest.parquet go here")
    p.add_argument("--hr-range", type=positive_number("a heart rate in BPM"), nargs=2, default=BPM_RANGE, metavar=("LOW", "HIGH"),
                   help="heart rates (BPM) the augmented set should cover evenly (default: 30 180)")
    p.add_argument("--extra", type=number_at_least(0, "a fraction"), default=0.3,
                   help="augmented recordings as a fraction of the ok source recordings (default: 0.3, as the paper)")
    p.add_argument("--seed", type=whole_number(0), default=0, help="seed of the factor choice: same seed, same output (default: 0)")
    p.add_argument("--factor-range", type=positive_number("a time-scale factor"), nargs=2, default=FACTOR_RANGE, metavar=("LOW", "HIGH"),
                   help="allowed time-scale factors; factor 2 plays a recording twice as fast (default: 0.5 2.0)")
    add_lock_argument(p)
    add_engine_arguments(p)


# ---- the step: one (recording, factor), on any engine ------------------------------------------------

class AugmentStep:
    """One (source recording, factor) in, one manifest row out; writes the augmented shard atomically.

    Streams the source shard a row group at a time through a TimeScaler into a SegmentBuilder: memory is
    one source row group plus one output segment, whatever the recording's length. Every crop size the
    source holds (frames and each frames_<size>) is time-scaled alike.
    """

    def __init__(self, input_uri: str, output_uri: str, segment_frames: int = SEGMENT_FRAMES):
        self.in_fs, self.in_root = fsspec.core.url_to_fs(input_uri)
        self.out_fs, self.out_root = fsspec.core.url_to_fs(output_uri)
        self.segment_frames = segment_frames

    def __call__(self, item: dict) -> dict:
        return shard_job.fill_row(self._row(item), lambda: self._process(item), item["source"]["shard"])

    def lost(self, item: dict, reason: str) -> dict:
        """The item's row, failed with the reason: making it killed the worker on every attempt
        (pipelines.engines.supervisor)."""
        return shard_job.fill_row(self._row(item), shard_job.failing(f"{item['source']['shard']}: {reason}"),
                                  item["source"]["shard"])

    @staticmethod
    def _row(item: dict) -> dict:
        src = item["source"]
        metadata = {**json.loads(src["metadata_json"] or "{}"), "augment_source": src["recording_id"],
                    "augment_scale": item["factor"], "source_hr_bpm": item["source_hr"],
                    "target_hr_bpm": round(item["source_hr"] * item["factor"], 3)}
        row = {"recording_id": item["recording_id"], "subject_id": src["subject_id"], "dataset": src["dataset"],
               "source_uri": src["source_uri"], "fingerprint": item["fingerprint"],
               "config_hash": item["config_hash"], "metadata_json": json.dumps(metadata, sort_keys=True)}
        return row

    def _process(self, item: dict) -> dict:
        src, factor = item["source"], item["factor"]
        source_uri = f"{self.in_root.rstrip('/')}/{src['shard']}"
        shard = shard_path(src["dataset"], item["recording_id"])
        segments = self._segments(source_uri, src["recording_id"])
        first = next(segments, None)
        if first is None:
            raise ItemFailed(f"{source_uri}: no segments of {src['recording_id']}")
        scaler, n_source = TimeScaler(factor), 0

        def scaled():
            nonlocal n_source
            for seg in itertools.chain([first], segments):
                n_source += seg.n_frames
                yield scaler.push(seg.timestamps, seg.frames, seg.face_found, seg.face_box, seg.bvp, seg.extra_crops)

        counts = write_recording(f"{self.out_root.rstrip('/')}/{shard}", self.out_fs, self._meta(first, item),
                                 scaled(), self.segment_frames)
        return {"n_source_frames": n_source, **shard_job.shard_fields(counts, self.out_fs, self.out_root, shard)}

    def _segments(self, source_uri: str, recording_id: str):
        """The source recording's segments in order; a gap would be scaled into a silent jump."""
        next_index = 0
        for seg in read_segments(source_uri, self.in_fs):
            if seg.recording_id != recording_id:
                continue
            if seg.segment_index != next_index:
                raise ItemFailed(f"{source_uri}: segment {next_index} of {recording_id} missing")
            next_index += 1
            yield seg

    @staticmethod
    def _meta(seg, item: dict) -> dict:
        # provenance stays the source video's: an augmented copy is traced back to what was filmed
        return {"recording_id": item["recording_id"], "subject_id": seg.subject_id, "dataset": seg.dataset,
                "source_uri": seg.source_uri, "source_size": seg.source_size, "source_mtime": seg.source_mtime,
                "config_hash": item["config_hash"], "package_version": package_version(),
                "augment_scale": item["factor"]}


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


def plan(picks, sources: dict[str, dict], hrs: dict[str, float], previous: list[dict], output_uri: str | None = None):
    """Work items for the picked (recording, factor) pairs, and the previous rows that can be kept (their
    shards under output_uri intact: `shard_job.plan`)."""
    keep = ("recording_id", "subject_id", "dataset", "source_uri", "shard", "fingerprint", "config_hash",
            "metadata_json", "n_frames")
    candidates = []
    for source_id, factor in picks:
        src = sources[source_id]
        rec_id = augmented_id(source_id, factor)
        cfg = config_hash({"source_config_hash": src["config_hash"], "augment_scale": factor, "method": METHOD})
        fp = config_hash({"source_fingerprint": src["fingerprint"], "augment_scale": factor, "method": METHOD})
        candidates.append(((src["dataset"], rec_id),
                           {"source": {k: src[k] for k in keep}, "factor": factor, "source_hr": hrs[source_id],
                            "recording_id": rec_id, "config_hash": cfg, "fingerprint": fp,
                            "source_fingerprint": src["fingerprint"]}))
    return shard_job.plan(candidates, previous, output_uri)


def measured_sources(input_uri: str) -> tuple[list[dict], dict[str, dict], dict[str, float], list[tuple[str, str]]]:
    """The input manifest's rows; its ok rows by recording id; their ground-truth heart rates (BPM, rounded
    to 3 decimals so last-digit differences between machines never change the picks); and the ok rows
    that have none, with why."""
    in_fs, in_root = fsspec.core.url_to_fs(input_uri)
    rows = shard_job.manifest_rows(input_uri)
    if not rows:
        raise JobError(f"no manifest.parquet in {input_uri}; run `pulsepipe preprocess` first")
    ok = [r for r in rows if r["status"] == "ok"]
    sources = {r["recording_id"]: r for r in ok}
    if len(sources) != len(ok):
        raise JobError("recording ids repeat across datasets in the input manifest")
    with ThreadPoolExecutor(READ_THREADS) as pool:
        measured = list(pool.map(lambda r: source_heart_rate(r, in_fs, in_root), ok))
    hrs = {r["recording_id"]: round(hr, 3) for r, (hr, _) in zip(ok, measured) if hr is not None}
    no_truth = [(r["recording_id"], why) for r, (hr, why) in zip(ok, measured) if hr is None]
    return rows, sources, hrs, no_truth


def run_augment(input_uri: str, output_uri: str, opts, hr_range=BPM_RANGE, extra: float = 0.3, seed: int = 0,
                factor_range=FACTOR_RANGE, segment_frames: int = SEGMENT_FRAMES, log=print,
                wait_for_lock: bool = False) -> list[dict]:
    """The whole job; returns the manifest rows it wrote (augmented recordings only). Everything a run can
    be refused for (an option, the input's manifest, the output, another run holding it) is said before any
    engine starts."""
    started = time.perf_counter()
    in_fs, in_root = fsspec.core.url_to_fs(input_uri)
    out_fs, out_root = fsspec.core.url_to_fs(output_uri)
    if posixpath.normpath(in_root) == posixpath.normpath(out_root) and in_fs.protocol == out_fs.protocol:
        raise JobError("--output must differ from --input (its manifest would be replaced)")
    check({"--hr-range": list(hr_range), "--factor-range": list(factor_range), "--extra": extra, "--seed": seed,
           "segment_frames": segment_frames}, OPTION_RULES, "")
    source_rows, sources, hrs, no_truth = measured_sources(input_uri)
    picks = choose_factors(hrs, int(round(extra * len(sources))), hr_range, seed, factor_range)
    with claimed_output(output_uri, wait_for_lock, log):
        previous = shard_job.manifest_rows(output_uri)
        todo, kept = plan(picks, sources, hrs, previous, output_uri)
        log(f"{len(source_rows)} recordings in {input_uri} ({len(sources)} ok, {len(hrs)} with ground truth): "
            f"{len(picks)} augmented copies planned, {len(kept)} unchanged, {len(todo)} to make on {opts.engine}")
        step_kwargs = {"input_uri": input_uri, "output_uri": output_uri, "segment_frames": segment_frames}
        rows, done = shard_job.run(AugmentStep, step_kwargs, todo, kept, previous, opts, output_uri)
    made = {r["recording_id"] for r in rows if r["status"] == "ok"}
    after = list(hrs.values()) + [hrs[s] * f for s, f in picks if augmented_id(s, f) in made]
    log(summary(len(source_rows), kept, done, no_truth, time.perf_counter() - started, rows=rows))
    log(histogram_table(list(hrs.values()), after, hr_range))
    return rows


def summary(n_in: int, kept: list[dict], done: list[dict], no_truth: list[tuple[str, str]], seconds: float,
            max_notes: int = 10, rows: list[dict] = ()) -> str:
    ok = [r for r in kept + done if r["status"] == "ok"]
    notes = [f"skipped: {rec_id}: {why}" for rec_id, why in no_truth[:max_notes]]
    if len(no_truth) > max_notes:
        notes.append(f"skipped: ... and {len(no_truth) - max_notes} more without usable ground truth")
    counts = {"in": n_in, "augmented": len(ok), "kept": len(kept), "no truth": len(no_truth),
              "failed": sum(r["status"] == "failed" for r in done), "frames": sum(r["n_frames"] or 0 for r in ok),
              "time (s)": seconds}
    return shard_job.summary(counts, done, notes, rows)


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
                tuple(args.factor_range), wait_for_lock=args.wait_for_lock)
    return 0
