"""Layout `ubfc-rppg`: UBFC-rPPG as published (Bobbia et al. 2017), both of its ground-truth formats.

    ROOT/<subject>/vid.avi
    ROOT/<subject>/ground_truth.txt   DATASET_2: three lines of whitespace-separated floats, one value per
                                      PPG sample: PPG, HR (BPM), time (s)
    ROOT/<subject>/gtdump.xmp         DATASET_1 instead: CSV rows of time (ms), HR, SpO2, PPG

Every immediate subfolder holding one of these files is one recording, its folder name the recording id.
Some copies of DATASET_1 name the video otherwise (`vid-12.avi`, `vid_5gt.avi`): without vid.avi, the
folder's only .avi is the video. The subject id is the folder name, except in DATASET_1, whose folders are
`<N>-gt` (subject N) and `after-exercise` (subject 10 again, after exercise; a split must keep the two
together). Other files at the top (`cohort.json` of `pulsepipe synth`) are ignored.

Truth time: the file's times, in seconds from the first frame, as the dataset authors' own reader takes
them. read_truth reads the frame count and rate from the video's header (no decoding) to check that the
truth covers the video.
"""
from __future__ import annotations

import io
from typing import Iterator

import av
import numpy as np

from transforms.datasets import (Recording, Truth, TruthError, checked_truth, read_bytes, root_path, uri_under,
                                 video_frame_blocks)

DATASET = "ubfc-rppg"
# what --input must hold, said when it holds none
LAYOUT = "ROOT/<subject>/ holding vid.avi and ground_truth.txt (DATASET_2) or gtdump.xmp (DATASET_1)"
VIDEO = "vid.avi"
TRUTH_FILES = ("ground_truth.txt", "gtdump.xmp")  # DATASET_2 first: when both exist it is the one read


def list_recordings(root: str, fs) -> list[Recording]:
    base = root_path(fs, root)
    recordings = []
    for entry in fs.ls(base, detail=True):
        if entry["type"] != "directory":
            continue
        folder = entry["name"].rstrip("/")
        names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)}
        truth = next((n for n in TRUTH_FILES if n in names), None)
        if VIDEO not in names and truth is None:
            continue  # not a recording folder
        name = folder.rsplit("/", 1)[-1]
        uri = uri_under(root, base, folder)
        videos = [VIDEO] if VIDEO in names else sorted(n for n in names if n.lower().endswith(".avi"))
        video = f"{uri}/{videos[0] if len(videos) == 1 else VIDEO}"
        problem = None
        if not videos:
            problem = f"{video}: missing"
        elif len(videos) > 1:
            problem = f"{uri}: {len(videos)} videos, none named {VIDEO} ({', '.join(videos)}): which is the recording?"
        elif truth is None:
            problem = f"{uri}/{TRUTH_FILES[0]}: missing (no {TRUTH_FILES[1]} either)"
        files = tuple(f"{uri}/{n}" for n in (videos[0] if len(videos) == 1 else None, truth) if n in names)
        metadata = {"ground_truth_format": {"ground_truth.txt": "DATASET_2", "gtdump.xmp": "DATASET_1"}.get(truth)}
        recordings.append(Recording(DATASET, subject_of(name), name, video, files, metadata, problem))
    return sorted(recordings, key=lambda r: r.recording_id)


def read_truth(rec: Recording, fs) -> Truth:
    truth_uri = next((f for f in rec.files if f.rsplit("/", 1)[-1] in TRUTH_FILES), None)
    if truth_uri is None:
        raise TruthError(rec.video.rsplit("/", 1)[0] + "/" + TRUTH_FILES[0], "missing")
    raw = read_bytes(fs, truth_uri)
    if truth_uri.endswith(".xmp"):
        time_s, ppg = _parse_gtdump(truth_uri, raw)
    else:
        time_s, ppg = _parse_ground_truth_txt(truth_uri, raw)
    return checked_truth(truth_uri, time_s, ppg, _video_end_s(fs, rec.video))


def subject_of(folder: str) -> str:
    """The subject of a recording folder: `5-gt` -> `5`, `after-exercise` -> `10`, others as named."""
    if folder == "after-exercise":
        return "10"
    return folder.removesuffix("-gt")


def frame_blocks(rec: Recording, local: dict[str, str], block: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    return video_frame_blocks(rec, local, block)


def _parse_ground_truth_txt(uri: str, raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(time_s, ppg) from DATASET_2's three lines: PPG, HR, time."""
    try:
        lines = [np.array(line.split(), np.float64) for line in raw.decode("ascii").splitlines() if line.strip()]
    except (UnicodeDecodeError, ValueError) as e:
        raise TruthError(uri, f"not three lines of numbers ({' '.join(str(e).split())})") from None
    if len(lines) < 3:
        raise TruthError(uri, f"{len(lines)} line(s) of numbers, expected 3 (PPG, HR, time in s)")
    ppg, _, time_s = lines[:3]
    if ppg.size != time_s.size or ppg.size == 0:
        raise TruthError(uri, f"{ppg.size} PPG values for {time_s.size} timestamps")
    return time_s, ppg


def _parse_gtdump(uri: str, raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(time_s, ppg) from DATASET_1's CSV rows: time (ms), HR, SpO2, PPG."""
    try:
        rows = np.loadtxt(io.StringIO(raw.decode("ascii")), delimiter=",", ndmin=2)
    except (UnicodeDecodeError, ValueError) as e:
        raise TruthError(uri, f"not CSV rows of numbers ({' '.join(str(e).split())})") from None
    if rows.shape[1] < 4 or rows.shape[0] == 0:
        raise TruthError(uri, f"{rows.shape[1]} column(s), expected 4 (time in ms, HR, SpO2, PPG)")
    return rows[:, 0] / 1000.0, rows[:, 3]


def _video_end_s(fs, video_uri: str) -> float | None:
    """Time of the last frame from the video header (frame count / rate); None when the header is unreadable.

    An unreadable video is reported when its frames are decoded, not as a truth problem.
    """
    try:
        with fs.open(video_uri, "rb") as f, av.open(f) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or 0)
            if stream.frames and rate:
                return (stream.frames - 1) / rate
            if stream.duration is not None and rate:
                return float(stream.duration * stream.time_base) - 1 / rate
    except (OSError, IndexError, av.FFmpegError):
        pass
    return None
