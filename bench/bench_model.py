"""ME-rPPG speed: ours (JAX, in-process) against the published implementation (open-rppg 0.1.1, Keras 3 on
JAX, run in a subprocess with its own venv, as the wheel runs it: its jitted `load_ME_rlap` /
`load_ME_chunk_rlap` calls, default mixed precision).

    .venv/bin/python bench/bench_model.py --ref-python .venv-ref/bin/python

Measures flow-step latency (median ms per frame after warm-up), chunk throughput (frames/s over an
1800-frame video, the last partial chunk padded as the wheel does), flow state size and compile time.
Prints a table and writes bench/results/model.json. Timings are wall clock on a possibly shared machine.
With --batch-sizes, also batched whole-video inference: B 1800-frame videos per device call (the GPU
figure of the model issue: `--batch-sizes 1 16 64 256 --precisions float32 bfloat16` where JAX sees a GPU).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VIDEO_FRAMES = 1800
CHUNK = 160

REFERENCE = r"""
import json, os, sys, time
os.environ.setdefault("KERAS_BACKEND", "jax")
import numpy as np, jax
import rppg.models as rm
n_flow, n_warm, n_video, chunk_repeats = (int(a) for a in sys.argv[1:5])
frames = np.random.default_rng(0).integers(0, 256, (n_video, 36, 36, 3), dtype=np.uint8)
out = {}
t = time.perf_counter(); call, state0, _ = rm.load_ME_rlap(); out["flow_load_s"] = time.perf_counter() - t
state = state0
for i in range(n_warm):
    y, state = call(frames[i:i + 1], state)
times = []
for i in range(n_flow):
    t = time.perf_counter(); y, state = call(frames[i % n_video][None], state); jax.block_until_ready(y)
    times.append(time.perf_counter() - t)
out["flow_ms"] = 1000 * float(np.median(times))
out["state_bytes"] = int(sum(np.asarray(a).nbytes for a in jax.tree.leaves(state0)))
t = time.perf_counter(); call, state0, _ = rm.load_ME_chunk_rlap(); out["chunk_load_s"] = time.perf_counter() - t
fps = []
for _ in range(chunk_repeats):
    t = time.perf_counter(); state, ys = state0, []
    n_full = n_video // 160
    for c in range(n_full):
        y, state = call(frames[c * 160:(c + 1) * 160], state); ys.append(np.asarray(y["bvp"]))
    tail = frames[n_full * 160:]
    if len(tail):
        y, _ = call(np.concatenate([tail, np.repeat(tail[-1:], 160 - len(tail), 0)]), state)
        ys.append(np.asarray(y["bvp"])[:len(tail)])
    fps.append(n_video / (time.perf_counter() - t))
out["chunk_fps"] = float(np.median(fps))
print("RESULT " + json.dumps(out))
"""


def bench_ours(n_flow: int, n_warm: int, n_video: int, chunk_repeats: int) -> dict:
    import jax.numpy as jnp

    import model
    from model import flow_step, state_bytes

    frames = np.random.default_rng(0).integers(0, 256, (n_video, 36, 36, 3), dtype=np.uint8)
    m = model.load("me-rppg", "rlap")
    state0 = m.init_state(1)
    out = {}

    t = time.perf_counter()
    step = flow_step.lower(m.params, frames[0], state0).compile()
    out["flow_compile_s"] = time.perf_counter() - t
    state = state0
    for i in range(n_warm):
        y, state = step(m.params, frames[i], state)
    times = []
    for i in range(n_flow):
        frame = frames[i % n_video]
        t = time.perf_counter()
        y, state = step(m.params, frame, state)
        y.block_until_ready()
        times.append(time.perf_counter() - t)
    out["flow_ms"] = 1000 * float(np.median(times))
    out["flow_ms_p90"] = 1000 * float(np.percentile(times, 90))
    out["state_bytes"] = state_bytes(state0)

    compile_s, seconds, cpu = time_chunk(m, jnp.asarray(frames), state0, chunk_repeats)
    fps = [n_video / s for s in seconds]
    out["chunk_compile_s"] = compile_s
    out["chunk_fps"] = float(np.median(fps))
    # CPU seconds per frame (all threads): steadier than wall clock when other jobs share the cores
    out["chunk_cpu_ms_per_frame"] = 1000 * float(np.median(cpu)) / n_video
    out["chunk_fps_best"] = float(np.max(fps))
    return out


def time_chunk(m, video, state0, repeats: int) -> tuple[float, list[float], list[float]]:
    """apply_chunk compiled for `video`'s shape, then timed: (compile s, wall s per run, CPU s per run)."""
    import jax

    from model import apply_chunk

    t = time.perf_counter()
    run = apply_chunk.lower(m.params, video, state0, cfg=m.cfg).compile()
    compile_s = time.perf_counter() - t
    jax.block_until_ready(run(m.params, video, state0))
    wall, cpu = [], []
    for _ in range(repeats):
        c, t = time.process_time(), time.perf_counter()
        jax.block_until_ready(run(m.params, video, state0))
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return compile_s, wall, cpu


def bench_batched(batch_sizes, precisions, n_video: int, repeats: int) -> list[dict]:
    """Whole-video chunk mode over B videos per device call (batched whole-video inference), frames/s."""
    import jax
    import jax.numpy as jnp

    import model

    rows = []
    for precision in precisions:
        m = model.load("me-rppg", "rlap", precision=precision)
        for b in batch_sizes:
            video = jnp.asarray(np.random.default_rng(b).integers(0, 256, (b, n_video, 36, 36, 3), dtype=np.uint8))
            compile_s, seconds, _ = time_chunk(m, video, m.init_state(b), repeats)
            rows.append({"precision": precision, "batch": b, "frames": b * n_video, "compile_s": compile_s,
                         "fps": b * n_video / float(np.median(seconds)), "device": str(jax.devices()[0])})
            print(f"  {precision:>8s}  B={b:<5d} {rows[-1]['fps']:12.0f} frames/s  (compile {compile_s:.1f} s)",
                  flush=True)
    return rows


def bench_reference(python: str, n_flow: int, n_warm: int, n_video: int, chunk_repeats: int) -> dict:
    args = [python, "-c", REFERENCE, str(n_flow), str(n_warm), str(n_video), str(chunk_repeats)]
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"reference benchmark failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref-python", help="python of a venv with open-rppg==0.1.1 and its dependencies")
    ap.add_argument("--flow-steps", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--frames", type=int, default=VIDEO_FRAMES)
    ap.add_argument("--repeats", type=int, default=3, help="chunk-mode passes over the video (ours)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "model.json"))
    ap.add_argument("--batch-sizes", type=int, nargs="*", default=[],
                    help="also time chunk mode over B whole videos per device call, for each B "
                         "(batched inference; on a GPU e.g. 1 16 64 256)")
    ap.add_argument("--precisions", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                    help="precisions of the batched runs (default: float32)")
    args = ap.parse_args(argv)

    load_before = os.getloadavg()
    ours = bench_ours(args.flow_steps, args.warmup, args.frames, args.repeats)
    ref = bench_reference(args.ref_python, args.flow_steps, args.warmup, args.frames, 1) if args.ref_python else {}

    rows = [
        ("flow step, median ms/frame", "flow_ms", "flow_ms", False),
        ("chunk, frames/s (1800-frame video)", "chunk_fps", "chunk_fps", True),
        ("flow state, MB", "state_bytes", "state_bytes", False),
        ("compile flow, s (ref: load + first call)", "flow_compile_s", "flow_load_s", False),
        ("compile chunk, s (ref: load + first call)", "chunk_compile_s", "chunk_load_s", False),
    ]
    print(f"ME-rPPG on {platform.processor() or platform.machine()}, {os.cpu_count()} cores (wall clock, shared machine)")
    print(f"{'':44s}{'ours':>10s}{'reference':>12s}{'gain':>8s}")
    for label, ko, kr, higher in rows:
        o, r = ours.get(ko), ref.get(kr)
        scale = 1e-6 if ko == "state_bytes" else 1.0
        gain = "" if r is None else f"{(o / r if higher else r / o):.1f}x"
        print(f"{label:44s}{o * scale:10.2f}{'' if r is None else f'{r * scale:12.2f}':>12s}{gain:>8s}")
    print(f"{'chunk, CPU ms/frame (all threads)':44s}{ours['chunk_cpu_ms_per_frame']:10.2f}")
    print("goals: flow <= 2 ms/frame, chunk >= 600 frames/s")
    print(f"load average (1, 5, 15 min) before: {', '.join(f'{v:.2f}' for v in load_before)}; "
          f"after: {', '.join(f'{v:.2f}' for v in os.getloadavg())} (other jobs slow the wall-clock figures)")

    batched = []
    if args.batch_sizes:
        print(f"batched whole-video chunk mode, {args.frames} frames per video:")
        batched = bench_batched(args.batch_sizes, args.precisions, args.frames, args.repeats)

    result = {"ours": ours, "reference": ref, "batched": batched, "cpu_count": os.cpu_count(), "frames": args.frames,
              "flow_steps": args.flow_steps, "load_average_before": load_before, "load_average": os.getloadavg()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
