"""Evaluate models on preprocessed recordings: whole-recording BVP, heart rates, metrics and a report.

Written once as a step over a bucket of recordings (EvaluateStep), run on Beam or Ray (pipelines.engines).
Each recording streams through every model in one pass over its shard, with the model state carried
across segments and chunks, so a recording of any length is one inference in bounded memory. Heart rates
come from predicted and ground-truth BVP by the same recipe (transforms.signal.heart_rate), for the whole
recording and for sliding windows; frames without a face or ground truth are silenced, not joined.

Outputs under --output: predictions.parquet (per recording and model: BVP, HRs per window and whole,
SQI, SNR; failed rows with their reason), metrics.parquet (per recording, subject, cohort, metadata group
and window length, with bootstrap CIs over subjects; the run's settings in its key-value metadata) and
report.html with its PNGs. A recording that cannot be scored fails alone, and a model whose output cannot
be scored fails only its own row; bad requests (an unknown model, unreadable weights, no manifest) end
before any engine starts. The driver, `run_evaluate`, runs four phases: check the request, predict (the
engine step), score (metrics) and present (report and terminal tables).
"""
from __future__ import annotations

import argparse
import json
import posixpath
import time
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import journal
from pipelines.arguments import number_at_least, whole_number
from pipelines.console import progress
from pipelines.engines import EngineOptions, add_engine_arguments, engine_options, run_step
from pipelines.errors import JobError
from pipelines.lock import add_lock_argument, check_output, claimed_output
from pipelines.predictors import PRECISIONS, Block, ModelSet, StreamRead, check_models, model_crop_sizes
from pipelines.shard_job import manifest_rows
from transforms import signal
from transforms.errors import ItemFailed
from transforms.manifest import manifest_uri, package_version, source_stats
from transforms.metrics import METRIC_COLUMNS
from transforms.resample import FPS
from transforms.shards import CROP_SIZE, atomic_file, crop_column, read_segments, shard_crop_sizes

DEFAULT_MODELS = ("me-chunk:rlap", "me-chunk:pure", "me-flow:rlap", "green", "chrom", "pos")
WINDOWS = (10.0, 30.0)  # default sliding-window lengths, seconds
PASSES_PIPELINE_ARGS = True
RECORDINGS_PER_CALL = 4  # default bucket size on CPU; a GPU wants many more (--recordings-per-call)
BUCKET_MIN_FILL = 0.75  # a bucket's shortest recording is at least this fraction of its longest
MIN_WINDOW_S = 2.0  # one beat at the lowest rate scored (30 BPM)

PREDICTION_SCHEMA = pa.schema([
    ("recording_id", pa.string()), ("subject_id", pa.string()), ("dataset", pa.string()),
    ("model", pa.string()), ("status", pa.string()), ("reason", pa.string()),
    ("n_frames", pa.int64()), ("face_fraction", pa.float32()),
    ("hr_pred", pa.float64()), ("hr_true", pa.float64()), ("sqi", pa.float64()), ("snr_db", pa.float64()),
    ("windows", pa.list_(pa.struct([("length_s", pa.float32()), ("start_s", pa.float32()),
                                    ("hr_pred", pa.float64()), ("hr_true", pa.float64())]))),
    ("bvp_pred", pa.list_(pa.float32())), ("bvp_true", pa.list_(pa.float32())),
    ("metadata_json", pa.string()),
])


WAVEFORMS = ("bvp_pred", "bvp_true")  # the columns only predictions.parquet holds, not the driver's rows
PARTS_PREFIX = ".prediction-parts-"

_TEXT_METRIC_COLUMNS = ("level", "model", "dataset", "group_key", "group_value", "subject_id", "recording_id")
METRICS_SCHEMA = pa.schema([(c, pa.string() if c in _TEXT_METRIC_COLUMNS else pa.int64() if c.startswith("n_")
                             else pa.float64()) for c in METRIC_COLUMNS])


@dataclass(frozen=True)
class EvaluateSettings:
    """What an evaluation is asked for; how an engine runs it is `EngineOptions`."""
    input_uri: str  # output root of `pulsepipe preprocess`
    output_uri: str
    models: tuple[str, ...] = DEFAULT_MODELS  # rows and tables follow this order
    windows: tuple[float, ...] = WINDOWS  # sliding-window lengths, seconds
    group_by: tuple[str, ...] | None = None  # metadata keys; None: every key with at most 12 values
    n_boot: int = 1000  # bootstrap resamples of subjects
    seed: int = 0  # of the bootstrap
    recordings_per_call: int = RECORDINGS_PER_CALL  # bucket size: recordings per device call
    precision: str = "float32"  # of ME-rPPG's convolutions (see PRECISIONS)

    def __post_init__(self):  # lists become tuples, so frozen settings cannot change under a running job
        for name in ("models", "windows", "group_by"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="output root of `pulsepipe preprocess` (manifest.parquet, shards/)")
    p.add_argument("--output", required=True, help="where predictions.parquet, metrics.parquet and report.html go")
    p.add_argument("--model", dest="models", action="extend", nargs="+", metavar="NAME",
                   help=f"models to run: --model A B or --model A --model B (default: {' '.join(DEFAULT_MODELS)}); "
                        "ME-rPPG as me-chunk:WEIGHTS or me-flow:WEIGHTS with rlap, pure, a .weights.h5 path or a "
                        "`pulsepipe train` run folder; PhysMamba as physmamba:WEIGHTS with rlap, pure or a .h5 path "
                        "(it reads 128x128 crops: preprocess with crop_sizes [36, 128])")
    p.add_argument("--windows", type=number_at_least(MIN_WINDOW_S, "a window length in seconds"), nargs="+",
                   default=list(WINDOWS), metavar="SECONDS",
                   help=f"sliding-window lengths for windowed heart rate, at least {MIN_WINDOW_S:g} s "
                        "(default: 10 30), step half a window")
    p.add_argument("--group-by", nargs="*", metavar="KEY",
                   help="metadata keys to break metrics down by (default: every key with at most 12 values)")
    p.add_argument("--bootstrap", type=whole_number(1), default=1000, metavar="N",
                   help="bootstrap resamples of subjects (default: 1000)")
    p.add_argument("--seed", type=whole_number(0), default=0, help="bootstrap seed (default: 0)")
    p.add_argument("--recordings-per-call", type=whole_number(1), default=RECORDINGS_PER_CALL, metavar="B",
                   help=f"recordings of similar length run together, one device call per 160 frames of all B "
                        f"(default: {RECORDINGS_PER_CALL}; on a GPU, 32-128)")
    p.add_argument("--precision", choices=PRECISIONS, default="float32",
                   help="ME-rPPG convolutions in float32 (the published model, default) or bfloat16 (faster on "
                        "GPUs; the parity bound is in tests/test_model_parity.py)")
    add_lock_argument(p)
    add_engine_arguments(p, gpus=True)


# ---- the step: a bucket of recordings, every model --------------------------------------------------

@dataclass(frozen=True)
class RecordingTruth:
    """What a recording's predictions are scored against."""
    face: np.ndarray  # (n,) bool, a face in the frame
    bvp_true: np.ndarray  # (n,) float64 ground-truth BVP, NaN where there is none
    usable: np.ndarray  # (n,) bool, a face and ground truth
    hr_true: float  # BPM, of the whole recording


def recording_truth(uri: str, read: StreamRead) -> RecordingTruth | str:
    """The truth to score a recording against, from what its shard's stream read, or why it cannot be
    scored (naming `uri`, its shard)."""
    if read.error:
        return str(read.error)
    if not len(read.face_found):
        return f"{uri}: the shard holds no segments"
    if read.truth is None:
        return f"{uri}: no ground-truth BVP: a layout without truth cannot be scored"
    usable = read.face_found & np.isfinite(read.truth)
    if usable.sum() < 2 * FPS:
        return f"{uri}: only {usable.sum() / FPS:.1f} s with a face and ground truth"
    hr_true, _ = signal.heart_rate(read.truth, FPS, usable=usable)
    if np.isnan(hr_true):
        return f"{uri}: the ground-truth BVP is flat (nothing in 0.5-3 Hz): nothing to score against"
    return RecordingTruth(read.face_found, read.truth, usable, hr_true)


def _shard_segments(uri: str, fs, columns: list[str]) -> Iterator:
    """`read_segments` of a shard's columns; an unreadable shard is an ItemFailed naming it."""
    try:
        yield from read_segments(uri, fs, columns=columns)
    except Exception as e:  # noqa: BLE001 - an unreadable shard fails its recording, not the bucket
        raise ItemFailed(f"{uri}: cannot read the shard: {type(e).__name__}: {e}") from e


def no_crops(uri: str, size: int) -> str:
    """Why a shard cannot feed a model that reads size x size crops, and what to do."""
    return f"{uri} has no {size}x{size} crops: re-run preprocess with crop_sizes including {size}"


def shard_blocks(uri: str, fs, sizes=(CROP_SIZE,)) -> Iterator[Block]:
    """A recording's shard, segment by segment, as blocks for the models with their ground truth (for
    `ModelSet.feed`): the crops at each of `sizes` (only their columns are read); ItemFailed if the shard
    cannot be read, a segment is missing or lacks a size."""
    columns = ["segment_index", "start_frame", "face_found", "bvp", *{crop_column(s) for s in sizes}]
    n_expected = 0
    for seg in _shard_segments(uri, fs, columns):
        if seg.start_frame != n_expected:
            raise ItemFailed(f"{uri}: segment {seg.segment_index} starts at frame {seg.start_frame}, "
                             f"expected {n_expected}")
        n_expected += seg.n_frames
        crops = {s: seg.crops(s) for s in sizes}
        for s, c in crops.items():
            if c is None:
                raise ItemFailed(no_crops(uri, s))
        yield Block(crops, seg.face_found, truth=seg.bvp)


class EvaluateStep:
    """A bucket of recordings of similar length through every model in lockstep (one device call per
    160-frame block serves the whole bucket); writes the bucket's prediction rows as a part file."""

    runs_model = True  # engines run it as a model step (Beam's RunInference, Ray's actor pool), a bucket per call

    def __init__(self, input_uri: str, parts_uri: str, models: list[str], windows: list[float],
                 precision: str = "float32", gpus: bool = False):
        self.in_fs, self.in_root = fsspec.core.url_to_fs(input_uri)
        self.out_fs, self.parts = fsspec.core.url_to_fs(parts_uri)
        self.models = ModelSet(models, precision=precision, cpu_only=not gpus)
        self.windows = windows

    def __call__(self, bucket: dict) -> dict:
        started = time.perf_counter()
        items = bucket["recordings"]
        try:
            rows = self._predict(items)
        except Exception as e:  # noqa: BLE001 - a bug must not drop recordings: they are reported failed
            reason = f"internal error: {type(e).__name__}: {e}"
            rows = [self._failed(item, f"{self._uri(item)}: {reason}") for item in items]
        return self._recorded(items, rows, started)

    def lost(self, bucket: dict, reason: str) -> dict:
        """The bucket's recordings failed for every model, with the reason: processing them killed the
        worker on every attempt (pipelines.engines.supervisor)."""
        items = bucket["recordings"]
        return self._recorded(items, [self._failed(item, f"{self._uri(item)}: {reason}") for item in items],
                              time.perf_counter())

    @staticmethod
    def split(bucket: dict) -> list[dict]:
        """A bucket per recording: after a worker died on the bucket, each recording is tried alone."""
        return [{**bucket, "recordings": [item]} for item in bucket["recordings"]]

    def _recorded(self, items: list[dict], rows: list[list[dict]], started: float) -> dict:
        """Each recording's rows written as its part file (`part_name`), whole or not at all, so a re-run
        after a killed driver knows it done; the result holds the rows without waveforms."""
        rows = [[{**dict.fromkeys(PREDICTION_SCHEMA.names), **r} for r in rs] for rs in rows]  # failed: nulls
        for item, recording_rows in zip(items, rows):
            with atomic_file(f"{self.parts}/{part_name(item)}", self.out_fs) as f:
                pq.write_table(pa.Table.from_pylist(recording_rows, schema=PREDICTION_SCHEMA), f)
        rows = [r for rs in rows for r in rs]
        self._progress(rows, len(items), time.perf_counter() - started)
        return {"rows": [{k: v for k, v in r.items() if k not in WAVEFORMS} for r in rows]}

    def _uri(self, item: dict) -> str:
        # a recording that failed in preprocessing has no shard: its messages name it instead
        return (f"{self.in_root.rstrip('/')}/{item['shard']}" if item["shard"]
                else f"{item['dataset']}/{item['recording_id']}")

    def _blocks(self, item: dict) -> Iterator[Block]:
        """The recording's blocks (`shard_blocks`); ItemFailed if it failed in preprocessing."""
        if item.get("reason"):
            raise ItemFailed(item["reason"])
        yield from shard_blocks(self._uri(item), self.in_fs, self.models.crop_sizes)

    def _predict(self, items: list[dict]) -> list[list[dict]]:
        fed = self.models.feed([self._blocks(item) for item in items])
        truths = [recording_truth(self._uri(item), read) for item, read in zip(items, fed.reads)]
        keep = [isinstance(t, RecordingTruth) for t in truths]
        bvps = {name: p.finish(keep) for name, p in fed.predictors.items()}
        return [self._score(item, truth, {name: b[k] for name, b in bvps.items()}) if keep[k]
                else self._failed(item, truth) for k, (item, truth) in enumerate(zip(items, truths))]

    def _failed(self, item: dict, reason: str) -> list[dict]:
        return [_failed_row(item, m, reason) for m in self.models.names]

    def _score(self, item: dict, truth: RecordingTruth, bvps: dict[str, np.ndarray]) -> list[dict]:
        """One row per model; a model whose output cannot be scored fails its own row, named."""
        true = signal.postprocess_bvp(truth.bvp_true, FPS, usable=truth.usable)
        rows = []
        for name, bvp in bvps.items():
            try:
                rows.append(self._score_model(item, truth, name, bvp, true))
            except Exception as e:  # noqa: BLE001 - one model's bad output must not fail the others
                why = str(e) if isinstance(e, ItemFailed) else f"{type(e).__name__}: {e}"
                rows.append(_failed_row(item, name, f"{self._uri(item)}: {name}: cannot score its output: {why}"))
        return rows

    def _score_model(self, item: dict, truth: RecordingTruth, name: str, bvp: np.ndarray, true: np.ndarray) -> dict:
        hr, sqi = signal.heart_rate(bvp, FPS, usable=truth.usable)
        if np.isnan(hr):
            raise ItemFailed("the predicted BVP is flat (nothing in 0.5-3 Hz)")
        pred = signal.postprocess_bvp(bvp, FPS, usable=truth.usable)
        return {**_base(item), "model": name, "status": "ok", "reason": None, "n_frames": len(truth.face),
                "face_fraction": float(truth.face.mean()), "hr_pred": hr, "hr_true": truth.hr_true, "sqi": sqi,
                "snr_db": signal.snr_db(pred, FPS, truth.hr_true), "windows": self._windows(pred, true, truth.usable),
                "bvp_pred": bvp.astype(np.float32), "bvp_true": truth.bvp_true.astype(np.float32)}

    def _windows(self, pred: np.ndarray, true: np.ndarray, usable: np.ndarray) -> list[dict]:
        """Sliding-window HRs of the band-passed waveforms on the recording's own time axis; windows
        mostly in gaps are left out (see `signal.hr_windows`)."""
        out = []
        for length in self.windows:
            if len(pred) < length * FPS:
                continue
            centres, hr_pred = signal.hr_windows(pred, FPS, length, length / 2, usable=usable)
            _, hr_true = signal.hr_windows(true, FPS, length, length / 2, usable=usable)
            out += [{"length_s": length, "start_s": c - length / 2, "hr_pred": hp, "hr_true": ht}
                    for c, hp, ht in zip(centres, hr_pred, hr_true) if not np.isnan(ht)]
        return out

    def _progress(self, rows: list[dict], n_recordings: int, seconds: float) -> None:
        n = len(self.models.names)
        for k in range(0, len(rows), n):  # one line per recording: its rows are the models in order
            failed = [r for r in rows[k:k + n] if r["status"] == "failed"]
            state = ("ok" if not failed else f"failed ({failed[0]['reason']})" if len(failed) == n
                     else "ok but " + "; ".join(r["reason"] for r in failed))  # each reason names its model
            progress(f"{rows[k]['dataset']}/{rows[k]['recording_id']}: {state} (bucket of {n_recordings}, "
                     f"{seconds:.1f} s)")


def _base(item: dict) -> dict:
    return {k: item[k] for k in ("recording_id", "subject_id", "dataset", "metadata_json")}


def _failed_row(item: dict, model: str, reason: str) -> dict:
    return {**_base(item), "model": model, "status": "failed", "reason": reason}


# ---- the driver -------------------------------------------------------------------------------------

def work_items(manifest: list[dict]) -> list[dict]:
    """One item per manifest row, longest first; rows that failed in preprocessing come along with their
    reason and land in the outputs as failed."""
    items = [{"recording_id": r["recording_id"], "subject_id": r["subject_id"], "dataset": r["dataset"],
              "metadata_json": r["metadata_json"], "shard": r["shard"], "n_frames": r["n_frames"] or 0,
              "reason": None if r["status"] == "ok" else f"preprocessing failed: {r['reason']}"}
             for r in manifest]
    items.sort(key=lambda i: (-i["n_frames"], i["dataset"], i["recording_id"]))
    return items


def buckets(items: list[dict], size: int, min_fill: float = BUCKET_MIN_FILL) -> list[dict]:
    """Items (longest first) into buckets of up to `size` recordings run in lockstep; a bucket only takes
    recordings at least `min_fill` of its longest's length, so padding wastes little of a device call.
    Recordings without frames (failed in preprocessing) share buckets of their own."""
    out, current = [], []
    for item in items:
        if current and (len(current) == size or item["n_frames"] < min_fill * current[0]["n_frames"]):
            out.append(current)
            current = []
        current.append(item)
    if current:
        out.append(current)
    return [{"index": k, "recordings": b} for k, b in enumerate(out)]


def default_group_keys(rows: list[dict], most: int = 12) -> list[str]:
    values: dict[str, set] = {}
    for r in rows:
        for k, v in json.loads(r["metadata_json"] or "{}").items():
            if isinstance(v, (str, bool, int)) and not isinstance(v, float):
                values.setdefault(k, set()).add(v)
    return sorted(k for k, v in values.items() if 1 < len(v) <= most)


def run_evaluate(settings: EvaluateSettings, opts: EngineOptions, log=print) -> dict:
    """The whole job; returns {'predictions': rows without waveforms, 'metrics': metric rows}."""
    started = time.perf_counter()
    items = check_request(settings)
    rows = predict(settings, opts, items, log)
    metric_rows, about = score(settings, opts, rows, len(items))
    report = present(settings, rows, metric_rows, about, log)
    log(f"\n{about['recordings scored by every model']} recordings scored by every model in "
        f"{time.perf_counter() - started:.0f} s; report: {report}")
    return {"predictions": rows, "metrics": metric_rows}


def check_request(settings: EvaluateSettings) -> list[dict]:
    """The work items of the input's manifest; JobError for a request that cannot run (an unknown model,
    unreadable weights, no manifest or a damaged one, an output that is a file or cannot be written), said
    here, not in every worker's traceback."""
    try:
        check_models(settings.models)
    except ValueError as e:
        raise JobError(str(e)) from None
    manifest = manifest_rows(settings.input_uri)
    if not manifest:
        raise JobError(f"{settings.input_uri}: no manifest.parquet; run `pulsepipe preprocess` first")
    check_crops(settings, manifest)
    check_output(settings.output_uri)
    return work_items(manifest)


def check_crops(settings: EvaluateSettings, manifest: list[dict]) -> None:
    """JobError when a model reads a crop size (PhysMamba's 128) that a recording's shard lacks: each ok
    shard's footer names its sizes, so hours of other models' work are not spent before the gap shows.
    Only runs that ask for such a size read the footers; a shard that cannot be read fails in the step."""
    from concurrent.futures import ThreadPoolExecutor

    wanted = {}
    for name, size in model_crop_sizes(settings.models).items():
        if size != CROP_SIZE:  # the shards' `frames`: every shard has them
            wanted.setdefault(size, []).append(name)
    if not wanted:
        return
    fs, root = fsspec.core.url_to_fs(settings.input_uri)
    uris = [f"{root.rstrip('/')}/{r['shard']}" for r in manifest if r["status"] == "ok" and r["shard"]]

    def sizes(uri: str) -> tuple[int, ...] | None:
        try:  # written before shards named their sizes: `frames` only
            return shard_crop_sizes(uri, fs) or (CROP_SIZE,)
        except Exception:  # noqa: BLE001 - the step reports an unreadable shard as that recording's failure
            return None

    with ThreadPoolExecutor(8) as pool:  # footers only: I/O bound
        found = dict(zip(uris, pool.map(sizes, uris)))
    for size, names in sorted(wanted.items()):
        lacking = [u for u, have in found.items() if have is not None and size not in have]
        if lacking:
            raise JobError(f"{', '.join(names)}: {len(lacking)} of {len(uris)} recordings: "
                           f"{no_crops(lacking[0], size)}" + (" (and the others likewise)" if len(lacking) > 1 else ""))


def predict(settings: EvaluateSettings, opts: EngineOptions, items: list[dict], log) -> list[dict]:
    """EvaluateStep over buckets of the items on the engine, each recording's rows a part file, the parts
    merged into predictions.parquet; returns the rows without waveforms, by dataset, recording and the
    models' order.

    The parts folder is named for the request (`_request_key`) and removed only once merged: a re-run of
    the same request after a killed driver redoes only the recordings without a part; a different request
    starts afresh (another request's parts, and temp files killed writers left, are removed first).
    """
    out_fs, out_root = fsspec.core.url_to_fs(settings.output_uri)
    out_fs.makedirs(out_root, exist_ok=True)
    parts_name = f"{PARTS_PREFIX}{_request_key(settings, opts)}"  # workers write here; merged below
    parts = f"{out_root.rstrip('/')}/{parts_name}"
    for old in out_fs.ls(out_root, detail=False):
        if posixpath.basename(old).startswith(PARTS_PREFIX) and posixpath.basename(old) != parts_name:
            out_fs.rm(old, recursive=True)
    journal.remove_temp_files(settings.output_uri)
    out_fs.makedirs(parts, exist_ok=True)
    present = {posixpath.basename(p) for p in out_fs.ls(parts, detail=False)}
    todo = [item for item in items if part_name(item) not in present]
    work = buckets(todo, settings.recordings_per_call)
    done = len(items) - len(todo)
    resumed = f" ({done} done before, from the parts of an interrupted run)" if done else ""
    log(f"{len(items)} recordings from {settings.input_uri}{resumed} in {len(work)} buckets of up to "
        f"{settings.recordings_per_call}, models {', '.join(settings.models)}, on {opts.engine} ({_device(opts)})")
    step_kwargs = {"input_uri": settings.input_uri, "parts_uri": f"{settings.output_uri.rstrip('/')}/{parts_name}",
                   "models": list(settings.models), "windows": list(settings.windows),
                   "precision": settings.precision, "gpus": bool(opts.num_gpus)}
    run_step(EvaluateStep, step_kwargs, work, opts, settings.output_uri)
    ordered = sorted(items, key=lambda i: (i["dataset"], i["recording_id"]))
    rows = _merge_parts(out_fs, [f"{parts}/{part_name(i)}" for i in ordered], f"{out_root}/predictions.parquet")
    out_fs.rm(parts, recursive=True)
    rows.sort(key=lambda r: (r["dataset"], r["recording_id"], settings.models.index(r["model"])))
    return rows


def part_name(item: dict) -> str:
    """The file name of a recording's prediction part."""
    return f"{journal.key([item['dataset'], item['recording_id']])}.parquet"


def _request_key(settings: EvaluateSettings, opts: EngineOptions) -> str:
    """What decides a recording's predictions: the input manifest's version, the models, windows, precision
    and device."""
    in_fs, in_root = fsspec.core.url_to_fs(settings.input_uri)
    return journal.key({"manifest": source_stats([manifest_uri(in_root)], in_fs), "models": settings.models,
                        "windows": settings.windows, "precision": settings.precision, "gpus": bool(opts.num_gpus)})


def score(settings: EvaluateSettings, opts: EngineOptions, rows: list[dict], n_recordings: int
          ) -> tuple[list[dict], dict]:
    """The metric rows of the scored predictions, written to metrics.parquet with the settings that decide
    them in its metadata; and what produced the run, for the report."""
    from transforms.metrics import metrics_table

    ok = _ok(rows)
    scored = [{**json.loads(r["metadata_json"] or "{}"), **r} for r in ok]
    keys = default_group_keys(ok) if settings.group_by is None else settings.group_by
    window_pairs = [{**r, **w} for r in ok for w in r["windows"]]  # a window's length_s, hr_pred, hr_true
    metric_rows = metrics_table(scored, keys, windows=window_pairs, n_boot=settings.n_boot, seed=settings.seed)
    metric_rows.sort(key=lambda r: settings.models.index(r["model"]))  # stable: the models' order, then the table's
    about = {"pulsepipe": package_version(), "input": settings.input_uri, "models": " ".join(settings.models),
             "precision": settings.precision, "windows (s)": " ".join(f"{w:g}" for w in settings.windows),
             "bootstrap resamples": str(settings.n_boot), "bootstrap seed": str(settings.seed),
             "engine": f"{opts.engine}, {_device(opts)}",
             "recordings scored by every model": f"{_n_scored(ok, settings.models)} of {n_recordings}",
             "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    out_fs, out_root = fsspec.core.url_to_fs(settings.output_uri)
    with atomic_file(f"{out_root}/metrics.parquet", out_fs) as f:
        table = pa.Table.from_pylist(metric_rows, schema=METRICS_SCHEMA)
        # the settings that decide the numbers: the same file from either engine
        decided_by = {f"pulsepipe:{k}": v for k, v in about.items() if k not in ("engine", "finished")}
        pq.write_table(table.replace_schema_metadata(decided_by), f)
    return metric_rows, about


def present(settings: EvaluateSettings, rows: list[dict], metric_rows: list[dict], about: dict, log) -> str:
    """report.html with each model's worst waveforms, then the terminal tables and one line per failure;
    returns the report's URI."""
    from pipelines.report import failures, format_cohort_table, format_subject_table, worst_recordings, write_report

    out_fs, out_root = fsspec.core.url_to_fs(settings.output_uri)
    waveforms = _waveforms(out_fs, out_root, worst_recordings(_ok(rows)))
    report = write_report(settings.output_uri, rows, metric_rows, waveforms, about)
    tables = [format_subject_table(metric_rows), format_cohort_table(metric_rows)]
    if any(r["level"] == "window" for r in metric_rows):
        tables.append(format_cohort_table(metric_rows, level="window"))
    for table in tables:
        log("")
        log(table)
    for dataset, recording_id, failed_models, reason in failures(rows, settings.models):
        named = "" if failed_models == "all" else f" ({failed_models})"
        log(f"failed: {dataset}/{recording_id}{named}: {reason}")
    return report


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["status"] == "ok"]


def _device(opts: EngineOptions) -> str:
    return f"{opts.num_gpus:g} GPU per worker" if opts.num_gpus else "CPU"


def _n_scored(ok: list[dict], models) -> int:
    per_recording = Counter((r["dataset"], r["recording_id"]) for r in ok)
    return sum(n == len(models) for n in per_recording.values())


def _merge_parts(fs, paths: list[str], target: str) -> list[dict]:
    """The part files at paths, in order, streamed into one table at target (memory holds one recording's
    rows at a time); returns their rows without the waveforms."""
    rows = []
    with atomic_file(target, fs) as f, pq.ParquetWriter(f, PREDICTION_SCHEMA) as writer:
        for path in paths:
            with fs.open(path, "rb") as part:
                table = pq.read_table(part, schema=PREDICTION_SCHEMA)
            writer.write_table(table)
            rows += table.drop_columns(list(WAVEFORMS)).to_pylist()
    return rows


def _waveforms(fs, root: str, wanted: list[tuple[str, str, str]]) -> dict:
    """(model, dataset, recording_id) -> (t, bvp_pred, bvp_true) of the wanted rows, in the order wanted,
    read from predictions.parquet."""
    if not wanted:
        return {}
    found = {}
    with fs.open(f"{root}/predictions.parquet", "rb") as f:
        table = pq.read_table(f, columns=["model", "dataset", "recording_id", "bvp_pred", "bvp_true"],
                              filters=[("recording_id", "in", sorted({rid for _, _, rid in wanted}))])
    for r in table.to_pylist():
        pred = np.asarray(r["bvp_pred"], np.float64)
        found[(r["model"], r["dataset"], r["recording_id"])] = (np.arange(len(pred)) / FPS, pred,
                                                                np.asarray(r["bvp_true"], np.float64))
    return {key: found[key] for key in wanted if key in found}


def main(args: argparse.Namespace) -> int:
    settings = EvaluateSettings(args.input, args.output, models=tuple(args.models or DEFAULT_MODELS),
                                windows=args.windows, group_by=args.group_by, n_boot=args.bootstrap, seed=args.seed,
                                recordings_per_call=args.recordings_per_call, precision=args.precision)
    with claimed_output(args.output, args.wait_for_lock):  # one writer per output root
        run_evaluate(settings, engine_options(args))
    return 0
