"""The human report of an evaluation: report.html with PNG plots under report/, and terminal tables.

Inputs are what `pulsepipe evaluate` already holds: per-recording prediction rows (model, dataset,
subject_id, recording_id, hr_pred, hr_true, snr_db, ...), the metric rows of
`transforms.metrics.metrics_table`, and waveforms of the worst recordings (see `worst_recordings`).
Plots use matplotlib's object API (`Figure`, no pyplot), so no global backend or state is touched.
"""
from __future__ import annotations

import html
import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from transforms import metrics, signal

REPORT_DIR = "report"  # PNGs, relative to report.html
N_WORST = 3  # worst recordings per model whose waveforms the report shows

# Cohort columns: (header, value column, low column, high column, digits).
_CI_COLUMNS = (
    ("MAE (BPM)", "mae", "mae_lo", "mae_hi", 2),
    ("RMSE (BPM)", "rmse", "rmse_lo", "rmse_hi", 2),
    ("MAPE (%)", "mape", "mape_lo", "mape_hi", 2),
    ("Pearson r", "pearson_r", "r_lo", "r_hi", 3),
    ("SNR (dB)", "snr_db", "snr_lo", "snr_hi", 2),
)


# --- formatting helpers ---------------------------------------------------------------------------

def _num(value, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _with_ci(row: dict, value: str, low: str, high: str, digits: int) -> str:
    """'3.21 [2.80, 3.65]', or the value alone where there is no interval."""
    text = _num(row.get(value), digits)
    if row.get(low) is None or row.get(high) is None:
        return text
    return f"{text} [{_num(row[low], digits)}, {_num(row[high], digits)}]"


def _limits(row: dict) -> str:
    if row.get("ba_bias") is None:
        return "-"
    if row.get("ba_loa_low") is None:
        return _num(row["ba_bias"])
    return f"{_num(row['ba_bias'])} ({_num(row['ba_loa_low'])}, {_num(row['ba_loa_high'])})"


def _slug(text: str) -> str:
    """A file-name-safe version of a model or recording id."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "x"


def _fixed_width(header: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header] + lines) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in lines])


def _pair(row: dict) -> tuple[float, float] | None:
    """(hr_pred, hr_true) of a prediction row, or None if either is missing."""
    pred, true = row.get("hr_pred"), row.get("hr_true")
    if pred is None or true is None or math.isnan(float(pred)) or math.isnan(float(true)):
        return None
    return float(pred), float(true)


def _levels(metric_rows, level: str) -> list[dict]:
    return [r for r in metric_rows if r["level"] == level]


# --- terminal tables -------------------------------------------------------------------------------

def format_cohort_table(metric_rows) -> str:
    """Fixed-width table, one line per model and dataset: counts and each metric with its 95% CI."""
    header = ["model", "dataset", "subjects", "recordings"] + [c[0] for c in _CI_COLUMNS] + ["BA bias (LoA)"]
    lines = [[str(r["model"]), str(r["dataset"]), str(r["n_subjects"]), str(r["n_recordings"])]
             + [_with_ci(r, *c[1:]) for c in _CI_COLUMNS] + [_limits(r)]
             for r in _levels(metric_rows, "cohort")]
    return _fixed_width(header, lines)


def format_subject_table(metric_rows) -> str:
    """Fixed-width table, one line per subject with each model's MAE (BPM), then one cohort line per
    dataset with each model's MAE [95% CI]."""
    subjects = _levels(metric_rows, "subject")
    models = sorted({r["model"] for r in subjects} | {r["model"] for r in _levels(metric_rows, "cohort")})
    mae = {(r["dataset"], r["subject_id"], r["model"]): r["mae"] for r in subjects}
    keys = sorted({(r["dataset"], r["subject_id"]) for r in subjects})
    lines = [[str(d), str(s)] + [_num(mae.get((d, s, m))) for m in models] for d, s in keys]
    cohort = {(r["dataset"], r["model"]): r for r in _levels(metric_rows, "cohort")}
    for dataset in sorted({d for d, _ in cohort}):
        lines.append([str(dataset), "cohort"] + [
            _with_ci(cohort[(dataset, m)], "mae", "mae_lo", "mae_hi", 2) if (dataset, m) in cohort else "-"
            for m in models])
    return _fixed_width(["dataset", "subject"] + [f"MAE {m} (BPM)" for m in models], lines)


# --- plots ------------------------------------------------------------------------------------------

def _new_figure(width: float = 7.0, height: float = 4.5):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), constrained_layout=True)
    return fig, fig.add_subplot()


def plot_bland_altman(path: Path, model: str, prediction_rows) -> bool:
    """Difference (pred - true) against mean of pred and true, per recording, coloured by dataset,
    with the bias and 95% limits of agreement. False (no file) with fewer than 2 pairs."""
    by_dataset = defaultdict(list)
    for r in prediction_rows:
        if r["model"] == model and (pair := _pair(r)) is not None:
            by_dataset[r["dataset"]].append(pair)
    pairs = np.array([p for v in by_dataset.values() for p in v]).reshape(-1, 2)
    if len(pairs) < 2:
        return False
    ba = metrics.bland_altman(pairs[:, 0], pairs[:, 1])
    fig, ax = _new_figure()
    for dataset, values in sorted(by_dataset.items()):
        values = np.array(values)
        ax.scatter(values.mean(axis=1), values[:, 0] - values[:, 1], s=14, alpha=0.7, label=str(dataset))
    ax.axhline(ba["bias"], color="k", lw=1.2, label=f"bias {ba['bias']:.2f} BPM")
    for name in ("loa_low", "loa_high"):
        ax.axhline(ba[name], color="k", lw=1, ls="--")
    ax.plot([], [], color="k", ls="--", label=f"95% limits {ba['loa_low']:.2f}, {ba['loa_high']:.2f} BPM")
    ax.set(title=f"Bland-Altman: {model} (n = {len(pairs)} recordings)",
           xlabel="mean of predicted and true HR (BPM)", ylabel="predicted - true HR (BPM)")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    return True


def plot_error_by_hr_bin(path: Path, model: str, bins: list[dict]) -> None:
    """Bars of mean absolute error per true-HR bin, with the number of recordings above each bar."""
    fig, ax = _new_figure()
    lows = np.array([b["bin_low"] for b in bins])
    widths = np.array([b["bin_high"] - b["bin_low"] for b in bins])
    heights = np.array([b["mae"] if b["mae"] is not None else 0.0 for b in bins])
    ax.bar(lows, heights, width=widths, align="edge", edgecolor="k", alpha=0.8,
           label="mean |predicted - true| (n = recordings in bin)")
    for low, width, height, b in zip(lows, widths, heights, bins):
        if b["n"]:
            ax.annotate(f"n={b['n']}", (low + width / 2, height), ha="center", va="bottom", fontsize=7)
    ax.set(title=f"Absolute error by true HR: {model}", xlabel="true HR (BPM)",
           ylabel="mean absolute error (BPM)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.savefig(path, dpi=100)


def _for_display(t: np.ndarray, bvp) -> np.ndarray:
    """Band-passed and standardised as before HR estimation; only standardised if too short to filter."""
    bvp = np.asarray(bvp, dtype=np.float64)
    fs = 1.0 / float(np.median(np.diff(t)))
    try:
        return signal.postprocess_bvp(bvp, fs)
    except ValueError:
        return (bvp - bvp.mean()) / (bvp.std() or 1.0)


def plot_waveform(path: Path, model: str, recording_id: str, t, bvp_pred, bvp_true,
                  hr_pred: float | None, hr_true: float | None) -> None:
    """Predicted and ground-truth BVP on one time axis, HRs and error in the title."""
    t = np.asarray(t, dtype=np.float64)
    fig, ax = _new_figure(10.0, 3.5)
    ax.plot(t, _for_display(t, bvp_true), lw=1.0, color="k", label="ground truth (contact PPG)")
    ax.plot(t, _for_display(t, bvp_pred), lw=1.0, color="tab:red", alpha=0.85, label=f"predicted ({model})")
    error = abs(hr_pred - hr_true) if hr_pred is not None and hr_true is not None else None
    ax.set(title=f"{model} on {recording_id}: predicted HR {_num(hr_pred, 1)} BPM, true HR "
                 f"{_num(hr_true, 1)} BPM, |error| {_num(error, 1)} BPM",
           xlabel="time (s)", ylabel="BVP (band-passed, z-scored)")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)


# --- the report -------------------------------------------------------------------------------------

def worst_recordings(prediction_rows, n: int = N_WORST) -> list[tuple[str, str]]:
    """(model, recording_id) of each model's n recordings with the largest |pred - true| HR error,
    worst first: the waveforms `write_report` wants."""
    by_model = defaultdict(list)
    for r in prediction_rows:
        if (pair := _pair(r)) is not None:
            by_model[r["model"]].append((abs(pair[0] - pair[1]), str(r["recording_id"])))
    return [(model, rec) for model in sorted(by_model)
            for _, rec in sorted(by_model[model], key=lambda e: (-e[0], e[1]))[:n]]


def _html_table(header: list[str], lines: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in line) + "</tr>" for line in lines)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _metric_table_html(rows: list[dict], first: list[tuple[str, str]]) -> str:
    """HTML table of cohort-style rows: the `first` (header, column) pairs, counts, metrics with CIs."""
    header = [h for h, _ in first] + ["subjects", "recordings"] + [c[0] for c in _CI_COLUMNS] \
        + ["BA bias (LoA), BPM"]
    lines = [[str(r[col]) for _, col in first] + [str(r["n_subjects"]), str(r["n_recordings"])]
             + [_with_ci(r, *c[1:]) for c in _CI_COLUMNS] + [_limits(r)] for r in rows]
    return _html_table(header, lines)


_CSS = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}th,td{border:1px solid #bbb;padding:3px 8px}
th{background:#eee}td{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%}"""


def write_report(out_dir, prediction_rows, metric_rows, waveforms: dict | None = None) -> Path:
    """Write OUT/report.html and its PNGs under OUT/report/; returns the path of report.html.

    prediction_rows: per-recording rows (model, dataset, subject_id, recording_id, hr_pred, hr_true).
    metric_rows: `transforms.metrics.metrics_table` output. waveforms: (model, recording_id) ->
    (t seconds, bvp_pred, bvp_true) for the recordings to show (`worst_recordings`), shown worst first.
    """
    out_dir = Path(out_dir)
    png_dir = out_dir / REPORT_DIR
    png_dir.mkdir(parents=True, exist_ok=True)
    prediction_rows, metric_rows = list(prediction_rows), list(metric_rows)
    waveforms = waveforms or {}
    models = sorted({r["model"] for r in prediction_rows} | {r["model"] for r in metric_rows})
    n_missing = sum(_pair(r) is None for r in prediction_rows)

    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>pulsepipe evaluation</title>"
             f"<style>{_CSS}</style></head><body><h1>pulsepipe evaluation</h1>",
             f"<p>{len(prediction_rows)} predictions of {len(models)} model(s); {n_missing} without both "
             f"a predicted and a true HR are left out of every metric. HR in beats per minute (BPM). "
             f"Intervals are 95% percentile bootstrap intervals resampling subjects. Bland-Altman: "
             f"bias = mean(predicted - true), limits of agreement = bias &plusmn; 1.96 sd.</p>"]

    parts.append("<h2>Cohort metrics</h2>")
    parts.append(_metric_table_html(_levels(metric_rows, "cohort"), [("model", "model"), ("dataset", "dataset")]))

    parts.append("<h2>Bland-Altman</h2>")
    for model in models:
        name = f"bland_altman_{_slug(model)}.png"
        if plot_bland_altman(png_dir / name, model, prediction_rows):
            parts.append(f"<img src='{REPORT_DIR}/{html.escape(name)}' "
                         f"alt='Bland-Altman plot of {html.escape(model)}'>")
        else:
            parts.append(f"<p>{html.escape(model)}: fewer than 2 recordings with both HRs, no plot.</p>")

    parts.append("<h2>Absolute error by true heart rate</h2>")
    bins_by_model = defaultdict(list)
    for b in metrics.error_by_hr_bin(prediction_rows):
        bins_by_model[b["model"]].append(b)
    for model in models:
        if model in bins_by_model:
            name = f"error_by_hr_{_slug(model)}.png"
            plot_error_by_hr_bin(png_dir / name, model, bins_by_model[model])
            parts.append(f"<img src='{REPORT_DIR}/{html.escape(name)}' alt='error by HR bin, {html.escape(model)}'>")

    if waveforms:
        parts.append("<h2>Worst recordings</h2><p>Waveforms band-passed (0.5-3 Hz) and standardised.</p>")
        hr = {(r["model"], str(r["recording_id"])): r for r in prediction_rows}
        abs_error = {k: abs(p[0] - p[1]) for k, r in hr.items() if (p := _pair(r)) is not None}
        shown = sorted(waveforms, key=lambda k: (str(k[0]), -abs_error.get((k[0], str(k[1])), 0.0), str(k[1])))
        for i, key in enumerate(shown):  # per model, worst first
            model, recording_id = key[0], str(key[1])
            row = hr.get((model, recording_id), {})
            name = f"waveform_{i:02d}_{_slug(model)}_{_slug(recording_id)}.png"
            plot_waveform(png_dir / name, model, recording_id, *waveforms[key],
                          hr_pred=row.get("hr_pred"), hr_true=row.get("hr_true"))
            parts.append(f"<img src='{REPORT_DIR}/{html.escape(name)}' "
                         f"alt='waveforms of {html.escape(model)} on {html.escape(recording_id)}'>")

    parts.append("<h2>Per subject</h2><p>Subject MAE = mean of the subject's recording absolute errors (BPM).</p>")
    subjects = _levels(metric_rows, "subject")
    mae = {(r["dataset"], r["subject_id"], r["model"]): r for r in subjects}
    keys = sorted({(r["dataset"], r["subject_id"]) for r in subjects})
    parts.append(_html_table(
        ["dataset", "subject"] + [f"MAE {m}" for m in models] + [f"recordings {m}" for m in models],
        [[str(d), str(s)] + [_num(mae[(d, s, m)]["mae"]) if (d, s, m) in mae else "-" for m in models]
         + [str(mae[(d, s, m)]["n_recordings"]) if (d, s, m) in mae else "-" for m in models]
         for d, s in keys]))

    groups = _levels(metric_rows, "group")
    if groups:
        parts.append("<h2>By group</h2>")
        for key in sorted({r["group_key"] for r in groups}):
            rows = sorted((r for r in groups if r["group_key"] == key), key=lambda r: (r["group_value"], r["model"]))
            parts.append(f"<h3>{html.escape(key)}</h3>")
            parts.append(_metric_table_html(rows, [(key, "group_value"), ("model", "model"), ("datasets", "dataset")]))

    parts.append("</body></html>")
    path = out_dir / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
