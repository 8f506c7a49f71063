"""Layout `rlap`: RLAP (Wang et al. 2023), recorded with PhysRecorder: one folder per participant and task.

    ROOT/p<NNN>/<task>/video_*.avi|mp4        the frames (which file: VIDEO_PREFERENCE)
    ROOT/p<NNN>/<task>/pictures_ZIP_RAW_RGB/   or lossless PNG frames 00000000.png, 00000001.png, ...
    ROOT/p<NNN>/<task>/BVP.csv                 header `timestamp,bvp`: UNIX time (s), oximeter value (~20 Hz)
    ROOT/p<NNN>/<task>/frames_timestamp.csv    header `frame,timestamp`: frame index, UNIX time (s)
    (info.txt and missed_frames.csv are not read.)

Column names as in PhysRecorder's published example recording (Example/v01); columns are found by name,
so their order does not matter. Tasks are R1-R4, E1-E6, T1-T3 (TASKS); the subject id is `p<NNN>`, the
recording id `p<NNN>/<task>`. The metadata holds the task, its description and the frame source used.

Truth time: both CSVs share the recording PC's clock, so t_s = BVP timestamp - the first frame's timestamp.
Frames carry the times of frames_timestamp.csv too (relative to the first frame), not the container's
nominal rate: a webcam's frame intervals wander, and these are the times the BVP was logged against.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator

import numpy as np

from transforms.datasets import Recording, Truth, TruthError, checked_truth, read_bytes, root_path, uri_under
from transforms.video import VideoError, iter_blocks

DATASET = "rlap"
# what --input must hold, said when it holds none
LAYOUT = "ROOT/p<NNN>/<task>/ holding video_*.avi|mp4 or pictures_ZIP_RAW_RGB/, BVP.csv, frames_timestamp.csv"
BVP, FRAME_TIMES, PICTURES = "BVP.csv", "frames_timestamp.csv", "pictures_ZIP_RAW_RGB"
# Lossless sources first: the pulse is a change of a few grey levels that lossy codecs erase. The names
# are those PhysRecorder writes for each codec (raw RGBA, raw I420, FFV1, PNG frames, H.264, MJPG).
VIDEO_PREFERENCE = ("video_RAW_RGBA.avi", "video_RAW_YUV420.avi", "video_ZIP_RAW_BGRA.avi", PICTURES,
                    "video_ZIP_H264.mp4", "video_ZIP_H264.avi", "video_ZIP_MJPG.avi")
VIDEO_SUFFIXES = (".avi", ".mp4", ".mkv", ".mov")
TASKS = {  # the experiment procedure of the RLAP README
    "R1": "relaxed", "R2": "relaxed (dark)", "R3": "play a game", "R4": "read an article",
    "E1": "watch natural sceneries", "E2": "watch a puzzle game", "E3": "watch a comedy",
    "E4": "watch an illusion picture", "E5": "watch an academic paper", "E6": "watch yawn videos",
    "T1": "video-based learning", "T2": "textbook-based learning", "T3": "watch a public class",
}


def list_recordings(root: str, fs) -> list[Recording]:
    base = root_path(fs, root)
    folders: dict[str, set[str]] = {}
    for path in fs.glob(f"{base}/*/*/*"):  # one listing of every task folder's entries
        folder, name = path.rstrip("/").rsplit("/", 1)
        folders.setdefault(folder, set()).add(name)
    recordings = []
    for folder, names in folders.items():
        source = next((n for n in VIDEO_PREFERENCE if n in names), None)
        source = source or next((n for n in sorted(names) if n.lower().endswith(VIDEO_SUFFIXES)), None)
        if source is None and BVP not in names:
            continue  # not a task folder
        subject, task = folder.rsplit("/", 2)[-2:]
        uri = uri_under(root, base, folder)
        video = f"{uri}/{source or VIDEO_PREFERENCE[-1]}"
        missing = [n for n in (BVP, FRAME_TIMES) if n not in names]
        problem = None
        if source is None:
            problem = f"{uri}: no video (video_*.avi|mp4 or {PICTURES}/)"
        elif missing:
            problem = f"{uri}/{missing[0]}: missing" + (f" (and {missing[1]})" if len(missing) > 1 else "")
        files = tuple(f"{uri}/{n}" for n in (source, BVP, FRAME_TIMES) if n in names)
        metadata = {"task": task, "task_name": TASKS.get(task, "unknown"), "frame_source": source}
        recordings.append(Recording(DATASET, subject, f"{subject}/{task}", video, files, metadata, problem))
    return sorted(recordings, key=lambda r: r.recording_id)


def read_truth(rec: Recording, fs) -> Truth:
    bvp_uri, times_uri = _file(rec, BVP), _file(rec, FRAME_TIMES)
    [frame_s] = _columns(times_uri, read_bytes(fs, times_uri), "timestamp")
    bvp_s, bvp = _columns(bvp_uri, read_bytes(fs, bvp_uri), "timestamp", "bvp")
    if frame_s.size == 0:
        raise TruthError(times_uri, "no frame timestamps")
    return checked_truth(bvp_uri, bvp_s - frame_s[0], bvp, frame_s[-1] - frame_s[0])


def frame_blocks(rec: Recording, local: dict[str, str], block: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    times_uri = _file(rec, FRAME_TIMES)
    try:
        [times] = _columns(times_uri, Path(local[times_uri]).read_bytes(), "timestamp")
    except (OSError, TruthError) as e:
        raise VideoError(local.get(times_uri, times_uri), f"no frame times ({e})") from None
    times = times - times[0] if times.size else times
    source = Path(local[rec.video])
    if source.is_dir():
        yield from iter_blocks(source, block, timestamps=times)
        return
    done = 0
    for _, frames in iter_blocks(source, block, lazy=True):
        if done + len(frames) > times.size:
            raise VideoError(source, f"more frames than the {times.size} rows of {FRAME_TIMES}")
        yield times[done:done + len(frames)], frames
        done += len(frames)
    if done < times.size:
        raise VideoError(source, f"{done} frames decoded for {times.size} rows of {FRAME_TIMES}")


def _file(rec: Recording, name: str) -> str:
    uri = next((f for f in rec.files if f.endswith(f"/{name}")), None)
    if uri is None:
        raise TruthError(rec.video.rsplit("/", 1)[0] + f"/{name}", "missing")
    return uri


def _columns(uri: str, raw: bytes, *columns: str) -> list[np.ndarray]:
    """Named columns (case-insensitive) of a CSV with a header row, as float64 arrays."""
    try:
        table = np.genfromtxt(io.BytesIO(raw), delimiter=",", names=True, dtype=np.float64, encoding="ascii")
    except (UnicodeDecodeError, ValueError) as e:
        raise TruthError(uri, f"not a CSV of numbers with a header row ({' '.join(str(e).split())})") from None
    header = table.dtype.names or ()
    by_name = {n.lower(): n for n in header}
    out = []
    for column in columns:
        if column not in by_name:
            raise TruthError(uri, f"no '{column}' column (header: {', '.join(header) or 'none'})")
        out.append(np.atleast_1d(table[by_name[column]]).astype(np.float64))
    return out
