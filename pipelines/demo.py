"""Synthesise a small cohort and measure every recording with ME-rPPG and POS, all on this machine.

The embedded default job: writes the cohort under --out, runs `infer` on each recording, and prints a
per-subject table of true and predicted heart rates with the cohort's mean absolute error.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

from pipelines.infer import InferError, infer_models, write_outputs
from pipelines.predictors import ModelSet
from transforms import signal
from transforms.face import FaceDetector
from transforms.synth import write_cohort
from transforms.video import VideoError

DEMO_MODELS = ("me-chunk", "pos")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="pulsepipe-demo", help="folder for the cohort and results (default: pulsepipe-demo)")
    p.add_argument("--subjects", type=int, default=8, help="subjects to synthesise (default: 8)")
    p.add_argument("--seconds", type=float, default=30.0, help="seconds per recording (default: 30)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the cohort (default: 0)")


def true_hr(ppg_csv: Path) -> float:
    """Ground-truth HR of one recording: its PPG at its own rate through the same recipe as predictions."""
    with open(ppg_csv) as f:
        rows = np.array([[float(a), float(b)] for a, b in list(csv.reader(f))[1:]])
    fs = 1.0 / np.median(np.diff(rows[:, 0]))
    return signal.heart_rate(rows[:, 1], fs)[0]


def measure_cohort(cohort_dir: Path, models=DEMO_MODELS, results_dir: Path | None = None, log=print) -> list[dict]:
    """One row per recording: ids, true HR and each model's predicted HR (NaN with the error if it failed)."""
    cohort = json.loads((cohort_dir / "cohort.json").read_text())
    rows = []
    loaded = ModelSet(models)
    with FaceDetector() as detector:
        for rec in cohort["recordings"]:
            video = cohort_dir / rec["video"]
            row = {"subject_id": rec["subject_id"], "recording_id": rec["recording_id"],
                   "true_hr": true_hr(video.parent / "ppg.csv")}
            try:
                results = infer_models(str(video), loaded, detector=detector)
            except (VideoError, InferError) as e:  # a failed recording is reported in the table, never dropped
                results = {}
                row["error"] = str(e)
            for name in models:
                row[name] = results[name].hr_bpm if name in results else float("nan")
                if results_dir is not None and name in results:
                    write_outputs(results[name], results_dir / name, stem=rec["recording_id"])
            log(f"  {rec['recording_id']}: truth {row['true_hr']:6.1f}  " +
                "  ".join(f"{m} {row[m]:6.1f}" for m in models))
            rows.append(row)
    return rows


def format_table(rows: list[dict], models=DEMO_MODELS) -> str:
    head = f"{'subject':<10}{'true HR':>9}" + "".join(f"{m:>11}{'|err|':>8}" for m in models)
    lines = [head, "-" * len(head)]
    for subject in sorted({r["subject_id"] for r in rows}):
        mine = [r for r in rows if r["subject_id"] == subject]
        truth = np.mean([r["true_hr"] for r in mine])
        cells = ""
        for m in models:
            pred = np.mean([r[m] for r in mine])
            err = np.mean([abs(r[m] - r["true_hr"]) for r in mine])
            cells += f"{pred:>11.1f}{err:>8.1f}"
        lines.append(f"{subject:<10}{truth:>9.1f}{cells}")
    lines.append("-" * len(head))
    cohort = "".join(f"{'MAE':>11}{np.nanmean([abs(r[m] - r['true_hr']) for r in rows]):>8.2f}" for m in models)
    lines.append(f"{'cohort':<10}{'':>9}{cohort}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    started = time.perf_counter()
    print(f"synthesising {args.subjects} subjects x {args.seconds:g} s into {out / 'cohort'} (seed {args.seed})")
    write_cohort(out / "cohort", args.subjects, args.seconds, args.seed,
                 on_recording=lambda done, total, meta: print(f"  {done}/{total} {meta['recording_id']}", file=sys.stderr))
    print(f"measuring heart rate with {', '.join(DEMO_MODELS)}")
    rows = measure_cohort(out / "cohort", results_dir=out / "results")
    print()
    print(format_table(rows))
    failed = [(r["recording_id"], r["error"]) for r in rows if "error" in r]
    for rec, err in failed:
        print(f"failed: {rec}: {err}")
    print(f"\nBVP waveforms and spectra: {out / 'results'}/<model>/<recording>.png; "
          f"took {time.perf_counter() - started:.0f} s")
    return 1 if failed else 0
