"""Layout `mmpd`: MMPD (Tang et al. 2023), one MATLAB file per recording holding frames, PPG and labels.

    ROOT/subject<N>/p<N>_<k>.mat   MATLAB v5 file with
        video       (T, H, W, 3) RGB floats in [0, 1] (uint8 is taken as is), 30 fps
        GT_ppg      (T,) or (1, T) PPG, one sample per frame
        light       'LED-low' | 'LED-high' | 'Incandescent' | 'Nature'
        motion      'Stationary' | 'Stationary (after exercise)' | 'Rotation' | 'Talking' | 'Walking' | ...
        exercise, glasser (sic; `glasses` read too), hair_cover, makeup   'True' | 'False'
        skin_color  Fitzpatrick type 3-6;  gender  'male' | 'female'

The subject id is the folder name (`subject<N>`), the recording id the file stem (`p<N>_<k>`). Listing
reads the labels (small variables; the video is skipped, not loaded) into the metadata under the names
above, with `glasses` for `glasser` and booleans for 'True'/'False'.

Truth time: GT_ppg is sampled with the frames (the dataset's README gives both the same length T), so
sample k is at k / 30 s; read_truth reads the video's shape from the file's variable headers to check that.
Frames: round(video * 255) as uint8 at k / 30 s; the whole array is loaded once (MATLAB files cannot be
read in part).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import scipy.io

from transforms.datasets import Recording, Truth, TruthError, checked_truth, root_path, uri_under
from transforms.resample import FPS  # MMPD's camera and PPG run at the model rate
from transforms.video import VideoError

DATASET = "mmpd"
# what --input must hold, said when it holds none
LAYOUT = "ROOT/subject<N>/p<N>_<k>.mat"
LABELS = ("light", "motion", "exercise", "skin_color", "gender", "glasser", "glasses", "hair_cover", "makeup")
HEADER_BLOCK = 1 << 16  # small reads: listing skips over the video variable instead of fetching it


def list_recordings(root: str, fs) -> list[Recording]:
    base = root_path(fs, root)
    recordings = []
    for path in fs.glob(f"{base}/*/*.mat"):
        uri = uri_under(root, base, path)
        subject, name = path.rsplit("/", 2)[-2], Path(path).stem
        metadata, problem = {}, None
        try:
            with fs.open(uri, "rb", block_size=HEADER_BLOCK) as f:
                metadata = _labels(scipy.io.loadmat(f, variable_names=LABELS))
        except Exception as e:  # scipy raises many kinds (ValueError, TypeError, NotImplementedError for v7.3)
            problem = f"{uri}: unreadable MATLAB file ({type(e).__name__}: {' '.join(str(e).split())})"
        recordings.append(Recording(DATASET, subject, name, uri, (uri,), metadata, problem))
    return sorted(recordings, key=lambda r: r.recording_id)


def read_truth(rec: Recording, fs) -> Truth:
    try:
        with fs.open(rec.video, "rb", block_size=HEADER_BLOCK) as f:
            shapes = {name: shape for name, shape, _ in scipy.io.whosmat(f)}
            f.seek(0)
            mat = scipy.io.loadmat(f, variable_names=("GT_ppg",))
    except FileNotFoundError:
        raise TruthError(rec.video, "missing") from None
    except Exception as e:
        raise TruthError(rec.video, f"unreadable MATLAB file ({type(e).__name__}: {' '.join(str(e).split())})") \
            from None
    if "GT_ppg" not in mat:
        raise TruthError(rec.video, "no GT_ppg variable")
    ppg = np.asarray(mat["GT_ppg"], np.float64).ravel()
    n_frames = shapes.get("video", (0,))[0]
    video_end_s = (n_frames - 1) / FPS if n_frames else None
    return checked_truth(rec.video, np.arange(ppg.size) / FPS, ppg, video_end_s)


def frame_blocks(rec: Recording, local: dict[str, str], block: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    path = local[rec.video]
    try:
        video = scipy.io.loadmat(path, variable_names=("video",)).get("video")
    except Exception as e:
        raise VideoError(path, f"unreadable MATLAB file ({type(e).__name__}: {e})") from None
    if video is None:
        raise VideoError(path, "no video variable")
    if video.ndim != 4 or video.shape[-1] != 3 or video.shape[0] == 0:
        raise VideoError(path, f"video has shape {video.shape}, expected (T, H, W, 3)")
    for start in range(0, video.shape[0], block):
        part = video[start:start + block]
        frames = part if part.dtype == np.uint8 else np.clip(np.round(part * 255.0), 0, 255).astype(np.uint8)
        yield np.arange(start, start + len(part)) / FPS, np.ascontiguousarray(frames)


def _labels(mat: dict) -> dict:
    """JSON-able labels from loadmat's arrays: strings, ints, floats, booleans for 'True'/'False'."""
    labels = {}
    for name in LABELS:
        if name not in mat:
            continue
        value = np.asarray(mat[name]).ravel()
        if value.size == 0:
            continue
        item = value[0].item() if hasattr(value[0], "item") else value[0]
        if isinstance(item, str):
            item = {"True": True, "False": False}.get(item.strip(), item.strip())
        elif isinstance(item, float) and item.is_integer():
            item = int(item)
        labels["glasses" if name == "glasser" else name] = item
    return labels
