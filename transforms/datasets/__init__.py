"""Dataset adapters: one module per on-disk layout, each listing recordings and reading their truth.

Every adapter module (`transforms/datasets/<layout>.py`, layout name with '-' as '_') provides:

    list_recordings(root: str, fs: fsspec.AbstractFileSystem) -> list[Recording]
        Every recording under `root`, sorted by recording_id. Cheap: lists and stats files, reads no video.
        A recording whose files are incomplete (e.g. video without ground truth) is still listed, with
        `problem` set, so that it lands in the manifest as failed instead of vanishing.
    read_truth(rec: Recording, fs) -> Truth | None
        Ground-truth PPG at its own rate with its own timestamps; None for layouts without truth.
        Raises TruthError (file and reason) for missing, unreadable or too short ground truth.
    frame_blocks(rec: Recording, local: dict[str, str], block: int) -> Iterator[(timestamps_s (n,), frames (n, H, W, 3) uint8 RGB)]
        Decoded frames. `local` maps each of rec.files to a local path (the job copies remote files first).
        Layouts of plain video files use `video_frame_blocks`; frame folders (PURE) and arrays in .mat
        files (MMPD) read their own.

Adapters import only numpy, scipy, cv2, fsspec, pyarrow and the rest of transforms/: no engine.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from transforms.video import iter_blocks

LAYOUTS = ("ubfc-rppg", "pure", "mmpd", "vitalvideo", "rlap", "folder", "synthetic")


class TruthError(Exception):
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


def video_frame_blocks(rec: Recording, local: dict[str, str], block: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """frame_blocks for layouts whose frames are one video file (rec.video)."""
    return iter_blocks(local[rec.video], block)
