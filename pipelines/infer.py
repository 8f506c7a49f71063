"""Heart rate from one video or image folder: decode, face crop, 30 fps, BVP model, HR and SQI.

Prints the heart rate and the signal quality index, and writes NAME.bvp.csv (time, BVP) and NAME.png
(waveform and spectrum) into --out. Errors are one line naming the file and the reason, with exit code 2.
"""
from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pipelines.arguments import positive_number, whole_number
from pipelines.predictors import MODEL_NAMES, Block, ModelSet
from transforms import signal
from transforms.errors import ItemFailed
from transforms.face_crops import iter_face_crops
from transforms.resample import FPS

MIN_SECONDS = 2.0


@dataclass(frozen=True)
class InferResult:
    source: str
    model: str
    hr_bpm: float
    sqi: float
    timestamps: np.ndarray  # (T,) seconds at 30 fps
    bvp: np.ndarray  # (T,) model output, zero where no face
    face_fraction: float


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("video", help="a video file (mp4, avi, mov, mkv, ...) or a folder of image frames")
    p.add_argument("--model", choices=MODEL_NAMES, default="me-chunk", help="BVP model (default: me-chunk)")
    p.add_argument("--weights", default="rlap",
                   help="ME-rPPG weights: rlap, pure, a .weights.h5 path or a `pulsepipe train` run folder; "
                        "PhysMamba weights: rlap, pure or a .h5 path (default: rlap)")
    p.add_argument("--out", default=".", help="folder for NAME.bvp.csv and NAME.png (default: current folder)")
    p.add_argument("--image-fps", type=positive_number("a frame rate"), default=FPS,
                   help="frame rate of an image folder (default: 30)")
    p.add_argument("--detect-every", type=whole_number(1), default=5,
                   help="run face detection every k frames (default: 5)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def infer_video(
    path: str, *, model: str = "me-chunk", weights: str = "rlap", image_fps: float = FPS,
    detect_every: int = 5, progress: bool = False, detector=None,
) -> InferResult:
    """Run one model over one video; raises ItemFailed naming the file: unreadable input (VideoError, one
    kind of it), no usable signal.

    detector: a transforms.face.FaceDetector to reuse across videos (one is opened per call otherwise).
    """
    result = infer_models(path, ModelSet([model], weights), image_fps=image_fps, detect_every=detect_every,
                          progress=progress, detector=detector)[model]
    if np.isnan(result.hr_bpm):
        raise ItemFailed(f"{path}: {model} finds no pulse: its BVP is flat (nothing in 0.5-3 Hz)")
    return result


def infer_models(
    path: str, models: ModelSet | Sequence[str], *, image_fps: float = FPS, detect_every: int = 5,
    progress: bool = False, detector=None,
) -> dict[str, InferResult]:
    """Several models over one decode pass of one video: {model name: InferResult}; a model whose BVP is
    flat has hr_bpm NaN. Raises ItemFailed naming the file: unreadable, too short, too little face.

    models: model names (ME-rPPG and PhysMamba with the rlap weights), or a ModelSet loaded once for many
    videos. The crops are made at each size the models read (36x36, PhysMamba's 128x128), from one decode.
    """
    models = models if isinstance(models, ModelSet) else ModelSet(models)
    blocks = (Block(b.sized, b.face_found, timestamps=b.timestamps)
              for b in iter_face_crops(path, detect_every=detect_every, image_fps=image_fps,
                                       detector=detector, progress=progress, sizes=models.crop_sizes))
    fed = models.feed([blocks])
    (read,) = fed.reads
    if read.error:
        raise read.error
    t, face_found = read.timestamps, read.face_found
    _check_usable(path, t, face_found)
    results = {}
    for name, predictor in fed.predictors.items():
        (bvp,) = predictor.finish()
        hr, sqi = signal.heart_rate(bvp, FPS, usable=face_found)  # NaN: a flat BVP (see infer_video)
        results[name] = InferResult(path, name, hr, sqi, t, bvp, float(face_found.mean()))
    return results


def _check_usable(path: str, t: np.ndarray, face_found: np.ndarray) -> None:
    """ItemFailed unless the clip and the face in it last long enough for a heart rate."""
    duration = len(t) / FPS
    if duration < MIN_SECONDS:
        raise ItemFailed(f"{path}: clip is {duration:.2f} s long; at least {MIN_SECONDS:.0f} s are needed")
    if not face_found.any():
        raise ItemFailed(f"{path}: no face found in any of {len(t)} frames")
    if face_found.sum() / FPS < MIN_SECONDS:
        raise ItemFailed(f"{path}: a face is visible for only {face_found.sum() / FPS:.2f} s; "
                         f"at least {MIN_SECONDS:.0f} s are needed")


def write_outputs(result: InferResult, out_dir: Path, stem: str | None = None) -> tuple[Path, Path]:
    """Write STEM.bvp.csv and STEM.png (default stem: the video's name) into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or Path(result.source.rstrip("/")).stem
    csv_path, png_path = out_dir / f"{stem}.bvp.csv", out_dir / f"{stem}.png"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t_s", "bvp"])
        w.writerows(zip(np.round(result.timestamps, 6), np.round(result.bvp, 7)))
    plot_bvp(result, png_path)
    return csv_path, png_path


def plot_bvp(result: InferResult, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.signal import welch

    filtered = signal.postprocess_bvp(result.bvp, FPS)
    f, p = welch(filtered, FPS, nperseg=min(len(filtered), 512), nfft=8192)
    fig, (ax_wave, ax_spec) = plt.subplots(2, 1, figsize=(10, 6), constrained_layout=True)
    ax_wave.plot(result.timestamps, filtered, lw=0.8)
    ax_wave.set(xlabel="time (s)", ylabel="BVP (band-passed, z-scored)",
                title=f"{Path(result.source).name}: {result.model}, HR {result.hr_bpm:.1f} BPM, SQI {result.sqi:.2f}")
    band = (f >= 0.5) & (f <= 3.0)
    ax_spec.plot(f[band] * 60, p[band], lw=1)
    ax_spec.axvline(result.hr_bpm, color="C3", ls="--", label=f"{result.hr_bpm:.1f} BPM")
    ax_spec.set(xlabel="frequency (BPM)", ylabel="power", title="Welch spectrum")
    ax_spec.legend()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    try:
        result = infer_video(
            args.video, model=args.model, weights=args.weights, image_fps=args.image_fps,
            detect_every=args.detect_every, progress=not args.no_progress,
        )
    except ItemFailed as e:  # VideoError is one
        print(f"pulsepipe infer: error: {e}", file=sys.stderr)
        return 2
    csv_path, png_path = write_outputs(result, Path(args.out))
    print(f"{args.video}: HR {result.hr_bpm:.1f} BPM, SQI {result.sqi:.2f} ({args.model}, "
          f"{len(result.bvp)} frames at 30 fps, face in {100 * result.face_fraction:.0f}%)")
    print(f"wrote {csv_path} and {png_path}")
    return 0
