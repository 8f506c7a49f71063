"""Tiny datasets in the exact on-disk layouts that transforms/datasets reads, with what each one holds.

Each `write_<layout>(root, broken=None)` writes three or four recordings of SECONDS of synthetic face video
(transforms.synth: the astronaut photo with a pulse, SIZE pixels, lossless so frames compare exactly) and
their PPG, then returns {recording_id: Expected}: what an adapter must report for that recording.

`broken` maps recording ids to a damage done while writing, recorded in Expected.broken with the damaged
file:
    "missing-truth"     the truth file is absent (MMPD: the GT_ppg variable)
    "short-truth"       the truth stops an eighth of the way into the video
    "unreadable-truth"  the truth file holds bytes that are not its format
Layout facts these follow (file names, keys, columns) are the adapters' docstrings.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import scipy.io

from transforms import synth

SECONDS = 2.0
FPS = 30.0
SIZE = (160, 120)  # (W, H)
GARBAGE = b"\x89\x00\xffnot this format\x00\n\xfe"
KINDS = ("missing-truth", "short-truth", "unreadable-truth")


@dataclass(frozen=True)
class Expected:
    """What an adapter must report for one written recording."""

    subject_id: str
    files: tuple[str, ...]  # paths relative to the root that Recording.files must hold
    frame_t_s: np.ndarray  # frame times frame_blocks yields, s from the first frame
    frames: np.ndarray  # (n, H, W, 3) uint8 the frames decode to (every source here is lossless)
    truth_t_s: np.ndarray | None = None  # what read_truth returns (None: no truth in the layout)
    truth_ppg: np.ndarray | None = None
    metadata: dict = field(default_factory=dict)  # items Recording.metadata must hold
    broken: tuple[str, str] | None = None  # (kind, path relative to the root of the damaged file)
    time_atol: float = 1e-6  # containers that keep times in ms (Matroska) need 1e-3


@dataclass(frozen=True)
class Clip:
    """One rendered recording: its spec, beats and frames at k / FPS."""

    spec: synth.RecordingSpec
    onsets: np.ndarray
    frames: np.ndarray  # (n, H, W, 3) uint8

    def ppg(self, t_s: np.ndarray) -> np.ndarray:
        """The ground-truth PPG at times `t_s` (s from the first frame)."""
        return synth.ppg_waveform(np.asarray(t_s, np.float64), self.onsets, self.spec.dicrotic_ratio)


@functools.lru_cache(maxsize=1)
def _scene() -> synth.FaceScene:
    return synth.face_scene()


def clips(n: int, seed: int, size: tuple[int, int] = SIZE, seconds: float = SECONDS) -> list[Clip]:
    out = []
    for spec in synth.recording_specs(n, seconds, seed, fps=FPS, size=size):
        onsets = synth.beat_onsets(spec)
        out.append(Clip(spec, onsets, np.stack(list(synth.render_frames(spec, _scene(), onsets)))))
    return out


def write_video(path: Path, frames: np.ndarray, codec: str = "h264-lossless") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    synth.write_video(path, iter(frames), FPS, synth.parse_codec(codec))


def write_pngs(folder: Path, frames: np.ndarray, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for frame, name in zip(frames, names):
        cv2.imwrite(str(folder / name), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))


def _kept(kind: str | None, n: int) -> int:
    """How many truth samples to write: an eighth of them for a short truth (beyond the adapters' tolerance)."""
    return n // 8 if kind == "short-truth" else n


def _write_truth(path: Path, data: bytes | str, kind: str | None) -> None:
    """Write a truth file, or damage it as `kind` says."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "missing-truth":
        return
    if kind == "unreadable-truth":
        data = GARBAGE
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def _frame_times() -> np.ndarray:
    return np.arange(int(round(SECONDS * FPS))) / FPS


# ---- ubfc-rppg ----

def write_ubfc_rppg(root: Path, broken: dict[str, str] | None = None) -> dict[str, Expected]:
    """subject1, subject2 as `pulsepipe synth --layout ubfc-rppg` writes them (DATASET_2), subject3 DATASET_1."""
    broken, root = broken or {}, Path(root)
    synth.write_cohort(root, 2, SECONDS, 11, layout="ubfc-rppg", size=SIZE)
    expected = {}
    for clip in clips(2, 11):
        name = f"subject{clip.spec.subject.index + 1}"
        truth = synth.ground_truth(clip.spec, clip.onsets)
        kind = broken.get(name)
        keep = _kept(kind, truth.t_s.size)
        if kind:  # rewrite synth's file, damaged
            lines = (" ".join(f"{v:.7e}" for v in values[:keep]) for values in (truth.ppg, truth.hr_bpm, truth.t_s))
            (root / name / "ground_truth.txt").unlink()
            _write_truth(root / name / "ground_truth.txt", "\n".join(lines) + "\n", kind)
        expected[name] = Expected(name, (f"{name}/vid.avi", f"{name}/ground_truth.txt"), _frame_times(), clip.frames,
                                  truth.t_s[:keep], truth.ppg[:keep], {"ground_truth_format": "DATASET_2"},
                                  (kind, f"{name}/ground_truth.txt") if kind else None)
    # DATASET_1: gtdump.xmp rows of time (ms from the first frame), HR, SpO2, PPG at 60 Hz, starting at 11 ms
    # as real files do
    clip, name = clips(1, 12)[0], "subject3"
    kind = broken.get(name)
    write_video(root / name / "vid.avi", clip.frames, "ffv1")
    t = np.arange(_kept(kind, int(SECONDS * 60))) / 60.0
    ppg = np.round(clip.ppg(t) * 100.0)
    rows = "".join(f"{11 + round(s * 1000)},72,98,{int(v)}\n" for s, v in zip(t, ppg))
    _write_truth(root / name / "gtdump.xmp", rows, kind)
    t_ms = np.array([11 + round(s * 1000) for s in t], np.float64)
    expected[name] = Expected(name, (f"{name}/vid.avi", f"{name}/gtdump.xmp"), _frame_times(), clip.frames,
                              t_ms / 1000, ppg, {"ground_truth_format": "DATASET_1"},
                              (kind, f"{name}/gtdump.xmp") if kind else None)
    return expected


# ---- pure ----

PURE_T0_NS = 1392643993642815000  # capture clock of the first frame (ns since 1970), as in PURE's names


def write_pure(root: Path, broken: dict[str, str] | None = None, nested: bool = False) -> dict[str, Expected]:
    """01-01, 02-03, 03-06: PNG frames named by capture time (jittered about 30 fps) and 60 Hz PPG JSON."""
    broken, root = broken or {}, Path(root)
    rng = np.random.default_rng(5)
    expected = {}
    for clip, name in zip(clips(3, 21), ("01-01", "02-03", "03-06")):
        kind = broken.get(name)
        n = len(clip.frames)
        frame_ns = PURE_T0_NS + np.round((np.arange(n) / FPS + rng.uniform(-0.003, 0.003, n)) * 1e9).astype(np.int64)
        frame_ns[0] = PURE_T0_NS
        # The oximeter starts 0.1 s before the camera and runs 0.1 s past it.
        ppg_t = np.arange(-0.1, SECONDS + 0.1, 1 / 60.0)[: _kept(kind, int((SECONDS + 0.2) * 60))]
        ppg_ns = PURE_T0_NS + np.round(ppg_t * 1e9).astype(np.int64)
        waveform = np.round(clip.ppg(ppg_t) * 100.0).astype(int)
        doc = {
            "/FullPackage": [{"Timestamp": int(t), "Value": {"pulseRate": 72, "o2saturation": 98, "signalStrength": 4,
                                                              "waveform": int(v)}} for t, v in zip(ppg_ns, waveform)],
            "/Image": [{"Timestamp": int(t)} for t in frame_ns],
        }
        folder, truth = (f"{name}/{name}", f"{name}/{name}.json") if nested else (name, f"{name}.json")
        write_pngs(root / folder, clip.frames, [f"Image{t}.png" for t in frame_ns])
        _write_truth(root / truth, json.dumps(doc), kind)
        expected[name] = Expected(name[:2], (folder, truth), (frame_ns - frame_ns[0]) / 1e9, clip.frames,
                                  (ppg_ns - frame_ns[0]) / 1e9, waveform.astype(np.float64),
                                  {"task": name[3:], "task_name": {"01": "steady", "03": "slow translation",
                                                                   "06": "medium rotation"}[name[3:]]},
                                  (kind, truth) if kind else None)
    return expected


# ---- mmpd ----

MMPD_SIZE = (80, 60)  # the arrays are stored uncompressed-ish as floats: keep them small
MMPD_LABELS = {"light": "LED-low", "motion": "Stationary", "exercise": "False", "skin_color": 3.0, "gender": "male",
               "glasser": "False", "hair_cover": "True", "makeup": "False"}


def write_mmpd(root: Path, broken: dict[str, str] | None = None) -> dict[str, Expected]:
    """subject1/p1_0.mat, subject1/p1_1.mat, subject2/p2_0.mat: float video in [0, 1], GT_ppg per frame, labels."""
    broken, root = broken or {}, Path(root)
    expected = {}
    for clip, (subject, name) in zip(clips(3, 31, MMPD_SIZE), (("subject1", "p1_0"), ("subject1", "p1_1"),
                                                               ("subject2", "p2_0"))):
        kind = broken.get(name)
        t = _frame_times()[: _kept(kind, len(clip.frames))]
        ppg = clip.ppg(t)
        path = root / subject / f"{name}.mat"
        path.parent.mkdir(parents=True, exist_ok=True)
        mat = {"video": clip.frames.astype(np.float32) / np.float32(255), **MMPD_LABELS}
        if kind != "missing-truth":
            mat["GT_ppg"] = ppg[None, :]  # a (1, T) row, as MATLAB saves a vector
        scipy.io.savemat(path, mat, do_compression=True)
        if kind == "unreadable-truth":
            path.write_bytes(GARBAGE)
        labels = {"light": "LED-low", "motion": "Stationary", "exercise": False, "skin_color": 3, "gender": "male",
                  "glasses": False, "hair_cover": True, "makeup": False}
        expected[name] = Expected(subject, (f"{subject}/{name}.mat",), _frame_times(), clip.frames, t, ppg,
                                  labels, (kind, f"{subject}/{name}.mat") if kind else None)
    return expected


# ---- vitalvideo ----

VV_T0_MS = 1_675_000_000_000  # the recording PC's clock at the first frame, ms since 1970
VV_PPG_HZ = 60.0


def write_vitalvideo(root: Path, broken: dict[str, str] | None = None) -> dict[str, Expected]:
    """Participants A (takes 1, 2), B and C (take 1 each): `<GUID>.json` and `<GUID>_<k>.mp4`, plus READ_ME.json.

    Damage to a JSON hits every take of its participant: break B's or C's take for missing or unreadable.
    """
    broken, root = broken or {}, Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "READ_ME.json").write_text(json.dumps({"about": "Vital Videos sample"}))
    guids = ["0f3a6c2e9b1d4e7f8a5b6c7d8e9f0a1b", "5d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a", "a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4"]
    takes = [(guids[0], 1), (guids[0], 2), (guids[1], 1), (guids[2], 1)]
    participants = {g: {"age": 20 + i * 11, "gender": "FM"[i % 2], "fitzpatrick": i + 2} for i, g in enumerate(guids)}
    docs = {g: {"GUID": g, "participant": participants[g], "location": f"site-{i}", "scenarios": []}
            for i, g in enumerate(guids)}
    expected = {}
    for clip, (guid, take) in zip(clips(4, 41), takes):
        name = f"{guid}_{take}"
        kind = broken.get(name)
        write_video(root / f"{name}.mp4", clip.frames)
        n = len(clip.frames)
        frame_ms = VV_T0_MS + np.round(np.arange(n) * 1000 / FPS).astype(np.int64)
        ppg_t = np.arange(-0.2, SECONDS + 0.2, 1 / VV_PPG_HZ)[: _kept(kind, int((SECONDS + 0.4) * VV_PPG_HZ))]
        ppg_ms = VV_T0_MS + np.round(ppg_t * 1000).astype(np.int64)
        ppg = np.round(clip.ppg(ppg_t), 5)
        settings = {"lighting": "daylight", "camera": f"cam{take}"}
        docs[guid]["scenarios"].append({"scenario_settings": settings, "recordings": {
            "RGB": {"filename": f"{name}.mp4", "timeseries": [[int(t), k] for k, t in enumerate(frame_ms)]},
            "ppg": {"timeseries": [[int(t), float(v)] for t, v in zip(ppg_ms, ppg)]},
            "bp_sys": {"value": 120 + take}, "bp_dia": {"value": 80}}})
        meta = {**participants[guid], "location": docs[guid]["location"], "take": take, "scenario_settings": settings,
                "bp_sys": 120 + take, "bp_dia": 80}
        expected[name] = Expected(guid, (f"{name}.mp4", f"{guid}.json"), _frame_times(), clip.frames,
                                  (ppg_ms - VV_T0_MS) / 1000.0, ppg, meta, (kind, f"{guid}.json") if kind else None)
    for guid, doc in docs.items():
        kinds = {expected[n].broken[0] for n in expected if n.startswith(guid) and expected[n].broken}
        damage = next((k for k in kinds if k != "short-truth"), None)
        _write_truth(root / f"{guid}.json", json.dumps(doc), damage)
    return expected


# ---- rlap ----

RLAP_T0_S = 1685590249.9497862  # UNIX time of the first frame, as PhysRecorder logs it


def write_rlap(root: Path, broken: dict[str, str] | None = None) -> dict[str, Expected]:
    """p001/R1 (video_ZIP_H264.mp4), p001/E2 and p002/T1 (pictures_ZIP_RAW_RGB/ PNGs), PhysRecorder CSVs."""
    broken, root = broken or {}, Path(root)
    rng = np.random.default_rng(6)
    expected = {}
    for clip, (subject, task) in zip(clips(3, 51), (("p001", "R1"), ("p001", "E2"), ("p002", "T1"))):
        name = f"{subject}/{task}"
        kind = broken.get(name)
        folder = root / subject / task
        n = len(clip.frames)
        # Webcam frame intervals wander (33 ms, sometimes 48 ms): the CSV's times, not n / 30, are the truth.
        frame_s = RLAP_T0_S + np.cumsum(np.r_[0.0, rng.choice([0.0315, 0.0325, 0.048], n - 1, p=[.45, .45, .1])])
        bvp_s = RLAP_T0_S + 0.01 + np.cumsum(rng.uniform(0.045, 0.055, int(frame_s[-1] - RLAP_T0_S) * 20 + 40))
        bvp_s = bvp_s[: _kept(kind, bvp_s.size)]
        bvp = np.round(clip.ppg(bvp_s - RLAP_T0_S) * 60.0).astype(int)
        if task == "R1":
            source = "video_ZIP_H264.mp4"
            write_video(folder / source, clip.frames)
        else:
            source = "pictures_ZIP_RAW_RGB"
            write_pngs(folder / source, clip.frames, [f"{k:08d}.png" for k in range(n)])
        (folder / "frames_timestamp.csv").write_text("frame,timestamp\n" + "".join(
            f"{k},{float(t)!r}\n" for k, t in enumerate(frame_s)))
        rows = "".join(f"{float(t)!r},{v}\n" for t, v in zip(bvp_s, bvp))
        _write_truth(folder / "BVP.csv", "timestamp,bvp\n" + rows, kind)
        (folder / "info.txt").write_text("cam model: C930c\ncam codec: YUY2\nsize: 160x120\n")
        (folder / "missed_frames.csv").write_text("")
        expected[name] = Expected(subject, (f"{name}/{source}", f"{name}/BVP.csv", f"{name}/frames_timestamp.csv"),
                                  frame_s - frame_s[0], clip.frames, bvp_s - frame_s[0], bvp.astype(np.float64),
                                  {"task": task, "frame_source": source}, (kind, f"{name}/BVP.csv") if kind else None)
    return expected


# ---- folder ----

def write_folder(root: Path, broken: dict[str, str] | None = None) -> dict[str, Expected]:
    """Videos at several depths in three containers, one PNG folder, and files that are no recording."""
    root = Path(root)
    c = clips(4, 61)
    write_video(root / "visit1" / "a.mp4", c[0].frames)
    write_video(root / "visit1" / "nested" / "b.avi", c[1].frames, "ffv1")
    write_video(root / "top.mkv", c[2].frames, "ffv1")
    write_pngs(root / "stills" / "seq", c[3].frames, [f"{k}.png" for k in range(len(c[3].frames))])
    write_video(root / ".hidden" / "skip.mp4", c[0].frames[:5])
    (root / "notes.txt").write_text("not a recording\n")
    t = _frame_times()
    return {
        "stills/seq": Expected("stills", ("stills/seq",), t, c[3].frames, metadata={"kind": "image-folder"}),
        "top.mkv": Expected("top.mkv", ("top.mkv",), t, c[2].frames, metadata={"kind": "video"}, time_atol=1e-3),
        "visit1/a.mp4": Expected("visit1", ("visit1/a.mp4",), t, c[0].frames, metadata={"kind": "video"}),
        "visit1/nested/b.avi": Expected("nested", ("visit1/nested/b.avi",), t, c[1].frames, metadata={"kind": "video"}),
    }


# ---- synthetic ----

def write_synthetic(root: Path, broken: dict[str, str] | None = None) -> dict[str, Expected]:
    """What `pulsepipe synth --subjects 2 --recordings-per-subject 2` writes (h264-lossless video)."""
    broken, root = broken or {}, Path(root)
    cohort = synth.write_cohort(root, 2, SECONDS, 71, recordings_per_subject=2, size=SIZE)
    scene = _scene()
    expected = {}
    for spec in synth.recording_specs(2, SECONDS, 71, recordings_per_subject=2, size=SIZE):
        name, subject = spec.recording_id, spec.subject.subject_id
        onsets = synth.beat_onsets(spec)
        truth = synth.ground_truth(spec, onsets)
        kind = broken.get(name)
        keep = _kept(kind, truth.t_s.size)
        folder = root / subject / name
        if kind:
            (folder / "ppg.csv").unlink()
            _write_truth(folder / "ppg.csv", "t_s,ppg\n" + "".join(
                f"{t:.6f},{v:.6f}\n" for t, v in zip(truth.t_s[:keep], truth.ppg[:keep])), kind)
        frames = np.stack(list(synth.render_frames(spec, scene, onsets)))
        meta = {"skin_tone": spec.subject.skin_tone, "n_frames": spec.n_frames, "fps": FPS,
                "true_mean_hr_bpm": truth.mean_hr_bpm}
        files = tuple(f"{subject}/{name}/{f}" for f in ("video.mp4", "ppg.csv", "meta.json"))
        expected[name] = Expected(subject, files, _frame_times(), frames, np.round(truth.t_s[:keep], 6),
                                  np.round(truth.ppg[:keep], 6), meta,
                                  (kind, f"{subject}/{name}/ppg.csv") if kind else None)
    assert len(cohort["recordings"]) == len(expected)
    return expected


WRITERS = {
    "ubfc-rppg": write_ubfc_rppg,
    "pure": write_pure,
    "mmpd": write_mmpd,
    "vitalvideo": write_vitalvideo,
    "rlap": write_rlap,
    "folder": write_folder,
    "synthetic": write_synthetic,
}

# For each layout with truth, which recording gets which damage (VitalVideo: damage to a JSON hits all takes).
BROKEN = {
    "ubfc-rppg": {"subject1": "missing-truth", "subject2": "short-truth", "subject3": "unreadable-truth"},
    "pure": {"01-01": "missing-truth", "02-03": "short-truth", "03-06": "unreadable-truth"},
    "mmpd": {"p1_0": "missing-truth", "p1_1": "short-truth", "p2_0": "unreadable-truth"},
    "vitalvideo": {"5d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a_1": "missing-truth",
                   "0f3a6c2e9b1d4e7f8a5b6c7d8e9f0a1b_2": "short-truth",
                   "a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4_1": "unreadable-truth"},
    "rlap": {"p001/R1": "missing-truth", "p001/E2": "short-truth", "p002/T1": "unreadable-truth"},
    "synthetic": {"s001-r01": "missing-truth", "s001-r02": "short-truth", "s002-r01": "unreadable-truth"},
}

