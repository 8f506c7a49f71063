"""Whole-video throughput: ours (`infer_models`) against the published `open-rppg` `process_video`.

For each test video (a lossy H.264 file and an FFV1 file, written once by `transforms.synth` and kept in
--workdir) it measures, side by side on this machine:

- decode only: a bare PyAV loop (the floor) and our `transforms.video.iter_blocks`;
- ours end to end: `pipelines.infer.infer_models` (decode, MediaPipe face tracking, crop, 30 fps, model),
  after a warm-up on a short clip so that model load and jit compile are reported apart;
- the reference end to end: `Model('ME-chunk.rlap').process_video` in a subprocess of the reference
  venv (construction and a warm-up on the same short clip reported apart);
- where our time goes: decode, face detection, the rest of tracking/crop/resampling, and the model;
- the heart rate each produced, against the synthetic ground truth.

Prints one table and writes the same as JSON with the machine's details. A script, not a test: it
asserts nothing about time. Usage:

    .venv/bin/python bench/bench_video.py [--ref-python .venv-ref/bin/python] [--seconds 60]
        [--repeat 1] [--workdir DIR] [--json bench/results/video.json] [--model me-chunk]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import av

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a plain script from anywhere

from benchlib import StageClock, machine_info  # noqa: E402
from pipelines.infer import infer_models  # noqa: E402
from pipelines.predictors import MODEL_NAMES, ModelSet  # noqa: E402
from transforms.face import FaceDetector  # noqa: E402
from transforms.face_crops import iter_face_crops  # noqa: E402
from transforms.synth import write_cohort  # noqa: E402
from transforms.video import iter_blocks  # noqa: E402

CODECS = ("h264-crf20", "ffv1")  # a typical lossy camera file (yuv420p) and a lossless archive file
SIZE = (640, 480)
SEED = 7
WARMUP_SECONDS = 6.0  # long enough for one full 160-frame chunk plus a partial one
REF_MODEL = {"me-chunk": "ME-chunk.rlap", "me-flow": "ME-flow.rlap"}  # published names for our ME models

# Runs in the reference venv: construct the published model, warm it up, time process_video.
REF_SCRIPT = r"""
import json, sys, time
t0 = time.perf_counter()
import rppg  # sets KERAS_BACKEND=jax itself: import it before anything pulls keras
import_s = time.perf_counter() - t0
model_name, warmup, video, repeat = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
t0 = time.perf_counter()
m = rppg.Model(model_name)
construct_s = time.perf_counter() - t0
t0 = time.perf_counter()
m.process_video(warmup)
warmup_s = time.perf_counter() - t0
runs = []
for _ in range(repeat):
    t0 = time.perf_counter()
    r = m.process_video(video)
    runs.append(time.perf_counter() - t0)
st = m.statistic
versions = {}
import importlib.metadata as md
for p in ("open-rppg", "keras", "jax", "jaxlib", "av", "onnxruntime", "numpy"):
    try:
        versions[p] = md.version(p)
    except md.PackageNotFoundError:
        pass
print("@@REF@@" + json.dumps({
    "import_s": import_s, "construct_s": construct_s, "warmup_s": warmup_s, "seconds": runs,
    "hr": float(r["hr"]), "sqi": float(r["SQI"]), "frames": st["key"] + st["dependent"],
    "model_frames": st["frames"], "versions": versions,
}))
"""


class BenchError(Exception):
    """A setup problem the user can fix (missing venv, unknown model); printed as one line."""


# ---- test videos ----

def cohort_video(workdir: Path, codec: str, seconds: float) -> tuple[Path, float]:
    """(video path, true mean HR) of a one-recording cohort, written on first use and reused after."""
    folder = workdir / f"{codec}-{seconds:g}s-seed{SEED}-{SIZE[0]}x{SIZE[1]}"
    manifest = folder / "cohort.json"
    if not manifest.exists():  # write_cohort writes cohort.json last, so its presence means complete
        print(f"writing {codec} test video ({seconds:g} s, {SIZE[0]}x{SIZE[1]}) into {folder} ...", flush=True)
        write_cohort(folder, 1, seconds, SEED, size=SIZE, codec=codec)
    rec = json.loads(manifest.read_text())["recordings"][0]
    return folder / rec["video"], float(rec["true_mean_hr_bpm"])


# ---- timings ----

def best(times: list[float]) -> float:
    # the least disturbed run: other processes on this machine only ever add time
    return min(times)


def repeated(fn, repeat: int) -> tuple[list[float], object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def decode_pyav(path: Path) -> int:
    """The floor: PyAV's decoder and RGB conversion, nothing else."""
    n = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            frame.to_ndarray(format="rgb24")
            n += 1
    return n


def decode_ours(path: Path) -> int:
    return sum(len(t) for t, _ in iter_blocks(path))




def stage_profile(path: Path, model: str) -> dict:
    """One instrumented run of our pipeline: decode, face detection, crop, the rest, model (seconds).

    Decode and crop are timed by swapping timed wrappers into the modules that call them for this run only;
    "other" is what is left of the face-crop pass (Kalman tracking, 30 fps resampling, per-frame Python).
    """
    import transforms.face
    import transforms.face_crops

    clock = StageClock()
    with FaceDetector() as detector, \
            mock.patch.object(transforms.face_crops, "iter_blocks",
                              clock.generator("decode", transforms.face_crops.iter_blocks)), \
            mock.patch.object(transforms.face, "crop_face", clock.function("crop", transforms.face.crop_face)), \
            mock.patch.object(detector, "detect", clock.function("detect", detector.detect)):
        t0 = time.perf_counter()
        blocks = list(iter_face_crops(path, detector=detector))
        crops_s = time.perf_counter() - t0
    models = ModelSet([model])  # warm: the jit cache is filled by the earlier runs
    t0 = time.perf_counter()
    models.feed([[(b.crops, b.face_found) for b in blocks]]).predictors[model].finish()
    model_s = time.perf_counter() - t0
    s = clock.seconds
    return {
        "decode_s": s.get("decode", 0.0),
        "detect_s": s.get("detect", 0.0),
        "detect_calls": clock.calls.get("detect", 0),
        "crop_s": s.get("crop", 0.0),
        "other_s": crops_s - sum(s.values()),
        "face_crops_total_s": crops_s,
        "model_s": model_s,
        "model_frames": int(sum(len(b.timestamps) for b in blocks)),
    }


def run_reference(ref_python: Path, model: str, warmup: Path, video: Path, repeat: int) -> dict:
    env = dict(os.environ)
    env.pop("KERAS_BACKEND", None)  # rppg sets jax itself
    proc = subprocess.run(
        [str(ref_python.absolute()), "-c", REF_SCRIPT, REF_MODEL[model], str(warmup), str(video), str(repeat)],
        capture_output=True, text=True, env=env, cwd=tempfile.gettempdir(),
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@REF@@")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise BenchError(f"reference run failed (exit {proc.returncode}) on {video}:\n{tail}")
    return json.loads(lines[-1][len("@@REF@@"):])


def bench_file(path: Path, codec: str, truth: float, warmup: Path, models: ModelSet, args) -> dict:
    print(f"[{codec}] decode (PyAV) ...", flush=True)
    pyav_s, frames = repeated(lambda: decode_pyav(path), args.repeat)
    print(f"[{codec}] decode (iter_blocks) ...", flush=True)
    ours_dec_s, ours_frames = repeated(lambda: decode_ours(path), args.repeat)
    if ours_frames != frames:
        print(f"  warning: iter_blocks gave {ours_frames} frames, PyAV {frames}", file=sys.stderr)

    print(f"[{codec}] ours end to end ({args.model}) ...", flush=True)
    # the model is loaded once beforehand, as the reference's Model() is built outside its timing
    ours_s, result = repeated(lambda: infer_models(str(path), models)[args.model], args.repeat)
    print(f"[{codec}] ours stage profile ...", flush=True)
    stages = stage_profile(path, args.model)

    ref = None
    if not args.no_ref and args.model in REF_MODEL:
        print(f"[{codec}] reference end to end ({REF_MODEL[args.model]}) ...", flush=True)
        ref = run_reference(args.ref_python, args.model, warmup, path, args.repeat)
        if ref["frames"] != frames:
            print(f"  warning: reference decoded {ref['frames']} frames, PyAV {frames}", file=sys.stderr)

    fps = lambda seconds: frames / seconds  # noqa: E731 - all rates count source frames
    row = {
        "file": str(path),
        "codec": codec,
        "frames": frames,
        "bytes": path.stat().st_size,
        "decode_pyav": {"seconds": pyav_s, "fps": fps(best(pyav_s))},
        "decode_ours": {"seconds": ours_dec_s, "fps": fps(best(ours_dec_s))},
        "ours": {"seconds": ours_s, "fps": fps(best(ours_s)), "hr": result.hr_bpm, "sqi": result.sqi,
                 "face_fraction": result.face_fraction, "stages": stages},
        "truth_hr": truth,
        "load_after": os.getloadavg(),
    }
    if ref is not None:
        row["reference"] = {**{k: ref[k] for k in ("seconds", "hr", "sqi", "frames", "model_frames",
                                                    "import_s", "construct_s", "warmup_s")},
                            "fps": fps(best(ref["seconds"]))}
        row["ref_versions"] = ref["versions"]
    return row


# ---- output ----

VIDEO_PACKAGES = ("pulsepipe", "jax", "jaxlib", "numpy", "av", "mediapipe", "opencv-contrib-python")



def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def print_table(rows: list[dict], setup: dict) -> None:
    head = ["file", "codec", "frames", "dec PyAV", "dec ours", "ours", "ref", "ours/ref",
            "ours/dec", "ref/dec", "HR ours", "HR ref", "HR true"]
    table = []
    for r in rows:
        ref = r.get("reference", {})
        dec = r["decode_pyav"]["fps"]
        table.append([
            Path(r["file"]).name, r["codec"], str(r["frames"]), f"{dec:.0f}", f"{r['decode_ours']['fps']:.0f}",
            f"{r['ours']['fps']:.1f}", f"{ref['fps']:.1f}" if ref else "-",
            ratio(r["ours"]["fps"], ref.get("fps")), ratio(r["ours"]["fps"], dec), ratio(ref.get("fps"), dec),
            f"{r['ours']['hr']:.1f}", f"{ref['hr']:.1f}" if ref else "-", f"{r['truth_hr']:.1f}",
        ])
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(head)]
    print()
    print("frames/s of source frames (best of --repeat); decode-only ratios are against bare PyAV")
    print("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    for row in table:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))

    print()
    print(f"ours: model load {setup['ours_model_load_s']:.2f} s, warm-up infer on a "
          f"{WARMUP_SECONDS:g} s clip {setup['ours_warmup_s']:.2f} s (load + jit compile)")
    ref = next((r["reference"] for r in rows if "reference" in r), None)
    if ref:
        print(f"reference: import {ref['import_s']:.2f} s, Model() {ref['construct_s']:.2f} s, "
              f"warm-up process_video on the same clip {ref['warmup_s']:.2f} s (per subprocess)")
    print()
    print("where our time goes (seconds, one instrumented run after the timed ones; other = tracking,")
    print("resampling, per-frame Python; e2e = best timed infer):")
    print(f"{'codec':>10}  {'decode':>7}  {'detect':>7}  {'crop':>7}  {'other':>7}  {'model':>7}  {'sum':>7}  {'e2e':>7}")
    for r in rows:
        s = r["ours"]["stages"]
        total = s["face_crops_total_s"] + s["model_s"]
        print(f"{r['codec']:>10}  {s['decode_s']:7.2f}  {s['detect_s']:7.2f}  {s['crop_s']:7.2f}  {s['other_s']:7.2f}"
              f"  {s['model_s']:7.2f}  {total:7.2f}  {best(r['ours']['seconds']):7.2f}"
              f"   ({s['detect_calls']} detections, {1e3 * s['detect_s'] / max(s['detect_calls'], 1):.1f} ms each)")
    print()
    print(f"load average: before {setup['load_before'][0]:.2f}, after "
          f"{rows[-1]['load_after'][0]:.2f} (1 min) on {os.cpu_count()} CPUs")


# ---- main ----

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref-python", type=Path, default=REPO / ".venv-ref/bin/python",
                   help="python of the reference venv with open-rppg 0.1.1 (default: .venv-ref/bin/python)")
    p.add_argument("--no-ref", action="store_true", help="skip the reference runs")
    p.add_argument("--seconds", type=float, default=60.0, help="length of each test video (default: 60)")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per measurement; the best is reported")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "pulsepipe-bench-video",
                   help="where test videos are written once and reused (default: $TMPDIR/pulsepipe-bench-video)")
    p.add_argument("--json", type=Path, default=REPO / "bench/results/video.json", help="where to write JSON")
    p.add_argument("--model", choices=MODEL_NAMES, default="me-chunk",
                   help="our model (default: me-chunk); the reference runs only for me-chunk and me-flow")
    p.add_argument("--codecs", nargs="+", default=list(CODECS),
                   help=f"test video codecs, transforms.synth names (default: {' '.join(CODECS)})")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    if args.seconds < WARMUP_SECONDS:
        p.error(f"--seconds must be at least {WARMUP_SECONDS:g}")
    return args


def check_reference(args) -> None:
    if args.no_ref or args.model not in REF_MODEL:
        return
    if not args.ref_python.exists():
        raise BenchError(f"reference venv not found: {args.ref_python} does not exist; "
                         "build it with `make ref-venv` (or pass --ref-python, or --no-ref)")
    probe = subprocess.run([str(args.ref_python), "-c", "import importlib.metadata as m; print(m.version('open-rppg'))"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        raise BenchError(f"{args.ref_python} has no open-rppg installed; rebuild it with `make ref-venv`")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_reference(args)
        load_before = os.getloadavg()
        args.workdir.mkdir(parents=True, exist_ok=True)
        warmup, _ = cohort_video(args.workdir, CODECS[0], WARMUP_SECONDS)
        videos = [(codec, *cohort_video(args.workdir, codec, args.seconds)) for codec in args.codecs]

        t0 = time.perf_counter()
        models = ModelSet([args.model])  # reads the weights, before any compile
        setup = {"load_before": load_before, "ours_model_load_s": time.perf_counter() - t0}
        print(f"ours: warm-up on {warmup.name} ({WARMUP_SECONDS:g} s) ...", flush=True)
        t0 = time.perf_counter()
        infer_models(str(warmup), models)
        setup["ours_warmup_s"] = time.perf_counter() - t0

        rows = [bench_file(path, codec, truth, warmup, models, args) for codec, path, truth in videos]
    except BenchError as e:
        print(f"bench_video: {e}", file=sys.stderr)
        return 2

    print_table(rows, setup)
    ref_versions = next((r.get("ref_versions") for r in rows if "ref_versions" in r), {})
    report = {
        "benchmark": "video",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": {"seconds": args.seconds, "repeat": args.repeat, "model": args.model, "size": list(SIZE),
                 "seed": SEED, "warmup_seconds": WARMUP_SECONDS, "reference_model": REF_MODEL.get(args.model)},
        "machine": {**machine_info(VIDEO_PACKAGES, reference_packages=ref_versions), "load_before": load_before, "load_after": os.getloadavg()},
        "setup": setup,
        "files": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
