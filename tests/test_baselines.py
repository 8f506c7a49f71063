"""transforms.baselines on synthetic skin-colour traces with a known pulse."""
import numpy as np
import pytest

from transforms import baselines
from transforms.signal import hr_welch, postprocess_bvp

FS = 30.0
SKIN_DC = np.array([180.0, 125.0, 95.0])  # mean R, G, B of a face crop, 0-255
PULSE_SIGNATURE = np.array([0.33, 0.77, 0.53])  # relative pulsatile strength per channel (Wang et al. 2017)


def skin_traces(bpm, seconds=30.0, illumination=0.0, noise=0.05, seed=0):
    """(T, 3) mean skin colour and the (T,) blood-volume pulse that drives it.

    Skin model of both papers: C(t) = C0 * (1 - a * bvp(t) * u_p) * (1 + illumination(t)) + noise,
    darker when more blood (a = 0.3 %), times a common multiplicative light change: a slow drift plus,
    when `illumination` > 0, flicker inside the pulse band at that relative amplitude.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * FS)) / FS
    f = bpm / 60
    bvp = np.sin(2 * np.pi * f * t) + 0.3 * np.sin(2 * np.pi * 2 * f * t + 0.8)  # with a harmonic
    light = 0.05 * t / seconds + illumination * (np.sin(2 * np.pi * 0.83 * t) + 0.7 * np.sin(2 * np.pi * 1.9 * t + 1))
    rgb = SKIN_DC * (1 - 0.003 * bvp[:, None] * PULSE_SIGNATURE) * (1 + light[:, None])
    return rgb + noise * rng.standard_normal(rgb.shape), bvp


def correlation(pulse, truth):
    return np.corrcoef(postprocess_bvp(pulse, FS), postprocess_bvp(truth, FS))[0, 1]


@pytest.mark.parametrize("method", ["pos", "chrom"])
@pytest.mark.parametrize("bpm", [52.0, 75.0, 118.0])
def test_pos_and_chrom_recover_the_pulse_rate(method, bpm):
    rgb, _ = skin_traces(bpm, illumination=0.01, seed=int(bpm))
    pulse = baselines.BASELINES[method](rgb, FS)
    assert pulse.shape == (rgb.shape[0],)
    assert abs(hr_welch(postprocess_bvp(pulse, FS), FS) - bpm) <= 2


@pytest.mark.parametrize("method", sorted(baselines.BASELINES))
def test_every_method_rises_with_blood_volume(method):
    rgb, bvp = skin_traces(70.0, noise=0.01)
    assert correlation(baselines.BASELINES[method](rgb, FS), bvp) > 0.9


def test_pos_and_chrom_cancel_a_common_illumination_change_green_does_not():
    rgb, bvp = skin_traces(72.0, illumination=0.02)  # light flicker ~7x the pulse, inside the band
    r_green = correlation(baselines.green(rgb, FS), bvp)
    for method in (baselines.pos, baselines.chrom):
        r = correlation(method(rgb, FS), bvp)
        assert r > 0.8 and r > r_green + 0.3


def test_rgb_means_averages_pixels_and_blanks_frames_without_a_face():
    frames = np.zeros((4, 2, 3, 3), dtype=np.uint8)
    frames[..., 0], frames[..., 1], frames[..., 2] = 200, 100, 50
    frames[1, 0, 0] = (255, 255, 255)  # one bright pixel of six
    rgb = baselines.rgb_means(frames, mask=np.array([True, True, False, True]))
    assert rgb.dtype == np.float64 and rgb.shape == (4, 3)
    np.testing.assert_allclose(rgb[0], [200, 100, 50])
    np.testing.assert_allclose(rgb[1], [(5 * 200 + 255) / 6, (5 * 100 + 255) / 6, (5 * 50 + 255) / 6])
    assert np.isnan(rgb[2]).all()
    with pytest.raises(ValueError, match="shape"):
        baselines.rgb_means(frames[0])
    with pytest.raises(ValueError, match="mask"):
        baselines.rgb_means(frames, mask=np.ones(3, dtype=bool))


@pytest.mark.parametrize("method", sorted(baselines.BASELINES))
def test_frames_without_a_face_are_interpolated(method):
    rgb, bvp = skin_traces(80.0, noise=0.01)
    gappy = rgb.copy()
    gappy[:4] = np.nan  # face found late
    gappy[300:310] = np.nan  # a third of a second lost
    gappy[-3:] = np.nan  # lost at the end
    pulse = baselines.BASELINES[method](gappy, FS)
    assert pulse.shape == (rgb.shape[0],) and np.isfinite(pulse).all()
    assert abs(hr_welch(postprocess_bvp(pulse, FS), FS) - 80) <= 2


@pytest.mark.parametrize("method", sorted(baselines.BASELINES))
def test_edge_cases(method):
    run = baselines.BASELINES[method]
    flat = np.full((101, 3), 120.0)  # 101: not a whole number of CHROM hops
    assert np.isfinite(run(flat, FS)).all() and run(flat, FS).shape == (101,)
    with pytest.raises(ValueError, match="no valid frame"):
        run(np.full((100, 3), np.nan), FS)
    with pytest.raises(ValueError, match="shape"):
        run(np.ones((100, 4)), FS)
    if method != "green":  # the windowed methods need one 1.6 s window
        with pytest.raises(ValueError, match="frames"):
            run(np.ones((40, 3)), FS)
