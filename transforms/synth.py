"""Synthetic rPPG cohort with known truth: face videos whose skin pulses with a ground-truth PPG.

Every later stage (heart rate from one video, preprocessing, cohort evaluation) is tested against
these recordings, so the pulse is a colour change of SKIN only, with the blood-volume signature of
skin (relative pulsatile amplitudes R:G:B = 0.33:0.77:0.53, de Haan & van Leest 2014), on top of the
nuisances of a real recording. How strong those are is a `Difficulty`: EASY (the default) has small
slow head motion, slow illumination drift, sensor noise and lossless video, which GREEN already reads to
a fraction of a BPM; HARD adds what separates methods: larger faster motion with roll and a slight
shake, light flicker near the heart rate, lossy H.264, more noise, and heart rates that ramp or step.

How one recording is made
-------------------------
- Beats: RR intervals around the recording's heart rate with beat-to-beat jitter and respiratory
  sinus arrhythmia (a slow sinusoidal RR modulation at the breathing rate). The rate is steady, or
  (difficulties with `hr_change_bpm`) a ramp or three steps around the same mean.
- Ground-truth PPG: two Gaussians per beat (systolic peak, then the diastolic wave after the
  dicrotic notch), sampled at its own rate (`PPG_RATE_HZ`, not the video rate) from t = 0.
- Video: the public-domain astronaut photo (`skimage.data.astronaut()`), skin found once with YCrCb
  thresholds (largest component, soft edges), tinted per subject. Per frame, skin is multiplied by
  ``1 - amplitude * signature * (ppg(t - delay) - mean)``: skin reflects less light while it holds more
  blood, so the green trace of the skin falls when the PPG rises (as in real recordings). The face is
  then moved (translation, scale, roll, shake), lit (slow multiplicative drift, flicker of level and
  colour), noised (Gaussian, in DN) and rounded to uint8. Frames are rendered and encoded one at a
  time (losslessly unless the difficulty or the codec asks otherwise), so memory does not grow with
  the duration.
- Everything is drawn from ``np.random.default_rng([seed, subject_index, ...])``: the same seed and
  difficulty give the same specs, byte-identical ``ppg.csv`` and identical decoded frames. Knobs added
  with the difficulties are drawn after the original ones, so an EASY cohort is the one this module
  always wrote, to the byte.

Layout ``synthetic`` (this project's own)::

    OUT/cohort.json                       seed, parameters, difficulty (every knob), package version,
                                          recordings (ids, paths, true mean HR and HR range)
    OUT/<subject_id>/<recording_id>/video.mp4   (video.avi for --codec ffv1)
    OUT/<subject_id>/<recording_id>/ppg.csv     header ``t_s,ppg``; one row per PPG sample at
                                                `PPG_RATE_HZ`, t_s from 0, spanning the video
    OUT/<subject_id>/<recording_id>/meta.json   ids, seed, fps, frame count, size, codec, true mean HR
                                                and HR range, the difficulty, skin tone, pulse, HR shape,
                                                motion, light and noise parameters

Subject ids are ``s001, s002, ...``; recording ids ``s001-r01, s001-r02, ...`` (unique in the cohort).

Layout ``ubfc-rppg`` (UBFC-rPPG DATASET_2 as published)::

    OUT/subject<N>/vid.avi           lossless (FFV1) unless the difficulty or --codec says otherwise
    OUT/subject<N>/ground_truth.txt  three lines of space-separated floats on the PPG time base:
                                     PPG values, instantaneous HR (BPM), timestamps (s)

plus the same ``OUT/cohort.json`` as a record of the truth (adapters that list ``subject*`` ignore it).
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import skimage.data
from scipy.ndimage import gaussian_filter1d, uniform_filter1d

from transforms.manifest import package_version
from transforms.resample import FPS

PPG_RATE_HZ = 64.0
HR_RANGE_BPM = (40.0, 160.0)
# Relative pulsatile amplitude of skin per channel (blood-volume-pulse signature), green strongest.
PULSE_SIGNATURE_RGB = (0.33, 0.77, 0.53)
DEFAULT_SIZE = (320, 240)  # (W, H): decode and face-detection cost scale with pixels
DEFAULT_FPS = FPS
LAYOUTS = ("synthetic", "ubfc-rppg")

# Random streams of one recording, each its own generator so adding draws to one never shifts another.
_BEATS, _MOTION, _NOISE = 1, 2, 3


# --------------------------------------------------------------------------------------------------
# Codecs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoCodec:
    """How frames are encoded: a PyAV codec with its pixel format and options."""

    name: str  # as given on the command line
    av_codec: str
    pix_fmt: str
    options: tuple[tuple[str, str], ...]
    extension: str  # of the `synthetic` layout's video file
    lossless: bool


CODECS = ("h264-lossless", "ffv1", "h264-crf<N>")
DEFAULT_CODEC = "h264-lossless"


def parse_codec(name: str) -> VideoCodec:
    """`h264-lossless` (libx264rgb qp 0: exact RGB, .mp4), `ffv1` (exact RGB, .avi) or `h264-crf<N>` (lossy
    yuv420p, .mp4).

    Lossy H.264 zeroes changes of a few DN in static regions, which is where the pulse lives: use it only
    to test robustness to compression.
    """
    if name == "h264-lossless":
        # ultrafast: 4x the encode and 3x the decode speed of veryfast for 15% more bytes (CAVLC, no B-frames)
        return VideoCodec(name, "libx264rgb", "rgb24", (("qp", "0"), ("preset", "ultrafast")), "mp4", True)
    if name == "ffv1":  # AVI, as UBFC: its 1/fps time base keeps frame times exact (Matroska rounds to ms)
        return VideoCodec(name, "ffv1", "bgr0", (("level", "3"), ("slicecrc", "1")), "avi", True)
    crf = re.fullmatch(r"h264-crf(\d{1,2})", name)
    if crf and int(crf.group(1)) <= 51:
        # Pinned so a seed gives the same frames anywhere: the thread count (x264 otherwise follows the cores) and
        # macroblock-tree rate control off (with it, x264 here gives one of several outputs, by process history).
        opts = (("crf", crf.group(1)), ("preset", "veryfast"), ("threads", "2"), ("x264-params", "mbtree=0"))
        return VideoCodec(name, "libx264", "yuv420p", opts, "mp4", False)
    raise ValueError(f"unknown codec {name!r}; choose one of {', '.join(CODECS)}")


# --------------------------------------------------------------------------------------------------
# Difficulty
# --------------------------------------------------------------------------------------------------

Range = tuple[float, float]  # a uniform range (lo, hi) a per-recording value is drawn from
HR_SHAPES = ("ramp", "steps")  # how the heart rate moves within a recording when it changes


@dataclass(frozen=True)
class Difficulty:
    """The nuisances a cohort is made with: ranges each recording draws its values from.

    A range of (0, 0) turns its nuisance off. A preset is a named instance (`DIFFICULTIES`); the whole
    instance goes into cohort.json and every meta.json, so a cohort says exactly what made it.
    """

    name: str
    skin_tone: Range = (0.0, 1.0)  # 0 light .. 1 dark: darker skin returns less light, so less pulse in DN
    pulse_amplitude: Range = (0.008, 0.016)  # green peak-to-peak relative skin change over one beat
    motion_shift_px: Range = (1.0, 4.0)  # peak head translation, output pixels
    motion_scale: Range = (0.01, 0.03)  # peak relative head scale change
    motion_rotation_deg: Range = (0.0, 0.0)  # peak in-plane head roll
    motion_corr_s: float = 1.0  # smoothing of the head's random walk: shorter is faster
    shake_px: Range = (0.0, 0.0)  # peak periodic head movement (talking, nodding) at shake_hz
    shake_hz: Range = (0.0, 0.0)  # its rate: inside the heart-rate band it competes with the pulse
    light_drift: Range = (0.01, 0.04)  # peak slow relative illumination change
    light_corr_s: float = 4.0  # smoothing of the drift
    flicker: Range = (0.0, 0.0)  # peak relative brightness of a flicker near the heart rate
    flicker_offset_bpm: Range = (0.0, 0.0)  # its distance from the recording's mean HR, sign drawn
    flicker_tint: float = 0.0  # share of the flicker that changes the light's colour, not only its level
    noise_sigma_dn: Range = (1.0, 2.0)  # sensor noise std per pixel, DN
    hr_change_bpm: Range = (0.0, 0.0)  # HR change from start to end of a recording, sign drawn
    hr_shapes: tuple[str, ...] = HR_SHAPES  # drawn per recording when the HR changes
    codec: str | None = None  # the cohort's codec unless one is asked for; None: the layout's lossless one

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            is_range = field.name != "hr_shapes" and isinstance(value, tuple)
            if is_range and not (len(value) == 2 and 0 <= value[0] <= value[1]):
                raise ValueError(f"difficulty {self.name}: {field.name} must be a range 0 <= lo <= hi, got {value}")
        if self.skin_tone[1] > 1:
            raise ValueError(f"difficulty {self.name}: skin_tone must lie in [0, 1], got {self.skin_tone}")
        if self.motion_corr_s <= 0 or self.light_corr_s <= 0 or not 0 <= self.flicker_tint <= 1:
            raise ValueError(f"difficulty {self.name}: corr times must be positive and flicker_tint in [0, 1]")
        if not self.hr_shapes or set(self.hr_shapes) - set(HR_SHAPES):
            raise ValueError(f"difficulty {self.name}: hr_shapes must be some of {HR_SHAPES}, got {self.hr_shapes}")
        if self.codec is not None:
            parse_codec(self.codec)


EASY = Difficulty("easy")  # the original cohort: small slow motion, slow drift, lossless, steady HR
# Tuned by measurement (README): lossy H.264 is what breaks the whole-crop colour means GREEN, CHROM and POS
# read while ME-rPPG still finds the pulse; shake and flicker stay weak, as ME-rPPG follows a flicker as GREEN does.
HARD = Difficulty(
    "hard",
    motion_shift_px=(2.0, 6.0),
    motion_scale=(0.02, 0.05),
    motion_rotation_deg=(2.0, 6.0),
    motion_corr_s=0.5,
    shake_px=(0.2, 0.6),
    shake_hz=(0.8, 2.5),
    light_drift=(0.02, 0.08),
    light_corr_s=3.0,
    flicker=(0.0003, 0.001),
    flicker_offset_bpm=(5.0, 20.0),
    flicker_tint=0.5,
    noise_sigma_dn=(2.0, 4.0),
    hr_change_bpm=(5.0, 20.0),
    codec="h264-crf17",
)
DIFFICULTIES = {d.name: d for d in (EASY, HARD)}


def difficulty_named(name: str | Difficulty) -> Difficulty:
    """The preset called `name` (a Difficulty passes through)."""
    if isinstance(name, Difficulty):
        return name
    try:
        return DIFFICULTIES[name]
    except KeyError:
        raise ValueError(f"unknown difficulty {name!r}; choose one of {', '.join(DIFFICULTIES)}") from None


# --------------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubjectSpec:
    """One synthetic person: resting heart rate and skin tone."""

    subject_id: str
    index: int
    hr_bpm: float  # resting heart rate; stratified over HR_RANGE_BPM across the cohort
    skin_tone: float  # 0 light .. 1 dark
    skin_gain_rgb: tuple[float, float, float]  # multiplies skin pixels of the photo
    skin_shift_rgb: tuple[float, float, float]  # DN added to skin pixels (warmth)

    @classmethod
    def draw(cls, seed: int, index: int, n_subjects: int, difficulty: Difficulty = EASY) -> SubjectSpec:
        """Subject `index` of a cohort of `n_subjects` drawn from `seed`, skin tone from `difficulty`.

        The HR range is cut into `n_subjects` strata and each subject gets one (in an order drawn from
        the seed), so even a small cohort spans 40-160 BPM.
        """
        if not 0 <= index < n_subjects:
            raise ValueError(f"subject index {index} outside a cohort of {n_subjects}")
        stratum = np.random.default_rng([seed]).permutation(n_subjects)[index]
        rng = np.random.default_rng([seed, index])
        lo, hi = HR_RANGE_BPM
        hr = lo + (hi - lo) * (stratum + rng.uniform()) / n_subjects
        tone = float(rng.uniform(*difficulty.skin_tone))
        # Darker skin: less light back overall, blue and green cut more than red (melanin absorption).
        gain = 1.0 - tone * np.array([0.45, 0.52, 0.58]) + rng.uniform(-0.03, 0.03, 3)
        shift = rng.uniform(-4.0, 4.0, 3)
        return cls(
            subject_id=f"s{index + 1:03d}",
            index=index,
            hr_bpm=round(float(hr), 3),
            skin_tone=round(tone, 4),
            skin_gain_rgb=tuple(round(float(g), 4) for g in gain),
            skin_shift_rgb=tuple(round(float(s), 3) for s in shift),
        )


@dataclass(frozen=True)
class RecordingSpec:
    """One recording of a subject: its pulse and the nuisances of the camera and the scene."""

    subject: SubjectSpec
    recording_id: str
    index: int
    seed: int
    seconds: float
    fps: float
    size: tuple[int, int]  # (W, H) of the video
    target_hr_bpm: float  # mean rate the RR series is drawn around
    rr_jitter: float  # std of beat-to-beat RR noise, fraction of the mean RR
    rsa_depth: float  # respiratory sinus arrhythmia: peak RR modulation, fraction of the mean RR
    resp_rate_hz: float  # breathing rate driving the RSA
    dicrotic_ratio: float  # diastolic wave height / systolic peak height
    pulse_amplitude: float  # green peak-to-peak relative change of skin brightness over one beat
    pulse_delay_s: float  # face pulse lags the ground-truth PPG by this much (transit time)
    motion_shift_px: float  # peak head translation, output pixels
    motion_scale: float  # peak relative head scale change
    light_drift: float  # peak relative illumination change
    noise_sigma_dn: float  # sensor noise std, DN of 8-bit pixels
    motion_rotation_deg: float  # peak in-plane head roll about the face centre
    shake_px: float  # peak periodic head movement
    shake_hz: float  # its rate
    flicker: float  # peak relative brightness of the light's flicker
    flicker_hz: float  # its rate, near the mean HR
    flicker_rgb: tuple[float, float, float]  # relative flicker per channel: (1, 1, 1) is a change of level only
    hr_shape: str  # "steady", or how the HR moves from start to end: "ramp" (linear) or "steps" (three levels)
    hr_change_bpm: float  # HR at the end minus HR at the start (0 when steady); the mean stays target_hr_bpm
    difficulty: Difficulty  # what the nuisances above were drawn from

    @classmethod
    def draw(
        cls,
        subject: SubjectSpec,
        index: int,
        seed: int,
        seconds: float,
        fps: float = DEFAULT_FPS,
        size: tuple[int, int] = DEFAULT_SIZE,
        difficulty: Difficulty = EASY,
    ) -> RecordingSpec:
        """Recording `index` of `subject`, drawn from ``default_rng([seed, subject.index, index])``.

        The first recording is at the subject's resting HR; later ones (other sessions) differ by up
        to 8 BPM, kept inside HR_RANGE_BPM, as is the changing HR of a `difficulty` that has one. Values
        added with the difficulty knobs are drawn after the original ones, so EASY draws what it always drew.
        """
        if seconds <= 0 or fps <= 0:
            raise ValueError(f"seconds and fps must be positive, got {seconds}, {fps}")
        rng = np.random.default_rng([seed, subject.index, index])
        d = difficulty

        def draw(bounds: Range, digits: int) -> float:
            return round(float(rng.uniform(*bounds)), digits)

        offset = rng.uniform(-8.0, 8.0) if index > 0 else 0.0
        target = round(float(np.clip(subject.hr_bpm + offset, *HR_RANGE_BPM)), 3)
        original = dict(  # in the order the cohort always drew them
            rr_jitter=draw((0.03, 0.05), 4),
            rsa_depth=draw((0.02, 0.05), 4),
            resp_rate_hz=draw((0.15, 0.33), 4),
            dicrotic_ratio=draw((0.3, 0.55), 4),
            pulse_amplitude=draw(d.pulse_amplitude, 5),
            pulse_delay_s=draw((0.0, 0.03), 4),
            motion_shift_px=draw(d.motion_shift_px, 3),
            motion_scale=draw(d.motion_scale, 4),
            light_drift=draw(d.light_drift, 4),
            noise_sigma_dn=draw(d.noise_sigma_dn, 3),
        )
        rotation, shake, shake_hz, flicker = (draw(r, 4) for r in (d.motion_rotation_deg, d.shake_px, d.shake_hz,
                                                                   d.flicker))
        flicker_hz = (target + rng.choice((-1.0, 1.0)) * rng.uniform(*d.flicker_offset_bpm)) / 60.0
        colour = rng.standard_normal(3)
        colour -= colour.mean()  # a change of hue only: the level is the white part
        colour *= np.sqrt(3.0) / max(np.linalg.norm(colour), 1e-12)  # as strong as the white part (1, 1, 1)
        flicker_rgb = (1.0 - d.flicker_tint) + d.flicker_tint * colour
        shape = str(rng.choice(d.hr_shapes))
        room = 2.0 * min(target - HR_RANGE_BPM[0], HR_RANGE_BPM[1] - target)  # the change stays in range
        change = min(rng.uniform(*d.hr_change_bpm), room) * rng.choice((-1.0, 1.0))
        return cls(
            subject=subject,
            recording_id=f"{subject.subject_id}-r{index + 1:02d}",
            index=index,
            seed=seed,
            seconds=float(seconds),
            fps=float(fps),
            size=(int(size[0]), int(size[1])),
            target_hr_bpm=target,
            **original,
            motion_rotation_deg=rotation,
            shake_px=shake,
            shake_hz=shake_hz,
            flicker=flicker,
            flicker_hz=round(float(max(flicker_hz, 0.5)), 4),  # a flicker slower than 30 BPM is drift
            flicker_rgb=tuple(round(float(c), 4) for c in flicker_rgb),
            hr_shape=shape if change else "steady",
            hr_change_bpm=round(float(change), 3),
            difficulty=d,
        )

    @property
    def n_frames(self) -> int:
        return int(round(self.seconds * self.fps))

    def hr_at(self, t: np.ndarray | float) -> np.ndarray | float:
        """The HR (BPM) the beats are drawn around at time `t` (s): target_hr_bpm plus the change's shape.

        Both shapes average to target_hr_bpm over [0, seconds] and hold their end values outside it.
        """
        if not self.hr_change_bpm:
            return self.target_hr_bpm if np.isscalar(t) else np.full(np.shape(t), self.target_hr_bpm)
        x = np.clip(np.asarray(t, np.float64) / self.seconds, 0.0, 1.0)  # 0 at the start, 1 at the end
        if self.hr_shape == "steps":  # three equal levels, each a third of the recording
            x = np.minimum(np.floor(3.0 * x), 2.0) / 2.0
        hr = self.target_hr_bpm + self.hr_change_bpm * (x - 0.5)
        return float(hr) if np.isscalar(t) else hr

    def rng(self, stream: int) -> np.random.Generator:
        """The generator of one random stream (`_BEATS`, `_MOTION`, `_NOISE`) of this recording."""
        return np.random.default_rng([self.seed, self.subject.index, self.index, stream])


# --------------------------------------------------------------------------------------------------
# Pulse
# --------------------------------------------------------------------------------------------------


def beat_onsets(spec: RecordingSpec) -> np.ndarray:
    """Onset times of the beats (s), shape (n_beats,), from before t=0 to past the end.

    RR_k = local_RR * (1 + rsa_depth * sin(2 pi f_resp t_k + phase) + rr_jitter * N(0, 1)) with
    local_RR = 60 / spec.hr_at(t_k), then the series is stretched so its `mean_hr_bpm` over [0, seconds]
    is target_hr_bpm: the cohort's HR strata hold for the recorded truth, not only for the targets (the
    stretch is under a percent, so a changing HR keeps its shape in time).
    """
    rng = spec.rng(_BEATS)
    mean_rr = 60.0 / spec.target_hr_bpm
    phase = rng.uniform(0.0, 2 * np.pi)
    t = -mean_rr * (1.0 + rng.uniform())  # random phase of the first beat relative to the video
    onsets = [t]
    while t < 1.2 * spec.seconds + 3 * mean_rr:  # margin for the stretch below
        local_rr = 60.0 / spec.hr_at(t)
        rsa = spec.rsa_depth * np.sin(2 * np.pi * spec.resp_rate_hz * t + phase)
        rr = local_rr * (1.0 + rsa + spec.rr_jitter * rng.standard_normal())
        t += max(rr, 0.5 * local_rr)  # a negative or tiny RR is not a heartbeat
        onsets.append(t)
    onsets = np.asarray(onsets)
    for _ in range(6):  # the window's share of the edge beats moves a little with each stretch
        onsets *= mean_hr_bpm(onsets, spec.seconds) / spec.target_hr_bpm
    return onsets


def mean_hr_bpm(onsets: np.ndarray, seconds: float) -> float:
    """True mean heart rate over [0, seconds]: the time average of 60 / RR of the beat in progress.

    The same average as the HR line of UBFC's ground truth; it changes smoothly as beats are stretched.
    """
    starts, stops = onsets[:-1], onsets[1:]
    overlap = np.clip(np.minimum(stops, seconds) - np.maximum(starts, 0.0), 0.0, None)  # s of each beat inside
    return float(np.sum(overlap * 60.0 / (stops - starts)) / np.sum(overlap))


# Beat shape as fractions of the beat's RR: (centre, width) of the systolic and the diastolic wave.
_SYSTOLE = (0.20, 0.07)
_DIASTOLE = (0.45, 0.11)


def ppg_waveform(t: np.ndarray, onsets: np.ndarray, dicrotic_ratio: float) -> np.ndarray:
    """Pulse waveform (arbitrary units, systolic peaks near 1) at times `t` (s), shape like `t`.

    Each beat adds a systolic and a diastolic Gaussian scaled to its RR, so the notch between them
    stays in place at any rate. `t` must be sorted.
    """
    t = np.asarray(t, dtype=np.float64)
    out = np.zeros_like(t)
    for start, stop in zip(onsets[:-1], onsets[1:]):
        rr = stop - start
        lo, hi = np.searchsorted(t, [start - 0.5 * rr, start + 1.5 * rr])  # a beat's support
        if lo == hi:
            continue
        ts = t[lo:hi] - start
        for (centre, width), height in ((_SYSTOLE, 1.0), (_DIASTOLE, dicrotic_ratio)):
            out[lo:hi] += height * np.exp(-0.5 * ((ts - centre * rr) / (width * rr)) ** 2)
    return out


def ppg_mean_level(dicrotic_ratio: float) -> float:
    """Time mean of `ppg_waveform` (a.u.): each beat's area is proportional to its RR, so it is constant."""
    return float(np.sqrt(2 * np.pi) * (_SYSTOLE[1] + dicrotic_ratio * _DIASTOLE[1]))


@dataclass(frozen=True)
class GroundTruth:
    """The contact PPG of a recording on its own time base."""

    t_s: np.ndarray  # (n_samples,) seconds from the first video frame, at PPG_RATE_HZ
    ppg: np.ndarray  # (n_samples,) a.u., rises with blood volume
    hr_bpm: np.ndarray  # (n_samples,) instantaneous HR: 60 / RR of the beat in progress
    mean_hr_bpm: float  # over the recording
    hr_range_bpm: tuple[float, float]  # lowest and highest HR averaged over HR_RANGE_WINDOW_S: how much it moves


HR_RANGE_WINDOW_S = 5.0  # long enough to average out breathing (RSA), short enough to see a ramp or a step


def ground_truth(spec: RecordingSpec, onsets: np.ndarray | None = None) -> GroundTruth:
    """The ground-truth PPG of `spec`, sampled at PPG_RATE_HZ over [0, seconds)."""
    onsets = beat_onsets(spec) if onsets is None else onsets
    t = np.arange(int(np.ceil(spec.seconds * PPG_RATE_HZ))) / PPG_RATE_HZ
    beat = np.searchsorted(onsets, t, side="right") - 1  # index of the beat in progress
    hr = 60.0 / (onsets[beat + 1] - onsets[beat])
    window = max(1, min(len(t), int(round(HR_RANGE_WINDOW_S * PPG_RATE_HZ))))
    smooth = uniform_filter1d(hr, window, mode="nearest")[window // 2: len(t) - (window - 1) // 2]  # full windows
    return GroundTruth(
        t_s=t,
        ppg=ppg_waveform(t, onsets, spec.dicrotic_ratio),
        hr_bpm=hr,
        mean_hr_bpm=round(mean_hr_bpm(onsets, spec.seconds), 4),
        hr_range_bpm=(round(float(smooth.min()), 2), round(float(smooth.max()), 2)),
    )


# --------------------------------------------------------------------------------------------------
# Scene and rendering
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FaceScene:
    """The photo the videos are made of, with its skin mask; computed once per cohort."""

    photo: np.ndarray  # (512, 512, 3) float32 RGB, DN
    skin: np.ndarray  # (512, 512) float32 in [0, 1], soft-edged skin weight
    face_centre: tuple[float, float]  # (x, y) photo pixels: centroid of the skin


# YCrCb box that holds the astronaut's face but neither her blond hair nor the beige backdrop.
_SKIN_YCRCB_LO = (90, 140, 106)
_SKIN_YCRCB_HI = (255, 175, 122)


def face_scene() -> FaceScene:
    """Load the astronaut photo and find her facial skin (YCrCb box, largest blob, smoothed edge)."""
    photo = skimage.data.astronaut()  # (512, 512, 3) uint8 RGB
    mask = cv2.inRange(cv2.cvtColor(photo, cv2.COLOR_RGB2YCrCb), _SKIN_YCRCB_LO, _SKIN_YCRCB_HI)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask)
    face = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))  # label 0 is the background
    mask = np.where(labels == face, 255, 0).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9)))
    skin = cv2.GaussianBlur(mask.astype(np.float32) / 255.0, (0, 0), 2.0)  # no hard edge to flicker
    ys, xs = np.nonzero(mask)
    return FaceScene(photo.astype(np.float32), skin, (float(xs.mean()), float(ys.mean())))


def crop_to_output(size: tuple[int, int], photo_shape: tuple[int, int] = (512, 512)) -> np.ndarray:
    """3x3 affine from photo pixels to output pixels: the upper part of the photo, head and shoulders.

    The crop is 56% of the photo's height (the face then fills about a third of the frame height, as
    in rPPG datasets) at the output's aspect ratio, centred on the face horizontally.
    """
    w, h = size
    ph, pw = photo_shape
    crop_h = 0.5625 * ph
    crop_w = min(crop_h * w / h, pw)
    crop_h = crop_w * h / w
    x0 = float(np.clip(222.0 - crop_w / 2, 0, pw - crop_w))  # 222: the face's column in the photo
    s = w / crop_w
    return np.array([[s, 0, -s * x0], [0, s, 0], [0, 0, 1]], dtype=np.float64)


def smooth_walk(rng: np.random.Generator, n: int, fps: float, corr_s: float, peak: float) -> np.ndarray:
    """A smooth zero-mean random walk, shape (n,), scaled so its largest excursion is `peak`.

    Gaussian smoothing over `corr_s` seconds keeps it below the heart-rate band (at 1 s, well below).
    """
    walk = gaussian_filter1d(np.cumsum(rng.standard_normal(n)), corr_s * fps, mode="nearest")
    walk -= walk.mean()
    top = np.abs(walk).max()
    return walk * (peak / top) if top > 0 else walk


@dataclass(frozen=True)
class Nuisance:
    """Per-frame head pose and light, shape (n_frames,) each unless said."""

    dx_px: np.ndarray  # translation, output pixels
    dy_px: np.ndarray
    scale: np.ndarray  # relative size change around the face centre
    light: np.ndarray  # relative illumination change
    rotation_deg: np.ndarray  # in-plane roll about the face centre
    flicker_rgb: np.ndarray  # (n_frames, 3) relative change of the light per channel


def nuisance(spec: RecordingSpec) -> Nuisance:
    """Head motion, illumination drift and flicker of `spec`; a few floats per frame, so held whole."""
    rng, n, fps, corr = spec.rng(_MOTION), spec.n_frames, spec.fps, spec.difficulty.motion_corr_s
    t = np.arange(n) / fps
    dx_px = smooth_walk(rng, n, fps, corr, spec.motion_shift_px)
    dy_px = smooth_walk(rng, n, fps, corr, spec.motion_shift_px * 0.6)
    scale = smooth_walk(rng, n, fps, 1.5 * corr, spec.motion_scale)
    light = smooth_walk(rng, n, fps, spec.difficulty.light_corr_s, spec.light_drift)
    # drawn after the original walks, so a difficulty without these leaves those untouched
    rotation = smooth_walk(rng, n, fps, 1.5 * corr, spec.motion_rotation_deg)
    shake_phase, shake_angle, flicker_phase = rng.uniform(0.0, 2 * np.pi, 3)
    shake = spec.shake_px * np.sin(2 * np.pi * spec.shake_hz * t + shake_phase)
    flicker = spec.flicker * np.sin(2 * np.pi * spec.flicker_hz * t + flicker_phase)
    return Nuisance(
        dx_px=dx_px + np.cos(shake_angle) * shake,
        dy_px=dy_px + np.sin(shake_angle) * shake,
        scale=scale,
        light=light,
        rotation_deg=rotation,
        flicker_rgb=flicker[:, None] * np.asarray(spec.flicker_rgb),
    )


def about(centre: tuple[float, float], scale: float, angle_deg: float) -> np.ndarray:
    """3x3 affine scaling by `scale` and rotating by `angle_deg` about `centre`.

    Written so that at angle 0 it is bit for bit the scale-only matrix easy cohorts were rendered with.
    """
    cx, cy = centre
    a = np.deg2rad(angle_deg)
    c, s = scale * np.cos(a), scale * np.sin(a)
    return np.array([[c, -s, cx * (1 - c) + s * cy], [s, c, cy * (1 - c) - s * cx], [0, 0, 1]])


def tinted_photo(scene: FaceScene, subject: SubjectSpec) -> np.ndarray:
    """The photo with the subject's skin tone on the skin, (512, 512, 3) float32 DN."""
    gain = np.asarray(subject.skin_gain_rgb, np.float32)
    shift = np.asarray(subject.skin_shift_rgb, np.float32)
    alpha = scene.skin[..., None]
    return scene.photo * (1.0 + alpha * (gain - 1.0)) + alpha * shift


def render_frames(
    spec: RecordingSpec, scene: FaceScene, onsets: np.ndarray | None = None
) -> Iterator[np.ndarray]:
    """Yield the frames of `spec` one at a time: (H, W, 3) uint8 RGB, frame k at t = k / fps.

    A generator, so a recording of any length is rendered in constant memory.
    """
    onsets = beat_onsets(spec) if onsets is None else onsets
    n, (w, h) = spec.n_frames, spec.size
    t = np.arange(n) / spec.fps
    blood = ppg_waveform(t - spec.pulse_delay_s, onsets, spec.dicrotic_ratio)
    blood -= ppg_mean_level(spec.dicrotic_ratio)  # the pulse changes colour around the resting tone
    motion = nuisance(spec)
    noise_rng = spec.rng(_NOISE)

    base = tinted_photo(scene, spec.subject)
    signature = np.asarray(PULSE_SIGNATURE_RGB, np.float32) / PULSE_SIGNATURE_RGB[1]
    # Skin darkens as blood volume rises (blood absorbs), by `pulse_amplitude` peak to peak in green.
    pulse_map = base * scene.skin[..., None] * (spec.pulse_amplitude * signature)
    to_output = crop_to_output((w, h), scene.photo.shape[:2])
    light = (1.0 + motion.light[:, None]) * (1.0 + motion.flicker_rgb)  # (n, 3) gain of each channel

    for k in range(n):
        head = about(scene.face_centre, 1.0 + motion.scale[k], motion.rotation_deg[k])
        shift = np.array([[1, 0, motion.dx_px[k]], [0, 1, motion.dy_px[k]], [0, 0, 1]])
        m = (shift @ to_output @ head)[:2]
        # warping is linear: warp the photo and the pulse map apart and mix them at the (smaller) output size
        frame, pulse = (cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
                        for img in (base, pulse_map))
        frame -= np.float32(blood[k]) * pulse
        frame *= light[k].astype(np.float32)
        frame += noise_rng.standard_normal(frame.shape, dtype=np.float32) * np.float32(spec.noise_sigma_dn)
        yield np.clip(np.rint(frame), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------


def write_video(path: str | Path, frames: Iterable[np.ndarray], fps: float, codec: VideoCodec) -> int:
    """Encode `frames` ((H, W, 3) uint8 RGB each) to `path` as they come; returns the frame count.

    Each frame is dropped once encoded, so any iterator (a generator of any length) can feed it.
    """
    rate = Fraction(fps).limit_denominator(1001)
    count = 0
    with av.open(str(path), "w") as container:
        stream = None
        for frame in frames:
            if stream is None:  # the first frame fixes the size
                stream = container.add_stream(codec.av_codec, rate=rate)
                stream.height, stream.width = frame.shape[:2]
                stream.pix_fmt = codec.pix_fmt
                stream.options = dict(codec.options)
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            video_frame.pts = count
            container.mux(stream.encode(video_frame))
            count += 1
        if stream is not None:
            container.mux(stream.encode())  # flush the encoder's delayed frames
    return count


# --------------------------------------------------------------------------------------------------
# Cohorts
# --------------------------------------------------------------------------------------------------


def recording_specs(
    subjects: int,
    seconds: float,
    seed: int,
    recordings_per_subject: int = 1,
    fps: float = DEFAULT_FPS,
    size: tuple[int, int] = DEFAULT_SIZE,
    difficulty: Difficulty = EASY,
) -> list[RecordingSpec]:
    """All recording specs of a cohort, subject by subject, with the nuisances of `difficulty`."""
    if subjects < 1 or recordings_per_subject < 1:
        raise ValueError("a cohort needs at least one subject and one recording per subject")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    specs = []
    for i in range(subjects):
        subject = SubjectSpec.draw(seed, i, subjects, difficulty)
        specs += [RecordingSpec.draw(subject, j, seed, seconds, fps, size, difficulty)
                  for j in range(recordings_per_subject)]
    return specs


def write_ppg_csv(path: Path, truth: GroundTruth) -> None:
    """`t_s,ppg` rows with fixed decimals, so the same truth gives the same bytes."""
    rows = "".join(f"{t:.6f},{v:.6f}\n" for t, v in zip(truth.t_s, truth.ppg))
    path.write_text("t_s,ppg\n" + rows)


def write_ubfc_ground_truth(path: Path, truth: GroundTruth) -> None:
    """UBFC-rPPG `ground_truth.txt`: lines of PPG, HR (BPM) and time (s), MATLAB ascii float format."""
    lines = ("".join(f"{v:16.7e}" for v in values) for values in (truth.ppg, truth.hr_bpm, truth.t_s))
    path.write_text("\n".join(lines) + "\n")


def recording_meta(spec: RecordingSpec, truth: GroundTruth, video: str, codec: VideoCodec, n_frames: int) -> dict:
    """What meta.json holds: ids, truth, the difficulty, and every drawn parameter."""
    params = dataclasses.asdict(spec)
    subject, difficulty = params.pop("subject"), params.pop("difficulty")
    return {
        "subject_id": spec.subject.subject_id,
        "recording_id": spec.recording_id,
        "seed": spec.seed,
        "video": video,
        "codec": codec.name,
        "fps": spec.fps,
        "n_frames": n_frames,
        "width": spec.size[0],
        "height": spec.size[1],
        "seconds": spec.seconds,
        "ppg_rate_hz": PPG_RATE_HZ,
        "true_mean_hr_bpm": truth.mean_hr_bpm,
        "true_hr_range_bpm": list(truth.hr_range_bpm),
        "pulse_signature_rgb": list(PULSE_SIGNATURE_RGB),
        "pulse_polarity": "skin darkens as the PPG rises",
        "difficulty": difficulty,
        "subject": subject,
        "recording": params,
        "package_version": package_version(),
    }


def write_recording(spec: RecordingSpec, scene: FaceScene, out_dir: Path, layout: str, codec: VideoCodec) -> dict:
    """Write one recording under `out_dir` in `layout`; returns its meta (paths relative to `out_dir`)."""
    onsets = beat_onsets(spec)
    truth = ground_truth(spec, onsets)
    if layout == "synthetic":
        folder = out_dir / spec.subject.subject_id / spec.recording_id
        video = folder / f"video.{codec.extension}"
    else:  # ubfc-rppg
        folder = out_dir / f"subject{spec.subject.index + 1}"
        video = folder / "vid.avi"
    folder.mkdir(parents=True, exist_ok=True)
    n_frames = write_video(video, render_frames(spec, scene, onsets), spec.fps, codec)
    meta = recording_meta(spec, truth, str(video.relative_to(out_dir)), codec, n_frames)
    if layout == "synthetic":
        write_ppg_csv(folder / "ppg.csv", truth)
        (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    else:
        write_ubfc_ground_truth(folder / "ground_truth.txt", truth)
    return meta


def write_cohort(
    out_dir: str | Path,
    subjects: int,
    seconds: float,
    seed: int,
    recordings_per_subject: int = 1,
    layout: str = "synthetic",
    fps: float = DEFAULT_FPS,
    size: tuple[int, int] = DEFAULT_SIZE,
    codec: str | None = None,
    on_recording: Callable[[int, int, dict], None] | None = None,
    difficulty: str | Difficulty = EASY,
) -> dict:
    """Write a synthetic cohort to `out_dir` in `layout`; returns what `cohort.json` holds.

    `difficulty` is a preset's name or a Difficulty. `codec` defaults to the difficulty's, else to
    `h264-lossless` for `synthetic` and `ffv1` for `ubfc-rppg` (whose vid.avi is lossless).
    `on_recording(done, total, meta)` is called after each recording (for progress).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout == "ubfc-rppg" and recordings_per_subject != 1:
        raise ValueError("the ubfc-rppg layout holds one recording per subject")
    difficulty = difficulty_named(difficulty)
    video_codec = parse_codec(codec or difficulty.codec or (DEFAULT_CODEC if layout == "synthetic" else "ffv1"))
    specs = recording_specs(subjects, seconds, seed, recordings_per_subject, fps, size, difficulty)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scene = face_scene()
    recordings = []
    for done, spec in enumerate(specs, start=1):
        meta = write_recording(spec, scene, out, layout, video_codec)
        recordings.append(
            {
                "subject_id": meta["subject_id"],
                "recording_id": meta["recording_id"],
                "video": meta["video"],
                "n_frames": meta["n_frames"],
                "true_mean_hr_bpm": meta["true_mean_hr_bpm"],
                "true_hr_range_bpm": meta["true_hr_range_bpm"],
            }
        )
        if on_recording is not None:
            on_recording(done, len(specs), meta)
    cohort = {
        "generator": "pulsepipe synth",
        "package_version": package_version(),
        "seed": seed,
        "layout": layout,
        "parameters": {
            "subjects": subjects,
            "recordings_per_subject": recordings_per_subject,
            "seconds": float(seconds),
            "fps": float(fps),
            "width": int(size[0]),
            "height": int(size[1]),
            "codec": video_codec.name,
            "ppg_rate_hz": PPG_RATE_HZ,
            "hr_range_bpm": list(HR_RANGE_BPM),
        },
        "difficulty": dataclasses.asdict(difficulty),
        "recordings": recordings,
    }
    (out / "cohort.json").write_text(json.dumps(cohort, indent=2) + "\n")
    return cohort
