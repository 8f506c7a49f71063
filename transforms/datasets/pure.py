"""Layout `pure`: PURE (Stricker et al. 2014), PNG frames that carry their own capture times.

    ROOT/NN-MM/Image<t_ns>.png   one PNG per frame, named by its capture time in ns (about 30 fps)
    ROOT/NN-MM.json              "/FullPackage": [{"Timestamp": t_ns, "Value": {"waveform": v, "pulseRate": ...,
                                 "o2saturation": ..., "signalStrength": ...}}, ...] at 60 Hz, and
                                 "/Image": [{"Timestamp": t_ns}, ...], one entry per frame

The nesting of the published archives (and of rPPG-Toolbox's docs), ROOT/NN-MM/NN-MM/ with
ROOT/NN-MM/NN-MM.json, is read too. NN is the subject (01-10), MM the task (TASKS); the recording id is
`NN-MM`, the subject id `NN`.

Truth time: PPG and frames share the capture clock, so t_s = (PPG Timestamp - first /Image Timestamp) / 1e9
(the frame names when /Image is absent). Frames come out with their own times from the file names (from
/Image when the names carry none), relative to the first frame.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from transforms.datasets import Recording, Truth, TruthError, checked_truth, read_bytes, root_path, uri_under
from transforms.video import IMAGE_SUFFIXES, VideoError, iter_blocks

DATASET = "pure"
# what --input must hold, said when it holds none
LAYOUT = "ROOT/NN-MM/ (PNG frames) with ROOT/NN-MM.json"
SESSION = re.compile(r"(\d+)-(\d+)")
FRAME_NAME = re.compile(r"Image(\d+)\.png")
TASKS = {  # the six setups of the PURE paper, by task code MM
    "01": "steady",
    "02": "talking",
    "03": "slow translation",
    "04": "fast translation",
    "05": "small rotation",
    "06": "medium rotation",
}


def list_recordings(root: str, fs) -> list[Recording]:
    base = root_path(fs, root)
    entries = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e["type"] for e in fs.ls(base, detail=True)}
    sessions = {n for n, kind in entries.items() if kind == "directory" and SESSION.fullmatch(n)}
    sessions |= {n[:-5] for n in entries if n.endswith(".json") and SESSION.fullmatch(n[:-5])}
    recordings = []
    for name in sorted(sessions):
        subject, task = SESSION.fullmatch(name).groups()
        frames, truth = name, f"{name}.json"
        if entries.get(name) == "directory" and truth not in entries and fs.isdir(f"{base}/{name}/{name}"):
            frames, truth = f"{name}/{name}", f"{name}/{name}.json"  # nested, as the archives unpack
        frames_uri, truth_uri = uri_under(root, base, f"{base}/{frames}"), uri_under(root, base, f"{base}/{truth}")
        has_frames = entries.get(name) == "directory"
        has_truth = truth in entries if frames == name else fs.exists(f"{base}/{truth}")
        problem = None
        if not has_frames:
            problem = f"{frames_uri}: missing frame folder"
        elif not has_truth and not fs.ls(f"{base}/{frames}", detail=False):
            problem = f"{frames_uri}: empty folder, no frames and no {name}.json (as 06-02 in the public release)"
        elif not has_truth:
            problem = f"{truth_uri}: missing"
        files = tuple(u for u, present in ((frames_uri, has_frames), (truth_uri, has_truth)) if present)
        metadata = {"task": task, "task_name": TASKS.get(task, "unknown")}
        recordings.append(Recording(DATASET, subject, name, frames_uri, files, metadata, problem))
    return sorted(recordings, key=lambda r: r.recording_id)


def read_truth(rec: Recording, fs) -> Truth:
    truth_uri = _truth_uri(rec)
    package, image_ns = _load_json(truth_uri, read_bytes(fs, truth_uri))
    if image_ns is None:  # no /Image: the frame names give the capture times
        image_ns = _names_ns([p.rsplit("/", 1)[-1] for p in fs.ls(rec.video, detail=False)])
    if image_ns is None or image_ns.size == 0:
        raise TruthError(truth_uri, "no frame times (no /Image entries, no Image<ns>.png frames)")
    try:
        ppg_ns = np.array([p["Timestamp"] for p in package], np.int64)
        ppg = np.array([p["Value"]["waveform"] for p in package], np.float64)
    except (KeyError, TypeError, ValueError) as e:
        raise TruthError(truth_uri, f"/FullPackage entry without a numeric Timestamp and Value.waveform ({e!r})") \
            from None
    first = image_ns.min()
    # Subtract in int64 first: ns since 1970 exceed float64's exact integers.
    return checked_truth(truth_uri, (ppg_ns - first) / 1e9, ppg, (image_ns.max() - first) / 1e9)


def frame_blocks(rec: Recording, local: dict[str, str], block: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    folder = Path(local[rec.video])
    if not folder.is_dir():
        raise VideoError(folder, "no such frame folder")
    names = [p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    times_ns = _names_ns(names)
    if times_ns is None:  # frames not named by time: /Image lists their times in frame order
        truth_uri = _truth_uri(rec)
        try:
            _, times_ns = _load_json(truth_uri, Path(local[truth_uri]).read_bytes())
        except (OSError, TruthError) as e:
            raise VideoError(folder, f"frame names carry no times and {truth_uri} gives none ({e})") from None
        if times_ns is None:
            raise VideoError(folder, f"frame names carry no times and {truth_uri} has no /Image entries")
    else:
        times_ns = np.sort(times_ns)  # the order iter_blocks reads them: natural order = numeric order here
    return iter_blocks(folder, block, timestamps=(times_ns - times_ns[0]) / 1e9)


def _truth_uri(rec: Recording) -> str:
    name = rec.recording_id
    truth = next((f for f in rec.files if f.endswith(f"/{name}.json")), None)
    if truth is None:  # listed with a problem: name the file that should be there
        truth = rec.video.rsplit("/", 1)[0] + f"/{name}.json"
        raise TruthError(truth, "missing")
    return truth


def _load_json(uri: str, raw: bytes) -> tuple[list, np.ndarray | None]:
    """(/FullPackage entries, /Image times in ns or None) of a PURE JSON file."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise TruthError(uri, f"not JSON ({e})") from None
    package = data.get("/FullPackage") if isinstance(data, dict) else None
    if not isinstance(package, list):
        raise TruthError(uri, "no /FullPackage list")
    images = data.get("/Image")
    try:
        image_ns = np.array([i["Timestamp"] for i in images], np.int64) if images else None
    except (KeyError, TypeError, ValueError):
        raise TruthError(uri, "/Image entry without a numeric Timestamp") from None
    return package, image_ns


def _names_ns(names: list[str]) -> np.ndarray | None:
    """Capture times (ns) from `Image<t_ns>.png` names, or None unless every image is named that way."""
    images = [n for n in names if Path(n).suffix.lower() in IMAGE_SUFFIXES]
    matches = [FRAME_NAME.fullmatch(n) for n in images]
    if not images or not all(matches):
        return None
    return np.array([int(m.group(1)) for m in matches], np.int64)
