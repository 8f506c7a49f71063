"""transforms.metrics: hand-computed values, the subject bootstrap (against tests/reference.py's brute-force
loop, itself checked on hand-computed cohorts), and the levels of the metrics table."""
import math

import numpy as np
import pytest
import scipy.stats

from reference import bootstrap_ci
from transforms import metrics as m

PRED = [70.0, 80.0, 90.0]
TRUE = [72.0, 78.0, 95.0]  # errors -2, +2, -5


# --- pair metrics by hand ---------------------------------------------------------------------------

def test_mae_rmse_mape_by_hand():
    assert m.mae(PRED, TRUE) == pytest.approx((2 + 2 + 5) / 3)
    assert m.rmse(PRED, TRUE) == pytest.approx(math.sqrt((4 + 4 + 25) / 3))
    assert m.mape(PRED, TRUE) == pytest.approx(100 / 3 * (2 / 72 + 2 / 78 + 5 / 95))


def test_pearson_r_by_hand_and_against_scipy():
    # Means 80 and 81.666..., deviations (-10, 0, 10) and (-9.667, -3.667, 13.333).
    dp = np.array([-10.0, 0.0, 10.0])
    dt = np.array(TRUE) - np.mean(TRUE)
    by_hand = (dp @ dt) / math.sqrt((dp @ dp) * (dt @ dt))
    assert m.pearson_r(PRED, TRUE) == pytest.approx(by_hand)
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=50), rng.normal(size=50)
    assert m.pearson_r(x, y) == pytest.approx(scipy.stats.pearsonr(x, y).statistic, abs=1e-12)


def test_pearson_r_of_a_constant_is_nan():
    assert math.isnan(m.pearson_r([70.1, 70.1, 70.1], [60, 70, 80]))


def test_bland_altman_by_hand():
    ba = m.bland_altman(PRED, TRUE)
    diffs = [-2.0, 2.0, -5.0]
    bias = -5 / 3
    sd = math.sqrt(sum((d - bias) ** 2 for d in diffs) / 2)  # ddof=1
    assert ba["bias"] == pytest.approx(bias)
    assert ba["sd"] == pytest.approx(sd)
    assert ba["loa_low"] == pytest.approx(bias - 1.96 * sd)
    assert ba["loa_high"] == pytest.approx(bias + 1.96 * sd)


def test_nan_pairs_are_dropped():
    pred = [70.0, np.nan, 80.0, 90.0, 100.0]
    true = [72.0, 60.0, 78.0, 95.0, np.nan]
    assert m.mae(pred, true) == pytest.approx(m.mae(PRED, TRUE))
    assert m.rmse(pred, true) == pytest.approx(m.rmse(PRED, TRUE))
    assert m.pearson_r(pred, true) == pytest.approx(m.pearson_r(PRED, TRUE))
    assert m.bland_altman(pred, true) == pytest.approx(m.bland_altman(PRED, TRUE))


def test_clear_errors():
    with pytest.raises(ValueError, match="different shapes"):
        m.mae([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="at least 1 pairs"):
        m.mae([np.nan], [70.0])
    with pytest.raises(ValueError, match="at least 3 pairs"):  # r of 2 points is always +-1
        m.pearson_r([70.0, 80.0, np.nan], [72.0, 75.0, 90.0])
    with pytest.raises(ValueError, match="at least 2 pairs"):
        m.bland_altman([70.0], [72.0])
    with pytest.raises(ValueError, match="true HR is 0"):
        m.mape([70.0], [0.0])


# --- bootstrap over subjects: the brute-force reference on cohorts whose intervals are known ---------

def normal_cohort(n_subjects=30, per_subject=3, seed=0):
    rng = np.random.default_rng(seed)
    cohort = {}
    for s in range(n_subjects):
        true = rng.uniform(55, 110, per_subject)
        cohort[f"s{s}"] = list(zip(true + rng.normal(0, 4, per_subject), true))
    return cohort


def test_bootstrap_is_reproducible_by_seed_and_varies_across_seeds():
    cohort = normal_cohort()
    a = bootstrap_ci(cohort, m.mae, n_boot=300, seed=1)
    assert a == bootstrap_ci(cohort, m.mae, n_boot=300, seed=1)
    assert a != bootstrap_ci(cohort, m.mae, n_boot=300, seed=2)
    # The subjects' order in the dict does not matter, only the seed.
    assert a == bootstrap_ci(dict(reversed(list(cohort.items()))), m.mae, n_boot=300, seed=1)


def test_bootstrap_ci_contains_the_point_estimate():
    cohort = normal_cohort()
    pred, true = np.array([p for v in cohort.values() for p in v]).T
    for statistic in (m.mae, m.rmse, m.pearson_r):
        low, high = bootstrap_ci(cohort, statistic, n_boot=500)
        assert low < statistic(pred, true) < high
    low, high = bootstrap_ci(cohort, m.mae, n_boot=500, level=0.5)
    assert (low, high) != bootstrap_ci(cohort, m.mae, n_boot=500)  # narrower at 50%
    assert bootstrap_ci(cohort, m.mae, n_boot=500)[0] < low < high < bootstrap_ci(cohort, m.mae, n_boot=500)[1]


def test_bootstrap_ci_is_a_point_when_every_subject_is_identical():
    same = [(70.0, 72.0), (80.0, 78.0), (90.0, 95.0)]
    low, high = bootstrap_ci({s: list(same) for s in range(8)}, m.mae, n_boot=200)
    assert low == pytest.approx(3.0) and high == pytest.approx(3.0)


def test_bootstrap_resamples_subjects_not_recordings():
    # Subject A: ten perfect recordings. Subject B: one recording 10 BPM off. Drawing subjects gives
    # pools AA (MAE 0), AB (10/11) or BB (10), so the 95% interval is exactly [0, 10]. Drawing
    # recordings would give about [0, 2.7] (k of 11 draws hit B's recording, k ~ Binomial(11, 1/11)).
    cohort = {"A": [(70.0, 70.0)] * 10, "B": [(90.0, 80.0)]}
    assert bootstrap_ci(cohort, m.mae, n_boot=2000) == (0.0, 10.0)
    by_recording = {i: [v] for i, v in enumerate(cohort["A"] + cohort["B"])}
    low, high = bootstrap_ci(by_recording, m.mae, n_boot=2000)
    assert low == 0.0 and high < 4.0


def test_bootstrap_passes_one_array_per_tuple_position():
    # Pools: aa (statistic 2 - 0), ab (3 - 1/3) or bb (5 - 1), drawn 1/4, 1/2 and 1/4 of the time.
    cohort = {"a": [(1.0, 0.0), (3.0, 0.0)], "b": [(5.0, 1.0)]}
    low, high = bootstrap_ci(cohort, lambda p, t: float(np.mean(p) - np.mean(t)), n_boot=500)
    assert (low, high) == pytest.approx((2.0, 4.0))


def test_bootstrap_skips_resamples_where_the_statistic_is_undefined():
    # Pools: aa has 2 pairs, no Pearson r; ab has r of its 3 points; bb 2 distinct points twice, r = 1.
    # Left out, aa would put NaN at the low end; it is skipped, so the interval runs from ab's r to 1.
    cohort = {"a": [(70.0, 71.0)], "b": [(80.0, 79.0), (90.0, 92.0)]}
    low, high = bootstrap_ci(cohort, m.pearson_r, n_boot=200)
    assert (low, high) == pytest.approx((m.pearson_r([70.0, 80.0, 90.0], [71.0, 79.0, 92.0]), 1.0))
    assert all(math.isnan(x) for x in bootstrap_ci({"a": [(70.0, 71.0)]}, m.pearson_r, n_boot=20))


# --- the metrics table -------------------------------------------------------------------------------

def rec(model, subject, recording, pred, true, snr=1.0, dataset="UBFC", **meta):
    return dict(model=model, dataset=dataset, subject_id=subject, recording_id=recording,
                hr_pred=pred, hr_true=true, snr_db=snr, **meta)


def small_rows():
    return [
        rec("pos", "s1", "s1a", 70.0, 72.0, snr=2.0, skin="II"),
        rec("pos", "s1", "s1b", 80.0, 78.0, snr=4.0, skin="II"),
        rec("pos", "s2", "s2a", 90.0, 95.0, snr=0.0, skin="V"),
        rec("pos", "s3", "s3a", 60.0, 61.0, snr=1.0, skin="V"),
        rec("pos", "s3", "s3b", np.nan, 66.0, snr=np.nan, skin="V"),
        rec("me", "s1", "s1a", 71.0, 72.0, snr=5.0, skin="II"),
        rec("me", "s2", "s2a", 94.0, 95.0, snr=5.0, skin="V"),
        rec("me", "s3", "s3a", 60.0, 61.0, snr=5.0, skin=None),
    ]


def by_level(table, level, **match):
    return [r for r in table if r["level"] == level and all(r[k] == v for k, v in match.items())]


def window(model, subject, recording, pred, true, length=10.0, dataset="UBFC"):
    return dict(model=model, dataset=dataset, subject_id=subject, recording_id=recording, length_s=length,
                hr_pred=pred, hr_true=true)


def small_windows():
    # the first carries its recording's SNR, as evaluate's window rows may: not a window's to report
    return [dict(window("pos", "s1", "s1a", 70.0, 72.0), snr_db=3.0), window("pos", "s1", "s1a", 74.0, 72.0),
            window("pos", "s2", "s2a", 90.0, 95.0), window("pos", "s3", "s3a", np.nan, 60.0),
            window("pos", "s1", "s1a", 71.0, 72.0, length=30.0)]


def test_every_row_has_the_same_columns_and_nulls_where_undefined():
    table = m.metrics_table(small_rows(), ["skin"], windows=small_windows(), n_boot=100)
    assert {r["level"] for r in table} == set(m.LEVELS)
    assert all(tuple(r) == m.METRIC_COLUMNS for r in table)
    for r in by_level(table, "recording") + by_level(table, "subject"):
        assert r["mae_lo"] is r["pearson_r"] is r["ba_loa_low"] is r["group_key"] is None
    for r in by_level(table, "subject") + by_level(table, "cohort"):
        assert r["recording_id"] is None
    for r in by_level(table, "cohort"):
        assert r["subject_id"] is r["group_key"] is r["hr_pred"] is None
        assert r["mae_lo"] <= r["mae"] <= r["mae_hi"]
    import pyarrow as pa

    assert pa.Table.from_pylist(table).num_rows == len(table)  # one Parquet table


def test_window_level_pools_window_pairs_per_length():
    table = m.metrics_table(small_rows(), windows=small_windows(), n_boot=200)
    ten, thirty = by_level(table, "window", model="pos")
    assert (ten["window_s"], ten["n_windows"], ten["n_recordings"], ten["n_subjects"]) == (10.0, 3, 2, 2)
    assert ten["mae"] == pytest.approx((2 + 2 + 5) / 3) and ten["rmse"] == pytest.approx(np.sqrt((4 + 4 + 25) / 3))
    assert ten["pearson_r"] == pytest.approx(m.pearson_r([70, 74, 90], [72, 72, 95]))
    assert ten["mae_lo"] <= ten["mae"] <= ten["mae_hi"] and ten["snr_db"] is None
    assert (thirty["window_s"], thirty["n_windows"], thirty["mae"]) == (30.0, 1, 1.0)
    assert all(r["window_s"] is None for r in table if r["level"] != "window")


def test_recording_level():
    table = m.metrics_table(small_rows(), n_boot=50)
    r = by_level(table, "recording", model="pos", recording_id="s2a")[0]
    assert (r["mae"], r["rmse"], r["ba_bias"], r["snr_db"]) == (5.0, 5.0, -5.0, 0.0)
    assert r["mape"] == pytest.approx(100 * 5 / 95)
    missing = by_level(table, "recording", model="pos", recording_id="s3b")[0]
    assert missing["mae"] is missing["hr_pred"] is missing["snr_db"] is None
    assert missing["n_recordings"] == 0 and missing["hr_true"] == 66.0


def test_subject_level_averages_the_subjects_recordings():
    table = m.metrics_table(small_rows(), n_boot=50)
    s1 = by_level(table, "subject", model="pos", subject_id="s1")[0]
    assert s1["mae"] == pytest.approx(2.0)  # mean of |-2| and |+2|, not |mean pred - mean true| = 0
    assert s1["ba_bias"] == pytest.approx(0.0)
    assert s1["rmse"] == pytest.approx(2.0)
    assert s1["mape"] == pytest.approx(50 * (2 / 72 + 2 / 78))
    assert (s1["hr_pred"], s1["hr_true"], s1["snr_db"]) == (75.0, 75.0, 3.0)
    assert s1["n_recordings"] == 2
    s3 = by_level(table, "subject", model="pos", subject_id="s3")[0]  # one recording lacks a prediction
    assert (s3["n_recordings"], s3["mae"], s3["hr_true"]) == (1, 1.0, 61.0)


def test_cohort_level_pools_recordings():
    table = m.metrics_table(small_rows(), n_boot=200)
    pos = by_level(table, "cohort", model="pos")[0]
    pred, true = [70.0, 80.0, 90.0, 60.0], [72.0, 78.0, 95.0, 61.0]
    assert (pos["n_recordings"], pos["n_subjects"], pos["dataset"]) == (4, 3, "UBFC")
    assert pos["mae"] == pytest.approx(m.mae(pred, true))
    assert pos["rmse"] == pytest.approx(m.rmse(pred, true))
    assert pos["mape"] == pytest.approx(m.mape(pred, true))
    assert pos["pearson_r"] == pytest.approx(m.pearson_r(pred, true))
    assert pos["snr_db"] == pytest.approx((2 + 4 + 0 + 1) / 4)
    ba = m.bland_altman(pred, true)
    assert (pos["ba_bias"], pos["ba_loa_low"], pos["ba_loa_high"]) == pytest.approx(
        (ba["bias"], ba["loa_low"], ba["loa_high"]))
    assert by_level(m.metrics_table(small_rows(), n_boot=200), "cohort", model="pos")[0] == pos  # seeded
    me = by_level(table, "cohort", model="me")[0]
    assert me["snr_lo"] == me["snr_hi"] == 5.0  # every recording has SNR 5


def test_cohort_ci_matches_bootstrap_ci():
    rows = [rec("pos", f"s{i % 5}", f"r{i}", 60.0 + 3 * i + (-1) ** i * (i % 4), 60.0 + 3 * i) for i in range(15)]
    cohort = by_level(m.metrics_table(rows, n_boot=300, seed=4), "cohort")[0]
    per_subject = {}
    for r in rows:
        per_subject.setdefault(("UBFC", r["subject_id"]), []).append((r["hr_pred"], r["hr_true"]))
    assert (cohort["mae_lo"], cohort["mae_hi"]) == pytest.approx(bootstrap_ci(per_subject, m.mae, n_boot=300, seed=4))


def _mean_finite_snr(pred, true, snr):
    snr = snr[np.isfinite(snr)]
    return float(snr.mean()) if snr.size else float("nan")  # NaN: left out


@pytest.mark.parametrize("rows", [
    small_rows(),  # a recording without prediction, resamples where r is undefined, a constant SNR
    [rec("pos", "A", f"a{i}", 70.0, 70.0 + (i % 3)) for i in range(10)]
    + [rec("pos", "B", "b", 90.0, 80.0, snr=np.nan)],
    [rec("pos", f"s{i % 4}", f"r{i}", 60.0 + 7 * i % 50, 62.0 + 5 * i % 45, snr=float(i % 5)) for i in range(17)],
])
def test_every_cohort_ci_matches_the_brute_force_reference(rows):
    statistics = {"mae": lambda p, t, s: m.mae(p, t), "rmse": lambda p, t, s: m.rmse(p, t),
                  "mape": lambda p, t, s: m.mape(p, t), "r": lambda p, t, s: m.pearson_r(p, t),
                  "snr": _mean_finite_snr}
    table = m.metrics_table(rows, n_boot=250, seed=9, level=0.9)
    for model in sorted({r["model"] for r in rows}):
        per_subject = {}
        for r in rows:
            if r["model"] == model and not (np.isnan(r["hr_pred"]) or np.isnan(r["hr_true"])):
                per_subject.setdefault((r["dataset"], r["subject_id"]), []).append(
                    (r["hr_pred"], r["hr_true"], r["snr_db"]))
        cohort = by_level(table, "cohort", model=model)[0]
        for name, statistic in statistics.items():
            want = bootstrap_ci(per_subject, statistic, n_boot=250, seed=9, level=0.9)
            got = (cohort[f"{name}_lo"], cohort[f"{name}_hi"])
            assert got == pytest.approx(want, rel=1e-12), (model, name)


def test_one_subject_gets_its_metrics_but_no_interval():
    rows = [rec("pos", "s1", f"r{i}", 70.0 + i, 72.0 + 2 * i) for i in range(4)]
    cohort = by_level(m.metrics_table(rows, n_boot=50), "cohort")[0]
    assert cohort["mae"] == pytest.approx(3.5) and cohort["pearson_r"] == pytest.approx(1.0)
    assert all(cohort[c] is None for c in m.METRIC_COLUMNS if c.endswith(("_lo", "_hi")))


def test_subjects_are_per_dataset():
    rows = [rec("pos", "1", "a", 70.0, 72.0, dataset="UBFC"), rec("pos", "1", "b", 80.0, 79.0, dataset="PURE")]
    table = m.metrics_table(rows, ["dataset_free_key"], n_boot=20)
    assert len(by_level(table, "subject")) == 2
    assert len(by_level(table, "cohort")) == 2


def test_group_level_by_metadata():
    table = m.metrics_table(small_rows(), ["skin"], n_boot=100)
    groups = by_level(table, "group")
    assert {(r["model"], r["group_value"]) for r in groups} == {("pos", "II"), ("pos", "V"), ("me", "II"), ("me", "V")}
    v = by_level(table, "group", model="pos", group_value="V")[0]
    assert (v["group_key"], v["dataset"], v["n_recordings"], v["n_subjects"]) == ("skin", "UBFC", 2, 2)
    assert v["mae"] == pytest.approx(3.0)  # |90-95| and |60-61|; s3b has no prediction
    me_v = by_level(table, "group", model="me", group_value="V")[0]
    assert me_v["n_recordings"] == 1  # s3 has no skin type for "me": in no group
    assert me_v["pearson_r"] is None and me_v["ba_bias"] is None  # one pair defines neither


def test_group_across_datasets_lists_them():
    rows = [rec("pos", "1", "a", 70.0, 72.0, dataset="UBFC", motion="still"),
            rec("pos", "1", "b", 80.0, 79.0, dataset="PURE", motion="still")]
    g = by_level(m.metrics_table(rows, ["motion"], n_boot=20), "group")[0]
    assert (g["dataset"], g["n_subjects"], g["mae"]) == ("PURE+UBFC", 2, 1.5)


def test_missing_columns_are_a_clear_error():
    with pytest.raises(ValueError, match="hr_true"):
        m.metrics_table([{"model": "a", "dataset": "d", "subject_id": 1, "recording_id": 1, "hr_pred": 70}])


# --- error by HR bin ---------------------------------------------------------------------------------

def test_error_by_hr_bin_bins_by_true_hr():
    rows = [rec("pos", "s", "a", 60.0, 65.0), rec("pos", "s", "b", 68.0, 69.0), rec("pos", "s", "c", 150.0, 180.0),
            rec("pos", "s", "d", 70.0, 200.0), rec("pos", "s", "e", np.nan, 65.0)]
    bins = m.error_by_hr_bin(rows)
    assert len(bins) == 15 and bins[0]["bin_low"] == 30 and bins[-1]["bin_high"] == 180
    sixties = next(b for b in bins if b["bin_low"] == 60)
    assert (sixties["n"], sixties["mae"], sixties["bias"]) == (2, 3.0, -3.0)
    assert (bins[-1]["n"], bins[-1]["mae"]) == (1, 30.0)  # 180 BPM falls in the last bin
    assert sum(b["n"] for b in bins) == 3  # 200 BPM is outside, NaN skipped
    assert next(b for b in bins if b["bin_low"] == 30)["mae"] is None
    with pytest.raises(ValueError, match="increasing"):
        m.error_by_hr_bin(rows, bins=[50, 40])
