"""Evaluation engine overhead: whole-video ME-rPPG inference frames/s through Beam and Ray against the model
called directly, on CPU, side by side on this machine.

Test data: a synthetic cohort (`transforms.synth`, --subjects x 1 recording x --seconds at 320x240, lossy
H.264 crf 20) preprocessed once with `run_preprocess` on Beam; both are written into --workdir and reused.
Every measurement runs in a fresh subprocess of this Python. It measures:

1. direct: in one process, `ModelSet(["me-chunk:rlap"]).feed` on each recording's shard
   (`read_segments`, every column, as EvaluateStep reads it) then `finish()`; the first recording is a
   warm-up (it pays the XLA compile) and is left out of frames/s; model load and warm-up are reported apart;
2. step: `EvaluateStep` called directly in the same process (no engine) on the same recordings, one per
   call, warm-up excluded the same way: the step's own work (heart rates, windows, its part file) over bare
   inference;
3. engines: `run_evaluate(EvaluateSettings(input, output, ("me-chunk:rlap",), (10.0,), n_boot=100,
   recordings_per_call=1), EngineOptions(engine, workers=W))` for each engine and W; wall time and frames/s. The fixed cost is
   the wall time of the same call on W tiny recordings (--tiny-seconds each, one per worker, so each worker
   starts and loads the model; the compiled model comes from a compile cache that the direct run of 1
   filled, as on every run after a machine's first); it includes their few frames of inference and the driver's
   report for them. frames/s
   is given including and excluding it, and overhead = 1 - engine fps / (direct fps x W) both ways. The
   full run's wall time is split with a stage clock into run_step (the engine), merging the part files,
   metrics (bootstrap), report (HTML and PNGs) and the rest (manifest read, work items);
4. batching: in one process, every recording through `ModelSet.feed` in buckets of B recordings for each B
   of --batch-sizes (one device call per 160-frame block serves the bucket), frames/s and the ratio to B=1.

CPU use: the direct child's own user+sys seconds give frames per CPU-second; for every child the machine's
busy cores over its measurement are read from /proc/stat (this includes other processes). The direct run's
XLA already spreads one recording over all cores, so W workers on a machine with fewer than W x that many
cores cannot reach direct fps x W: the overhead at W > 1 then holds that contention too.

Prints one table and writes the same as JSON with the machine's details. A script, not a test: it asserts
nothing. Other processes on this machine add time: the load average is printed before and after.
Usage:

    .venv/bin/python bench/bench_evaluate.py [--workdir DIR] [--seconds 60] [--subjects 4]
        [--engines beam ray] [--workers 1 2] [--batch-sizes 1 4] [--json bench/results/evaluate.json] [--quick]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a plain script from anywhere

import benchlib  # noqa: E402
from benchlib import StageClock  # noqa: E402

SIZE = (320, 240)
CODEC = "h264-crf20"  # a typical lossy camera file (yuv420p)
SEED = 11
MODELS = ("me-chunk:rlap",)
WINDOWS = (10.0,)
N_BOOT = 100
MARK = benchlib.MARK


# ---- test data ----

def preprocessed(workdir: Path, subjects: int, seconds: float) -> Path:
    """The output root of `run_preprocess` on a synthetic cohort; cohort and shards written on first use."""
    from pipelines.engines import EngineOptions
    from pipelines.preprocess import load_config, run_preprocess
    from transforms.synth import write_cohort

    name = f"{CODEC}-{subjects}x{seconds:g}s-seed{SEED}-{SIZE[0]}x{SIZE[1]}"
    cohort, out = workdir / name, workdir / f"{name}-preprocessed"
    if not (cohort / "cohort.json").exists():  # written last: its presence means complete
        print(f"writing {subjects} x {seconds:g} s {SIZE[0]}x{SIZE[1]} {CODEC} recordings into {cohort} ...",
              flush=True)
        t0 = time.perf_counter()
        write_cohort(cohort, subjects, seconds, SEED, size=SIZE, codec=CODEC)
        print(f"  {time.perf_counter() - t0:.0f} s", flush=True)
    if not (out / "manifest.parquet").exists():  # written last by run_preprocess
        print(f"preprocessing {cohort.name} into {out} (beam) ...", flush=True)
        run_preprocess("synthetic", str(cohort), str(out), load_config(None), EngineOptions("beam"),
                       log=lambda *a, **k: None)
    return out


def manifest_rows(root: str) -> list[dict]:
    import fsspec

    from transforms.manifest import read_manifest

    fs, path = fsspec.core.url_to_fs(root)
    return read_manifest(f"{path.rstrip('/')}/manifest.parquet", fs)


# ---- children: one measurement per fresh process ----

def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return r.ru_utime + r.ru_stime


def _machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot; busy excludes idle and iowait."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    return sum(values) - values[3] - values[4], sum(values)


def _busy_cores(before: tuple[int, int], after: tuple[int, int]) -> float:
    total = after[1] - before[1]
    return (after[0] - before[0]) / total * (os.cpu_count() or 1) if total else 0.0


def infer_bucket(models, input_uri: str, bucket: list[dict]) -> int:
    """The models over a bucket of recordings' shards (every column, as EvaluateStep reads them) in
    lockstep, outputs fetched; returns the frames of one model's output."""
    import fsspec

    from transforms.shards import read_segments

    fs, root = fsspec.core.url_to_fs(input_uri)
    streams = [((seg.frames, seg.face_found) for seg in read_segments(f"{root.rstrip('/')}/{i['shard']}", fs,
                                                                      columns=None)) for i in bucket]
    outputs = [p.finish() for p in models.feed(streams).predictors.values()]
    return sum(len(b) for b in outputs[0])


def child_direct(spec: dict) -> dict:
    """ModelSet predictors, then EvaluateStep, on every recording in this process; first one a warm-up."""
    from pipelines.evaluate import EvaluateStep, work_items
    from pipelines.predictors import ModelSet

    items = [i for i in work_items(manifest_rows(spec["input"])) if not i["reason"]]

    def infer(models: ModelSet, item: dict) -> int:
        return infer_bucket(models, spec["input"], [item])

    t0 = time.perf_counter()
    models = ModelSet(MODELS)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm_frames = infer(models, items[0])
    warm_s = time.perf_counter() - t0
    jiffies, cpu0, t0 = _machine_jiffies(), _cpu_s(), time.perf_counter()
    frames = sum(infer(models, item) for item in items[1:])
    direct = {"frames": frames, "wall_s": time.perf_counter() - t0, "cpu_s": _cpu_s() - cpu0,
              "busy_cores": _busy_cores(jiffies, _machine_jiffies()), "recordings": len(items) - 1,
              "load_s": load_s, "warmup_s": warm_s, "warmup_frames": warm_frames}

    parts = tempfile.mkdtemp(prefix="pulsepipe-bench-evaluate-parts-")
    try:
        t0 = time.perf_counter()
        step = EvaluateStep(spec["input"], parts, list(MODELS), list(WINDOWS))
        setup_s = time.perf_counter() - t0
        step({"index": 0, "recordings": [items[0]]})  # warm-up, as above (the jitted function is shared in-process)
        jiffies, cpu0, t0 = _machine_jiffies(), _cpu_s(), time.perf_counter()
        rows = [r for k, item in enumerate(items[1:], 1) for r in step({"index": k, "recordings": [item]})["rows"]]
        wall, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
    finally:
        shutil.rmtree(parts, ignore_errors=True)
    step_row = {"frames": sum(r["n_frames"] or 0 for r in rows if r["status"] == "ok"), "wall_s": wall,
                "cpu_s": cpu, "busy_cores": _busy_cores(jiffies, _machine_jiffies()), "setup_s": setup_s,
                "failed": [r["reason"] for r in rows if r["status"] != "ok"]}
    return {"direct": direct, "step": step_row}


def child_engine(spec: dict) -> dict:
    """run_evaluate on one engine, its wall time split by a stage clock around its parts."""
    from unittest import mock

    import pipelines.evaluate as evaluate
    import pipelines.report as report
    import transforms.metrics as metrics
    from pipelines.engines import EngineOptions

    opts = EngineOptions(spec["engine"], workers=spec["workers"])
    clock = StageClock()
    patches = [  # metrics_table and write_report are imported inside evaluate's phases: patch their modules
        mock.patch.object(evaluate, "run_step", clock.function("run_step", evaluate.run_step)),
        mock.patch.object(evaluate, "_merge_parts", clock.function("merge", evaluate._merge_parts)),
        mock.patch.object(metrics, "metrics_table", clock.function("metrics", metrics.metrics_table)),
        mock.patch.object(report, "write_report", clock.function("report", report.write_report)),
        mock.patch.object(evaluate, "_waveforms", clock.function("report", evaluate._waveforms)),
    ]
    for p in patches:
        p.start()
    quiet = lambda *a, **k: None  # noqa: E731 - the driver's tables would mix with ours
    jiffies, t0 = _machine_jiffies(), time.perf_counter()
    # one recording per call, as the direct run and the fixed-cost run (whose W tiny recordings make
    # buckets of one) do: a bucket of 4 would compile a second shape inside the timed run
    settings = evaluate.EvaluateSettings(spec["input"], spec["output"], MODELS, WINDOWS, n_boot=spec["n_boot"],
                                         recordings_per_call=1)
    result = evaluate.run_evaluate(settings, opts, log=quiet)
    wall = time.perf_counter() - t0
    busy = _busy_cores(jiffies, _machine_jiffies())
    for p in patches:
        p.stop()
    rows = result["predictions"]
    return {"frames": sum(r["n_frames"] or 0 for r in rows if r["status"] == "ok"), "wall_s": wall,
            "busy_cores": busy, "stages_s": clock.seconds, "recordings": len(rows),
            "failed": [r["reason"] for r in rows if r["status"] != "ok"], "opts": dataclasses.asdict(opts)}


def child_batched(spec: dict) -> dict:
    """Every recording through the models in buckets of B (one device call per block serves B), for each B;
    a warm-up bucket first per B (it pays that shape's compile)."""
    import jax

    from pipelines.evaluate import work_items
    from pipelines.predictors import ModelSet

    items = [i for i in work_items(manifest_rows(spec["input"])) if not i["reason"]]
    models = ModelSet(MODELS)

    out = {"device": str(jax.devices()[0]), "recordings": len(items), "by_batch": {}}
    for b in spec["batch_sizes"]:
        t0 = time.perf_counter()
        infer_bucket(models, spec["input"], items[:b])
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        frames = sum(infer_bucket(models, spec["input"], items[s:s + b]) for s in range(0, len(items), b))
        out["by_batch"][str(b)] = {"frames": frames, "wall_s": time.perf_counter() - t0, "warmup_s": warm}
    return out


CHILDREN = {"direct": child_direct, "engine": child_engine, "batched": child_batched}


def run_child(kind: str, spec: dict, label: str) -> dict:
    return benchlib.run_child(__file__, kind, spec, label)


def child_main(kind: str, spec_json: str) -> int:
    result = CHILDREN[kind](json.loads(spec_json))
    print(MARK + json.dumps(result, default=float), flush=True)
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: pyarrow's dataset threads have aborted it after a Ray run


# ---- the measurements ----

def measure_engines(full: Path, tiny: dict[int, Path], scratch: Path, engines: list[str],
                    workers: list[int], n_boot: int) -> list[dict]:
    rows = []
    for engine in engines:
        for w in workers:
            runs = {}
            for what, data in (("fixed", tiny[w]), ("full", full)):
                out = scratch / f"{engine}-{w}-{what}"
                runs[what] = run_child("engine", {"engine": engine, "workers": w, "input": str(data),
                                                  "output": str(out), "n_boot": n_boot},
                                       f"run_evaluate on {engine}, workers={w}, "
                                       + (f"{w} tiny recording(s) (fixed cost)" if what == "fixed" else "cohort"))
                shutil.rmtree(out, ignore_errors=True)
            rows.append({"engine": engine, "workers": w, **runs})
    return rows


# ---- output ----

def fps(frames: float, seconds: float) -> float | None:
    return frames / seconds if seconds > 0 else None


def fmt(x: float | None, spec: str = ".1f") -> str:
    return format(x, spec) if x is not None else "-"


def overhead(engine_fps: float | None, direct_fps: float, workers: int) -> float | None:
    return 1 - engine_fps / (direct_fps * workers) if engine_fps else None


def summarise(report: dict) -> list[dict]:
    """Per engine row: frames/s including and excluding the fixed cost, and the overheads."""
    d = report["direct"]["direct"]
    direct_fps = d["frames"] / d["wall_s"]
    out = []
    for r in report["engines"]:
        full, fixed = r["full"], r["fixed"]
        incl = fps(full["frames"], full["wall_s"])
        excl = fps(full["frames"], full["wall_s"] - fixed["wall_s"])
        w = r["workers"]
        out.append({"engine": r["engine"], "workers": w, "frames": full["frames"], "wall_s": full["wall_s"],
                    "fixed_s": fixed["wall_s"], "fps_incl": incl, "fps_excl": excl,
                    "fps_per_worker_incl": incl / w if incl else None,
                    "fps_per_worker_excl": excl / w if excl else None,
                    "overhead_incl": overhead(incl, direct_fps, w), "overhead_excl": overhead(excl, direct_fps, w),
                    "busy_cores": full["busy_cores"], "stages_s": full["stages_s"],
                    "fixed_stages_s": fixed["stages_s"]})
    return out


def print_table(report: dict) -> None:
    a = report["args"]
    d, s = report["direct"]["direct"], report["direct"]["step"]
    direct_fps = d["frames"] / d["wall_s"]
    print()
    print(f"1-2. in one process, no engine: {a['models'][0]} on {d['recordings']} of {a['subjects']} x "
          f"{a['seconds']:g} s recordings (the first is a warm-up, left out)")
    print(f"{'':36}{'frames':>8}{'wall s':>9}{'fps':>8}{'cpu s':>8}{'fps/cpu':>9}{'busy cores':>12}{'/direct':>9}")
    for name, r in (("direct (ModelSet predictors)", d), ("EvaluateStep (no engine)", s)):
        print(f"{name:36}{r['frames']:>8}{r['wall_s']:>9.2f}{r['frames'] / r['wall_s']:>8.1f}{r['cpu_s']:>8.2f}"
              f"{r['frames'] / r['cpu_s']:>9.1f}{r['busy_cores']:>12.2f}"
              f"{(r['frames'] / r['wall_s']) / direct_fps:>9.2f}")
    print(f"model load {d['load_s']:.2f} s; warm-up recording ({d['warmup_frames']} frames, compile included) "
          f"{d['warmup_s']:.2f} s, about {d['warmup_s'] - d['warmup_frames'] / direct_fps:.2f} s of it compile")

    if report["summary"]:
        print()
        print(f"3. run_evaluate on all {a['subjects']} recordings (n_boot={a['n_boot']}); fixed = the same call on "
              f"one {a['tiny_seconds']:g} s recording per worker; overhead = 1 - fps / (direct fps x workers)")
        print(f"{'engine':>8}{'workers':>8}{'frames':>8}{'wall s':>8}{'fixed s':>9}{'fps':>8}{'fps excl':>10}"
              f"{'/worker':>9}{'excl':>7}{'overhead':>10}{'excl':>7}{'busy cores':>12}")
        for r in report["summary"]:
            pct = lambda x: f"{100 * x:.0f}%" if x is not None else "-"  # noqa: E731
            print(f"{r['engine']:>8}{r['workers']:>8}{r['frames']:>8}{r['wall_s']:>8.1f}{r['fixed_s']:>9.1f}"
                  f"{fmt(r['fps_incl']):>8}{fmt(r['fps_excl']):>10}{fmt(r['fps_per_worker_incl']):>9}"
                  f"{fmt(r['fps_per_worker_excl']):>7}{pct(r['overhead_incl']):>10}{pct(r['overhead_excl']):>7}"
                  f"{r['busy_cores']:>12.2f}")
        print(f"(direct: {direct_fps:.1f} fps; goal: overhead under 15%; 'excl' subtracts the fixed cost; the "
              "workers load the compiled model from the cache the direct run filled)")

        print()
        print("where each full run's wall time goes (s; run_step = the engine: start-up, model load, compile, "
              "the steps)")
        names = ("run_step", "merge", "metrics", "report")
        print(f"{'engine':>8}{'workers':>8}" + "".join(f"{n:>10}" for n in (*names, "rest")) + f"{'fixed run':>11}"
              + f"{'fixed run_step':>16}{'run_step-that':>15}{'direct-time':>13}")
        for r in report["summary"]:
            st = r["stages_s"]
            rest = r["wall_s"] - sum(st.get(n, 0.0) for n in names)
            ideal = r["frames"] / (direct_fps * r["workers"])  # the inference alone at direct speed
            fixed_step = r["fixed_stages_s"].get("run_step", 0.0)  # engine start-up, model load, compile
            print(f"{r['engine']:>8}{r['workers']:>8}" + "".join(f"{st.get(n, 0.0):>10.2f}" for n in names)
                  + f"{rest:>10.2f}{r['fixed_s']:>11.2f}{fixed_step:>16.2f}{st.get('run_step', 0.0) - fixed_step:>15.2f}"
                  + f"{ideal:>13.2f}")
        print("(fixed run_step = the engine part of the fixed run; direct-time = frames / (direct fps x workers), "
              "what run_step would take with no overhead at all: run_step-that minus direct-time is the engine's "
              "remaining per-frame cost)")

    if report["batched"]:
        b = report["batched"]
        base = b["by_batch"].get("1")
        print()
        print(f"4. recordings per device call, in-process on {b['device']}: {a['models'][0]} over {b['recordings']} "
              "recordings in buckets of B (warm-up bucket left out)")
        print(f"{'B':>6}{'frames':>10}{'wall s':>9}{'fps':>10}{'vs B=1':>9}")
        for size, r in b["by_batch"].items():
            speed = r["frames"] / r["wall_s"]
            ratio = speed / (base["frames"] / base["wall_s"]) if base else None
            print(f"{size:>6}{r['frames']:>10}{r['wall_s']:>9.2f}{speed:>10.1f}{fmt(ratio, '.2f'):>9}")

    benchlib.print_load(report["machine"])


# ---- main ----

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "pulsepipe-bench-evaluate",
                   help="where test videos and their shards are written once and reused "
                        "(default: $TMPDIR/pulsepipe-bench-evaluate)")
    p.add_argument("--seconds", type=float, help="length of each recording (default: 60)")
    p.add_argument("--subjects", type=int, help="recordings, one per subject (default: 4)")
    p.add_argument("--tiny-seconds", type=float, default=4.0,
                   help="length of the recordings of the fixed-cost run (default: 4)")
    p.add_argument("--engines", nargs="*", choices=("beam", "ray"), default=["beam", "ray"],
                   help="engines to time (default: beam ray; none: direct only)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time (default: 1 2)")
    p.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 4],
                   help="recordings per device call to time, in-process (default: 1 4; none: skip; "
                        "on a GPU e.g. 1 16 64 with as many --subjects)")
    p.add_argument("--n-boot", type=int, default=N_BOOT, help=f"bootstrap resamples in run_evaluate (default: {N_BOOT})")
    p.add_argument("--json", type=Path, default=REPO / "bench/results/evaluate.json", help="where to write JSON")
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 x 12 s recordings")
    p.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.seconds = args.seconds or (12.0 if args.quick else 60.0)
    args.subjects = args.subjects or (2 if args.quick else 4)
    if args.subjects < 2:
        p.error("--subjects must be at least 2 (the first recording is the direct run's warm-up)")
    if min(args.seconds, args.tiny_seconds) < 3:
        p.error("--seconds and --tiny-seconds must be at least 3 (preprocessing fails recordings under 2 s)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(*args.child)

    def measure(scratch: Path) -> dict:
        # a compile cache of this run only: the direct child compiles (its warm-up shows the cost), the engine
        # runs after it load from the cache, as every run after the first on a machine does
        os.environ["JAX_COMPILATION_CACHE_DIR"] = str(scratch / "xla-cache")
        full = preprocessed(args.workdir, args.subjects, args.seconds)
        tiny = {w: preprocessed(args.workdir, w, args.tiny_seconds) for w in sorted(set(args.workers))}
        direct = run_child("direct", {"input": str(full)},
                           f"direct inference and EvaluateStep in-process on {args.subjects} recordings")
        batched = (run_child("batched", {"input": str(full), "batch_sizes": args.batch_sizes},
                             f"recordings per device call {args.batch_sizes}, in-process")
                   if args.batch_sizes else None)
        return {"input": str(full), "direct": direct, "batched": batched,
                "engines": measure_engines(full, tiny, scratch, args.engines, args.workers, args.n_boot)}

    done = benchlib.run_bench("evaluate", args.workdir, measure,
                              ("pulsepipe", "numpy", "jax", "jaxlib", "pyarrow", "apache-beam", "ray"))
    if done is None:
        return 2
    results, machine = done
    report = {
        "benchmark": "evaluate",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": {"seconds": args.seconds, "subjects": args.subjects, "tiny_seconds": args.tiny_seconds,
                 "engines": args.engines, "workers": args.workers, "batch_sizes": args.batch_sizes,
                 "n_boot": args.n_boot, "quick": args.quick, "models": list(MODELS), "windows": list(WINDOWS),
                 "size": list(SIZE), "codec": CODEC, "seed": SEED, "input": results.pop("input")},
        "machine": machine,
        **results,
    }
    report["summary"] = summarise(report)
    print_table(report)
    benchlib.write_json(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
