"""The human report of an evaluation: report.html with PNG plots under report/, and terminal tables.

Inputs are what `pulsepipe evaluate` already holds: per-recording prediction rows (model, dataset,
subject_id, recording_id, hr_pred, hr_true, snr_db, ...), the metric rows of
`transforms.metrics.metrics_table`, and waveforms of the worst recordings (see `worst_recordings`).
Plots use matplotlib's object API (`Figure`, no pyplot), so no global backend or state is touched.
"""
from __future__ import annotations

import html
import io
import math
import re
from collections import defaultdict

import fsspec
import numpy as np

from transforms import metrics, signal

REPORT_DIR = "report"  # PNGs, relative to report.html
N_WORST = 3  # worst recordings per model whose waveforms the report shows

# Cohort columns: (header, value column, low column, high column, digits).
CI_COLUMNS = (
    ("MAE (BPM)", "mae", "mae_lo", "mae_hi", 2),
    ("RMSE (BPM)", "rmse", "rmse_lo", "rmse_hi", 2),
    ("MAPE (%)", "mape", "mape_lo", "mape_hi", 2),
    ("Pearson r", "pearson_r", "r_lo", "r_hi", 3),
    ("SNR (dB)", "snr_db", "snr_lo", "snr_hi", 2),
)


# --- formatting helpers ---------------------------------------------------------------------------

def _num(value, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def with_ci(row: dict, value: str, low: str, high: str, digits: int) -> str:
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

def _metric_lines(rows: list[dict], first: list[tuple[str, str]]) -> tuple[list[str], list[list[str]]]:
    """Header and lines of cohort-style rows: the `first` (header, column) pairs, the counts, each metric
    with its CI and the Bland-Altman limits."""
    windows = any(r.get("n_windows") is not None for r in rows)
    header = [h for h, _ in first] + ["subjects", "recordings"] + ["windows"] * windows \
        + [c[0] for c in CI_COLUMNS] + ["BA bias (LoA), BPM"]
    lines = [[f"{r[col]:g}" if isinstance(r[col], float) else str(r[col]) for _, col in first]
             + [str(r["n_subjects"]), str(r["n_recordings"])] + [str(r["n_windows"])] * windows
             + [with_ci(r, *c[1:]) for c in CI_COLUMNS] + [_limits(r)] for r in rows]
    return header, lines


_COHORT_FIRST = {"cohort": [("model", "model"), ("dataset", "dataset")],
                 "window": [("model", "model"), ("dataset", "dataset"), ("window (s)", "window_s")]}


def format_cohort_table(metric_rows, level: str = "cohort") -> str:
    """Fixed-width table, one line per model and dataset (and window length, for level "window"): counts
    and each metric with its 95% CI."""
    return _fixed_width(*_metric_lines(_levels(metric_rows, level), _COHORT_FIRST[level]))


def format_subject_table(metric_rows) -> str:
    """Fixed-width table, one line per subject with each model's MAE (BPM), then one cohort line per
    dataset with each model's MAE [95% CI]."""
    subjects = _levels(metric_rows, "subject")
    models = list(dict.fromkeys(r["model"] for r in subjects + _levels(metric_rows, "cohort")))  # as the rows
    mae = {(r["dataset"], r["subject_id"], r["model"]): r["mae"] for r in subjects}
    keys = sorted({(r["dataset"], r["subject_id"]) for r in subjects})
    lines = [[str(d), str(s)] + [_num(mae.get((d, s, m))) for m in models] for d, s in keys]
    cohort = {(r["dataset"], r["model"]): r for r in _levels(metric_rows, "cohort")}
    for dataset in sorted({d for d, _ in cohort}):
        lines.append([str(dataset), "cohort"] + [
            with_ci(cohort[(dataset, m)], "mae", "mae_lo", "mae_hi", 2) if (dataset, m) in cohort else "-"
            for m in models])
    return _fixed_width(["dataset", "subject"] + [f"MAE {m} (BPM)" for m in models], lines)


# --- plots ------------------------------------------------------------------------------------------

def _new_figure(width: float = 7.0, height: float = 4.5):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), constrained_layout=True)
    return fig, fig.add_subplot()


def plot_bland_altman(model: str, prediction_rows):
    """Difference (pred - true) against mean of pred and true, per recording, coloured by dataset,
    with the bias and 95% limits of agreement: a Figure, or None with fewer than 2 pairs."""
    by_dataset = defaultdict(list)
    for r in prediction_rows:
        if r["model"] == model and (pair := _pair(r)) is not None:
            by_dataset[r["dataset"]].append(pair)
    pairs = np.array([p for v in by_dataset.values() for p in v]).reshape(-1, 2)
    if len(pairs) < 2:
        return None
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
    return fig


def plot_error_by_hr_bin(model: str, bins: list[dict]):
    """Bars of mean absolute error per true-HR bin, with the number of recordings above each bar: a
    Figure, or None when no bin holds a recording."""
    if not any(b["n"] for b in bins):
        return None
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
    return fig


def _for_display(t: np.ndarray, bvp) -> np.ndarray:
    """Band-passed and standardised as before HR estimation, gaps (NaN) silenced; only standardised if
    too short to filter."""
    bvp = np.asarray(bvp, dtype=np.float64)
    finite = np.isfinite(bvp)
    fs = 1.0 / float(np.median(np.diff(t)))
    try:
        return signal.postprocess_bvp(bvp, fs, usable=finite)
    except ValueError:
        out = np.zeros_like(bvp)
        if finite.any():
            out[finite] = (bvp[finite] - bvp[finite].mean()) / (bvp[finite].std() or 1.0)
        return out


def plot_waveform(model: str, recording_id: str, t, bvp_pred, bvp_true,
                  hr_pred: float | None, hr_true: float | None):
    """Predicted and ground-truth BVP on one time axis, HRs and error in the title: a Figure."""
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
    return fig


# --- the report -------------------------------------------------------------------------------------

def worst_recordings(prediction_rows, n: int = N_WORST) -> list[tuple[str, str, str]]:
    """(model, dataset, recording_id) of each model's n recordings with the largest |pred - true| HR
    error, worst first: the waveforms `write_report` wants."""
    by_model = defaultdict(list)
    for r in prediction_rows:
        if (pair := _pair(r)) is not None:
            by_model[r["model"]].append((abs(pair[0] - pair[1]), str(r["dataset"]), str(r["recording_id"])))
    return [(model, dataset, rec) for model in sorted(by_model)
            for _, dataset, rec in sorted(by_model[model], key=lambda e: (-e[0], e[1], e[2]))[:n]]


def html_table(header: list[str], lines: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in line) + "</tr>" for line in lines)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _metric_table_html(rows: list[dict], first: list[tuple[str, str]]) -> str:
    return html_table(*_metric_lines(rows, first))


CSS = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}th,td{border:1px solid #bbb;padding:3px 8px}
th{background:#eee}td{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%}"""


def failures(prediction_rows, models) -> list[tuple[str, str, str, str]]:
    """(dataset, recording_id, models, reason) per failed recording and reason, sorted; models is "all"
    when every one of `models` failed so, else the failed ones joined by ", "."""
    by_reason: dict[tuple, list[str]] = {}
    for r in prediction_rows:
        if r.get("status") == "failed":
            by_reason.setdefault((str(r["dataset"]), str(r["recording_id"]), str(r["reason"])), []).append(r["model"])
    return [(d, rid, "all" if len(names) == len(models) else ", ".join(names), reason)
            for (d, rid, reason), names in sorted(by_reason.items())]


_LEVELS_HTML = """<p>Heart rates (HR, beats per minute, BPM) come from each recording's whole predicted and
ground-truth BVP by the same recipe (band-pass 0.5-3 Hz, Welch peak); frames without a face or ground truth
are left silent. Levels: <b>recording</b> (one HR pair per recording and model, in predictions.parquet and
metrics.parquet); <b>subject</b>, the mean over the subject's recordings; <b>cohort</b>, the recordings of one
dataset pooled; <b>window</b>, the HR pairs of sliding windows pooled. Intervals in brackets are 95% percentile
bootstrap intervals that resample subjects, whose recordings share a face, camera and session (none with
fewer than 2 subjects). SNR: power within 0.1 Hz of the true HR and its first harmonic over the rest of
0.5-3 Hz, in dB (de Haan &amp; Jeanne 2013). Bland-Altman: bias = mean(predicted - true), limits of agreement = bias &plusmn; 1.96 sd.</p>"""


class _PngFolder:
    """The report's PNG folder, emptied of an earlier report's plots; `img` saves a figure there and links it."""

    def __init__(self, fs, root: str):
        self.fs, self.path = fs, f"{root}/{REPORT_DIR}"
        if fs.exists(self.path):
            fs.rm(self.path, recursive=True)
        fs.makedirs(self.path, exist_ok=True)

    def img(self, fig, name: str, alt: str) -> str:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        with self.fs.open(f"{self.path}/{name}", "wb") as f:
            f.write(buffer.getvalue())
        return f"<img src='{REPORT_DIR}/{html.escape(name)}' alt='{html.escape(alt)}'>"

    def img_or_say(self, fig, name: str, alt: str, no_plot: str) -> str:
        """The figure's img, or a paragraph saying `no_plot` where there is no figure."""
        return self.img(fig, name, alt) if fig else f"<p>{no_plot}</p>"


# --- the report's sections, in page order: each a list of HTML parts, empty when it has nothing to show ----

def _page_head() -> list[str]:
    return [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>pulsepipe evaluation</title>"
            f"<style>{CSS}</style></head><body><h1>pulsepipe evaluation</h1>", _LEVELS_HTML]


def _run_settings_html(about: dict | None, prediction_rows) -> list[str]:
    parts = [html_table(["run", ""], [[str(k), str(v)] for k, v in about.items()])] if about else []
    n_missing = sum(_pair(r) is None for r in prediction_rows if r.get("status", "ok") == "ok")
    if n_missing:
        parts.append(f"<p>{n_missing} scored predictions without both a predicted and a true HR are left out of "
                     f"every metric.</p>")
    return parts


def _cohort_html(metric_rows) -> list[str]:
    return ["<h2>Cohort metrics</h2>", _metric_table_html(_levels(metric_rows, "cohort"), _COHORT_FIRST["cohort"])]


def _windows_html(metric_rows) -> list[str]:
    window_rows = _levels(metric_rows, "window")
    if not window_rows:
        return []
    return ["<h2>Sliding-window heart rate</h2><p>HR on windows of the given length, every half window, "
            "by the same recipe; each window's pair counts once, and intervals still resample subjects. "
            "Windows mostly without a face or ground truth are left out.</p>",
            _metric_table_html(window_rows, _COHORT_FIRST["window"])]


def _failed_html(prediction_rows, models: list[str]) -> list[str]:
    lines = [list(line) for line in failures(prediction_rows, models)]
    return ["<h2>Failed</h2>", html_table(["dataset", "recording", "models", "reason"], lines) if lines
            else "<p>None: every recording was scored by every model.</p>"]


def _bland_altman_html(pngs: _PngFolder, models: list[str], prediction_rows) -> list[str]:
    return ["<h2>Bland-Altman</h2>"] + [
        pngs.img_or_say(plot_bland_altman(model, prediction_rows), f"bland_altman_{_slug(model)}.png",
                        f"Bland-Altman plot of {model}",
                        f"{html.escape(model)}: fewer than 2 recordings with both HRs, no plot.")
        for model in models]


def _error_by_hr_bin_html(pngs: _PngFolder, models: list[str], prediction_rows) -> list[str]:
    bins_by_model = defaultdict(list)
    for b in metrics.error_by_hr_bin(prediction_rows):
        bins_by_model[b["model"]].append(b)
    return ["<h2>Absolute error by true heart rate</h2>"] + [
        pngs.img_or_say(plot_error_by_hr_bin(model, bins_by_model[model]) if model in bins_by_model else None,
                        f"error_by_hr_{_slug(model)}.png", f"error by HR bin, {model}",
                        f"{html.escape(model)}: no recording with both HRs, no plot.")
        for model in models]


def _worst_recordings_html(pngs: _PngFolder, models: list[str], prediction_rows, waveforms: dict) -> list[str]:
    if not waveforms:
        return []
    parts = ["<h2>Worst recordings</h2><p>Each model's recordings with the largest HR errors. "
             "Waveforms band-passed (0.5-3 Hz) and standardised.</p>"]
    rows = {(r["model"], str(r["dataset"]), str(r["recording_id"])): r for r in prediction_rows}
    order = {m: i for i, m in enumerate(models)}
    shown = sorted(waveforms, key=lambda k: order.get(k[0], len(order)))  # stable: each model's as given
    for i, (model, dataset, recording_id) in enumerate(shown):
        row = rows.get((model, dataset, recording_id), {})
        fig = plot_waveform(model, f"{dataset}/{recording_id}", *waveforms[(model, dataset, recording_id)],
                            hr_pred=row.get("hr_pred"), hr_true=row.get("hr_true"))
        parts.append(pngs.img(fig, f"waveform_{i:02d}_{_slug(model)}_{_slug(recording_id)}.png",
                              f"waveforms of {model} on {dataset}/{recording_id}"))
    return parts


def _per_subject_html(models: list[str], prediction_rows, metric_rows) -> list[str]:
    subjects = _levels(metric_rows, "subject")
    mae = {(r["dataset"], r["subject_id"], r["model"]): r for r in subjects}
    keys = sorted({(r["dataset"], r["subject_id"]) for r in subjects}
                  | {(r["dataset"], str(r["subject_id"])) for r in prediction_rows})
    return ["<h2>Per subject</h2><p>Subject MAE = mean of the subject's recording absolute errors (BPM); "
            "- where a model scored none of the subject's recordings (see Failed).</p>",
            html_table(
                ["dataset", "subject"] + [f"MAE {m}" for m in models] + [f"recordings {m}" for m in models],
                [[str(d), str(s)] + [_num(mae[(d, s, m)]["mae"]) if (d, s, m) in mae else "-" for m in models]
                 + [str(mae[(d, s, m)]["n_recordings"]) if (d, s, m) in mae else "0" for m in models]
                 for d, s in keys])]


def _by_group_html(metric_rows) -> list[str]:
    groups = _levels(metric_rows, "group")
    if not groups:
        return []
    parts = ["<h2>By group</h2>"]
    for key in sorted({r["group_key"] for r in groups}):
        rows = sorted((r for r in groups if r["group_key"] == key), key=lambda r: (r["group_value"], r["model"]))
        parts.append(f"<h3>{html.escape(key)}</h3>")
        parts.append(_metric_table_html(rows, [(key, "group_value"), ("model", "model"), ("datasets", "dataset")]))
    return parts


def write_report(out_uri, prediction_rows, metric_rows, waveforms: dict | None = None,
                 about: dict | None = None) -> str:
    """Write OUT/report.html and its PNGs under OUT/report/ (any fsspec URI); returns report.html's URI.

    prediction_rows: per (recording, model) rows (model, dataset, subject_id, recording_id, hr_pred,
    hr_true; status and reason where some failed). metric_rows: `transforms.metrics.metrics_table`
    output. waveforms: (model, dataset, recording_id) -> (t seconds, bvp_pred, bvp_true) for the
    recordings to show (`worst_recordings`), in that order within each model. about: what produced the
    run (seed, models, input, ...), shown as given. PNGs of an earlier report in the same folder are removed.
    """
    fs, root = fsspec.core.url_to_fs(str(out_uri))
    root = root.rstrip("/")
    pngs = _PngFolder(fs, root)
    prediction_rows, metric_rows = list(prediction_rows), list(metric_rows)
    # in the order the rows name them: evaluate's rows follow the command line's model order
    models = list(dict.fromkeys([r["model"] for r in prediction_rows] + [r["model"] for r in metric_rows]))
    parts = (_page_head() + _run_settings_html(about, prediction_rows) + _cohort_html(metric_rows)
             + _windows_html(metric_rows) + _failed_html(prediction_rows, models)
             + _bland_altman_html(pngs, models, prediction_rows) + _error_by_hr_bin_html(pngs, models, prediction_rows)
             + _worst_recordings_html(pngs, models, prediction_rows, waveforms or {})
             + _per_subject_html(models, prediction_rows, metric_rows) + _by_group_html(metric_rows)
             + ["</body></html>"])
    with fs.open(f"{root}/report.html", "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    return f"{str(out_uri).rstrip('/')}/report.html"
