"""Synthetic rPPG cohort with known truth: face videos whose skin pulses with a ground-truth PPG.

Every later stage (heart rate from one video, preprocessing, cohort evaluation) is tested against
these recordings, so the pulse is a colour change of SKIN only, with the blood-volume signature of
skin (relative pulsatile amplitudes R:G:B = 0.33:0.77:0.53, de Haan & van Leest 2014), on top of the
nuisances of a real recording: small head motion, slow illumination drift and sensor noise.

How one recording is made
-------------------------
- Beats: RR intervals around the recording's heart rate with beat-to-beat jitter and respiratory
  sinus arrhythmia (a slow sinusoidal RR modulation at the breathing rate).
- Ground-truth PPG: two Gaussians per beat (systolic peak, then the diastolic wave after the
  dicrotic notch), sampled at its own rate (`PPG_RATE_HZ`, not the video rate) from t = 0.
- Video: the public-domain astronaut photo (`skimage.data.astronaut()`), skin found once with YCrCb
  thresholds (largest component, soft edges), tinted per subject. Per frame, skin is multiplied by
  ``1 - amplitude * signature * (ppg(t - delay) - mean)``: skin reflects less light while it holds more
  blood, so the green trace of the skin falls when the PPG rises (as in real recordings). The face is
  then moved (translation, scale), lit (slow multiplicative drift), noised (Gaussian, in DN) and
  rounded to uint8. Frames are rendered and encoded one at a time (losslessly by default), so memory
  does not grow with the duration.
- Everything is drawn from ``np.random.default_rng([seed, subject_index, ...])``: the same seed gives
  the same specs, byte-identical ``ppg.csv`` and identical decoded frames.

Layout ``synthetic`` (this project's own)::

    OUT/cohort.json                       seed, parameters, package version, recordings (ids, paths,
                                          true mean HR)
    OUT/<subject_id>/<recording_id>/video.mp4   (video.avi for --codec ffv1)
    OUT/<subject_id>/<recording_id>/ppg.csv     header ``t_s,ppg``; one row per PPG sample at
                                                `PPG_RATE_HZ`, t_s from 0, spanning the video
    OUT/<subject_id>/<recording_id>/meta.json   ids, seed, fps, frame count, size, codec, true mean HR,
                                                skin tone, pulse, motion, light and noise parameters

Subject ids are ``s001, s002, ...``; recording ids ``s001-r01, s001-r02, ...`` (unique in the cohort).

Layout ``ubfc-rppg`` (UBFC-rPPG DATASET_2 as published)::

    OUT/subject<N>/vid.avi           lossless (FFV1 by default)
    OUT/subject<N>/ground_truth.txt  three lines of space-separated floats on the PPG time base:
                                     PPG values, instantaneous HR (BPM), timestamps (s)

plus the same ``OUT/cohort.json`` as a record of the truth (adapters that list ``subject*`` ignore it).
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
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
from scipy.ndimage import gaussian_filter1d

PPG_RATE_HZ = 64.0
HR_RANGE_BPM = (40.0, 160.0)
# Relative pulsatile amplitude of skin per channel (blood-volume-pulse signature), green strongest.
PULSE_SIGNATURE_RGB = (0.33, 0.77, 0.53)
DEFAULT_SIZE = (320, 240)  # (W, H): decode and face-detection cost scale with pixels
DEFAULT_FPS = 30.0
LAYOUTS = ("synthetic", "ubfc-rppg")

# Random streams of one recording, each its own generator so adding draws to one never shifts another.
_BEATS, _MOTION, _NOISE = 1, 2, 3


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
    def draw(cls, seed: int, index: int, n_subjects: int) -> SubjectSpec:
        """Subject `index` of a cohort of `n_subjects` drawn from `seed`.

        The HR range is cut into `n_subjects` strata and each subject gets one (in an order drawn from
        the seed), so even a small cohort spans 40-160 BPM.
        """
        if not 0 <= index < n_subjects:
            raise ValueError(f"subject index {index} outside a cohort of {n_subjects}")
        stratum = np.random.default_rng([seed]).permutation(n_subjects)[index]
        rng = np.random.default_rng([seed, index])
        lo, hi = HR_RANGE_BPM
        hr = lo + (hi - lo) * (stratum + rng.uniform()) / n_subjects
        tone = float(rng.uniform(0.0, 1.0))
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

    @classmethod
    def draw(
        cls,
        subject: SubjectSpec,
        index: int,
        seed: int,
        seconds: float,
        fps: float = DEFAULT_FPS,
        size: tuple[int, int] = DEFAULT_SIZE,
    ) -> RecordingSpec:
        """Recording `index` of `subject`, drawn from ``default_rng([seed, subject.index, index])``.

        The first recording is at the subject's resting HR; later ones (other sessions) differ by up
        to 8 BPM, kept inside HR_RANGE_BPM.
        """
        if seconds <= 0 or fps <= 0:
            raise ValueError(f"seconds and fps must be positive, got {seconds}, {fps}")
        rng = np.random.default_rng([seed, subject.index, index])
        offset = rng.uniform(-8.0, 8.0) if index > 0 else 0.0
        return cls(
            subject=subject,
            recording_id=f"{subject.subject_id}-r{index + 1:02d}",
            index=index,
            seed=seed,
            seconds=float(seconds),
            fps=float(fps),
            size=(int(size[0]), int(size[1])),
            target_hr_bpm=round(float(np.clip(subject.hr_bpm + offset, *HR_RANGE_BPM)), 3),
            rr_jitter=round(float(rng.uniform(0.03, 0.05)), 4),
            rsa_depth=round(float(rng.uniform(0.02, 0.05)), 4),
            resp_rate_hz=round(float(rng.uniform(0.15, 0.33)), 4),
            dicrotic_ratio=round(float(rng.uniform(0.3, 0.55)), 4),
            pulse_amplitude=round(float(rng.uniform(0.008, 0.016)), 5),
            pulse_delay_s=round(float(rng.uniform(0.0, 0.03)), 4),
            motion_shift_px=round(float(rng.uniform(1.0, 4.0)), 3),
            motion_scale=round(float(rng.uniform(0.01, 0.03)), 4),
            light_drift=round(float(rng.uniform(0.01, 0.04)), 4),
            noise_sigma_dn=round(float(rng.uniform(1.0, 2.0)), 3),
        )

    @property
    def n_frames(self) -> int:
        return int(round(self.seconds * self.fps))

    def rng(self, stream: int) -> np.random.Generator:
        """The generator of one random stream (`_BEATS`, `_MOTION`, `_NOISE`) of this recording."""
        return np.random.default_rng([self.seed, self.subject.index, self.index, stream])


# --------------------------------------------------------------------------------------------------
# Pulse
# --------------------------------------------------------------------------------------------------


def beat_onsets(spec: RecordingSpec) -> np.ndarray:
    """Onset times of the beats (s), shape (n_beats,), from before t=0 to past the end.

    RR_k = mean_RR * (1 + rsa_depth * sin(2 pi f_resp t_k + phase) + rr_jitter * N(0, 1)), then the
    series is stretched so its `mean_hr_bpm` over [0, seconds] is target_hr_bpm: the cohort's HR strata
    hold for the recorded truth, not only for the targets.
    """
    rng = spec.rng(_BEATS)
    mean_rr = 60.0 / spec.target_hr_bpm
    phase = rng.uniform(0.0, 2 * np.pi)
    t = -mean_rr * (1.0 + rng.uniform())  # random phase of the first beat relative to the video
    onsets = [t]
    while t < 1.2 * spec.seconds + 3 * mean_rr:  # margin for the stretch below
        rsa = spec.rsa_depth * np.sin(2 * np.pi * spec.resp_rate_hz * t + phase)
        rr = mean_rr * (1.0 + rsa + spec.rr_jitter * rng.standard_normal())
        t += max(rr, 0.5 * mean_rr)  # a negative or tiny RR is not a heartbeat
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


def ground_truth(spec: RecordingSpec, onsets: np.ndarray | None = None) -> GroundTruth:
    """The ground-truth PPG of `spec`, sampled at PPG_RATE_HZ over [0, seconds)."""
    onsets = beat_onsets(spec) if onsets is None else onsets
    t = np.arange(int(np.ceil(spec.seconds * PPG_RATE_HZ))) / PPG_RATE_HZ
    beat = np.searchsorted(onsets, t, side="right") - 1  # index of the beat in progress
    hr = 60.0 / (onsets[beat + 1] - onsets[beat])
    return GroundTruth(
        t_s=t,
        ppg=ppg_waveform(t, onsets, spec.dicrotic_ratio),
        hr_bpm=hr,
        mean_hr_bpm=round(mean_hr_bpm(onsets, spec.seconds), 4),
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

    Gaussian smoothing over `corr_s` seconds keeps it well below the heart-rate band.
    """
    walk = gaussian_filter1d(np.cumsum(rng.standard_normal(n)), corr_s * fps, mode="nearest")
    walk -= walk.mean()
    top = np.abs(walk).max()
    return walk * (peak / top) if top > 0 else walk


@dataclass(frozen=True)
class Nuisance:
    """Per-frame head pose and light, shape (n_frames,) each."""

    dx_px: np.ndarray  # translation, output pixels
    dy_px: np.ndarray
    scale: np.ndarray  # relative size change around the face centre
    light: np.ndarray  # relative illumination change


def nuisance(spec: RecordingSpec) -> Nuisance:
    """Head motion and illumination drift of `spec`; a few floats per frame, so held whole."""
    rng, n, fps = spec.rng(_MOTION), spec.n_frames, spec.fps
    return Nuisance(
        dx_px=smooth_walk(rng, n, fps, 1.0, spec.motion_shift_px),
        dy_px=smooth_walk(rng, n, fps, 1.0, spec.motion_shift_px * 0.6),
        scale=smooth_walk(rng, n, fps, 1.5, spec.motion_scale),
        light=smooth_walk(rng, n, fps, 4.0, spec.light_drift),
    )


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
    cx, cy = scene.face_centre

    for k in range(n):
        s = 1.0 + motion.scale[k]
        head = np.array([[s, 0, cx * (1 - s)], [0, s, cy * (1 - s)], [0, 0, 1]])  # scale about the face
        shift = np.array([[1, 0, motion.dx_px[k]], [0, 1, motion.dy_px[k]], [0, 0, 1]])
        m = (shift @ to_output @ head)[:2]
        # warping is linear: warp the photo and the pulse map apart and mix them at the (smaller) output size
        frame, pulse = (cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
                        for img in (base, pulse_map))
        frame -= np.float32(blood[k]) * pulse
        frame *= np.float32(1.0 + motion.light[k])
        frame += noise_rng.standard_normal(frame.shape, dtype=np.float32) * np.float32(spec.noise_sigma_dn)
        yield np.clip(np.rint(frame), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Encoding
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
        opts = (("crf", crf.group(1)), ("preset", "veryfast"))
        return VideoCodec(name, "libx264", "yuv420p", opts, "mp4", False)
    raise ValueError(f"unknown codec {name!r}; choose one of {', '.join(CODECS)}")


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


def package_version() -> str:
    try:
        return importlib.metadata.version("pulsepipe")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def recording_specs(
    subjects: int,
    seconds: float,
    seed: int,
    recordings_per_subject: int = 1,
    fps: float = DEFAULT_FPS,
    size: tuple[int, int] = DEFAULT_SIZE,
) -> list[RecordingSpec]:
    """All recording specs of a cohort, subject by subject."""
    if subjects < 1 or recordings_per_subject < 1:
        raise ValueError("a cohort needs at least one subject and one recording per subject")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    specs = []
    for i in range(subjects):
        subject = SubjectSpec.draw(seed, i, subjects)
        specs += [RecordingSpec.draw(subject, j, seed, seconds, fps, size) for j in range(recordings_per_subject)]
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
    """What meta.json holds: ids, truth, and every drawn parameter."""
    params = dataclasses.asdict(spec)
    subject = params.pop("subject")
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
        "pulse_signature_rgb": list(PULSE_SIGNATURE_RGB),
        "pulse_polarity": "skin darkens as the PPG rises",
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
) -> dict:
    """Write a synthetic cohort to `out_dir` in `layout`; returns what `cohort.json` holds.

    `codec` defaults to `h264-lossless` for `synthetic` and `ffv1` for `ubfc-rppg` (whose vid.avi is
    lossless). `on_recording(done, total, meta)` is called after each recording (for progress).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout == "ubfc-rppg" and recordings_per_subject != 1:
        raise ValueError("the ubfc-rppg layout holds one recording per subject")
    video_codec = parse_codec(codec or (DEFAULT_CODEC if layout == "synthetic" else "ffv1"))
    specs = recording_specs(subjects, seconds, seed, recordings_per_subject, fps, size)
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
        "recordings": recordings,
    }
    (out / "cohort.json").write_text(json.dumps(cohort, indent=2) + "\n")
    return cohort
