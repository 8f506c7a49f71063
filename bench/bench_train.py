"""ME-rPPG training speed and memory: our `model.train.train_step` against the published architecture trained
by Keras 3 on JAX (open-rppg 0.1.1 in its own venv), side by side on this machine, with the ratios.

    .venv/bin/python bench/bench_train.py --ref-python .venv-ref/bin/python [--lengths 160 640 1600]
        [--batch 1] [--repeats 3] [--ref-repeats 1] [--out bench/results/train.json]

Ours: one full `train_step` (published config: float32, GaussianDropout 0.5 on, Adam 1e-3, MSE, the default
"chunked" gradients) on random uint8 frames (B, T, 36, 36, 3) with random labels, at each sequence length T
(a multiple of 160), and the training forward pass alone over the same frames (`model.train.train_forward`,
dropout on, from a zero state; or `--forward apply_chunk`, inference chunk mode) for the step / forward
ratio (goal <= 4x; a backward costs about two forwards, so the arithmetic bound is about 3x; the chunked
gradients' flat memory costs one more forward, the recompute: 4x). Each child keeps freed memory for reuse
as `pulsepipe train` does (`model.keep_freed_memory`; `--malloc default`: the C library's own behaviour).

Reference: `rppg.models.load_ME` (InfinitePulse([2]*4) built at (1, 160, 36, 36, 3), the rlap weights loaded)
with the float32 policy set after import (the wheel sets mixed_float16 globally; `--ref-policy` keeps it),
`model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")` and `model.train_on_batch(x, y)` with
x = frames / 255 float32 (B, T, 36, 36, 3) and y float32 (B, T). Keras's train step calls the model with
training=True: its GaussianDropout(0.5) layers are on, and the whole T-frame sequence is one graph (the TN
and SSD layers split it into 160-frame chunks inside, from a zero state), so its memory grows with T.

Every measurement runs in a fresh child process (ours: this Python; reference: --ref-python), so that its
peak resident memory (VmHWM) is its own: the first call (compile and one step) is a warm-up, then the peak
mark is reset (/proc/self/clear_refs) and `--repeats` steps are timed. Reported: best wall seconds per step
(the least disturbed by other processes on a shared machine) and its frames/s, CPU ms per frame (all
threads), the whole child's VmHWM (the goal's figure: Python, JAX, compile and steps) and the peak over the
timed steps alone; where JAX runs on a GPU, the device's peak bytes in use. The step's child then times
`--repeats` more pairs of a training forward pass and a step, one right after the other: "step/fwd, paired"
is the median of their ratios, which a shared machine's slower and faster spells disturb less than the
ratio of the two children's best times. A reference child is killed if
its resident memory passes --ref-mem-cap-gb or it runs past --ref-timeout-s; that is recorded as the result.

Goals, printed as pass/fail columns: peak memory at the longest length within 1.25x of that at the shortest;
time per frame there within 1.2x; step <= 4x forward; ours >= 3x the reference's frames/s.
Prints a table and writes JSON (default bench/results/train.json) with the machine and the load average.
A script, not a test. Without --ref-python the reference is skipped (a GPU machine has no Keras):
`bench/gpu_check.sh` runs `--batch 32 --lengths 160 1600`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a plain script from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402

MARK = benchlib.MARK
CHUNK = 160
GOAL_MEMORY = 1.25  # peak at the longest length / at the shortest
GOAL_TIME = 1.2  # time per frame at the longest length / at the shortest
GOAL_STEP_FORWARD = 4.0
GOAL_VS_REF = 3.0

# The reference child: argv[1] is its spec as JSON. Prints one MARK line.
REFERENCE = r"""
import json, os, sys, time
os.environ.setdefault("KERAS_BACKEND", "jax")
spec = json.loads(sys.argv[1]); MARK = sys.argv[2]
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024  # MiB
import numpy as np, jax, keras
import rppg.models as rm  # sets the mixed_float16 policy globally
keras.mixed_precision.set_global_policy(spec["policy"])
out = {"keras": keras.__version__, "jax": jax.__version__, "policy": spec["policy"], "device": str(jax.devices()[0])}
t = time.perf_counter()
model, _ = rm.load_ME(os.path.join(os.path.dirname(rm.__file__), "weights", "ME.rlap.weights.h5"))
model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
out["load_s"] = time.perf_counter() - t
out["params"] = int(model.count_params())
b, n = spec["batch"], spec["frames"]
rng = np.random.default_rng(0)
x = (rng.integers(0, 256, (b, n, 36, 36, 3), dtype=np.uint8) / 255.0).astype(np.float32)  # as the wheel feeds it
y = rng.standard_normal((b, n)).astype(np.float32)
t = time.perf_counter(); loss = model.train_on_batch(x, y); out["first_call_s"] = time.perf_counter() - t
out["hwm_warmup_mib"] = status("VmHWM")
try:
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak mark: the timed steps' own peak
except OSError:
    out["hwm_reset"] = False
out["rss_base_mib"] = status("VmRSS")
wall, cpu, losses = [], [], []
for _ in range(spec["repeats"]):
    c, t = time.process_time(), time.perf_counter()
    losses.append(float(model.train_on_batch(x, y)))
    wall.append(time.perf_counter() - t); cpu.append(time.process_time() - c)
out.update(step_s=wall, cpu_s=cpu, losses=losses, hwm_steps_mib=status("VmHWM"))
out["hwm_mib"] = max(out["hwm_warmup_mib"], out["hwm_steps_mib"])
print(MARK + json.dumps(out), flush=True)
"""


# ---- children: one measurement per fresh process ----

def _status_mib(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return float("nan")


def _device_peak_bytes():
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}  # None on CPU
    return stats.get("peak_bytes_in_use")


def child(kind: str, spec: dict) -> dict:
    """kind "step": train_step; "forward": the forward pass (spec["forward"]) over the same frames."""
    import model

    kept = model.keep_freed_memory() if spec["malloc"] == "kept" else False  # as `pulsepipe train` does

    import jax
    import jax.numpy as jnp
    import numpy as np

    from model import train
    from model.config import ME
    from model.weights import load_params

    b, n = spec["batch"], spec["frames"]
    hp = train.TrainHParams(compute_dtype=spec["precision"], method=spec["method"], batch_size=b)
    rng = np.random.default_rng(0)
    batch = {"frames": rng.integers(0, 256, (b, n, 36, 36, 3), dtype=np.uint8),
             "bvp": rng.standard_normal((b, n)).astype(np.float32), "mask": np.ones((b, n), bool)}
    t = time.perf_counter()
    params = jax.tree.map(jnp.asarray, load_params("rlap", ME))
    out = {"device": str(jax.devices()[0]), "backend": jax.default_backend(), "n_devices": len(jax.devices()),
           "freed_memory_kept": kept}

    if kind == "step":
        state = train.init_train_state(params, hp, seed=0)
        out["load_s"] = time.perf_counter() - t

        def run():
            nonlocal state
            state, metrics = train.train_step(state, batch, hp)
            jax.block_until_ready((state, metrics))
            return float(metrics["loss"])

        def forward():  # the step's own first phase, already compiled: no memory of its own
            return jax.block_until_ready(train.train_forward(state["params"], batch["frames"], jax.random.key(0), hp))
    elif spec["forward"] == "train_forward":
        key = jax.random.key(0)
        out["load_s"] = time.perf_counter() - t

        def run():
            return float(jnp.mean(jax.block_until_ready(train.train_forward(params, batch["frames"], key, hp))))
    else:  # inference chunk mode, one jitted call over the whole sequence from a zero state
        cfg = train.model_config(hp, ME)
        frames = jnp.asarray(batch["frames"])
        state0 = train.zero_state(b, params, cfg)
        out["load_s"] = time.perf_counter() - t

        def run():
            y, _ = model.apply_chunk(params, frames, state0, cfg=cfg)
            return float(jnp.mean(jax.block_until_ready(y)))

    t = time.perf_counter()
    run()
    out["first_call_s"] = time.perf_counter() - t
    out["hwm_warmup_mib"] = _status_mib("VmHWM")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak mark: the timed calls' own peak
    except OSError:  # not writable here: the steps' peak is then the whole process's
        out["hwm_reset"] = False
    out["rss_base_mib"] = _status_mib("VmRSS")
    wall, cpu, losses = [], [], []
    for _ in range(spec["repeats"]):
        c, t = time.process_time(), time.perf_counter()
        losses.append(run())
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    out.update(step_s=wall, cpu_s=cpu, values=losses, hwm_steps_mib=_status_mib("VmHWM"))
    if kind == "step" and spec["forward"] == "train_forward":  # step / forward, pair by pair in this process
        ratios = []
        for _ in range(spec["repeats"]):
            t = time.perf_counter()
            forward()
            f = time.perf_counter() - t
            t = time.perf_counter()
            run()
            ratios.append((time.perf_counter() - t) / f)
        out["paired_step_over_forward"] = ratios
    out["hwm_mib"] = max(out["hwm_warmup_mib"], out["hwm_steps_mib"])
    out["device_peak_bytes"] = _device_peak_bytes()
    return out


def run_process(args: list[str], label: str, mem_cap_gb: float | None, timeout_s: float | None,
                env: dict | None = None) -> dict:
    """Run a child to its MARK line, watching its resident memory: killed past mem_cap_gb or timeout_s
    (then {"killed": why, ...}). Adds the wall time, the largest RSS seen from here and the load after."""
    print(f"{label} ...", flush=True)
    with tempfile.TemporaryFile("w+") as so, tempfile.TemporaryFile("w+") as se:
        started = time.perf_counter()
        proc = subprocess.Popen(args, stdout=so, stderr=se, text=True, cwd=REPO, env=env)
        killed, rss_seen = None, 0.0
        while proc.poll() is None:
            try:
                rss = next((int(l.split()[1]) / 1024 for l in open(f"/proc/{proc.pid}/status")
                            if l.startswith("VmRSS")), 0.0)
            except OSError:
                rss = 0.0
            rss_seen = max(rss_seen, rss)
            elapsed = time.perf_counter() - started
            if mem_cap_gb and rss > mem_cap_gb * 1024:
                killed = f"resident memory passed the {mem_cap_gb:g} GiB cap after {elapsed:.0f} s"
            elif timeout_s and elapsed > timeout_s:
                killed = f"still running after {timeout_s:g} s"
            if killed:
                proc.kill()
                proc.wait()
                break
            time.sleep(0.2)
        wall = time.perf_counter() - started
        so.seek(0)
        se.seek(0)
        stdout, stderr = so.read(), se.read()
    base = {"child_wall_s": wall, "rss_seen_mib": rss_seen, "load_after": os.getloadavg()}
    if killed:
        print(f"  killed: {killed} (largest RSS seen {rss_seen:.0f} MiB)", flush=True)
        return {"killed": killed, **base}
    lines = [ln for ln in stdout.splitlines() if ln.startswith(MARK)]
    if not lines:
        tail = "\n".join((stderr or stdout).strip().splitlines()[-20:])
        print(f"  failed (exit {proc.returncode}):\n{tail}", flush=True)
        return {"failed": f"exit {proc.returncode}", "stderr_tail": tail, **base}
    result = json.loads(lines[-1][len(MARK):])
    if proc.returncode:
        result["exit_code"] = proc.returncode
    result.update(base)
    result["best_s"] = min(result["step_s"])
    return result


def summarise(r: dict, frames: int) -> dict:
    if "best_s" in r:
        r["frames"] = frames
        r["fps"] = frames / r["best_s"]
        r["cpu_ms_per_frame"] = 1000 * min(r["cpu_s"]) / frames
        r["ms_per_frame"] = 1000 * r["best_s"] / frames
    return r


# ---- the table ----

def _ok(ratio, goal, at_most=True) -> str:
    if ratio is None:
        return ""
    good = ratio <= goal if at_most else ratio >= goal
    return f"{ratio:.2f}x {'pass' if good else 'FAIL'}"


def report(rows: list[dict], args) -> list[str]:
    """The table (Markdown): ours per length with the goals' columns, then the reference's."""
    first = rows[0]["ours"]
    base = rows[0]["frames"]
    has_ref = any(r.get("ref") for r in rows)
    gpu = first.get("device_peak_bytes") is not None
    head = ["T", "ours s/step", "frames/s", "CPU ms/frame", "peak MiB", "steps' peak MiB"]
    if gpu:
        head.append("device peak MiB")
    head += ["fwd s", "step/fwd (<=4x)", "step/fwd, CPU s", "step/fwd, paired", f"peak vs T={base} (<=1.25x)",
             f"ms/frame vs T={base} (<=1.2x)"]
    if has_ref:
        head += ["Keras s/step", "Keras frames/s", "Keras CPU ms/frame", "Keras peak MiB", f"Keras peak vs T={base}",
                 "ours/Keras (>=3x)", "ours/Keras, CPU s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref0 = (rows[0].get("ref") or {}) if "fps" in (rows[0].get("ref") or {}) else None
    for row in rows:
        o, f, k = row["ours"], row.get("forward") or {}, row.get("ref") or {}
        if "fps" not in o:
            cells = [str(row["frames"]), o.get("killed") or o.get("failed", "?")] + [""] * (len(head) - 2)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        cells = [str(row["frames"]), f"{o['best_s']:.2f}", f"{o['fps']:.0f}", f"{o['cpu_ms_per_frame']:.1f}",
                 f"{o['hwm_mib']:.0f}", f"{o['hwm_steps_mib']:.0f}"]
        if gpu:
            cells.append(f"{(o.get('device_peak_bytes') or 0) / 2**20:.0f}")
        if "best_s" in f:
            cells += [f"{f['best_s']:.2f}", _ok(o["best_s"] / f["best_s"], GOAL_STEP_FORWARD),
                      _ok(min(o["cpu_s"]) / min(f["cpu_s"]), GOAL_STEP_FORWARD)]
        else:
            cells += ["", "", ""]
        paired = o.get("paired_step_over_forward")
        cells.append(_ok(statistics.median(paired), GOAL_STEP_FORWARD) if paired else "")
        if row is rows[0] or "fps" not in first:
            cells += ["1.00x", "1.00x"] if row is rows[0] else ["", ""]
        else:
            cells += [_ok(o["hwm_mib"] / first["hwm_mib"], GOAL_MEMORY),
                      _ok(o["ms_per_frame"] / first["ms_per_frame"], GOAL_TIME)]
        if has_ref:
            if "fps" in k:
                cells += [f"{k['best_s']:.2f}", f"{k['fps']:.1f}", f"{k['cpu_ms_per_frame']:.1f}", f"{k['hwm_mib']:.0f}",
                          f"{k['hwm_mib'] / ref0['hwm_mib']:.2f}x" if ref0 else "",
                          _ok(o["fps"] / k["fps"], GOAL_VS_REF, at_most=False),
                          _ok(k["cpu_ms_per_frame"] / o["cpu_ms_per_frame"], GOAL_VS_REF, at_most=False)]
            elif k:
                cells += [k.get("killed") or k.get("failed", "?"), "", "", f"(RSS seen {k['rss_seen_mib']:.0f})",
                          "", "", ""]
            else:
                cells += ["not run"] + [""] * 6
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref-python", help="python of a venv with open-rppg==0.1.1 (Keras 3 on JAX); "
                                         "without it the reference is skipped")
    ap.add_argument("--lengths", type=int, nargs="+", default=[160, 640, 1600],
                    help="sequence lengths T, multiples of 160 (the first is the goals' base)")
    ap.add_argument("--ref-lengths", type=int, nargs="*", default=None,
                    help="lengths for the reference (default: --lengths)")
    ap.add_argument("--batch", type=int, default=1, help="sequences per step, B")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per child after the warm-up (ours)")
    ap.add_argument("--ref-repeats", type=int, default=1, help="timed steps per child after the warm-up (reference)")
    ap.add_argument("--precision", default="float32", choices=["float32", "bfloat16"],
                    help="compute dtype of our convolutions (TrainHParams.compute_dtype)")
    ap.add_argument("--method", default="chunked", choices=["chunked", "whole", "remat"],
                    help="how our gradients go through the chunks (TrainHParams.method)")
    ap.add_argument("--forward", default="train_forward", choices=["train_forward", "apply_chunk", "none"],
                    help="the forward pass timed for step/forward: training mode (dropout) or inference chunk mode")
    ap.add_argument("--malloc", default="kept", choices=["kept", "default"],
                    help="ours: glibc malloc keeping freed memory, as `pulsepipe train` sets it "
                         "(model.keep_freed_memory), or the C library's defaults")
    ap.add_argument("--ref-policy", default="float32", choices=["float32", "mixed_float16"],
                    help="Keras dtype policy of the reference (the wheel's own default is mixed_float16)")
    ap.add_argument("--ref-mem-cap-gb", type=float, default=12.0,
                    help="kill a reference child past this resident memory, GiB (Keras at T=1600, B=1: ~9.4)")
    ap.add_argument("--ref-timeout-s", type=float, default=1200.0, help="kill a reference child after this")
    benchlib.add_output_arguments(ap, "train")
    args = ap.parse_args(argv)

    if args.child:
        spec = json.loads(args.child[1])
        out = child(args.child[0], spec)
        print(MARK + json.dumps(out, default=float), flush=True)
        return 0

    bad = [t for t in args.lengths + (args.ref_lengths or []) if t <= 0 or t % CHUNK]
    if bad:
        ap.error(f"lengths must be positive multiples of {CHUNK}: {bad}")
    ref_lengths = args.lengths if args.ref_lengths is None else args.ref_lengths
    load_before = os.getloadavg()
    started = time.perf_counter()
    print(f"load average before: {load_before} on {os.cpu_count()} CPUs", flush=True)
    ref_env = {**os.environ, "JAX_PLATFORMS": "cpu", "KERAS_BACKEND": "jax"}
    rows, ref_versions = [], {}
    for frames in args.lengths:
        spec = {"batch": args.batch, "frames": frames, "repeats": args.repeats, "precision": args.precision,
                "method": args.method, "forward": args.forward, "malloc": args.malloc}
        me = [sys.executable, str(Path(__file__).resolve()), "--child"]
        row = {"frames": frames}
        row["ours"] = summarise(run_process(me + ["step", json.dumps(spec)], f"ours: train_step B={args.batch} "
                                            f"T={frames}", None, None), args.batch * frames)
        if args.forward != "none":
            row["forward"] = summarise(run_process(me + ["forward", json.dumps(spec)], f"ours: {args.forward} "
                                                   f"B={args.batch} T={frames}", None, None), args.batch * frames)
        if args.ref_python and frames in ref_lengths:
            rspec = {"batch": args.batch, "frames": frames, "repeats": args.ref_repeats, "policy": args.ref_policy}
            r = run_process([args.ref_python, "-c", REFERENCE, json.dumps(rspec), MARK],
                            f"Keras: train_on_batch B={args.batch} T={frames}", args.ref_mem_cap_gb,
                            args.ref_timeout_s, env=ref_env)
            row["ref"] = summarise(r, args.batch * frames)
            ref_versions.update({k: r[k] for k in ("keras", "jax", "policy") if k in r})
        rows.append(row)
        o = row["ours"]
        if "fps" in o:
            print(f"  T={frames}: ours {o['best_s']:.2f} s/step, {o['fps']:.0f} frames/s, peak {o['hwm_mib']:.0f} MiB"
                  + (f"; Keras {row['ref']['best_s']:.2f} s/step, peak {row['ref']['hwm_mib']:.0f} MiB"
                     if "fps" in row.get("ref", {}) else ""), flush=True)

    machine = {**benchlib.machine_info(["jax", "jaxlib", "optax", "numpy"]), "load_before": load_before,
               "load_after": os.getloadavg(), "bench_wall_s": time.perf_counter() - started,
               "device": rows[0]["ours"].get("device")}
    print()
    print(f"ME-rPPG training step, published config ({args.precision}, GaussianDropout 0.5, Adam 1e-3, MSE), "
          f"B={args.batch}, method {args.method}, malloc {args.malloc}, "
          f"on {machine['processor']} x {machine['cpu_count']} CPUs ({machine['cpu_model']}), "
          f"device {machine['device']}" + (f"; reference Keras {ref_versions.get('keras')} on JAX "
                                            f"{ref_versions.get('jax')}, policy {args.ref_policy}"
                                            if ref_versions else ""))
    print(f"best of {args.repeats} (reference {args.ref_repeats}) timed steps after a warm-up; peak = the child "
          f"process's VmHWM (steps' peak: over the timed steps alone); forward = {args.forward}")
    print()
    for line in report(rows, args):
        print(line)
    benchlib.print_load(machine)
    result = {"rows": rows, "args": {k: v for k, v in vars(args).items() if k != "child"},
              "goals": {"memory_longest_over_shortest": GOAL_MEMORY, "time_per_frame_longest_over_shortest":
                        GOAL_TIME, "step_over_forward": GOAL_STEP_FORWARD, "ours_over_reference": GOAL_VS_REF},
              "reference_versions": ref_versions, "machine": machine}
    benchlib.write_json(result, Path(args.out))
    return 0 if all("fps" in r["ours"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
