"""The embedded default: synthesise a small cohort, preprocess it, evaluate every model, print the tables.

Everything runs on this machine (Beam's Python runner by default, or Ray in-process), in three folders
under --out: cohort/ (videos with known truth), preprocessed/ (shards and manifest) and evaluation/
(predictions, metrics and report.html). Re-running reuses what is unchanged.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pipelines.arguments import positive_number, whole_number
from pipelines.engines import add_engine_arguments, engine_options
from pipelines.evaluate import EvaluateSettings, run_evaluate
from pipelines.preprocess import load_config, run_preprocess
from transforms.synth import write_cohort


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="pulsepipe-demo", help="folder for everything the demo writes (default: pulsepipe-demo)")
    p.add_argument("--subjects", type=whole_number(1), default=12, help="subjects to synthesise (default: 12)")
    p.add_argument("--recordings", type=whole_number(1), default=2, help="recordings per subject (default: 2)")
    p.add_argument("--seconds", type=positive_number("a number of seconds"), default=20.0,
                   help="seconds per recording (default: 20)")
    p.add_argument("--seed", type=whole_number(0), default=0, help="seed of the cohort (default: 0)")
    add_engine_arguments(p)


def ensure_cohort(folder: Path, subjects: int, recordings: int, seconds: float, seed: int) -> None:
    """Synthesise the cohort unless the folder already holds this exact one."""
    wanted = {"subjects": subjects, "recordings_per_subject": recordings, "seconds": float(seconds)}
    existing = folder / "cohort.json"
    if existing.exists():
        cohort = json.loads(existing.read_text())
        if cohort["seed"] == seed and all(cohort["parameters"].get(k) == v for k, v in wanted.items()):
            print(f"cohort: reusing {folder}")
            return
    print(f"cohort: synthesising {subjects} subjects x {recordings} recordings x {seconds:g} s into {folder}")
    write_cohort(folder, subjects, seconds, seed, recordings_per_subject=recordings,
                 on_recording=lambda done, total, meta: print(
                     f"  {done}/{total} {meta['recording_id']}: {meta['true_mean_hr_bpm']:.1f} BPM", file=sys.stderr))


def main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    out = Path(args.out)
    opts = engine_options(args)
    ensure_cohort(out / "cohort", args.subjects, args.recordings, args.seconds, args.seed)
    print("\npreprocess:")
    run_preprocess("synthetic", str(out / "cohort"), str(out / "preprocessed"), load_config(None), opts)
    print("\nevaluate:")
    settings = EvaluateSettings(str(out / "preprocessed"), str(out / "evaluation"), windows=(10.0,), n_boot=500)
    run_evaluate(settings, opts)
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; open {out / 'evaluation' / 'report.html'}")
    return 0
