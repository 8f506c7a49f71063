"""Layout `synthetic`: what `pulsepipe synth` writes (transforms/synth.py).

    ROOT/cohort.json                                 not read (its recordings are the folders below)
    ROOT/<subject_id>/<recording_id>/video.mp4|.avi
    ROOT/<subject_id>/<recording_id>/ppg.csv         header `t_s,ppg`, t_s from 0 at the first frame
    ROOT/<subject_id>/<recording_id>/meta.json       ids, fps, n_frames, true mean HR, skin tone, nuisances

Every folder two levels down holding one of these files is a recording; its ids are the folder names.
Listing reads meta.json (small) for the metadata: METADATA_KEYS, the nuisances of RECORDING_KEYS and the
subject's `skin_tone` (0 light .. 1 dark) and `subject_hr_bpm`, and bands of tone and motion to group by
(`skin`, `motion`). read_truth checks that the PPG covers the n_frames / fps that meta.json states.
"""
from __future__ import annotations

import io
import json
import warnings
from typing import Iterator

import numpy as np

from transforms.datasets import (Recording, Truth, TruthError, checked_truth, read_bytes, root_path, uri_under,
                                 video_frame_blocks)

DATASET = "synthetic"
# what --input must hold, said when it holds none
LAYOUT = "ROOT/<subject_id>/<recording_id>/ holding video.mp4|avi, ppg.csv, meta.json"
PPG, META = "ppg.csv", "meta.json"
VIDEO_NAMES = ("video.mp4", "video.avi")
METADATA_KEYS = ("seed", "codec", "fps", "n_frames", "width", "height", "seconds", "ppg_rate_hz", "true_mean_hr_bpm")
MOTION_LARGE_PX = 2.5  # peak head translation from which the motion band is "large" (synth draws 1-4 px)
RECORDING_KEYS = ("target_hr_bpm", "pulse_amplitude", "motion_shift_px", "motion_scale", "light_drift",
                  "noise_sigma_dn")


def list_recordings(root: str, fs) -> list[Recording]:
    base = root_path(fs, root)
    folders: dict[str, set[str]] = {}
    for path in fs.glob(f"{base}/*/*/*"):
        folder, name = path.rstrip("/").rsplit("/", 1)
        folders.setdefault(folder, set()).add(name)
    recordings = []
    for folder, names in folders.items():
        video = next((n for n in VIDEO_NAMES if n in names), None)
        if video is None and PPG not in names and META not in names:
            continue
        subject, name = folder.rsplit("/", 2)[-2:]
        uri = uri_under(root, base, folder)
        missing = [n for n, present in ((VIDEO_NAMES[0], video), (PPG, PPG in names), (META, META in names))
                   if not present]
        problem = f"{uri}/{missing[0]}: missing" + (f" (and {', '.join(missing[1:])})" if missing[1:] else "") \
            if missing else None
        metadata = {}
        if META in names:
            try:
                metadata = _metadata(json.loads(read_bytes(fs, f"{uri}/{META}").decode("utf-8")))
            except (TruthError, UnicodeDecodeError, ValueError, AttributeError) as e:
                problem = problem or f"{uri}/{META}: unreadable ({' '.join(str(e).split())})"
        files = tuple(f"{uri}/{n}" for n in (video, PPG, META) if n in names)
        recordings.append(Recording(DATASET, subject, name, f"{uri}/{video or VIDEO_NAMES[0]}", files, metadata,
                                    problem))
    return sorted(recordings, key=lambda r: r.recording_id)


def read_truth(rec: Recording, fs) -> Truth:
    ppg_uri = next((f for f in rec.files if f.endswith(f"/{PPG}")), None)
    if ppg_uri is None:
        raise TruthError(rec.video.rsplit("/", 1)[0] + f"/{PPG}", "missing")
    raw = read_bytes(fs, ppg_uri)
    try:
        with warnings.catch_warnings():  # an empty table is reported below, not warned about
            warnings.simplefilter("ignore", UserWarning)
            table = np.loadtxt(io.BytesIO(raw), delimiter=",", skiprows=1, ndmin=2, encoding="ascii")
    except (UnicodeDecodeError, ValueError) as e:
        raise TruthError(ppg_uri, f"not `t_s,ppg` rows ({' '.join(str(e).split())})") from None
    if table.size == 0:
        raise TruthError(ppg_uri, "too short: no PPG rows")
    if table.shape[1] != 2:
        raise TruthError(ppg_uri, f"{table.shape[1]} columns, expected 2 (t_s, ppg)")
    n_frames, fps = rec.metadata.get("n_frames"), rec.metadata.get("fps")
    video_end_s = (n_frames - 1) / fps if n_frames and fps else None
    return checked_truth(ppg_uri, table[:, 0], table[:, 1], video_end_s)


def frame_blocks(rec: Recording, local: dict[str, str], block: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    return video_frame_blocks(rec, local, block)


def _metadata(meta: dict) -> dict:
    """Flat facts of meta.json: its scalars of METADATA_KEYS, the subject's skin tone and HR, the nuisances,
    and the tone and head motion named in bands (`skin` light / medium / dark by thirds of the tone,
    `motion` small below 2.5 px, large from there), the groups evaluation breaks its metrics down by."""
    subject, recording = meta.get("subject", {}), meta.get("recording", {})
    out = {k: meta[k] for k in METADATA_KEYS if k in meta}
    if "skin_tone" in subject:
        out["skin_tone"] = subject["skin_tone"]  # 0 light .. 1 dark
        out["skin"] = ("light", "medium", "dark")[min(int(subject["skin_tone"] * 3), 2)]
    if "hr_bpm" in subject:
        out["subject_hr_bpm"] = subject["hr_bpm"]
    out.update({k: recording[k] for k in RECORDING_KEYS if k in recording})
    if "motion_shift_px" in recording:
        out["motion"] = "large" if recording["motion_shift_px"] >= MOTION_LARGE_PX else "small"
    return out
