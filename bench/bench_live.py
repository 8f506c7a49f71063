"""`pulsepipe live` in real time: per-frame latency, sustained frames/s, flat memory, against open-rppg.

For a 640x480 and a 1280x720 synthetic H.264 file (written once by `transforms.synth` into --workdir):

- latency, paced: the file played at its own 30 fps, as a camera delivers it, through our frame loop
  (`pipelines.live.live_rows`, with the page server running): p50 / p99 of decode start to the value on
  the page's feed, and each stage's p50 (decode, face, model); frames dropped;
- frames/s, unpaced (`--as-fast-as-possible`): every frame, as fast as the loop goes;
- memory: RSS after 1 and after 10 minutes of video (the 640x480 file looped, unpaced);
- the published package's own real-time path on the same files, in a subprocess of the reference venv:
  `rppg.Model('ME-flow.rlap')`, `update_frame(frame, ts)` per decoded frame (its face detection and
  model threads), paced and unpaced; a frame's latency ends when the model call that covers it returns.

Prints one table with ratios and writes JSON. A script, not a test: it asserts nothing about time.

    .venv/bin/python bench/bench_live.py [--ref-python .venv-ref/bin/python] [--seconds 20]
        [--memory-minutes 10] [--workdir DIR] [--json bench/results/live.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a plain script from anywhere

from benchlib import machine_info, write_json  # noqa: E402
from pipelines.live import live_rows, load_flow_model  # noqa: E402
from pipelines.live_flow import LiveEstimator  # noqa: E402
from pipelines.live_server import Board, PageServer  # noqa: E402
from pipelines.live_source import FileSource, Frame, FrameFeed, Source  # noqa: E402
from transforms.face import FaceDetector  # noqa: E402
from transforms.synth import write_cohort  # noqa: E402

SIZES = ((640, 480), (1280, 720))
CODEC = "h264-crf20"  # what a camera or a stream delivers: lossy 4:2:0
SEED = 7

# Runs in the reference venv: the published real-time path, paced then unpaced, on one file.
REF_SCRIPT = r"""
import json, sys, threading, time
import rppg  # sets KERAS_BACKEND=jax itself: import it before anything pulls keras
import av, jax, numpy as np
video = sys.argv[1]
m = rppg.Model('ME-flow.rlap')
done = []
orig = m.call
def call(x, state):  # the model thread's call: a frame's signal exists once it returns
    r, s = orig(x, state)
    jax.block_until_ready(r)
    done.append(time.perf_counter())
    return r, s
m.call = call
out = {}
for mode in ("paced", "unpaced"):
    done.clear()
    start, t0 = [], time.perf_counter()
    with m, av.open(video) as c:
        decoded = c.decode(video=0)
        while True:
            began = time.perf_counter()  # decode start, as ours counts it
            f = next(decoded, None)
            if f is None:
                break
            img = f.to_ndarray(format="rgb24")
            if mode == "paced":  # a camera's frame is due at its time; its decode counts from then
                wait = max(0.0, t0 + f.time - time.perf_counter())
                time.sleep(wait)
                began += wait
            start.append(began)
            m.update_frame(img, f.time)
    wall = time.perf_counter() - t0
    n = min(len(done), len(start))
    lat = np.array(done[:n]) - np.array(start[:n])
    out[mode] = {"frames": len(start), "signals": len(done), "wall_s": wall,
                 "latency_ms": (lat * 1e3).tolist(), "statistic": dict(m.statistic), "hr": (m.hr() or {}).get("hr")}
with open("/proc/self/status") as f:
    out["rss_mb"] = next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
print("@@REF@@" + json.dumps(out))
"""


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_video(workdir: Path, size: tuple[int, int], seconds: float) -> Path:
    folder = workdir / f"{CODEC}-{seconds:g}s-seed{SEED}-{size[0]}x{size[1]}"
    if not (folder / "cohort.json").exists():  # written last: its presence means complete
        print(f"writing {size[0]}x{size[1]} test video ({seconds:g} s) into {folder} ...", flush=True)
        write_cohort(folder, 1, seconds, SEED, size=size, codec=CODEC)
    return folder / json.loads((folder / "cohort.json").read_text())["recordings"][0]["video"]


class LoopedFile(Source):
    """A file played `times` times in a row, unpaced, its clock running on: a long video without the disk."""

    def __init__(self, path: str, times: int):
        self.name, self.realtime, self._path, self._times = f"{path} x{times}", False, path, times

    def frames(self):
        offset = 0.0
        for _ in range(self._times):
            last = 0.0
            for f in FileSource(self._path, paced=False).frames():
                last = f.t
                yield Frame(offset + f.t, f.image, f.decode_s, f.ready)
            offset += last + 1 / 30


def run_ours(me, detector, source: Source, board: Board, checkpoints_s=()) -> dict:
    """Our frame loop over a source; per-frame latencies, wall time, RSS at each checkpoint of source time."""
    feed = FrameFeed(source)
    estimator = LiveEstimator(me, detector)
    lat, rss, marks = [], {}, list(checkpoints_s)
    t0 = time.perf_counter()
    try:
        for row in live_rows(feed, estimator, board):
            lat.append(row.latency_s)
            if marks and row.t >= marks[0]:
                rss[marks.pop(0)] = rss_mb()
    finally:
        feed.close()
    return {"frames": len(lat), "wall_s": time.perf_counter() - t0, "latency_s": np.array(lat),
            "dropped": feed.dropped, "hr": row.hr_bpm, "rss_mb": rss}


def run_reference(ref_python: Path, video: Path) -> dict:
    proc = subprocess.run([str(ref_python), "-c", REF_SCRIPT, str(video)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@REF@@")]
    if not lines:
        raise RuntimeError(f"reference failed (exit {proc.returncode}):\n" + "\n".join(proc.stderr.splitlines()[-15:]))
    return json.loads(lines[-1][len("@@REF@@"):])


def pct(values, q) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref-python", type=Path, default=REPO / ".venv-ref/bin/python")
    p.add_argument("--seconds", type=float, default=20.0, help="length of each test video (default 20)")
    p.add_argument("--memory-minutes", type=float, default=10.0, help="video minutes for the memory run (default 10)")
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "pulsepipe-bench-live")
    p.add_argument("--json", type=Path, default=REPO / "bench/results/live.json")
    p.add_argument("--no-reference", action="store_true")
    args = p.parse_args(argv)
    print(f"load average before: {os.getloadavg()} on {os.cpu_count()} CPUs", flush=True)
    videos = {f"{w}x{h}": test_video(args.workdir, (w, h), args.seconds) for w, h in SIZES}
    me = load_flow_model("rlap")
    board = Board()
    server = PageServer(board, "127.0.0.1", 0)  # running, as in a real session
    results = {}
    with FaceDetector() as detector:
        for name, video in videos.items():
            print(f"ours {name}: paced, then unpaced ...", flush=True)
            paced = run_ours(me, detector, FileSource(str(video), paced=True), board)
            unpaced = run_ours(me, detector, FileSource(str(video), paced=False), board)
            results[name] = {"ours": {"paced": paced, "unpaced": unpaced}}
        loops = max(1, round(args.memory_minutes * 60 / args.seconds))
        print(f"ours memory: {loops} loops of {videos['640x480'].name} ({args.memory_minutes:g} min) ...", flush=True)
        marks = (60.0, args.memory_minutes * 60 - 1.0)
        memory = run_ours(me, detector, LoopedFile(str(videos["640x480"]), loops), board, marks)
    server.close()
    if not args.no_reference:
        for name, video in videos.items():
            print(f"reference {name}: paced, then unpaced ...", flush=True)
            results[name]["ref"] = run_reference(args.ref_python, video)

    rows = []
    for name, r in results.items():
        ours_p, ours_u, ref = r["ours"]["paced"], r["ours"]["unpaced"], r.get("ref")
        total_ms = ours_p["latency_s"][:, 3] * 1e3
        stage = {k: pct(ours_p["latency_s"][:, i] * 1e3, 50) for i, k in enumerate(("decode", "face", "model"))}
        row = {"input": name, "p50_ms": pct(total_ms, 50), "p99_ms": pct(total_ms, 99), "stage_p50_ms": stage,
               "dropped_paced": ours_p["dropped"], "frames": ours_p["frames"],
               "fps_unpaced": ours_u["frames"] / ours_u["wall_s"], "hr": ours_u["hr"]}
        if ref:
            lat = np.array(ref["paced"]["latency_ms"])
            row["ref"] = {"p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "signals_paced": ref["paced"]["signals"],
                          "skipped_paced": ref["paced"]["statistic"].get("skipped"),
                          "fps_unpaced": ref["unpaced"]["signals"] / ref["unpaced"]["wall_s"], "rss_mb": ref["rss_mb"],
                          "hr": ref["unpaced"]["hr"]}
        rows.append(row)
    mem = {"rss_mb_at": memory["rss_mb"], "frames": memory["frames"], "fps": memory["frames"] / memory["wall_s"]}

    def ratio(a, b):
        return f"{b / a:.1f}x" if a and b else "-"

    print(f"\n| input | ours p50 / p99 ms | reference p50 / p99 ms | p99 ratio | ours stage p50 ms "
          f"(decode, face, model) | ours dropped | ours fps unpaced | reference fps unpaced | fps ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = r.get("ref", {})
        s = r["stage_p50_ms"]
        print(f"| {r['input']} | {r['p50_ms']:.1f} / {r['p99_ms']:.1f} | "
              f"{ref.get('p50_ms', float('nan')):.1f} / {ref.get('p99_ms', float('nan')):.1f} | "
              f"{ratio(r['p99_ms'], ref.get('p99_ms'))} lower | {s['decode']:.1f}, {s['face']:.1f}, {s['model']:.1f} | "
              f"{r['dropped_paced']} of {r['frames'] + r['dropped_paced']} | {r['fps_unpaced']:.0f} | "
              f"{ref.get('fps_unpaced', float('nan')):.0f} | {ratio(ref.get('fps_unpaced'), r['fps_unpaced'])} |")
    at = mem["rss_mb_at"]
    print(f"\nmemory (640x480 looped, unpaced, {mem['frames']} frames at {mem['fps']:.0f} fps): RSS "
          + ", ".join(f"{v:.0f} MB after {k / 60:.0f} min" for k, v in at.items()))
    report = {"date": datetime.date.today().isoformat(), "rows": rows, "memory": mem,
              "machine": machine_info(["jax", "jaxlib", "av", "mediapipe", "aiohttp"]), "load_after": os.getloadavg()}
    write_json(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
