"""Layout `vitalvideo`: Vital Videos (Toye 2023), one JSON per participant and one video per take.

    ROOT/<GUID>.json      {"GUID": ..., "participant": {"age": ..., "gender": ..., "fitzpatrick": ...},
                           "location": ..., "scenarios": [{"scenario_settings": {...}, "recordings": {
                               "RGB": {"filename": "<GUID>_<k>.mp4", "timeseries": [[t_ms, frame_index], ...]},
                               "ppg": {"timeseries": [[t_ms, value], ...]},
                               "bp_sys": {"value": ...}, "bp_dia": {"value": ...}}}, ...]}
    ROOT/<GUID>_<k>.mp4   take k of the participant (the scenario whose RGB filename names it)

Files may sit in subfolders; a video's JSON is `<GUID>.json` beside it, and JSON files of other shapes
(the release's READ_ME.json) are ignored. The subject id is the GUID, the recording id the video's stem.
Listing reads each participant JSON once (small) for the metadata: every `participant` field, `location`,
the take `k`, `scenario_settings` and the blood pressure when present. A take listed in a JSON whose video
is absent (the release deleted unreadable ones) is listed with its problem.

Truth time: PPG and frame times share one millisecond clock, so t_s = (PPG t_ms - t_ms of the first
frame) / 1000, the first frame being the RGB entry with the lowest frame index. Repeated PPG timestamps
keep their first sample. Frames are the video's own (container timestamps).
"""
from __future__ import annotations

import json
import re
from typing import Iterator

import numpy as np

from transforms.datasets import (Recording, Truth, TruthError, checked_truth, read_bytes, root_path, uri_under,
                                 video_frame_blocks)

DATASET = "vitalvideo"
# what --input must hold, said when it holds none
LAYOUT = "ROOT/<GUID>.json beside ROOT/<GUID>_<k>.mp4"
TAKE = re.compile(r"(.+)_(\d+)\.mp4")


def list_recordings(root: str, fs) -> list[Recording]:
    base = root_path(fs, root)
    paths = fs.find(base)
    videos = {p: TAKE.fullmatch(p.rsplit("/", 1)[-1]) for p in paths if p.lower().endswith(".mp4")}
    jsons = [p for p in paths if p.endswith(".json")]
    found: dict[str, Recording] = {}

    participants = {}  # JSON path -> (participant JSON or None, problem)
    for path in jsons:
        uri = uri_under(root, base, path)
        try:
            data = json.loads(read_bytes(fs, uri).decode("utf-8"))
        except TruthError as e:
            participants[path] = (None, str(e))
            continue
        except (UnicodeDecodeError, ValueError) as e:
            participants[path] = (None, f"{uri}: unreadable JSON ({' '.join(str(e).split())})")
            continue
        if isinstance(data, dict) and isinstance(data.get("scenarios"), list):
            participants[path] = (data, None)
        else:  # READ_ME.json and the like: only a problem for a video that needs it
            participants[path] = (None, f"{uri}: no scenarios list (not a participant JSON)")

    for path, match in videos.items():
        if match is None:
            continue  # not a `<GUID>_<k>.mp4` take
        guid, take = match.groups()
        folder = path.rsplit("/", 1)[0]
        json_path = f"{folder}/{guid}.json"
        uri, json_uri = uri_under(root, base, path), uri_under(root, base, json_path)
        data, problem = participants.get(json_path, (None, f"{json_uri}: missing"))
        metadata = {"take": int(take)}
        if data is not None:
            scenario = _scenario(data, path.rsplit("/", 1)[-1])
            if scenario is None:
                problem = f"{json_uri}: no scenario names {path.rsplit('/', 1)[-1]}"
            else:
                metadata.update(_metadata(data, scenario))
        files = (uri, json_uri) if json_path in participants else (uri,)  # the JSON as soon as it exists
        found[uri] = Recording(DATASET, guid, f"{guid}_{take}", uri, files, metadata, problem)

    for json_path, (data, _) in participants.items():  # takes named in a JSON without their video
        if data is None:
            continue
        folder, json_uri = json_path.rsplit("/", 1)[0], uri_under(root, base, json_path)
        guid = json_path.rsplit("/", 1)[-1][:-5]
        for scenario in data["scenarios"]:
            name = _rgb(scenario).get("filename")
            match = TAKE.fullmatch(str(name))
            uri = uri_under(root, base, f"{folder}/{name}")
            if match is None or uri in found:
                continue
            metadata = {"take": int(match.group(2)), **_metadata(data, scenario)}
            found[uri] = Recording(DATASET, guid, f"{match.group(1)}_{match.group(2)}", uri, (json_uri,), metadata,
                                   f"{uri}: missing")
    return sorted(found.values(), key=lambda r: r.recording_id)


def read_truth(rec: Recording, fs) -> Truth:
    json_uri = next((f for f in rec.files if f.endswith(".json")), None)
    if json_uri is None:
        raise TruthError(rec.video.rsplit("/", 1)[0] + f"/{rec.subject_id}.json", "missing")
    try:
        data = json.loads(read_bytes(fs, json_uri).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise TruthError(json_uri, f"not JSON ({e})") from None
    name = rec.video.rsplit("/", 1)[-1]
    scenario = _scenario(data, name) if isinstance(data, dict) else None
    if scenario is None:
        raise TruthError(json_uri, f"no scenario names {name}")
    try:
        ppg = np.array(scenario["recordings"]["ppg"]["timeseries"], np.float64).reshape(-1, 2)
        frames = np.array(_rgb(scenario)["timeseries"], np.float64).reshape(-1, 2)
    except (KeyError, TypeError, ValueError) as e:
        raise TruthError(json_uri, f"{name}: no [t_ms, value] pairs in recordings.ppg / recordings.RGB "
                                   f"timeseries ({e!r})") from None
    if frames.size == 0:
        raise TruthError(json_uri, f"{name}: no RGB frame times to align the PPG with")
    first_ms = frames[np.argmin(frames[:, 1]), 0]  # the frame with the lowest index
    return checked_truth(json_uri, (ppg[:, 0] - first_ms) / 1000.0, ppg[:, 1],
                         (frames[:, 0].max() - first_ms) / 1000.0)


def frame_blocks(rec: Recording, local: dict[str, str], block: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    return video_frame_blocks(rec, local, block)


def _rgb(scenario) -> dict:
    try:
        rgb = scenario["recordings"]["RGB"]
    except (KeyError, TypeError):
        return {}
    return rgb if isinstance(rgb, dict) else {}


def _scenario(data: dict, video_name: str) -> dict | None:
    return next((s for s in data.get("scenarios", []) if _rgb(s).get("filename") == video_name), None)


def _metadata(data: dict, scenario: dict) -> dict:
    """Participant fields, location, scenario settings and blood pressure, as the JSON gives them."""
    participant = data.get("participant")
    metadata = dict(participant) if isinstance(participant, dict) else {}
    if "location" in data:
        metadata["location"] = data["location"]
    if "scenario_settings" in scenario:
        metadata["scenario_settings"] = scenario["scenario_settings"]
    recordings = scenario.get("recordings", {})
    for key in ("bp_sys", "bp_dia"):
        if isinstance(recordings.get(key), dict) and "value" in recordings[key]:
            metadata[key] = recordings[key]["value"]
    return metadata
