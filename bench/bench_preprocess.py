"""Preprocessing throughput, worker memory and engine scaling, side by side on this machine.

Test videos are synthetic 640x480 lossy H.264 (crf 20) recordings written once by `transforms.synth`
into --workdir and reused. Every measurement runs in a fresh subprocess of this Python, so peak RSS
(`ru_maxrss`) belongs to that measurement alone. It measures:

1. throughput: `PreprocessStep` called directly (no engine) on --recordings recordings of --seconds,
   against a bare `transforms.video.iter_blocks` decode of the same files; frames/s of wall time and
   frames per CPU-second (user + system of all threads: the per-core rate), and their ratio;
2. the whole-video-in-memory baseline in the rPPG-Toolbox manner (`BaseLoader.read_video` then `resize`
   with DYNAMIC_DETECTION off): every frame read with cv2.VideoCapture into a list, `np.asarray`, one
   face detection (our MediaPipe `FaceDetector`) on the first frame, its box (x1.5, LARGER_BOX_COEF) cropped
   from every frame and resized with cv2.INTER_AREA into a float64 (n, S, S, 3) array that is held;
   time and peak RSS on the same files as 1;
3. peak RSS of one `PreprocessStep` on --long-minutes videos, beside the baseline where its projected
   peak (two copies of the decoded video while `np.asarray` copies the list) stays under --baseline-max-gb;
   elsewhere the projection is printed. Long videos are the shortest one looped: its H.264 packets are
   stream-copied N times with shifted timestamps (no re-encode; every loop starts on the clip's IDR frame)
   and its ppg.csv tiled to match, because rendering 10 minutes of 640x480 frames takes ~10 minutes here;
4. engine scaling: `run_preprocess` on the recordings of 1 with `EngineOptions(engine, workers=1)` and
   `workers=2`, wall time including engine start-up; start-up alone is timed by a run of the same step on
   items that fail at once (each worker still builds its step, so this includes the face detector load);
   the work span, from the first recording's start to the last one's end in the workers, leaves the
   engine's start and stop out; an unchanged re-run (every recording skipped: the engine never starts)
   is reported too;
5. where the step's time goes: one instrumented run on one recording (decode, face detection, crop,
   resampling, segment building, shard writing, truth, the rest).

Prints one table and writes the same as JSON with the machine's details. A script, not a test: it
asserts nothing. Other processes on this machine add time: the load average is printed before and after.
Usage:

    .venv/bin/python bench/bench_preprocess.py [--workdir DIR] [--seconds 30] [--recordings 4]
        [--long-minutes 1 5 10] [--engines beam ray] [--json bench/results/preprocess.json] [--quick]
"""
from __future__ import annotations

import argparse
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

SIZE = (640, 480)
CODEC = "h264-crf20"  # a typical lossy camera file (yuv420p)
SEED = 11
BASELINE_BOX_COEF = 1.5  # rPPG-Toolbox's LARGER_BOX_COEF in its shipped configs
MARK = benchlib.MARK


# ---- test videos ----

def cohort(workdir: Path, subjects: int, seconds: float) -> Path:
    """A `synthetic` cohort of 640x480 crf-20 recordings, written on first use and reused after."""
    from transforms.synth import write_cohort

    folder = workdir / f"{CODEC}-{subjects}x{seconds:g}s-seed{SEED}-{SIZE[0]}x{SIZE[1]}"
    if not (folder / "cohort.json").exists():  # written last: its presence means complete
        print(f"writing {subjects} x {seconds:g} s {SIZE[0]}x{SIZE[1]} {CODEC} recordings into {folder} ...",
              flush=True)
        t0 = time.perf_counter()
        write_cohort(folder, subjects, seconds, SEED, size=SIZE, codec=CODEC)
        print(f"  {time.perf_counter() - t0:.0f} s", flush=True)
    return folder


def recording_folder(cohort_dir: Path, index: int = 0) -> Path:
    rec = json.loads((cohort_dir / "cohort.json").read_text())["recordings"][index]
    return cohort_dir / Path(rec["video"]).parent


def looped_cohort(workdir: Path, base: Path, loops: int) -> Path:
    """A one-recording cohort holding `base`'s recording `loops` times over (stream copy, tiled truth)."""
    import av
    import numpy as np

    if loops == 1:
        return base
    folder = workdir / f"{base.name}-loop{loops}"
    if (folder / "cohort.json").exists():
        return folder
    src = recording_folder(base)
    dst = folder / src.relative_to(base)
    dst.mkdir(parents=True, exist_ok=True)
    print(f"looping {src / 'video.mp4'} {loops} times into {dst} ...", flush=True)
    with av.open(str(src / "video.mp4")) as probe:
        stream = probe.streams.video[0]
        packets = [p for p in probe.demux(stream) if p.dts is not None]
        span = max(p.pts + p.duration for p in packets) - min(p.pts for p in packets)  # one loop, time_base units
        del packets
    with av.open(str(dst / "video.mp4"), "w") as out:
        ostream = None
        for k in range(loops):
            with av.open(str(src / "video.mp4")) as inp:
                istream = inp.streams.video[0]
                if ostream is None:
                    ostream = out.add_stream_from_template(istream)
                for packet in inp.demux(istream):
                    if packet.dts is None:  # the demuxer's empty flush packet
                        continue
                    packet.pts += k * span
                    packet.dts += k * span
                    packet.stream = ostream
                    out.mux(packet)
    table = np.loadtxt(src / "ppg.csv", delimiter=",", skiprows=1, ndmin=2)
    rate = json.loads((src / "meta.json").read_text())["ppg_rate_hz"]
    ppg = np.tile(table[:, 1], loops)
    rows = "".join(f"{t:.6f},{v:.6f}\n" for t, v in zip(np.arange(len(ppg)) / rate, ppg))
    (dst / "ppg.csv").write_text("t_s,ppg\n" + rows)
    meta = json.loads((src / "meta.json").read_text())
    meta.update(n_frames=meta["n_frames"] * loops, seconds=meta["seconds"] * loops,
                looped_from=str(src / "video.mp4"), loops=loops)
    (dst / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    info = json.loads((base / "cohort.json").read_text())
    info["recordings"][0]["n_frames"] = meta["n_frames"]
    info["looped"] = {"from": str(base), "loops": loops}
    (folder / "cohort.json").write_text(json.dumps(info, indent=2) + "\n")
    return folder


def videos(cohort_dir: Path) -> list[Path]:
    info = json.loads((cohort_dir / "cohort.json").read_text())
    return [cohort_dir / r["video"] for r in info["recordings"]]


# ---- children: one measurement per fresh process ----



def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return r.ru_utime + r.ru_stime


def child_decode(spec: dict) -> dict:
    from transforms.video import iter_blocks

    setup_rss, cpu0, t0 = _rss_mb(), _cpu_s(), time.perf_counter()
    frames = sum(len(t) for path in spec["videos"] for t, _ in iter_blocks(path, spec["block"]))
    return {"frames": frames, "wall_s": time.perf_counter() - t0, "cpu_s": _cpu_s() - cpu0,
            "setup_rss_mb": setup_rss}


def _work_items(cohort_dir: str, config: dict) -> list[dict]:
    import fsspec

    from pipelines.preprocess import plan
    from transforms.datasets import adapter
    from transforms.manifest import config_hash

    fs, root = fsspec.core.url_to_fs(cohort_dir)
    records = adapter("synthetic").list_recordings(root, fs)
    todo, _ = plan(records, [], fs, config_hash({"layout": "synthetic", **config}))
    return todo


def child_preprocess(spec: dict) -> dict:
    """PreprocessStep on every recording of a cohort, in this process; optionally instrumented."""
    from pipelines.preprocess import PreprocessStep, load_config

    config = load_config(None)
    items = _work_items(spec["cohort"], config)
    t0 = time.perf_counter()
    step = PreprocessStep("synthetic", spec["cohort"], spec["output"], config)
    setup_s, setup_rss = time.perf_counter() - t0, _rss_mb()
    if spec.get("profile"):
        return _profiled(step, items[:1])
    cpu0, t0 = _cpu_s(), time.perf_counter()
    rows = [step(item) for item in items]
    wall, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
    step.close()
    failed = [r["reason"] for r in rows if r["status"] != "ok"]
    return {"frames": sum(r.get("n_source_frames") or 0 for r in rows),
            "output_frames": sum(r.get("n_frames") or 0 for r in rows), "wall_s": wall, "cpu_s": cpu,
            "setup_s": setup_s, "setup_rss_mb": setup_rss, "failed": failed}


def _profiled(step, items: list[dict]) -> dict:
    """One run of the step with timed wrappers swapped into the modules it calls (for this run only)."""
    from unittest import mock

    import pipelines.preprocess as pre
    import transforms.datasets.synthetic as synthetic
    import transforms.face as face
    from transforms.resample import Resampler
    from transforms.shards import SegmentBuilder, ShardWriter

    clock = StageClock()
    patches = [
        mock.patch.object(synthetic, "frame_blocks", clock.generator("decode", synthetic.frame_blocks)),
        mock.patch.object(step.detector, "detect", clock.function("detect", step.detector.detect)),
        mock.patch.object(face, "crop_face", clock.function("crop", face.crop_face)),
        mock.patch.object(Resampler, "push", clock.function("resample", Resampler.push)),
        mock.patch.object(Resampler, "flush", clock.function("resample", Resampler.flush)),
        mock.patch.object(SegmentBuilder, "push", clock.function("segments", SegmentBuilder.push)),
        mock.patch.object(SegmentBuilder, "finish", clock.function("segments", SegmentBuilder.finish)),
        mock.patch.object(ShardWriter, "write_rows", clock.function("write", ShardWriter.write_rows)),
        mock.patch.object(ShardWriter, "close", clock.function("write", ShardWriter.close)),
        mock.patch.object(synthetic, "read_truth", clock.function("truth", synthetic.read_truth)),
        mock.patch.object(pre, "resample_signal", clock.function("truth", pre.resample_signal)),
    ]
    for p in patches:
        p.start()
    try:
        t0 = time.perf_counter()
        rows = [step(item) for item in items]
        total = time.perf_counter() - t0
    finally:
        for p in reversed(patches):
            p.stop()
        step.close()
    stages = dict(clock.seconds)
    stages["other"] = total - sum(stages.values())  # tracker Python, Kalman filters, stacking, manifest row
    return {"frames": sum(r.get("n_source_frames") or 0 for r in rows), "total_s": total, "stages_s": stages,
            "detect_calls": clock.calls.get("detect", 0), "crop_calls": clock.calls.get("crop", 0),
            "recording": items[0]["recording"]["video"] if items else None}


def child_baseline(spec: dict) -> dict:
    """rPPG-Toolbox style: the whole video in memory, one detection on frame 0, crop + resize every frame."""
    import cv2
    import numpy as np

    from transforms.face import FaceDetector

    detector = FaceDetector()
    setup_rss, cpu0, t0 = _rss_mb(), _cpu_s(), time.perf_counter()
    # BaseLoader.read_video: BGR frames to RGB, appended to a list, then one array
    capture = cv2.VideoCapture(spec["video"])
    frames = []
    ok, frame = capture.read()
    while ok:
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        ok, frame = capture.read()
    capture.release()
    frames = np.asarray(frames)
    read_s = time.perf_counter() - t0
    # BaseLoader.resize with dynamic_det False: the region found in frames[0] is used for every frame
    t1 = time.perf_counter()
    box = detector.detect(frames[0])
    detector.close()
    if box is None:
        x, y, w, h = 0, 0, frames.shape[2], frames.shape[1]
    else:
        w, h = (box.x1 - box.x0) * BASELINE_BOX_COEF, (box.y1 - box.y0) * BASELINE_BOX_COEF
        x, y = box.x0 - (w - (box.x1 - box.x0)) / 2, box.y0 - (h - (box.y1 - box.y0)) / 2
    x, y, w, h = (int(v) for v in (x, y, w, h))
    s = spec["size"]
    resized = np.zeros((frames.shape[0], s, s, 3))  # float64, as rPPG-Toolbox allocates it
    for i in range(frames.shape[0]):
        crop = frames[i][max(y, 0):min(y + h, frames.shape[1]), max(x, 0):min(x + w, frames.shape[2])]
        resized[i] = cv2.resize(crop, (s, s), interpolation=cv2.INTER_AREA)
    crop_s = time.perf_counter() - t1
    return {"frames": int(frames.shape[0]), "wall_s": time.perf_counter() - t0, "cpu_s": _cpu_s() - cpu0,
            "read_s": read_s, "detect_crop_resize_s": crop_s, "video_bytes": int(frames.nbytes),
            "result_bytes": int(resized.nbytes), "face_found": box is not None, "setup_rss_mb": setup_rss}


def child_engine(spec: dict) -> dict:
    """Start-up (a run of failing-at-once items), then the real run_preprocess, then an unchanged re-run.

    The real run's step stamps each row with the wall-clock time its recording started and ended (one clock
    for every process of this machine): the work span, from the first recording's start to the last one's
    end, is the time the workers shared the recordings, without the engine's start and stop."""
    import dataclasses

    import pipelines.preprocess
    from pipelines.engines import EngineOptions, run_step
    from pipelines.preprocess import PreprocessStep, load_config, run_preprocess

    class StampedStep(PreprocessStep):  # defined here, in __main__: both engines ship it to their workers by value
        def __call__(self, item: dict) -> dict:
            started = time.time()
            return {**super().__call__(item), "bench_started": started, "bench_ended": time.time()}

    config = load_config(None)
    opts = EngineOptions(spec["engine"], workers=spec["workers"])
    out = Path(spec["output"])
    quiet = lambda *a, **k: None  # noqa: E731 - the driver's summary lines would mix with ours

    idle = [{**item, "recording": {**item["recording"], "problem": "bench: no work"}}
            for item in _work_items(spec["cohort"], config)[: spec["workers"]]]
    kwargs = {"layout": "synthetic", "input_uri": spec["cohort"], "output_uri": str(out / "idle"), "config": config}
    (out / "idle").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run_step(PreprocessStep, kwargs, idle, opts, str(out / "idle"))
    startup_s = time.perf_counter() - t0

    pipelines.preprocess.PreprocessStep = StampedStep  # what run_preprocess hands the engine
    t0 = time.perf_counter()
    rows = run_preprocess("synthetic", spec["cohort"], str(out / "run"), config, opts, log=quiet)
    wall = time.perf_counter() - t0
    pipelines.preprocess.PreprocessStep = PreprocessStep
    span = max(r["bench_ended"] for r in rows) - min(r["bench_started"] for r in rows)
    t0 = time.perf_counter()
    run_preprocess("synthetic", spec["cohort"], str(out / "run"), config, opts, log=quiet)
    rerun_s = time.perf_counter() - t0
    return {"startup_s": startup_s, "wall_s": wall, "span_s": span, "rerun_unchanged_s": rerun_s,
            "frames": sum(r.get("n_source_frames") or 0 for r in rows),
            "failed": [r["reason"] for r in rows if r["status"] != "ok"], "opts": dataclasses.asdict(opts)}


CHILDREN = {"decode": child_decode, "preprocess": child_preprocess, "baseline": child_baseline,
            "engine": child_engine}


def run_child(kind: str, spec: dict, label: str) -> dict:
    return benchlib.run_child(__file__, kind, spec, label)


def child_main(kind: str, spec_json: str) -> int:
    result = CHILDREN[kind](json.loads(spec_json))
    result["peak_rss_mb"] = _peak_mb()  # this process only (Beam/Ray workers are other processes)
    print(MARK + json.dumps(result, default=float), flush=True)
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: pyarrow's dataset threads have aborted it after a Ray run


# ---- the measurements ----

def measure_throughput(cohort_dir: Path, scratch: Path, config: dict) -> dict:
    paths = [str(p) for p in videos(cohort_dir)]
    decode = run_child("decode", {"videos": paths, "block": config["block_frames"]},
                       f"decode only (iter_blocks) on {len(paths)} recordings")
    ours = run_child("preprocess", {"cohort": str(cohort_dir), "output": str(scratch / "throughput")},
                     f"PreprocessStep in-process on {len(paths)} recordings")
    baseline = run_child("baseline", {"video": paths[0], "size": 72},
                         "whole-video baseline (72x72) on the first recording")
    baseline36 = run_child("baseline", {"video": paths[0], "size": 36},
                           "whole-video baseline (36x36) on the first recording")
    one = scratch / "one"  # a cohort of the first recording alone, so ours runs on the baseline's file
    src = recording_folder(cohort_dir)
    shutil.copytree(src, one / src.relative_to(cohort_dir))
    ours_one = run_child("preprocess", {"cohort": str(one), "output": str(scratch / "one-out")},
                         "PreprocessStep on the first recording alone")
    return {"decode": decode, "ours": ours, "baseline_72": baseline, "baseline_36": baseline36,
            "ours_first_recording": ours_one}


def projected_baseline_gb(n_frames: int, size: int = 72) -> float:
    video = n_frames * SIZE[0] * SIZE[1] * 3
    return (max(2 * video, video + n_frames * size * size * 3 * 8)) / 1e9  # list + np.asarray copy


def measure_memory(workdir: Path, scratch: Path, minutes: list[float], max_gb: float) -> list[dict]:
    base = cohort(workdir, 1, minutes[0] * 60)
    rows = []
    for m in minutes:
        folder = looped_cohort(workdir, base, max(1, round(m / minutes[0])))
        n_frames = json.loads((folder / "cohort.json").read_text())["recordings"][0]["n_frames"]
        out = scratch / f"long-{m:g}"
        ours = run_child("preprocess", {"cohort": str(folder), "output": str(out)},
                         f"PreprocessStep peak RSS on a {m:g} min video ({n_frames} frames)")
        shutil.rmtree(out, ignore_errors=True)
        projected = projected_baseline_gb(n_frames)
        baseline = None
        if projected <= max_gb:
            baseline = run_child("baseline", {"video": str(videos(folder)[0]), "size": 72},
                                 f"whole-video baseline peak RSS on the {m:g} min video")
        rows.append({"minutes": m, "frames": n_frames, "video": str(videos(folder)[0]), "ours": ours,
                     "baseline": baseline, "baseline_projected_gb": projected})
    return rows


def measure_engines(cohort_dir: Path, scratch: Path, engines: list[str]) -> list[dict]:
    rows = []
    for engine in engines:
        for workers in (1, 2):
            out = scratch / f"engine-{engine}-{workers}"
            shutil.rmtree(out, ignore_errors=True)
            r = run_child("engine", {"engine": engine, "workers": workers, "cohort": str(cohort_dir),
                                     "output": str(out)}, f"run_preprocess on {engine}, workers={workers}")
            rows.append({"engine": engine, "workers": workers, **r})
            shutil.rmtree(out, ignore_errors=True)
    return rows


# ---- output ----

def fps(r: dict | None, key: str = "wall_s") -> float | None:
    return r["frames"] / r[key] if r and r.get(key) else None


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def gb(mb: float | None) -> str:
    return f"{mb / 1024:.2f}" if mb else "-"


def print_table(report: dict) -> None:
    t = report["throughput"]
    dec, ours = t["decode"], t["ours"]
    print()
    print(f"1-2. throughput on {report['args']['recordings']} x {report['args']['seconds']:g} s "
          f"{SIZE[0]}x{SIZE[1]} {CODEC} recordings (source frames; cpu = user+sys of all threads of the process)")
    head = f"{'':34}{'frames':>8}{'wall s':>9}{'fps':>8}{'cpu s':>9}{'fps/cpu':>9}{'peak GB':>9}{'fps/dec':>9}"
    print(head)
    rows = [("decode only (iter_blocks)", dec), ("PreprocessStep (no engine)", ours),
            ("ours, first recording alone", t.get("ours_first_recording")),
            ("whole-video baseline 72x72", t["baseline_72"]), ("whole-video baseline 36x36", t["baseline_36"])]
    for name, r in rows:
        if not r:
            continue
        print(f"{name:34}{r['frames']:>8}{r['wall_s']:>9.2f}{fps(r):>8.1f}{r['cpu_s']:>9.2f}"
              f"{fps(r, 'cpu_s'):>9.1f}{gb(r['peak_rss_mb']):>9}{ratio(fps(r), fps(dec)):>9}")
    print(f"PreprocessStep / decode only: {ratio(fps(ours), fps(dec))}x of wall-clock frames/s, "
          f"{ratio(fps(ours, 'cpu_s'), fps(dec, 'cpu_s'))}x of frames per CPU-second (goal >= 0.6)")
    b = t["baseline_72"]
    print(f"baseline split: read {b['read_s']:.2f} s, detect+crop+resize {b['detect_crop_resize_s']:.2f} s; "
          f"PreprocessStep setup (face detector) {ours['setup_s']:.2f} s, not in its wall time")

    print()
    print("3. peak RSS of one process (GB; 'setup' = RSS after imports and setup, before the video)")
    print(f"{'video':>8}{'frames':>8}{'ours peak':>11}{'setup':>8}{'ours s':>8}{'base peak':>11}"
          f"{'base setup':>11}{'base s':>8}{'base projected':>16}")
    for r in report["memory"]:
        o, b = r["ours"], r["baseline"]
        base = (gb(b["peak_rss_mb"]), gb(b["setup_rss_mb"]), f"{b['wall_s']:.1f}") if b else ("skipped", "-", "-")
        print(f"{r['minutes']:>6g} m{r['frames']:>8}{gb(o['peak_rss_mb']):>11}{gb(o['setup_rss_mb']):>8}"
              f"{o['wall_s']:>8.1f}{base[0]:>11}{base[1]:>11}{base[2]:>8}{r['baseline_projected_gb']:>16.2f}")
    print(f"(baseline runs only where its projected peak, two copies of the decoded video, is at most "
          f"{report['args']['baseline_max_gb']:g} GB; goal for ours: < 1.5 GB and flat)")

    if report["engines"]:
        print()
        print("4. run_preprocess on the same recordings; wall s includes engine start-up")
        print(f"{'engine':>8}{'workers':>9}{'wall s':>9}{'fps':>8}{'start-up s':>12}{'span s':>9}"
              f"{'rerun s':>9}{'speed-up':>10}{'span speed-up':>15}")
        by = {(r["engine"], r["workers"]): r for r in report["engines"]}
        for r in report["engines"]:
            one = by.get((r["engine"], 1))
            up = ratio(one["wall_s"], r["wall_s"]) if one else "-"
            up_span = ratio(one["span_s"], r["span_s"]) if one else "-"
            print(f"{r['engine']:>8}{r['workers']:>9}{r['wall_s']:>9.1f}{fps(r):>8.1f}{r['startup_s']:>12.1f}"
                  f"{r['span_s']:>9.1f}{r['rerun_unchanged_s']:>9.2f}{up:>10}{up_span:>15}")
        print("(speed-up = workers=1 wall / this wall, goal >= 1.7 at 2 workers; start-up = a run whose items "
              "fail at once; span = first recording's start to last one's end in the workers, the engine's start "
              "and stop left out; rerun = every recording unchanged, the engine is never started)")

    p = report["profile"]
    print()
    print(f"5. where PreprocessStep's time goes on {Path(p['recording']).parent.name} "
          f"({p['frames']} frames, {p['total_s']:.2f} s instrumented):")
    for stage, s in sorted(p["stages_s"].items(), key=lambda kv: -kv[1]):
        print(f"{stage:>10} {s:7.2f} s  {100 * s / p['total_s']:5.1f} %")
    print(f"({p['detect_calls']} detections, {1e3 * p['stages_s'].get('detect', 0) / max(p['detect_calls'], 1):.1f} ms "
          f"each; {p['crop_calls']} crops)")

    benchlib.print_load(report["machine"])


# ---- main ----

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "pulsepipe-bench-preprocess",
                   help="where test videos are written once and reused (default: $TMPDIR/pulsepipe-bench-preprocess)")
    p.add_argument("--seconds", type=float, help="length of each throughput/engine recording (default: 30)")
    p.add_argument("--recordings", type=int, help="recordings for throughput and engines (default: 4)")
    p.add_argument("--long-minutes", type=float, nargs="+",
                   help="long video lengths for peak memory; the first is rendered, the others loop it "
                        "(default: 1 5 10)")
    p.add_argument("--engines", nargs="*", choices=("beam", "ray"), default=["beam", "ray"],
                   help="engines to time at 1 and 2 workers (default: beam ray; none: skip)")
    p.add_argument("--baseline-max-gb", type=float, default=8.0,
                   help="run the whole-video baseline only where its projected peak is at most this (default: 8)")
    p.add_argument("--json", type=Path, default=REPO / "bench/results/preprocess.json", help="where to write JSON")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 2 x 6 s recordings, long videos of 0.2 and 0.4 min")
    p.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    args.seconds = args.seconds or (6.0 if quick else 30.0)
    args.recordings = args.recordings or (2 if quick else 4)
    args.long_minutes = sorted(args.long_minutes or ([0.2, 0.4] if quick else [1.0, 5.0, 10.0]))
    if args.seconds < 3:
        p.error("--seconds must be at least 3 (the preprocess config fails recordings under 2 s)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(*args.child)
    from pipelines.preprocess import load_config

    def measure(scratch: Path) -> dict:
        recordings = cohort(args.workdir, args.recordings, args.seconds)
        return {
            "throughput": measure_throughput(recordings, scratch, load_config(None)),
            "profile": run_child("preprocess", {"cohort": str(recordings), "output": str(scratch / "profile"),
                                                "profile": True}, "instrumented PreprocessStep on one recording"),
            "memory": measure_memory(args.workdir, scratch, args.long_minutes, args.baseline_max_gb),
            "engines": measure_engines(recordings, scratch, args.engines),
        }

    done = benchlib.run_bench("preprocess", args.workdir, measure, ("pulsepipe", "numpy", "av", "mediapipe",
                                                                    "opencv-python-headless", "pyarrow",
                                                                    "apache-beam", "ray"))
    if done is None:
        return 2
    results, machine = done
    report = {
        "benchmark": "preprocess",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": {"seconds": args.seconds, "recordings": args.recordings, "long_minutes": args.long_minutes,
                 "engines": args.engines, "baseline_max_gb": args.baseline_max_gb, "quick": args.quick,
                 "size": list(SIZE), "codec": CODEC, "seed": SEED, "config": load_config(None),
                 "long_videos": "the first length rendered by transforms.synth, longer ones its H.264 packets "
                                "stream-copied in a loop with the truth tiled"},
        "machine": machine,
        **results,
    }
    print_table(report)
    benchlib.write_json(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
