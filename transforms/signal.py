"""Signal processing on pulse waveforms: detrend, band-pass, heart rate, signal quality, SNR.

Engine-free functions on 1-D numpy arrays. `x` is a pulse waveform (BVP) of shape (N,) sampled at
`fs` Hz; heart rates are in beats per minute (BPM). Where a function has a counterpart in the
published open-rppg 0.1.1 code (`detrend`, `bandpass_filter`, `get_hr`, `SQI`), it gives the same
numbers; the differences are noted in its docstring.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.signal

from transforms.resample import FPS

PULSE_BAND_HZ = (0.5, 3.0)  # 30-180 BPM, the heart-rate range the project covers
BPM_RANGE = (30.0, 180.0)


def _check_fs(fs: float) -> float:
    fs = float(fs)
    if not np.isfinite(fs) or fs <= 0:
        raise ValueError(f"fs must be a positive sampling rate in Hz, got {fs}")
    return fs


def _check_signal(x, min_len: int, why: str) -> np.ndarray:
    """Return `x` as a float64 (N,) array, or raise ValueError saying what is wrong with it."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"expected a 1-D signal of shape (N,), got shape {x.shape}")
    n_bad = int(np.count_nonzero(~np.isfinite(x)))
    if n_bad:
        raise ValueError(f"signal has {n_bad} NaN or infinite samples of {x.size}; fill or drop them first")
    if x.size < min_len:
        raise ValueError(f"signal has {x.size} samples; need at least {min_len} ({why})")
    return x


def _check_bpm_range(bpm_range) -> tuple[float, float]:
    lo, hi = (float(v) for v in bpm_range)
    if not 0 < lo < hi:
        raise ValueError(f"bpm_range must be (low, high) with 0 < low < high, got {bpm_range}")
    return lo, hi


def _min_hr_len(fs: float, bpm_range) -> int:
    # One period of the slowest rate searched: anything shorter cannot show that rate.
    return max(3, int(np.ceil(fs * 60.0 / bpm_range[0])))


def detrend(x, fs: float = FPS, min_freq: float = 0.5) -> np.ndarray:
    """Smoothness-priors detrend (Tarvainen et al. 2002): `x - (I + lam^2 D^T D)^-1 x`.

    x: (N,), N >= 3. D is the (N-2, N) second-difference matrix and
    lam = 50 * (fs/30)^2 * (0.5/min_freq)^2, squared inside as in open-rppg's `detrend`.
    The system is pentadiagonal and positive definite, so it is solved by banded Cholesky in O(N)
    time and memory (10^6 samples in well under a second). Returns (N,) float64.
    """
    fs = _check_fs(fs)
    x = _check_signal(x, 3, "the second-difference penalty needs 3")
    if min_freq <= 0:
        raise ValueError(f"min_freq must be positive, got {min_freq}")
    lam = 50.0 * (fs / FPS) ** 2 * (0.5 / min_freq) ** 2
    n = x.size
    # Bands of D^T D, summed row by row of D = [1, -2, 1] shifted: exact at both ends for any N >= 3.
    second_diff = np.array([1.0, -2.0, 1.0])
    diag0, diag1, diag2 = np.zeros(n), np.zeros(n - 1), np.zeros(n - 2)
    for j in range(3):
        diag0[j:j + n - 2] += second_diff[j] ** 2
    for j in range(2):
        diag1[j:j + n - 2] += second_diff[j] * second_diff[j + 1]
    diag2 += second_diff[0] * second_diff[2]
    # Upper banded storage for solveh_banded: row 2 the diagonal, rows 1 and 0 the super-diagonals.
    bands = np.zeros((3, n))
    bands[2] = 1.0 + lam**2 * diag0
    bands[1, 1:] = lam**2 * diag1
    bands[0, 2:] = lam**2 * diag2
    trend = scipy.linalg.solveh_banded(bands, x, lower=False, check_finite=False)
    return x - trend


def bandpass(x, fs: float, low: float = 0.5, high: float = 3.0, order: int = 3, axis: int = -1) -> np.ndarray:
    """Zero-phase Butterworth band-pass, [low, high] Hz, applied forwards and backwards.

    x: (N,), or any shape with time along `axis` (each row filtered on its own). Same response as
    open-rppg's `bandpass_filter` (`butter(order)` + `filtfilt`, odd padding of 3 * (2 * order + 1)
    samples); run as second-order sections, which stays accurate for narrow bands at high rates where
    the transfer-function form loses precision. Returns float64 of the shape of x.
    """
    fs = _check_fs(fs)
    if not 0 < low < high < fs / 2:
        raise ValueError(f"band ({low}, {high}) Hz must satisfy 0 < low < high < fs/2 = {fs / 2}")
    sos = scipy.signal.butter(order, [low, high], btype="bandpass", fs=fs, output="sos")
    # filtfilt's default padding for the (b, a) form of this filter: keep the edges identical.
    padlen = 3 * (2 * order + 1)
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 0 or not np.isfinite(x).all():
        raise ValueError(f"expected a finite signal with a time axis, got shape {x.shape} "
                         f"with {int(np.count_nonzero(~np.isfinite(x)))} NaN or infinite samples")
    if x.shape[axis] <= padlen:
        raise ValueError(f"signal has {x.shape[axis]} samples; need at least {padlen + 1} "
                         f"(the zero-phase filter pads {padlen} samples at each end)")
    return scipy.signal.sosfiltfilt(sos, x, axis=axis, padtype="odd", padlen=padlen)


def postprocess_bvp(x, fs: float, low: float = 0.5, high: float = 3.0, usable=None) -> np.ndarray:
    """Band-pass, then standardise to zero mean and unit variance: what we do before HR estimation.

    x: (N,). usable: (N,) bool, the samples that hold the waveform (default: all); only they are filtered
    and standardised, joined, and the others come back as 0. Silence in a gap keeps the pulse's phase
    on either side of it, where joining the samples would put a phase jump into every spectrum taken
    across the gap. Returns (N,) float64; a signal with nothing in the band comes back as zeros.
    """
    if usable is not None:
        x, usable = np.asarray(x, dtype=np.float64), np.asarray(usable, bool)
        if usable.shape != x.shape:
            raise ValueError(f"usable has shape {usable.shape}; expected {x.shape}, one flag per sample")
        out = np.zeros(x.shape)
        out[usable] = postprocess_bvp(x[usable], fs, low, high)
        return out
    filtered = bandpass(x, fs, low, high)
    std = filtered.std()
    # Below this the band holds only rounding error of the input, not a waveform worth scaling up.
    if std <= 1e-10 * np.abs(np.asarray(x, dtype=np.float64)).max():
        return np.zeros_like(filtered)
    return (filtered - filtered.mean()) / std


def _peak_bpm(freqs_hz: np.ndarray, power: np.ndarray, bpm_range) -> float:
    """The peak's rate in BPM; NaN when the range holds no power (a flat signal has no rate)."""
    # Strict band edges, as open-rppg's get_hr.
    in_range = (freqs_hz > bpm_range[0] / 60.0) & (freqs_hz < bpm_range[1] / 60.0)
    if not in_range.any():
        raise ValueError(f"no spectral bin inside {bpm_range} BPM; the signal is too short")
    if not power[in_range].any():
        return float("nan")  # argmax would name the range's first bin, a rate nothing in the signal has
    return float(freqs_hz[in_range][np.argmax(power[in_range])] * 60.0)


def hr_welch(x, fs: float, bpm_range=BPM_RANGE) -> float:
    """Heart rate (BPM) at the peak of Welch's power spectrum, as open-rppg's `get_hr`.

    x: (N,). Segments of min(N - 1, 256/30 * fs) samples (about 8.5 s), Hann window, half overlap,
    zero-padded to 20000 points (0.09 BPM bins at 30 fps).
    """
    fs = _check_fs(fs)
    bpm_range = _check_bpm_range(bpm_range)
    x = _check_signal(x, _min_hr_len(fs, bpm_range), f"one period at {bpm_range[0]} BPM")
    nperseg = int(min(x.size - 1, 256 / FPS * fs))
    freqs_hz, power = scipy.signal.welch(x, fs, nperseg=nperseg, nfft=max(20000, nperseg))
    return _peak_bpm(freqs_hz, power, bpm_range)


def heart_rate(bvp, fs: float, bpm_range=BPM_RANGE, usable=None) -> tuple[float, float]:
    """The recipe every job uses for one recording: (HR in BPM, SQI).

    HR is the Welch peak of the band-passed, standardised waveform, NaN when nothing is left in the band
    (a flat waveform); SQI scores the raw waveform, as open-rppg does. usable: (N,) bool, the samples to
    score (default: all): the HR's with gaps silenced as `postprocess_bvp` does, the SQI's joined.
    Predicted and ground-truth BVP go through this same function.
    """
    x = postprocess_bvp(bvp, fs, usable=usable)
    raw = np.asarray(bvp, dtype=np.float64)
    return hr_welch(x, fs, bpm_range), sqi(raw if usable is None else raw[np.asarray(usable, bool)], fs)


def hr_windows(x, fs: float, window_s: float, step_s: float, bpm_range=BPM_RANGE, usable=None,
               min_usable: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """Heart rate on sliding windows of `window_s` seconds every `step_s` seconds.

    x: (N,), zero-mean (band-passed). Windows start at 0, step_s, 2 step_s, ... and end inside the
    signal; the tail shorter than a window is not used. usable: (N,) bool, the samples to score
    (default: all); a window is scored when they are at least `min_usable` of it, with the others
    silenced (0, as `postprocess_bvp` leaves them), else its rate is NaN. Returns
    (centres_s, bpm), each (n_windows,): window centres in seconds from the first sample, and each
    window's `hr_welch` rate.
    """
    fs = _check_fs(fs)
    window_len = int(round(window_s * fs))
    step_len = int(round(step_s * fs))
    if window_len < 1 or step_len < 1:
        raise ValueError(f"window_s and step_s must each span at least one sample, got {window_s}, {step_s}")
    x = _check_signal(x, window_len, f"one window of {window_s} s")
    usable = np.ones(x.shape, bool) if usable is None else np.asarray(usable, bool)
    if usable.shape != x.shape:
        raise ValueError(f"usable has shape {usable.shape}; expected {x.shape}, one flag per sample")
    windows = np.lib.stride_tricks.sliding_window_view(x, window_len)[::step_len]  # (n_windows, window_len)
    masks = np.lib.stride_tricks.sliding_window_view(usable, window_len)[::step_len]
    bpm = np.array([hr_welch(np.where(m, w, 0.0), fs, bpm_range) if m.mean() >= min_usable else np.nan
                    for w, m in zip(windows, masks)])
    centres_s = (np.arange(len(windows)) * step_len + window_len / 2) / fs
    return centres_s, bpm


def _autocorr_peak(window: np.ndarray, fs: float, min_freq: float, max_freq: float) -> float:
    """Highest normalised autocorrelation at lags of one period in [1/max_freq, 1/min_freq] s, in [0, 1]."""
    n = window.size
    if n < 2:
        return 0.0
    centred = window - window.mean()
    if not centred.any():
        return 0.0  # a flat window has no pulse (open-rppg's SQI returns 1.0 here: 0/0 then clipped)
    centred = centred / (centred.std() + 1e-8)
    autocorr = scipy.signal.correlate(centred, centred, mode="full")[n - 1:]  # lags 0 .. n-1
    autocorr = autocorr / autocorr[0]
    min_lag = max(1, int(fs / max_freq))
    max_lag = min(n - 1, int(fs / min_freq))
    if min_lag >= max_lag:
        return 0.0
    return float(np.clip(autocorr[min_lag:max_lag + 1].max(), 0.0, 1.0))


def sqi(x, fs: float, window_s: float = 10, min_freq: float = 0.5, max_freq: float = 3.0) -> float:
    """Signal quality index in [0, 1]: mean over windows of the autocorrelation peak at a pulse lag.

    x: (N,), the raw (unfiltered) waveform as open-rppg scores it. Windows are laid out as open-rppg's
    `SQI`: floor(N / W) + 1 windows of W = round(window_s * fs) samples, evenly strided from the first
    to the last full window (one window, possibly shorter than W, when N < W). A periodic pulse scores
    near 1, white noise near 0. Same numbers as open-rppg except for flat windows (0 here, 1 there).
    """
    fs = _check_fs(fs)
    x = _check_signal(x, 2, "an autocorrelation needs 2")
    window_len = int(round(window_s * fs))
    if window_len < 1:
        raise ValueError(f"window_s must span at least one sample, got {window_s}")
    n_windows = x.size // window_len + 1
    stride = (x.size - window_len) // (n_windows - 1) if n_windows > 1 else 0
    scores = [_autocorr_peak(x[i * stride:i * stride + window_len], fs, min_freq, max_freq)
              for i in range(n_windows)]
    return float(np.mean(scores))


def snr_db_from_spectrum(freqs_hz, power, hr_bpm: float, band_hz=PULSE_BAND_HZ,
                         half_width_hz: float = 0.1) -> float:
    """SNR (dB) of a power spectrum around a heart rate, as de Haan & Jeanne (2013).

    freqs_hz, power: (F,) bin frequencies and powers. Both sums run over the bins inside `band_hz`:
    signal, the bins within `half_width_hz` of the HR frequency or of its first harmonic (2 x HR);
    noise, the rest. A harmonic above the band adds nothing (power there is neither). Returns
    10 log10(signal / noise): +inf when there is no noise power, -inf when there is no signal power,
    NaN when the band holds no power at all (a flat waveform).
    """
    freqs_hz = np.asarray(freqs_hz, dtype=np.float64)
    power = np.asarray(power, dtype=np.float64)
    hr_hz = float(hr_bpm) / 60.0
    if not np.isfinite(hr_hz) or hr_hz <= 0:
        raise ValueError(f"hr_bpm must be a positive rate, got {hr_bpm}")
    near_pulse = (np.abs(freqs_hz - hr_hz) <= half_width_hz) | (np.abs(freqs_hz - 2 * hr_hz) <= half_width_hz)
    in_band = (freqs_hz >= band_hz[0]) & (freqs_hz <= band_hz[1])
    signal_power = power[in_band & near_pulse].sum()
    noise_power = power[in_band & ~near_pulse].sum()
    if signal_power <= 0 and noise_power <= 0:
        return float("nan")
    if noise_power <= 0:
        return float("inf")
    if signal_power <= 0:
        return float("-inf")
    return float(10.0 * np.log10(signal_power / noise_power))


def snr_db(bvp, fs: float, hr_bpm: float, band_hz=PULSE_BAND_HZ, half_width_hz: float = 0.1,
           window: str = "hann") -> float:
    """SNR (dB) of a pulse waveform at a known heart rate (de Haan & Jeanne 2013).

    bvp: (N,). Power from the periodogram (mean removed) zero-padded to 0.01 Hz bins; see
    `snr_db_from_spectrum` for the ratio. The Hann window keeps a clean pulse's leakage out of the
    noise bins; rPPG-Toolbox uses no window (`window="boxcar"`), which caps a pure sine near 15 dB.
    """
    fs = _check_fs(fs)
    bvp = _check_signal(bvp, int(np.ceil(2 * fs)), "2 seconds")
    nfft = max(bvp.size, int(np.ceil(fs / 0.01)))
    freqs_hz, power = scipy.signal.periodogram(bvp, fs, window=window, nfft=nfft, detrend="constant")
    return snr_db_from_spectrum(freqs_hz, power, hr_bpm, band_hz, half_width_hz)
