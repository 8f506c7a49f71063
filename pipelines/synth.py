"""`pulsepipe synth`: write a synthetic cohort with known heart rates (see transforms/synth.py)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pipelines.arguments import positive_number, whole_number
from transforms import synth


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WxH, e.g. 320x240, got {text!r}") from None
    if w < 64 or h < 64 or w % 2 or h % 2:  # encoders want even sizes; BlazeFace needs some pixels
        raise argparse.ArgumentTypeError(f"size must be even and at least 64x64, got {text!r}")
    return w, h


def _codec(text: str) -> str:
    try:
        return synth.parse_codec(text).name
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _range(meta: dict) -> str:
    """` (ramp 90.1-110.3)` for a recording whose HR moves (its shape and true range), nothing for a steady one."""
    shape, (lo, hi) = meta["recording"]["hr_shape"], meta["true_hr_range_bpm"]
    return "" if shape == "steady" else f" ({shape} {lo:.1f}-{hi:.1f})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `pulsepipe synth`, for a standalone parser or a subcommand."""
    parser.add_argument("out", type=Path, help="folder to write the cohort into (created if missing)")
    parser.add_argument("--subjects", type=whole_number(1), default=4, help="number of subjects (default 4)")
    parser.add_argument("--seconds", type=positive_number("a length in seconds"), default=30.0, help="length of each recording (default 30)")
    parser.add_argument("--seed", type=whole_number(0), default=0, help="non-negative seed; same seed, same cohort (default 0)")
    parser.add_argument(
        "--recordings", type=whole_number(1), default=1, help="recordings per subject (default 1; ubfc-rppg: 1 only)"
    )
    parser.add_argument(
        "--layout",
        choices=synth.LAYOUTS,
        default="synthetic",
        help="synthetic: this project's layout (cohort.json, <subject>/<recording>/video + ppg.csv + meta.json); "
        "ubfc-rppg: subject<N>/vid.avi + ground_truth.txt as in UBFC-rPPG DATASET_2 (default synthetic)",
    )
    parser.add_argument("--fps", type=positive_number("a frame rate"), default=synth.DEFAULT_FPS, help="video frame rate (default 30)")
    parser.add_argument(
        "--size", type=_size, default=synth.DEFAULT_SIZE, metavar="WxH", help="video size (default 320x240)"
    )
    parser.add_argument(
        "--codec",
        type=_codec,
        default=None,
        help="h264-lossless (libx264rgb qp 0, exact RGB, .mp4), ffv1 (exact RGB, .avi) or h264-crf<N> (lossy, .mp4); "
        "default: the difficulty's (hard: " + str(synth.HARD.codec) + "), else h264-lossless for synthetic, "
        "ffv1 for ubfc-rppg",
    )
    parser.add_argument(
        "--difficulty",
        choices=tuple(synth.DIFFICULTIES),
        default=synth.EASY.name,
        help="easy: small slow head motion, slow light drift, lossless video, steady heart rates; hard: larger, "
        "faster head motion with roll and a slight shake, light flicker near the heart rate and faster drift, lossy "
        "H.264, more sensor noise, heart rates that ramp or step within a recording (every knob is in cohort.json "
        "and meta.json; default easy)",
    )


def main(args: argparse.Namespace) -> int:
    """Write the cohort `args` describe; a progress line per recording on stderr, a summary on stdout."""
    if args.layout == "ubfc-rppg" and args.recordings != 1:
        print("pulsepipe synth: the ubfc-rppg layout holds one recording per subject", file=sys.stderr)
        return 2
    started = time.perf_counter()
    total_bytes = 0

    def progress(done: int, total: int, meta: dict) -> None:
        nonlocal total_bytes
        size = (args.out / meta["video"]).stat().st_size
        total_bytes += size
        print(
            f"[{done}/{total}] {meta['recording_id']}: {meta['true_mean_hr_bpm']:.1f} BPM{_range(meta)}, "
            f"{meta['n_frames']} frames, {size / 1e6:.1f} MB, {time.perf_counter() - started:.1f} s",
            file=sys.stderr,
            flush=True,
        )

    cohort = synth.write_cohort(
        args.out,
        subjects=args.subjects,
        seconds=args.seconds,
        seed=args.seed,
        recordings_per_subject=args.recordings,
        layout=args.layout,
        fps=args.fps,
        size=args.size,
        codec=args.codec,
        on_recording=progress,
        difficulty=args.difficulty,
    )
    hrs = [r["true_mean_hr_bpm"] for r in cohort["recordings"]]
    params = cohort["parameters"]
    print(
        f"wrote {len(hrs)} recordings of {args.subjects} subjects to {args.out} "
        f"({args.layout}, {cohort['difficulty']['name']}, {params['codec']}, {params['width']}x{params['height']} "
        f"at {params['fps']:g} fps): "
        f"HR {min(hrs):.1f}-{max(hrs):.1f} BPM, {total_bytes / 1e6:.1f} MB in {time.perf_counter() - started:.1f} s"
    )
    return 0


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pulsepipe synth",
        description="Write a synthetic rPPG cohort with known truth: face videos whose skin pulses with a "
        "ground-truth PPG, heart rates spread over 40-160 BPM. Same seed, same cohort.",
    )
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(run())
