"""Layout `folder`: any videos and image-frame folders under a root, found recursively; no ground truth.

    ROOT/**/<name>.mp4|.avi|.mov|.mkv|.webm   one recording per video file
    ROOT/**/<dir>/                            one recording per folder holding image frames (.png, .jpg, ...)

The recording id is the path relative to the root (`visits/a/clip.mp4`, `visits/b/frames`), the subject id
the name of the folder it sits in (the recording id itself at the top level). Hidden files and folders
(leading '.') are skipped. Image folders carry no times: their frames are taken to be FOLDER_FPS apart,
which the metadata records. read_truth returns None.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from transforms.datasets import Recording, root_path, uri_under, video_frame_blocks
from transforms.resample import FPS
from transforms.video import IMAGE_SUFFIXES, iter_blocks

DATASET = "folder"
# what --input must hold, said when it holds none
LAYOUT = "ROOT/**/<name>.mp4 (or .avi, .mov, .mkv, .webm), or folders of image frames"
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
FOLDER_FPS = FPS  # assumed rate of image-frame folders: the model rate


def list_recordings(root: str, fs) -> list[Recording]:
    base = root_path(fs, root)
    recordings = {}
    for path in fs.find(base):
        relative = path[len(base):].lstrip("/")
        if any(part.startswith(".") for part in relative.split("/")):
            continue
        suffix = Path(path).suffix.lower()
        if suffix in VIDEO_SUFFIXES:
            recordings[relative] = _recording(root, base, path, {"kind": "video"})
        elif suffix in IMAGE_SUFFIXES:
            folder = path.rsplit("/", 1)[0]
            key = folder[len(base):].lstrip("/") or Path(base).name  # frames straight under the root
            if key not in recordings:
                recordings[key] = _recording(root, base, folder, {"kind": "image-folder", "fps_assumed": FOLDER_FPS})
    return sorted(recordings.values(), key=lambda r: r.recording_id)


def read_truth(rec: Recording, fs) -> None:
    return None


def frame_blocks(rec: Recording, local: dict[str, str], block: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    if rec.metadata.get("kind") == "image-folder":
        return iter_blocks(local[rec.video], block, fps=FOLDER_FPS)
    return video_frame_blocks(rec, local, block)


def _recording(root: str, base: str, path: str, metadata: dict) -> Recording:
    relative = path[len(base):].lstrip("/") or Path(base).name
    parts = relative.split("/")
    subject = parts[-2] if len(parts) > 1 else relative
    uri = uri_under(root, base, path) if path != base else root.rstrip("/")
    return Recording(DATASET, subject, relative, uri, (uri,), metadata)
