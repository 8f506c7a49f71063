"""Dataset adapters: one module per on-disk layout, each listing recordings and reading their truth.

Every adapter module (`transforms/datasets/<layout>.py`, layout name with '-' as '_') provides:

    DATASET, LAYOUT
        The dataset's name in shards and manifests; the layout in one line, for the error when a root
        holds no recording.
    list_recordings(root: str, fs: fsspec.AbstractFileSystem) -> list[Recording]
        Every recording under `root`, sorted by recording_id. Cheap: lists and stats files, reads no video.
        A recording whose files are incomplete (e.g. video without ground truth) is still listed, with
        `problem` set, so that it lands in the manifest as failed instead of vanishing.
    read_truth(rec: Recording, fs) -> Truth | None
        Ground-truth PPG at its own rate with its own timestamps; None for layouts without truth.
        Raises TruthError (file and reason) for missing, unreadable or too short ground truth.
    frame_blocks(rec: Recording, local: dict[str, str], block: int) -> Iterator[(timestamps_s (n,), frames (n, H, W, 3) uint8 RGB)]
        Decoded frames (an array, or the list of lazily converted frames of `iter_blocks(lazy=True)`).
        `local` maps each of rec.files to a local path (the job copies remote files first).
        Layouts of plain video files use `video_frame_blocks`; frame folders (PURE) and arrays in .mat
        files (MMPD) read their own.

Adapters import only numpy, scipy, cv2, fsspec, pyarrow and the rest of transforms/: no engine.
The helpers at the end (`root_path`, `uri_under`, `read_bytes`, `checked_truth`) are what every adapter
shares: one way to resolve a root, name a file, read a truth file and validate a truth.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from transforms.errors import ItemFailed
from transforms.video import iter_blocks

LAYOUTS = ("ubfc-rppg", "pure", "mmpd", "vitalvideo", "rlap", "folder", "synthetic")


class TruthError(ItemFailed):
    """Ground truth that is missing, unreadable or too short; str is 'PATH: reason'."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


@dataclass(frozen=True)
class Recording:
    """One source recording, as listed by an adapter. Plain data: it crosses process boundaries."""

    dataset: str  # layout name, e.g. "ubfc-rppg"
    subject_id: str
    recording_id: str  # unique within the dataset root
    video: str  # URI of the video file, frame folder or array file that holds the frames
    files: tuple[str, ...]  # every URI whose change must redo the recording (video, truth, timestamps)
    metadata: dict = field(default_factory=dict)  # JSON-able facts from the layout (skin type, motion, ...)
    problem: str | None = None  # set when listing already shows the recording cannot be processed

    def __hash__(self) -> int:
        return hash((self.dataset, self.recording_id))


@dataclass(frozen=True)
class Truth:
    """Ground-truth PPG at its own rate: timestamps (n,) seconds from the video's first frame, values (n,)."""

    t_s: np.ndarray
    ppg: np.ndarray


def adapter(layout: str):
    """The adapter module of a layout name."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    return importlib.import_module(f"transforms.datasets.{layout.replace('-', '_')}")


TRUTH_EDGE_TOLERANCE_S = 1.0  # truth may start or end this far inside the video (sensor start/stop lag)


def root_path(fs, root: str) -> str:
    """`root` as `fs` lists paths (protocol stripped, no trailing slash); FileNotFoundError if not a folder."""
    path = fs._strip_protocol(root).rstrip("/") or "/"
    if not fs.isdir(path):
        raise FileNotFoundError(f"{root}: no such dataset folder")
    return path


def uri_under(root: str, base: str, path: str) -> str:
    """URI of `path` (as `fs` lists it, under `base` = root_path(root)) in the form `root` was given."""
    return root.rstrip("/") + "/" + path[len(base):].lstrip("/")


def read_bytes(fs, uri: str) -> bytes:
    """A truth file's bytes; TruthError when it is missing or cannot be read."""
    try:
        with fs.open(uri, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise TruthError(uri, "missing") from None
    except OSError as e:
        raise TruthError(uri, f"unreadable ({' '.join(str(e).split())})") from None


def checked_truth(path: str, t_s, ppg, video_end_s: float | None = None) -> Truth:
    """A Truth from raw samples, or TruthError naming `path`.

    Samples are put in time order; of samples sharing a timestamp the first is kept, and samples with a
    non-finite value are dropped (sensors log gaps that way). `video_end_s`, the last frame's time when the
    layout states it, is checked: the truth must cover the video within TRUTH_EDGE_TOLERANCE_S.
    """
    t = np.asarray(t_s, np.float64).ravel()
    v = np.asarray(ppg, np.float64).ravel()
    if t.shape != v.shape:
        raise TruthError(path, f"{t.size} timestamps for {v.size} PPG samples")
    if not np.isfinite(t).all():
        raise TruthError(path, "non-finite timestamps")
    order = np.argsort(t, kind="stable")
    t, v = t[order], v[order]
    keep = np.isfinite(v) & np.r_[True, np.diff(t) > 0]
    t, v = t[keep], v[keep]
    if t.size < 2:
        raise TruthError(path, f"too short: {t.size} usable PPG sample(s)")
    if video_end_s is not None:
        if t[0] > TRUTH_EDGE_TOLERANCE_S:
            raise TruthError(path, f"truth starts {t[0]:.2f} s after the first frame")
        if t[-1] < video_end_s - TRUTH_EDGE_TOLERANCE_S:
            raise TruthError(path, f"too short: truth ends at {t[-1]:.2f} s, the video at {video_end_s:.2f} s")
    return Truth(t, v)


def video_frame_blocks(rec: Recording, local: dict[str, str], block: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """frame_blocks for layouts whose frames are one video file (rec.video)."""
    return iter_blocks(local[rec.video], block, lazy=True)
