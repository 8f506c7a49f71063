"""Helpers shared by the benchmark scripts: a stage clock and the machine's description."""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MARK = "@@BENCH@@"  # prefix of a child's one result line on stdout

class StageClock:
    """Adds up seconds spent inside wrapped functions and generators, by stage name."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def _add(self, stage: str, dt: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + dt
        self.calls[stage] = self.calls.get(stage, 0) + 1

    def function(self, stage: str, fn):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self._add(stage, time.perf_counter() - t0)
        return timed

    def generator(self, stage: str, fn):
        def timed(*a, **kw):  # time spent producing each item, not the consumer's time between items
            it = iter(fn(*a, **kw))
            while True:
                t0 = time.perf_counter()
                try:
                    item = next(it)
                except StopIteration:
                    self._add(stage, time.perf_counter() - t0)
                    return
                self._add(stage, time.perf_counter() - t0)
                yield item
        return timed


def add_output_arguments(ap, name: str) -> None:
    """--out (default bench/results/NAME.json) and the hidden --child KIND SPEC with which a bench runs its
    measurements in fresh processes of itself."""
    import argparse

    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / f"{name}.json"))
    ap.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)


def package_versions(names) -> dict:
    """Installed versions of the named distributions (those installed)."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def cpu_model() -> str:
    """The CPU's model name, family and model, and its widest vector ISA, from /proc/cpuinfo (Linux); the
    same VM type can land on hosts of different generations, and XLA:CPU's kernels differ with the ISA."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())  # the first CPU's
    except OSError:
        return platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    isa = "AVX-512" if "avx512f" in flags else "AVX2, no AVX-512" if "avx2" in flags else "no AVX2"
    family, model = fields.get("cpu family", "?"), fields.get("model", "?")
    return f"{fields.get('model name', '?')}, family {family} model {model}, {isa}"


def machine_info(packages, **extra) -> dict:
    """What the figures were measured on: platform, CPUs, memory, Python and package versions."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9,
        "python": sys.version.split()[0],
        "packages": package_versions(packages),
        **extra,
    }


def run_child(script: str, kind: str, spec: dict, label: str) -> dict:
    """Run one measurement (`script --child KIND SPEC`) in a fresh interpreter, so peaks don't mix;
    its result with the load average after."""
    print(f"{label} ...", flush=True)
    proc = subprocess.run([sys.executable, str(Path(script).resolve()), "--child", kind, json.dumps(spec)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-20:])
        raise RuntimeError(f"{label} failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(lines[-1][len(MARK):])
    if proc.returncode != 0:  # the result was complete; a crash in interpreter teardown is only noted
        result["exit_code"] = proc.returncode
        print(f"  note: exit code {proc.returncode} after the result was written", flush=True)
    result["load_after"] = os.getloadavg()
    return result


def run_bench(name: str, workdir: Path, measure, packages) -> tuple[dict, dict] | None:
    """The frame of a bench's main: print the load average, make `workdir` (test data kept for reuse) and a
    scratch folder (removed afterwards), run `measure(scratch) -> results`. Returns (results, machine: what
    it ran on with the load average before and after), or None after printing a failed measurement."""
    load_before = os.getloadavg()
    print(f"load average before: {load_before} on {os.cpu_count()} CPUs", flush=True)
    workdir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"pulsepipe-bench-{name}-"))
    started = time.perf_counter()
    try:
        results = measure(scratch)
    except RuntimeError as e:
        print(f"bench_{name}: {e}", file=sys.stderr)
        return None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return results, {**machine_info(packages), "load_before": load_before, "load_after": os.getloadavg(),
                     "bench_wall_s": time.perf_counter() - started}


def write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(f"\nwrote {path}")


def print_load(machine: dict) -> None:
    print()
    print(f"load average (1, 5, 15 min): before {tuple(round(x, 2) for x in machine['load_before'])}, after "
          f"{tuple(round(x, 2) for x in machine['load_after'])} on {machine['cpu_count']} CPUs; "
          "other processes add time")
