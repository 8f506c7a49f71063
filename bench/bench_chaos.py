"""Chaos: a preprocess job while random workers are killed, against an undisturbed run, and what crash
isolation costs on the happy path.

A synthetic cohort of --recordings recordings (written once into --workdir by `transforms.synth`) is
preprocessed by `run_preprocess` on --engine with --workers workers, in this order:

1. happy path without isolation (`EngineOptions(isolate=False)`: the step in the engine's worker) and
   with it (the default: the step in a supervised child per worker), alternating, --repeats times each;
   the medians give the cost of isolation as a share of the job's wall time (goal: under 5%);
2. the chaos run, with isolation: a thread SIGKILLs a random supervised child (the process that holds the
   step and does the work) at random times, seeded (--seed), at most --kills times and only while the job
   runs. Each killed item is retried on a fresh child (up to 3 attempts, then a failed row).

Then it prints the chaos run's outcome against the undisturbed run (rows ok and failed, shards identical
byte for byte for the ok recordings, temp or journal files left) and the isolation's cost, and writes
the same as JSON. A script, not a test: it asserts nothing. Other processes on this machine add noise:
the load average is printed. Usage:

    .venv/bin/python bench/bench_chaos.py [--workdir DIR] [--recordings 20] [--seconds 8] [--kills 5]
        [--seed 0] [--engine beam|ray] [--workers 2] [--repeats 3] [--json bench/results/chaos.json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a plain script from anywhere

import benchlib  # noqa: E402

SIZE = (320, 240)


def supervised_children() -> list[int]:
    """This process's descendants that are supervised step children (pipelines.engines.supervisor)."""
    from pipelines.engines.supervisor import CHILD
    from pipelines.processes import descendants

    found = []
    for pid in descendants():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if CHILD.encode() in f.read():
                    found.append(pid)
        except OSError:
            pass
    return found


class Killer(threading.Thread):
    """SIGKILLs a random supervised child at random intervals, at most `kills` times, until stopped."""

    def __init__(self, seed: int, kills: int, mean_interval_s: float):
        super().__init__(name="chaos", daemon=True)
        self.rng, self.kills, self.mean = random.Random(seed), kills, mean_interval_s
        self.stop, self.killed = threading.Event(), []

    def run(self) -> None:
        while len(self.killed) < self.kills and not self.stop.wait(self.rng.expovariate(1 / self.mean)):
            children = sorted(supervised_children())
            if children:
                pid = self.rng.choice(children)
                try:
                    os.kill(pid, signal.SIGKILL)
                    self.killed.append(pid)
                except ProcessLookupError:
                    pass


def shards(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("shards/**/*.parquet"))}


def leftovers(out: Path) -> list[str]:
    return [str(p.relative_to(out)) for p in out.rglob(".*")]


def run(cohort: Path, out: Path, opts, killer: Killer | None = None) -> tuple[float, list[dict]]:
    from pipelines.preprocess import load_config, run_preprocess

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    if killer:
        killer.start()
    try:
        rows = run_preprocess("synthetic", str(cohort), str(out), load_config(None), opts, log=lambda *_: None)
    finally:
        if killer:
            killer.stop.set()
            killer.join()
    return time.perf_counter() - t0, rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "pulsepipe-bench-chaos")
    p.add_argument("--recordings", type=int, default=20)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--kills", type=int, default=5, help="at most this many children killed (default: 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", choices=("beam", "ray"), default="beam")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="happy-path runs of each kind (default: 3)")
    p.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "chaos.json")
    args = p.parse_args(argv)

    from pipelines.engines import EngineOptions
    from transforms import synth

    cohort = args.workdir / f"cohort-{args.recordings}x{args.seconds:g}s"
    if not (cohort / "cohort.json").exists():
        print(f"writing {args.recordings} recordings of {args.seconds:g} s into {cohort} ...", flush=True)
        synth.write_cohort(cohort, subjects=args.recordings, seconds=args.seconds, seed=args.seed, size=SIZE)
    load_before = os.getloadavg()
    isolated = EngineOptions(args.engine, workers=args.workers)
    plain = EngineOptions(args.engine, workers=args.workers, isolate=False)
    walls = {"without isolation": [], "with isolation": []}
    for k in range(args.repeats):
        for name, opts in (("without isolation", plain), ("with isolation", isolated)):
            wall, rows = run(cohort, args.workdir / "happy", opts)
            walls[name].append(wall)
            print(f"  happy path {k + 1}/{args.repeats} {name}: {wall:.1f} s, "
                  f"{sum(r['status'] == 'ok' for r in rows)} ok", flush=True)
    undisturbed = shards(args.workdir / "happy")  # the last run: with isolation, undisturbed

    job_s = statistics.median(walls["with isolation"])
    # kills spread over the job, but not faster than a child starts (2-4 s on a busy 2-core machine): three
    # kills of one worker's child while it builds its step end the run, as a step whose setup always dies must
    killer = Killer(args.seed, args.kills, mean_interval_s=max(job_s / (args.kills + 1), 4.0))
    chaos_wall, rows = run(cohort, args.workdir / "chaos", isolated, killer)
    chaos = shards(args.workdir / "chaos")
    ok = [r for r in rows if r["status"] == "ok"]
    failed = [r for r in rows if r["status"] == "failed"]
    identical = all(chaos.get(r["shard"]) == undisturbed.get(r["shard"]) for r in ok)
    left = leftovers(args.workdir / "chaos")

    median = {k: statistics.median(v) for k, v in walls.items()}
    cost = (median["with isolation"] - median["without isolation"]) / median["without isolation"]
    print(f"\nchaos: {args.recordings} recordings x {args.seconds:g} s ({SIZE[0]}x{SIZE[1]}), {args.engine}, "
          f"{args.workers} workers, seed {args.seed}; load average {load_before[0]:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after")
    header = f"{'run':<28}{'wall (s)':>10}{'rows':>6}{'ok':>5}{'failed':>8}{'kills':>7}  shards identical  left over"
    print(header)
    print(f"{'undisturbed (median)':<28}{median['with isolation']:>10.1f}{args.recordings:>6}{args.recordings:>5}"
          f"{0:>8}{0:>7}  {'-':<16}  -")
    print(f"{'chaos':<28}{chaos_wall:>10.1f}{len(rows):>6}{len(ok):>5}{len(failed):>8}{len(killer.killed):>7}  "
          f"{'yes' if identical else 'NO':<16}  {', '.join(left) or 'nothing'}")
    for r in failed:
        print(f"  failed: {r['recording_id']}: {r['reason']}")
    print(f"\nhappy path, median of {args.repeats}: {median['without isolation']:.1f} s without isolation, "
          f"{median['with isolation']:.1f} s with: isolation costs {100 * cost:+.1f}% of the job's time")

    result = {"recordings": args.recordings, "seconds": args.seconds, "size": SIZE, "engine": args.engine,
              "workers": args.workers, "seed": args.seed, "kills_asked": args.kills, "kills": len(killer.killed),
              "happy_path_s": walls, "isolation_cost": cost, "chaos_wall_s": chaos_wall, "rows": len(rows),
              "ok": len(ok), "failed": [{"recording_id": r["recording_id"], "reason": r["reason"]} for r in failed],
              "ok_shards_identical": identical, "left_over": left,
              "machine": benchlib.machine_info(["apache-beam", "ray"], load_before=load_before,
                                               load_after=os.getloadavg())}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
