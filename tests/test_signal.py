"""transforms.signal: closed-form cases, and the published open-rppg formulas written out independently."""
import numpy as np
import pytest
import scipy.signal

from transforms import signal as sig

FS = 30.0


def sine(freq_hz, seconds=30.0, fs=FS, phase=0.3):
    t = np.arange(int(seconds * fs)) / fs
    return np.sin(2 * np.pi * freq_hz * t + phase)


def dense_detrend(x, fs=30.0, min_freq=0.5):
    """Tarvainen et al. (2002) with a dense solve: x - (I + lam^2 D^T D)^-1 x, lam as open-rppg."""
    lam = 50 * (fs / 30) ** 2 * (0.5 / min_freq) ** 2
    n = x.size
    second_diff = np.diff(np.eye(n), 2, axis=0)  # (n-2, n)
    return x - np.linalg.solve(np.eye(n) + lam**2 * second_diff.T @ second_diff, x)


# --- heart rate -------------------------------------------------------------------------------

@pytest.mark.parametrize("freq_hz", [0.7, 1.1, 1.37, 2.3])
def test_hr_of_a_sine_is_60_times_its_frequency(freq_hz):
    bpm = sig.hr_welch(sine(freq_hz), FS)
    assert abs(bpm - 60 * freq_hz) <= 0.5


def test_hr_search_is_limited_to_bpm_range():
    two_tones = sine(1.0) + 2 * sine(2.5)
    assert abs(sig.hr_welch(two_tones, FS) - 150) <= 0.5
    assert abs(sig.hr_welch(two_tones, FS, bpm_range=(30, 120)) - 60) <= 0.5


def test_hr_windows_count_centres_and_values():
    x = sine(1.3, seconds=60)
    centres_s, bpm = sig.hr_windows(x, FS, window_s=10, step_s=2)
    n_expected = (1800 - 300) // 60 + 1
    assert centres_s.shape == bpm.shape == (n_expected,)
    np.testing.assert_allclose(centres_s, 5 + 2 * np.arange(n_expected))
    np.testing.assert_allclose(bpm, 78, atol=0.5)


def test_hr_windows_score_usable_samples_on_the_signals_own_time_axis():
    x = sine(1.3, seconds=60)
    usable = np.ones(x.size, bool)
    usable[600:750] = False  # 5 s without a face, from 20 s to 25 s
    usable[1500:1515] = False  # half a second, from 50 s
    x_gaps = np.where(usable, x, 1e3)  # what lies in a gap must not reach a rate
    centres_s, bpm = sig.hr_windows(x_gaps, FS, window_s=10, step_s=5, usable=usable)
    np.testing.assert_allclose(centres_s, 5 + 5 * np.arange(11))
    # windows [15, 25), [20, 30) and [25, 35) ... hold 50%, 50% and 0% of the 5 s gap
    overlaps_gap = (centres_s - 5 < 25) & (centres_s + 5 > 20)
    assert np.isnan(bpm[overlaps_gap]).all() and overlaps_gap.sum() == 2
    np.testing.assert_allclose(bpm[~overlaps_gap], 78, atol=1.0)  # the half-second gap: 95% usable
    _, strict = sig.hr_windows(x_gaps, FS, window_s=10, step_s=5, usable=usable, min_usable=1.0)
    assert np.isnan(strict[-2:]).all()  # both windows over the half-second gap
    with pytest.raises(ValueError, match="one flag per sample"):
        sig.hr_windows(x, FS, 10, 5, usable=usable[:-1])


def test_gaps_are_silenced_not_joined():
    # Half a second without a face: joined, the sine's phase jumps by 0.65 cycles and splits its peak.
    x = sine(1.3, seconds=10)
    usable = np.ones(x.size, bool)
    usable[150:165] = False
    assert abs(sig.hr_welch(sig.postprocess_bvp(x[usable], FS), FS) - 78) > 2  # why not join
    filled = sig.postprocess_bvp(np.where(usable, x, 1e3), FS, usable=usable)
    assert (filled[~usable] == 0).all()
    np.testing.assert_allclose(filled[usable], sig.postprocess_bvp(x[usable], FS))
    hr, quality = sig.heart_rate(np.where(usable, x, 1e3), FS, usable=usable)
    assert abs(hr - 78) <= 0.5 and quality == pytest.approx(sig.sqi(x[usable], FS))


# --- filters ----------------------------------------------------------------------------------

def amplitude_ratio(freq_hz, seconds=60.0):
    x = sine(freq_hz, seconds)
    y = sig.bandpass(x, FS)
    middle = slice(len(x) // 4, 3 * len(x) // 4)  # away from the filter's edge transients
    return y[middle].std() / x[middle].std()


def test_bandpass_passes_the_pulse_and_stops_drift_and_flicker():
    assert amplitude_ratio(1.2) > 0.99
    assert amplitude_ratio(0.1) < 1e-3
    assert amplitude_ratio(8.0) < 1e-2


def test_bandpass_filters_each_row_along_axis():
    rows = np.random.default_rng(0).standard_normal((3, 200))
    np.testing.assert_allclose(sig.bandpass(rows, FS, axis=1)[2], sig.bandpass(rows[2], FS))


def test_postprocess_bvp_is_standardised():
    y = sig.postprocess_bvp(3 + 5 * sine(1.2) + np.linspace(0, 10, 900), FS)
    assert abs(y.mean()) < 1e-9 and abs(y.std() - 1) < 1e-9
    np.testing.assert_array_equal(sig.postprocess_bvp(np.ones(100), FS), 0)


def test_detrend_removes_trends_and_keeps_the_pulse():
    t = np.arange(900) / FS
    pulse = sine(1.0)
    for trend in (3.0 * t / 30, 5.0 * (t / 30) ** 2 - 2 * t / 30):
        detrended = sig.detrend(pulse + trend, FS)
        assert np.corrcoef(detrended, pulse)[0, 1] > 0.99


def test_detrend_equals_the_dense_solve():
    x = np.random.default_rng(1).standard_normal(300).cumsum()
    np.testing.assert_allclose(sig.detrend(x, FS), dense_detrend(x, FS), rtol=0, atol=1e-8)
    np.testing.assert_allclose(sig.detrend(x, 60, min_freq=0.7), dense_detrend(x, 60, 0.7), rtol=0, atol=1e-8)
    for n in (3, 4, 5):  # the band ends overlap for the shortest signals
        np.testing.assert_allclose(sig.detrend(x[:n], FS), dense_detrend(x[:n], FS), rtol=0, atol=1e-8)


def test_detrend_is_linear_in_time_and_memory():
    n = 200_000  # a dense (n, n) matrix would need 320 GB
    ramp = np.linspace(0, 100, n)
    out = sig.detrend(ramp + np.sin(np.arange(n) * 2 * np.pi / 30), FS)
    assert out.shape == (n,)
    assert np.abs(out[1000:-1000]).max() < 1.01  # the ramp is gone, the sine stays


# --- quality ----------------------------------------------------------------------------------

def test_sqi_of_a_clean_pulse_is_high_and_of_noise_low():
    assert sig.sqi(sine(1.2, seconds=60), FS) > 0.85
    assert sig.sqi(np.random.default_rng(2).standard_normal(1800), FS) < 0.3
    assert sig.sqi(np.zeros(600), FS) == 0.0  # flat: no pulse


def test_snr_of_a_sine_is_high_and_falls_with_noise():
    clean = sine(1.2)
    noise = np.random.default_rng(3).standard_normal(clean.size)
    snrs = [sig.snr_db(clean + level * noise, FS, 72) for level in (0.0, 0.3, 1.0, 3.0)]
    assert snrs[0] > 30
    assert all(a > b for a, b in zip(snrs, snrs[1:]))
    assert sig.snr_db(clean, FS, 100) < 0  # at the wrong rate the pulse counts as noise


@pytest.mark.parametrize("hr_bpm", [84.0, 108.0])  # 108: the harmonic (3.6 Hz) lies above the band
def test_snr_from_spectrum_matches_a_brute_force_count(hr_bpm):
    freqs = np.arange(0, 5, 0.01)
    power = np.random.default_rng(4).random(freqs.size)
    hr_hz = hr_bpm / 60
    signal_power = noise_power = 0.0
    for f, p in zip(freqs, power):
        if not 0.5 <= f <= 3.0:
            continue
        if abs(f - hr_hz) <= 0.1 or abs(f - 2 * hr_hz) <= 0.1:
            signal_power += p
        else:
            noise_power += p
    expected = 10 * np.log10(signal_power / noise_power)
    assert sig.snr_db_from_spectrum(freqs, power, hr_bpm) == pytest.approx(expected, rel=1e-12)


def test_snr_ignores_power_above_the_band_even_at_the_harmonic():
    noise = 0.5 * np.random.default_rng(5).standard_normal(900)
    pulse = sine(1.8) + noise  # 108 BPM
    assert sig.snr_db(pulse + 3 * sine(3.6), FS, 108) == pytest.approx(sig.snr_db(pulse, FS, 108), abs=0.05)


def test_a_flat_waveform_has_no_rate_and_no_snr():
    for flat in (np.zeros(900), np.full(900, 3.0)):
        assert np.isnan(sig.hr_welch(flat - flat.mean(), FS))
        hr, quality = sig.heart_rate(flat, FS)
        assert np.isnan(hr) and quality == 0.0
        assert np.isnan(sig.snr_db(flat, FS, 72))


# --- bad input --------------------------------------------------------------------------------

ONE_D_FUNCTIONS = {
    "detrend": lambda x: sig.detrend(x, FS),
    "bandpass": lambda x: sig.bandpass(x, FS),
    "hr_welch": lambda x: sig.hr_welch(x, FS),
    "sqi": lambda x: sig.sqi(x, FS),
    "snr_db": lambda x: sig.snr_db(x, FS, 72),
    "hr_windows": lambda x: sig.hr_windows(x, FS, 5, 1),
}


@pytest.mark.parametrize("name", sorted(ONE_D_FUNCTIONS))
def test_bad_input_raises_value_error(name):
    call = ONE_D_FUNCTIONS[name]
    good = sine(1.2, seconds=10)
    with_nan = good.copy()
    with_nan[5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        call(with_nan)
    with pytest.raises(ValueError, match="samples"):
        call(good[:1])
    if name != "bandpass":  # bandpass filters along an axis of any array
        with pytest.raises(ValueError, match="1-D"):
            call(np.stack([good, good]))


def test_bad_parameters_raise_value_error():
    with pytest.raises(ValueError, match="fs/2"):
        sig.bandpass(sine(1.2), FS, low=0.5, high=20)
    with pytest.raises(ValueError, match="fs"):
        sig.hr_welch(sine(1.2), 0)
    with pytest.raises(ValueError, match="bpm_range"):
        sig.hr_welch(sine(1.2), FS, bpm_range=(180, 30))


# --- the published formulas, written out independently ---------------------------------------

def reference_sqi(x, fs, window_s=10, min_freq=0.5, max_freq=3.0):
    """open-rppg's SQI: evenly strided windows, normalised autocorrelation peak at a pulse lag."""
    window_len = round(window_s * fs)
    n_windows = int(len(x) / window_len) + 1
    stride = int((len(x) - window_len) / (n_windows - 1)) if n_windows > 1 else 0
    scores = []
    for i in range(n_windows):
        w = x[i * stride:i * stride + window_len]
        w = (w - w.mean()) / (w.std() + 1e-8)
        ac = np.correlate(w, w, mode="full")[len(w) - 1:]
        ac = ac / ac[0]
        lo, hi = max(1, int(fs / max_freq)), min(len(ac) - 1, int(fs / min_freq))
        scores.append(0.0 if lo >= hi else max(0.0, min(1.0, ac[lo:hi + 1].max())))
    return np.mean(scores)


@pytest.mark.parametrize("n", [100, 299, 301, 900, 1000])
def test_matches_the_published_formulas_on_random_signals(n):
    rng = np.random.default_rng(n)
    x = 0.7 * np.sin(2 * np.pi * 1.3 * np.arange(n) / FS) + rng.standard_normal(n)
    np.testing.assert_allclose(sig.detrend(x, FS), dense_detrend(x, FS), rtol=0, atol=1e-8)
    b, a = scipy.signal.butter(3, [0.5, 3.0], btype="band", fs=FS)
    np.testing.assert_allclose(sig.bandpass(x, FS), scipy.signal.filtfilt(b, a, x), rtol=0, atol=1e-9)
    freqs, power = scipy.signal.welch(x, FS, nfft=20000, nperseg=int(min(n - 1, 256 / 30 * FS)))
    in_range = (freqs > 0.5) & (freqs < 3.0)
    assert sig.hr_welch(x, FS) == pytest.approx(freqs[in_range][np.argmax(power[in_range])] * 60, abs=1e-9)
    assert sig.sqi(x, FS) == pytest.approx(reference_sqi(x, FS), abs=1e-9)


def test_heart_rate_recipe_recovers_a_noisy_pulse_and_scores_it():
    fs = 30.0
    t = np.arange(int(20 * fs)) / fs
    rng = np.random.default_rng(3)
    clean = np.sin(2 * np.pi * 1.25 * t) + 0.3 * t  # 75 BPM on a drift the band-pass must remove
    hr, quality = sig.heart_rate(clean + 0.2 * rng.standard_normal(t.size), fs)
    assert abs(hr - 75.0) < 0.5
    _, noise_quality = sig.heart_rate(rng.standard_normal(t.size), fs)
    assert quality > 0.6 > noise_quality
