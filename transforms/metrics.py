"""Heart-rate evaluation metrics, as the rPPG literature defines them, and the cohort metrics table.

Notation: p_i predicted HR and t_i ground-truth HR (BPM) of pair i, e_i = p_i - t_i, n pairs.
Every pair function takes two arrays of the same shape, drops the pairs where either side is NaN,
and raises ValueError on mismatched shapes or too few pairs.

`metrics_table` turns per-recording rows (and sliding-window HR pairs) into rows of one table at five
levels (recording, subject, cohort, group, window), all with the columns in `METRIC_COLUMNS`, None where a
level defines no value.
Confidence intervals resample *subjects*: recordings of one subject share a face, a camera and a
session, so their errors are not independent and resampling recordings would give too-narrow CIs.
"""
from __future__ import annotations

import math
import warnings
from collections import defaultdict
from typing import Callable, Iterable, Sequence

import numpy as np

LEVELS = ("recording", "subject", "cohort", "group", "window")
METRIC_COLUMNS = (
    "level", "model", "dataset", "group_key", "group_value", "subject_id", "recording_id", "window_s",
    "n_recordings", "n_subjects", "n_windows",
    "mae", "mae_lo", "mae_hi", "rmse", "rmse_lo", "rmse_hi", "mape", "mape_lo", "mape_hi",
    "pearson_r", "r_lo", "r_hi", "snr_db", "snr_lo", "snr_hi",
    "ba_bias", "ba_loa_low", "ba_loa_high",
    "hr_pred", "hr_true",
)
MIN_CI_SUBJECTS = 2  # one subject resampled is always itself: its interval would claim certainty
BA_Z = 1.96  # Bland & Altman (1986): 95% of differences lie within bias +- 1.96 sd if they are normal


# --- pair metrics ---------------------------------------------------------------------------------

def paired(pred, true, min_pairs: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(pred, true) as flat float64 arrays without the pairs where either is NaN.

    Raises ValueError if the shapes differ or fewer than `min_pairs` pairs remain.
    """
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if pred.shape != true.shape:
        raise ValueError(f"predicted and true HR have different shapes: {pred.shape} vs {true.shape}")
    pred, true = pred.ravel(), true.ravel()
    keep = ~(np.isnan(pred) | np.isnan(true))
    if keep.sum() < min_pairs:
        raise ValueError(f"need at least {min_pairs} pairs with both HRs present; got {int(keep.sum())} "
                         f"of {pred.size}")
    return pred[keep], true[keep]


def mae(pred, true) -> float:
    """Mean absolute error (BPM): (1/n) sum |p_i - t_i|."""
    pred, true = paired(pred, true)
    return float(np.mean(np.abs(pred - true)))


def rmse(pred, true) -> float:
    """Root mean squared error (BPM): sqrt((1/n) sum (p_i - t_i)^2)."""
    pred, true = paired(pred, true)
    return float(np.sqrt(np.mean((pred - true) ** 2)))


def mape(pred, true) -> float:
    """Mean absolute percentage error (%): (100/n) sum |p_i - t_i| / |t_i|. A true HR of 0 is an error."""
    pred, true = paired(pred, true)
    if np.any(true == 0):
        raise ValueError("MAPE is undefined where the true HR is 0")
    return float(100.0 * np.mean(np.abs(pred - true) / np.abs(true)))


def pearson_r(pred, true) -> float:
    """Pearson correlation: sum (p_i - p_mean)(t_i - t_mean) / sqrt(sum (p_i - p_mean)^2 sum (t_i - t_mean)^2).

    Needs 3 pairs (through 2 points any line fits, so r would be +-1 whatever the data); NaN when either
    side is constant (the denominator is 0).
    """
    pred, true = paired(pred, true, min_pairs=3)
    # The formula in numpy, not scipy.stats.pearsonr: that costs ~0.6 ms a call, 90% of a bootstrap
    # (the tests check the two agree).
    if np.all(pred == pred[0]) or np.all(true == true[0]):
        return float("nan")  # tested exactly: a constant's mean can differ from it by rounding
    dp, dt = pred - pred.mean(), true - true.mean()
    denominator = np.sqrt(np.sum(dp * dp) * np.sum(dt * dt))
    if denominator == 0:
        return float("nan")
    return float(np.clip(np.sum(dp * dt) / denominator, -1.0, 1.0))


def bland_altman(pred, true) -> dict[str, float]:
    """Bland-Altman agreement (Bland & Altman 1986) of e_i = p_i - t_i, in BPM.

    bias = mean(e); sd = std(e, ddof=1); limits of agreement loa_low, loa_high = bias -+ 1.96 sd.
    Needs 2 pairs. Returns dict(bias, sd, loa_low, loa_high).
    """
    pred, true = paired(pred, true, min_pairs=2)
    diff = pred - true
    bias, sd = float(diff.mean()), float(diff.std(ddof=1))
    return {"bias": bias, "sd": sd, "loa_low": bias - BA_Z * sd, "loa_high": bias + BA_Z * sd}


# --- bootstrap over subjects ---------------------------------------------------------------------

def _subject_arrays(per_subject_values: dict[tuple, list[tuple]]) -> list[np.ndarray]:
    """Each subject's (non-empty) list of k-tuples as a (n_i, k) float64 array, subjects in sorted-key order."""
    # sorted: the seed alone fixes the result, whatever order the subjects came in
    return [np.asarray(per_subject_values[key], dtype=np.float64) for key in sorted(per_subject_values, key=repr)]


def _bootstrap_statistics(subject_arrays: list[np.ndarray], statistics: dict[str, Callable],
                          n_boot: int, seed: int) -> dict[str, np.ndarray]:
    """(n_boot,) bootstrap replicates of each statistic, all on the same subject resamples.

    Each replicate draws len(subject_arrays) subjects with replacement, pools every row of every
    drawn subject (a subject drawn twice counts twice) and calls statistic(*columns of the pool).
    A statistic that raises ValueError on a resample (too few pairs) gives NaN there.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1; got {n_boot}")
    n_subjects = len(subject_arrays)
    flat = np.concatenate(subject_arrays)  # (total rows, k)
    starts = np.cumsum([0] + [a.shape[0] for a in subject_arrays])
    row_ranges = [np.arange(starts[i], starts[i + 1]) for i in range(n_subjects)]
    draws = np.random.default_rng(seed).integers(0, n_subjects, size=(n_boot, n_subjects))
    replicates = {name: np.full(n_boot, np.nan) for name in statistics}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of a resample with no SNR at all
        for b, drawn in enumerate(draws):
            columns = flat[np.concatenate([row_ranges[i] for i in drawn])].T
            for name, statistic in statistics.items():
                try:
                    replicates[name][b] = statistic(*columns)
                except ValueError:
                    pass
    return replicates


def _percentile_interval(replicates: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile interval of the finite replicates; (nan, nan) if there are none."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level}")
    finite = replicates[np.isfinite(replicates)]
    if finite.size == 0:
        return float("nan"), float("nan")
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return float(low), float(high)


# --- the metrics table ----------------------------------------------------------------------------

def _finite_or_none(x) -> float | None:
    """Parquet null for values a level cannot define (NaN, inf or None)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _as_float(x) -> float:
    return float("nan") if x is None else float(x)


def _empty_row(level: str, **fields) -> dict:
    row = dict.fromkeys(METRIC_COLUMNS)
    row["level"] = level
    row.update(fields)
    return row


def _recording_row(rec: dict) -> dict:
    """One recording: mae = rmse = |e|, mape = 100 |e| / t, ba_bias = e (its signed error)."""
    pred, true, snr = _as_float(rec["hr_pred"]), _as_float(rec["hr_true"]), _as_float(rec.get("snr_db"))
    valid = not (math.isnan(pred) or math.isnan(true))
    error = pred - true if valid else float("nan")
    return _empty_row(
        "recording", model=rec["model"], dataset=rec["dataset"], subject_id=str(rec["subject_id"]),
        recording_id=str(rec["recording_id"]), n_recordings=int(valid), n_subjects=int(valid),
        mae=_finite_or_none(abs(error)), rmse=_finite_or_none(abs(error)),
        mape=_finite_or_none(100.0 * abs(error) / abs(true)) if valid and true != 0 else None,
        snr_db=_finite_or_none(snr), ba_bias=_finite_or_none(error),
        hr_pred=_finite_or_none(pred), hr_true=_finite_or_none(true))


def _subject_row(model: str, dataset: str, subject_id: str, recs: list[dict]) -> dict:
    """One subject, averaging its recordings with valid pairs (see `metrics_table`)."""
    pred = np.array([_as_float(r["hr_pred"]) for r in recs])
    true = np.array([_as_float(r["hr_true"]) for r in recs])
    snr = np.array([_as_float(r.get("snr_db")) for r in recs])
    valid = ~(np.isnan(pred) | np.isnan(true))
    row = _empty_row("subject", model=model, dataset=dataset, subject_id=subject_id,
                     n_recordings=int(valid.sum()), n_subjects=int(valid.any()))
    if not valid.any():
        return row
    pred, true, snr = pred[valid], true[valid], snr[valid]
    error = pred - true
    finite_snr = snr[np.isfinite(snr)]
    row.update(
        mae=float(np.mean(np.abs(error))), rmse=float(np.sqrt(np.mean(error**2))),
        mape=_finite_or_none(mape(pred, true)) if np.all(true != 0) else None,
        snr_db=_finite_or_none(finite_snr.mean()) if finite_snr.size else None,
        ba_bias=float(error.mean()), hr_pred=float(pred.mean()), hr_true=float(true.mean()))
    return row


def _nan_if_invalid(fn: Callable) -> Callable:
    def wrapped(*args):
        try:
            return fn(*args)
        except ValueError:
            return float("nan")
    return wrapped


def _mean_snr(pred, true, snr) -> float:
    snr = snr[np.isfinite(snr)]
    return float(snr.mean()) if snr.size else float("nan")


# Cohort statistics on pooled (pred, true, snr) columns; the table's column names for each.
_COHORT_STATISTICS = {
    "mae": (lambda p, t, s: mae(p, t), "mae_lo", "mae_hi"),
    "rmse": (lambda p, t, s: rmse(p, t), "rmse_lo", "rmse_hi"),
    "mape": (lambda p, t, s: mape(p, t), "mape_lo", "mape_hi"),
    "pearson_r": (lambda p, t, s: pearson_r(p, t), "r_lo", "r_hi"),
    "snr_db": (_mean_snr, "snr_lo", "snr_hi"),
}


def _cohort_metrics(recs: list[dict], n_boot: int, seed: int, level: float) -> dict:
    """Pooled metrics of the recordings with valid pairs, with CIs from resampling subjects."""
    per_subject: dict[tuple, list[tuple]] = defaultdict(list)
    for r in recs:
        pred, true = _as_float(r["hr_pred"]), _as_float(r["hr_true"])
        if not (math.isnan(pred) or math.isnan(true)):
            # (dataset, subject): subject ids restart in every dataset.
            per_subject[(r["dataset"], str(r["subject_id"]))].append((pred, true, _as_float(r.get("snr_db"))))
    fields = {"n_recordings": sum(len(v) for v in per_subject.values()), "n_subjects": len(per_subject)}
    if not per_subject:
        return fields
    pooled = np.array([v for values in per_subject.values() for v in values]).T  # (3, n_recordings)
    statistics = {name: _nan_if_invalid(fn) for name, (fn, _, _) in _COHORT_STATISTICS.items()}
    for name in _COHORT_STATISTICS:
        fields[name] = _finite_or_none(statistics[name](*pooled))
    if len(per_subject) >= MIN_CI_SUBJECTS:
        replicates = _bootstrap_statistics(_subject_arrays(per_subject), statistics, n_boot, seed)
        for name, (_, lo_col, hi_col) in _COHORT_STATISTICS.items():
            low, high = _percentile_interval(replicates[name], level)
            fields[lo_col], fields[hi_col] = _finite_or_none(low), _finite_or_none(high)
    if pooled.shape[1] >= 2:
        ba = bland_altman(pooled[0], pooled[1])
        fields.update(ba_bias=ba["bias"], ba_loa_low=ba["loa_low"], ba_loa_high=ba["loa_high"])
    return fields


def metrics_table(rows: Iterable[dict], group_keys: Sequence[str] = (), *, windows: Iterable[dict] = (),
                  n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> list[dict]:
    """Metric rows at five levels from per-recording rows; every row has exactly `METRIC_COLUMNS`.

    rows: one dict per (model, recording) with model, dataset, subject_id, recording_id, hr_pred,
    hr_true (BPM; NaN or None when missing), snr_db, and metadata columns (skin_type, motion, ...).
    A recording "has a pair" when both HRs are present; only those enter the metrics, and
    n_recordings / n_subjects count recordings and subjects with pairs.

    - recording: mae = rmse = |e|, mape = 100 |e| / t, ba_bias = e = p - t, snr_db, hr_pred, hr_true.
    - subject (per model, dataset, subject): the mean over the subject's recordings of each
      recording-level value: mae = mean |e_j|, rmse = sqrt(mean e_j^2), mape = mean APE_j,
      ba_bias = mean e_j, snr_db = mean SNR_j, and the subject's HR pair hr_pred = mean p_j,
      hr_true = mean t_j. No Pearson r or limits of agreement (a handful of recordings).
    - cohort (per model, dataset): MAE, RMSE, MAPE, Pearson r and mean SNR pooled over recordings,
      each with a `level` percentile bootstrap CI (Efron & Tibshirani 1993, ch. 13) resampling subjects:
      `n_boot` replicates, each drawing as many subjects as there are with replacement and pooling their
      recordings, all statistics on the same draws, replicates where a statistic is undefined left out,
      no CI below MIN_CI_SUBJECTS subjects; and Bland-Altman bias and limits of agreement (recordings
      taken as independent; with many recordings per subject the limits come out somewhat narrow, see
      Bland & Altman 2007 on repeated measures).
    - group (per model, key in group_keys, value of that key): the cohort metrics of the recordings
      with that value, pooled over datasets; dataset lists the datasets joined by "+", group_value
      is str(value). Recordings without the key (or with None) are in no group of that key.
    - window (per model, dataset, window length window_s): the cohort metrics of the HR pairs of
      sliding windows pooled, with CIs resampling subjects. windows: one dict per window with model,
      dataset, subject_id, recording_id, length_s, hr_pred, hr_true. n_windows counts the pairs,
      n_recordings the recordings they come from. No SNR: it is measured over whole recordings.
    """
    rows = list(rows)
    for r in rows:
        missing = {"model", "dataset", "subject_id", "recording_id", "hr_pred", "hr_true"} - set(r)
        if missing:
            raise ValueError(f"prediction row lacks {sorted(missing)}: {r}")
    rows.sort(key=lambda r: (r["model"], r["dataset"], str(r["subject_id"]), str(r["recording_id"])))

    out = [_recording_row(r) for r in rows]

    by_subject: dict[tuple, list[dict]] = defaultdict(list)
    by_cohort: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        by_subject[(r["model"], r["dataset"], str(r["subject_id"]))].append(r)
        by_cohort[(r["model"], r["dataset"])].append(r)
    out += [_subject_row(*key, recs) for key, recs in by_subject.items()]
    for (model, dataset), recs in by_cohort.items():
        out.append(_empty_row("cohort", model=model, dataset=dataset,
                              **_cohort_metrics(recs, n_boot, seed, level)))

    for key in group_keys:
        by_group: dict[tuple, list[dict]] = defaultdict(list)
        for r in rows:
            if r.get(key) is not None:
                by_group[(r["model"], str(r[key]))].append(r)
        for (model, value), recs in sorted(by_group.items()):
            datasets = "+".join(sorted({r["dataset"] for r in recs}))
            out.append(_empty_row("group", model=model, dataset=datasets, group_key=key, group_value=value,
                                  **_cohort_metrics(recs, n_boot, seed, level)))

    by_window: dict[tuple, list[dict]] = defaultdict(list)
    for w in windows:
        by_window[(w["model"], w["dataset"], float(w["length_s"]))].append(w)
    for (model, dataset, length), recs in sorted(by_window.items()):
        fields = _cohort_metrics([{**w, "snr_db": None} for w in recs], n_boot, seed, level)  # SNR: recordings
        paired_recordings = {str(w["recording_id"]) for w in recs
                             if not (math.isnan(_as_float(w["hr_pred"])) or math.isnan(_as_float(w["hr_true"])))}
        fields.update(n_windows=fields["n_recordings"], n_recordings=len(paired_recordings))
        out.append(_empty_row("window", model=model, dataset=dataset, window_s=length, **fields))
    return out


def error_by_hr_bin(rows: Iterable[dict], bins: Iterable[float] = range(30, 190, 10)) -> list[dict]:
    """Absolute error by ground-truth HR bin, per model.

    bins: increasing edges (BPM); bin i holds recordings with edges[i] <= t < edges[i+1], the last bin
    also t == edges[-1]. Binned by the *true* HR so that models are compared on the same recordings.
    Returns one dict per model and bin (empty bins included): model, bin_low, bin_high, n,
    mae (mean |e|, None if empty), bias (mean e, None if empty). Recordings without a pair are skipped.
    """
    edges = np.asarray(list(bins), dtype=np.float64)
    if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"bins must be at least 2 increasing edges; got {edges}")
    errors: dict[str, list[list[float]]] = {}
    for r in rows:
        per_bin = errors.setdefault(r["model"], [[] for _ in range(edges.size - 1)])
        pred, true = _as_float(r.get("hr_pred")), _as_float(r.get("hr_true"))  # failed rows lack HRs
        if math.isnan(pred) or math.isnan(true) or not edges[0] <= true <= edges[-1]:
            continue
        i = min(int(np.searchsorted(edges, true, side="right")) - 1, edges.size - 2)
        per_bin[i].append(pred - true)
    out = []
    for model in sorted(errors):
        for i, errs in enumerate(errors[model]):
            e = np.asarray(errs)
            out.append({"model": model, "bin_low": float(edges[i]), "bin_high": float(edges[i + 1]),
                        "n": int(e.size), "mae": float(np.abs(e).mean()) if e.size else None,
                        "bias": float(e.mean()) if e.size else None})
    return out
