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
before any engine starts.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections import Counter

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.engines import add_engine_arguments, engine_options, number_at_least, run_step, whole_number
from pipelines.errors import JobError
from pipelines.predictors import FPS, PRECISIONS, ModelSet, check_models
from transforms import signal
from transforms.manifest import read_manifest
from transforms.metrics import METRIC_COLUMNS
from transforms.shards import atomic_file, read_segments

DEFAULT_MODELS = ("me-chunk:rlap", "me-chunk:pure", "me-flow:rlap", "green", "chrom", "pos")
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


_TEXT_METRIC_COLUMNS = ("level", "model", "dataset", "group_key", "group_value", "subject_id", "recording_id")
METRICS_SCHEMA = pa.schema([(c, pa.string() if c in _TEXT_METRIC_COLUMNS else pa.int64() if c.startswith("n_")
                             else pa.float64()) for c in METRIC_COLUMNS])


class EvaluationFailed(Exception):
    """A recording that cannot be evaluated; str names the shard and the reason."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="output root of `pulsepipe preprocess` (manifest.parquet, shards/)")
    p.add_argument("--output", required=True, help="where predictions.parquet, metrics.parquet and report.html go")
    p.add_argument("--model", dest="models", action="append",
                   help=f"model to run, repeatable (default: {' '.join(DEFAULT_MODELS)}); "
                        "ME-rPPG as me-chunk:WEIGHTS or me-flow:WEIGHTS with rlap, pure or a path")
    p.add_argument("--windows", type=number_at_least(MIN_WINDOW_S, "a window length in seconds"), nargs="+", default=[10.0, 30.0], metavar="SECONDS",
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
    add_engine_arguments(p, gpus=True)


# ---- the step: a bucket of recordings, every model --------------------------------------------------

class _Recording:
    """One recording's shard, read segment by segment: crops go to the models, flags and truth stay here.
    A shard that cannot be read ends its stream early with `error` set; the bucket's others go on."""

    def __init__(self, item: dict, fs, root: str):
        self.item, self.fs = item, fs
        # a recording that failed in preprocessing has no shard: its messages name it instead
        self.uri = f"{root.rstrip('/')}/{item['shard']}" if item["shard"] else f"{item['dataset']}/{item['recording_id']}"
        self.error: str | None = item.get("reason")
        self.found: list[np.ndarray] = []
        self.truth: list[np.ndarray | None] = []

    def crops(self):
        if self.error:
            return
        n_expected = 0
        try:
            for seg in read_segments(self.uri, self.fs, columns=None):
                if seg.start_frame != n_expected:
                    raise EvaluationFailed(f"{self.uri}: segment {seg.segment_index} starts at frame "
                                           f"{seg.start_frame}, expected {n_expected}")
                n_expected += seg.n_frames
                self.found.append(np.asarray(seg.face_found, bool))
                self.truth.append(None if seg.bvp is None else np.asarray(seg.bvp, np.float64))
                yield seg.frames, seg.face_found
        except EvaluationFailed as e:
            self.error = str(e)
        except Exception as e:  # noqa: BLE001 - an unreadable shard fails its recording, not the bucket
            self.error = f"{self.uri}: cannot read the shard: {type(e).__name__}: {e}"

    def check(self) -> None:
        """Set `error` if the recording cannot be scored; otherwise `face`, `bvp_true` and `usable`."""
        if self.error:
            return
        if not self.found:
            self.error = f"{self.uri}: the shard holds no segments"
        elif any(t is None for t in self.truth):
            self.error = f"{self.uri}: no ground-truth BVP: a layout without truth cannot be scored"
        else:
            self.face, self.bvp_true = np.concatenate(self.found), np.concatenate(self.truth)
            self.usable = self.face & np.isfinite(self.bvp_true)
            if self.usable.sum() < 2 * FPS:
                self.error = f"{self.uri}: only {self.usable.sum() / FPS:.1f} s with a face and ground truth"
                return
            self.hr_true, _ = signal.heart_rate(self.bvp_true, FPS, usable=self.usable)
            if np.isnan(self.hr_true):
                self.error = f"{self.uri}: the ground-truth BVP is flat (nothing in 0.5-3 Hz): nothing to score against"


class EvaluateStep:
    """A bucket of recordings of similar length through every model in lockstep (one device call per
    160-frame block serves the whole bucket); writes the bucket's prediction rows as a part file."""

    def __init__(self, input_uri: str, parts_uri: str, models: list[str], windows: list[float],
                 precision: str = "float32", gpus: bool = False):
        self.in_fs, self.in_root = fsspec.core.url_to_fs(input_uri)
        self.out_fs, self.parts = fsspec.core.url_to_fs(parts_uri)
        self.models = ModelSet(models, precision=precision, cpu_only=not gpus)
        self.windows = windows

    def __call__(self, bucket: dict) -> dict:
        started = time.perf_counter()
        recordings = [_Recording(item, self.in_fs, self.in_root) for item in bucket["recordings"]]
        try:
            rows = self._predict(recordings)
        except Exception as e:  # noqa: BLE001 - a bug must not drop recordings: they are reported failed
            reason = f"internal error: {type(e).__name__}: {e}"
            rows = [self._failed(r.item, f"{r.uri}: {reason}") for r in recordings]
        rows = [{**dict.fromkeys(PREDICTION_SCHEMA.names), **r} for rs in rows for r in rs]  # failed: nulls
        with atomic_file(f"{self.parts}/{bucket['index']:08d}.parquet", self.out_fs) as f:
            pq.write_table(pa.Table.from_pylist(rows, schema=PREDICTION_SCHEMA), f)
        seconds = time.perf_counter() - started
        n = len(self.models.names)
        for k in range(0, len(rows), n):  # one line per recording: its rows are the models in order
            failed = [r for r in rows[k:k + n] if r["status"] == "failed"]
            state = ("ok" if not failed else f"failed ({failed[0]['reason']})" if len(failed) == n
                     else "ok but " + "; ".join(r["reason"] for r in failed))  # each reason names its model
            print(f"  {rows[k]['dataset']}/{rows[k]['recording_id']}: {state} (bucket of {len(recordings)}, "
                  f"{seconds:.1f} s)", file=sys.stderr)
        # what the driver needs for metrics: everything but the waveforms
        return {"rows": [{k: v for k, v in r.items() if k not in ("bvp_pred", "bvp_true")} for r in rows]}

    def _failed(self, item: dict, reason: str) -> list[dict]:
        return [{**_base(item), "model": m, "status": "failed", "reason": reason} for m in self.models.names]

    def _predict(self, recordings: list[_Recording]) -> list[list[dict]]:
        predictors = self.models.feed([r.crops() for r in recordings])
        for r in recordings:
            r.check()
        keep = [r.error is None for r in recordings]
        bvps = {name: p.finish(keep) for name, p in predictors.items()}
        return [self._score(r, {name: b[k] for name, b in bvps.items()}) if keep[k] else self._failed(r.item, r.error)
                for k, r in enumerate(recordings)]

    def _score(self, r: _Recording, bvps: dict[str, np.ndarray]) -> list[dict]:
        """One row per model; a model whose output cannot be scored fails its own row, named."""
        true = signal.postprocess_bvp(r.bvp_true, FPS, usable=r.usable)
        rows = []
        for name, bvp in bvps.items():
            try:
                rows.append(self._score_model(r, name, bvp, true))
            except Exception as e:  # noqa: BLE001 - one model's bad output must not fail the others
                why = str(e) if isinstance(e, EvaluationFailed) else f"{type(e).__name__}: {e}"
                rows.append({**_base(r.item), "model": name, "status": "failed",
                             "reason": f"{r.uri}: {name}: cannot score its output: {why}"})
        return rows

    def _score_model(self, r: _Recording, name: str, bvp: np.ndarray, true: np.ndarray) -> dict:
        hr, sqi = signal.heart_rate(bvp, FPS, usable=r.usable)
        if np.isnan(hr):
            raise EvaluationFailed("the predicted BVP is flat (nothing in 0.5-3 Hz)")
        pred = signal.postprocess_bvp(bvp, FPS, usable=r.usable)
        return {**_base(r.item), "model": name, "status": "ok", "reason": None, "n_frames": len(r.face),
                "face_fraction": float(r.face.mean()), "hr_pred": hr, "hr_true": r.hr_true, "sqi": sqi,
                "snr_db": signal.snr_db(pred, FPS, r.hr_true), "windows": self._windows(pred, true, r.usable),
                "bvp_pred": bvp.astype(np.float32), "bvp_true": r.bvp_true.astype(np.float32)}

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


def _base(item: dict) -> dict:
    return {k: item[k] for k in ("recording_id", "subject_id", "dataset", "metadata_json")}


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


def run_evaluate(input_uri: str, output_uri: str, models, windows, opts, group_by=None, n_boot: int = 1000,
                 seed: int = 0, recordings_per_call: int = RECORDINGS_PER_CALL, precision: str = "float32",
                 log=print) -> dict:
    """The whole job; returns {'predictions': rows without waveforms, 'metrics': metric rows}."""
    from pipelines.cli import package_version
    from pipelines.report import failures, format_cohort_table, format_subject_table, worst_recordings, write_report
    from transforms.metrics import metrics_table

    started = time.perf_counter()
    models = tuple(models)
    try:
        check_models(models)  # here, not in every worker's traceback
    except ValueError as e:
        raise JobError(str(e)) from None
    in_fs, in_root = fsspec.core.url_to_fs(input_uri)
    out_fs, out_root = fsspec.core.url_to_fs(output_uri)
    manifest = read_manifest(f"{in_root.rstrip('/')}/manifest.parquet", in_fs)
    if not manifest:
        raise JobError(f"{input_uri}: no manifest.parquet; run `pulsepipe preprocess` first")
    items = work_items(manifest)
    work = buckets(items, recordings_per_call)
    device = f"{opts.num_gpus:g} GPU per worker" if opts.num_gpus else "CPU"
    log(f"{len(items)} recordings from {input_uri} in {len(work)} buckets of up to {recordings_per_call}, "
        f"models {', '.join(models)}, on {opts.engine} ({device})")
    out_fs.makedirs(out_root, exist_ok=True)
    parts_name = f".prediction-parts-{uuid.uuid4().hex}"  # workers write here; merged below
    parts = f"{out_root.rstrip('/')}/{parts_name}"
    out_fs.makedirs(parts, exist_ok=True)
    step_kwargs = {"input_uri": input_uri, "parts_uri": f"{output_uri.rstrip('/')}/{parts_name}",
                   "models": list(models), "windows": list(windows), "precision": precision,
                   "gpus": bool(opts.num_gpus)}
    try:
        # a model step (Beam's RunInference, Ray's map_batches on an actor pool), one bucket per call
        results = run_step(EvaluateStep, step_kwargs, work, opts, output_uri, model_batch=1)
        _merge_parts(out_fs, parts, f"{out_root}/predictions.parquet")
    finally:
        out_fs.rm(parts, recursive=True)
    rows = [r for res in results for r in res["rows"]]
    rows.sort(key=lambda r: (r["dataset"], r["recording_id"], models.index(r["model"])))
    ok = [r for r in rows if r["status"] == "ok"]
    scored = [{**json.loads(r["metadata_json"] or "{}"), **r} for r in ok]
    keys = default_group_keys(ok) if group_by is None else group_by
    window_pairs = [{**r, **w} for r in ok for w in r["windows"]]  # a window's length_s, hr_pred, hr_true
    metric_rows = metrics_table(scored, keys, windows=window_pairs, n_boot=n_boot, seed=seed)
    metric_rows.sort(key=lambda r: models.index(r["model"]))  # stable: the command line's order, then the table's
    about = {"pulsepipe": package_version(), "input": input_uri, "models": " ".join(models),
             "precision": precision, "windows (s)": " ".join(f"{w:g}" for w in windows),
             "bootstrap resamples": str(n_boot), "bootstrap seed": str(seed), "engine": f"{opts.engine}, {device}",
             "recordings scored by every model": f"{_n_scored(ok, models)} of {len(items)}",
             "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    with atomic_file(f"{out_root}/metrics.parquet", out_fs) as f:
        table = pa.Table.from_pylist(metric_rows, schema=METRICS_SCHEMA)
        # the settings that decide the numbers: the same file from either engine
        settings = {f"pulsepipe:{k}": v for k, v in about.items() if k not in ("engine", "finished")}
        pq.write_table(table.replace_schema_metadata(settings), f)
    waveforms = _waveforms(out_fs, out_root, worst_recordings(ok))
    report = write_report(output_uri, rows, metric_rows, waveforms, about)
    log("")
    log(format_subject_table(metric_rows))
    log("")
    log(format_cohort_table(metric_rows))
    if any(r["level"] == "window" for r in metric_rows):
        log("")
        log(format_cohort_table(metric_rows, level="window"))
    for dataset, recording_id, failed_models, reason in failures(rows, models):
        named = "" if failed_models == "all" else f" ({failed_models})"
        log(f"failed: {dataset}/{recording_id}{named}: {reason}")
    log(f"\n{about['recordings scored by every model']} recordings scored by every model in "
        f"{time.perf_counter() - started:.0f} s; report: {report}")
    return {"predictions": rows, "metrics": metric_rows}


def _n_scored(ok: list[dict], models) -> int:
    per_recording = Counter((r["dataset"], r["recording_id"]) for r in ok)
    return sum(n == len(models) for n in per_recording.values())


def _merge_parts(fs, parts: str, target: str) -> None:
    # one part file per recording, streamed into one table: memory holds one recording's rows at a time
    with atomic_file(target, fs) as f:
        with pq.ParquetWriter(f, PREDICTION_SCHEMA) as writer:
            for path in sorted(fs.ls(parts, detail=False)):
                with fs.open(path, "rb") as part:
                    writer.write_table(pq.read_table(part, schema=PREDICTION_SCHEMA))


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
    run_evaluate(args.input, args.output, tuple(args.models or DEFAULT_MODELS), args.windows, engine_options(args),
                 group_by=args.group_by, n_boot=args.bootstrap, seed=args.seed,
                 recordings_per_call=args.recordings_per_call, precision=args.precision)
    return 0
