"""PhysMamba speed and memory: our whole-video inference (JAX, the evaluate/infer predictor) against the
published implementation (open-rppg 0.1.1's Keras model on JAX, run in a subprocess with its own venv, as
the wheel runs it: its jitted `load_PhysMamba_rlap` call, default mixed precision).

    .venv/bin/python bench/bench_physmamba.py --ref-python .venv-ref/bin/python      # make bench-physmamba

Ours: `PhysMambaPredictor` over a streamed video of 128x128 crops (160-frame lockstep blocks into 128-frame
chunks, the last one padded as the wheel pads), 1 and 10 minutes long, each in a fresh process: frames/s
after a one-chunk warm-up (the compile) and the process's peak resident memory (VmHWM), which must stay flat
in the video's length. Reference: `--ref-chunks` 128-frame chunks after its load (which includes its
compile): about a minute each on one core, so only a few are timed and its frames/s is 128 / median chunk s
(no state between chunks, so a whole video takes that many times as long). The ratios print in one run.
With --batch-sizes, also batched throughput: b chunks per device call (the GPU figure; no reference).
Prints a table and writes bench/results/physmamba.json. Wall clock on a possibly shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import benchlib  # noqa: E402 - bench/ is the script's own folder

CHUNK = 128
MINUTE = 60 * 30  # frames of a minute at 30 fps

REFERENCE = r"""
import json, os, resource, sys, time
os.environ.setdefault("KERAS_BACKEND", "jax")
import numpy as np, jax
import rppg.models as rm
n_chunks, mark = int(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(0)
t = time.perf_counter(); call, state, _ = rm.load_PhysMamba_rlap(); load_s = time.perf_counter() - t
times, cpu = [], []
for _ in range(n_chunks):
    x = rng.integers(0, 256, (128, 128, 128, 3), dtype=np.uint8)
    t, c = time.perf_counter(), time.process_time()
    y, _ = call(x, state); jax.block_until_ready(y["bvp"])
    times.append(time.perf_counter() - t); cpu.append(time.process_time() - c)
print(mark + json.dumps({"load_s": load_s, "chunk_s": times, "fps": 128 / float(np.median(times)),
                         "cpu_ms_per_frame": 1000 * float(np.median(cpu)) / 128,
                         "hwm_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)
"""


def video_blocks(n_frames: int, block: int = 160, seed: int = 0):
    """A video of n_frames 128x128 crops streamed as lockstep-sized blocks (never held whole): a few
    random frames cycled with a per-frame brightness ramp, so every chunk differs. Face everywhere."""
    from pipelines.predictors import Block

    pool = np.random.default_rng(seed).integers(0, 240, (17, CHUNK, CHUNK, 3), dtype=np.uint8)
    for a in range(0, n_frames, block):
        idx = np.arange(a, min(a + block, n_frames))
        frames = pool[idx % len(pool)] + (idx % 16).astype(np.uint8)[:, None, None, None]
        yield Block({CHUNK: frames}, np.ones(len(idx), bool))


def child(kind: str, spec: dict) -> dict:
    import jax

    import model

    pm = model.load("physmamba", "rlap")
    if kind == "video":  # whole-video inference, one recording, as evaluate and infer run it
        from pipelines.predictors import PhysMambaPredictor, feed  # not on a GPU kit: batched needs only model

        t = time.perf_counter()
        feed({"pm": PhysMambaPredictor(pm, 1)}, [video_blocks(CHUNK)]).predictors["pm"].finish()
        warm_s = time.perf_counter() - t
        t, c = time.perf_counter(), time.process_time()
        (bvp,) = feed({"pm": PhysMambaPredictor(pm, 1)}, [video_blocks(spec["frames"])]).predictors["pm"].finish()
        wall = time.perf_counter() - t
        assert len(bvp) == spec["frames"]
        return {"frames": spec["frames"], "wall_s": wall, "fps": spec["frames"] / wall, "warmup_s": warm_s,
                "cpu_ms_per_frame": 1000 * (time.process_time() - c) / spec["frames"],
                "hwm_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "device": str(jax.devices()[0])}
    # batched: b chunks per device call
    b = spec["batch"]
    x = jax.device_put(np.random.default_rng(b).integers(0, 256, (b, CHUNK, CHUNK, CHUNK, 3), dtype=np.uint8))
    t = time.perf_counter()
    run = model.physmamba_chunk.lower(pm.params, x).compile()
    compile_s = time.perf_counter() - t
    jax.block_until_ready(run(pm.params, x))
    times = []
    for _ in range(spec["repeats"]):
        t = time.perf_counter()
        jax.block_until_ready(run(pm.params, x))
        times.append(time.perf_counter() - t)
    return {"batch": b, "compile_s": compile_s, "fps": b * CHUNK / float(np.median(times)),
            "device": str(jax.devices()[0])}


def reference(python: str, n_chunks: int) -> dict:
    print(f"reference: Keras PhysMamba, {n_chunks} chunks of {CHUNK} frames (about a minute each) ...", flush=True)
    proc = subprocess.run([python, "-c", REFERENCE, str(n_chunks), benchlib.MARK], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "KERAS_BACKEND": "jax"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(benchlib.MARK)]
    if proc.returncode or not lines:
        raise RuntimeError(f"reference failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(benchlib.MARK):])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref-python", help="python of a venv with open-rppg==0.1.1 and its dependencies; "
                                         "without it the reference is skipped")
    ap.add_argument("--minutes", type=float, nargs="*", default=[1, 10],
                    help="video lengths for ours, minutes (peak memory must be flat across them)")
    ap.add_argument("--ref-chunks", type=int, default=2, help="reference chunks timed after its load")
    ap.add_argument("--batch-sizes", type=int, nargs="*", default=[],
                    help="also time b chunks per device call for each b (batched throughput; on a GPU e.g. 1 8 32)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per batch size")
    benchlib.add_output_arguments(ap, "physmamba")
    args = ap.parse_args(argv)
    if args.child:
        print(benchlib.MARK + json.dumps(child(args.child[0], json.loads(args.child[1]))), flush=True)
        return 0

    def measure(_scratch) -> dict:
        videos = [benchlib.run_child(__file__, "video", {"frames": int(round(m * MINUTE))},
                                     f"ours: whole-video PhysMamba, {m:g} min") for m in args.minutes]
        ref = reference(args.ref_python, args.ref_chunks) if args.ref_python else {}
        batched = [benchlib.run_child(__file__, "batched", {"batch": b, "repeats": args.repeats},
                                      f"ours: {b} chunks per call") for b in args.batch_sizes]
        return {"videos": videos, "reference": ref, "batched": batched}

    done = benchlib.run_bench("physmamba", ROOT / "bench" / "work", measure, ["jax", "jaxlib", "numpy", "keras"])
    if done is None:
        return 1
    results, machine = done
    videos, ref = results["videos"], results["reference"]
    print()
    print(f"PhysMamba (rlap) on {platform.processor() or platform.machine()}, {os.cpu_count()} cores, device "
          f"{videos[0]['device']} (wall clock, shared machine)")
    print(f"{'':44s}{'ours':>10s}{'reference':>12s}{'gain':>8s}")
    for v in videos:
        gain = f"{v['fps'] / ref['fps']:.1f}x" if ref else ""
        refs = f"{ref['fps']:12.2f}" if ref else " " * 12
        label = f"frames/s, {v['frames'] / MINUTE:g}-min video"
        print(f"{label:44s}{v['fps']:10.1f}{refs}{gain:>8s}")
    for v in videos:
        refs = f"{ref['hwm_mib']:12.0f}" if ref else " " * 12
        label = f"peak RSS MiB, {v['frames'] / MINUTE:g}-min video (ref: 1 chunk)"
        print(f"{label:44s}{v['hwm_mib']:10.0f}{refs}")
    if len(videos) > 1:
        print(f"{'peak RSS, longest / shortest video':44s}{videos[-1]['hwm_mib'] / videos[0]['hwm_mib']:10.2f}")
    cpu_ref = f"{ref['cpu_ms_per_frame']:12.1f}{ref['cpu_ms_per_frame'] / videos[-1]['cpu_ms_per_frame']:7.1f}x" \
        if ref else ""
    print(f"{'CPU ms/frame, all threads (steadier)':44s}{videos[-1]['cpu_ms_per_frame']:10.2f}{cpu_ref}")
    if ref:
        print(f"{'compile s (ref: load + first call)':44s}{videos[0]['warmup_s']:10.1f}{ref['load_s']:12.1f}")
        print(f"reference: {len(ref['chunk_s'])} chunks, {', '.join(f'{s:.1f}' for s in ref['chunk_s'])} s each")
    print("goals: >= 20x the reference's frames/s (at least real time, 30 frames/s); peak memory flat in length")
    for row in results["batched"]:
        print(f"  batched: {row['batch']:4d} chunks per call {row['fps']:10.0f} frames/s  "
              f"(compile {row['compile_s']:.1f} s, {row['device']})")
    benchlib.print_load(machine)
    benchlib.write_json({**results, "machine": machine}, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
