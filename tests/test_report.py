"""pipelines.report: the HTML report and its PNGs on a small fake cohort, and the terminal tables."""
import re

import fsspec
import numpy as np
import pytest

from pipelines import report
from transforms import metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FS = 30.0


@pytest.fixture(scope="module")
def cohort():
    rng = np.random.default_rng(0)
    rows = []
    for model, noise in (("me_rppg", 2.0), ("pos", 6.0)):
        for s in range(5):
            for k in range(2):
                true = float(rng.uniform(55, 110))
                rows.append(dict(model=model, dataset="UBFC", subject_id=f"subj{s}", recording_id=f"subj{s}_v{k}",
                                 hr_pred=true + float(rng.normal(0, noise)), hr_true=true,
                                 snr_db=float(rng.normal(3, 1)), motion=("still", "talking")[k]))
    rows[0]["hr_pred"] = float("nan")  # a recording without a prediction must not break anything
    metric_rows = metrics.metrics_table(rows, ["motion"], n_boot=100)
    t = np.arange(int(20 * FS)) / FS
    waveforms = {}
    for model, dataset, recording_id in report.worst_recordings(rows, n=2):
        row = next(r for r in rows if r["model"] == model and r["recording_id"] == recording_id)
        bvp_pred = np.sin(2 * np.pi * row["hr_pred"] / 60 * t) + 0.3 * rng.normal(size=t.size)
        waveforms[(model, dataset, recording_id)] = (t, bvp_pred, np.sin(2 * np.pi * row["hr_true"] / 60 * t))
    return rows, metric_rows, waveforms


def test_worst_recordings_are_per_model_largest_errors_first(cohort):
    rows, _, _ = cohort
    worst = report.worst_recordings(rows, n=2)
    assert [m for m, _, _ in worst] == ["me_rppg", "me_rppg", "pos", "pos"]
    errors = {(r["model"], r["recording_id"]): abs(r["hr_pred"] - r["hr_true"]) for r in rows}
    pos = [r for m, _, r in worst if m == "pos"]
    assert errors[("pos", pos[0])] == max(e for (m, _), e in errors.items() if m == "pos")
    assert errors[("pos", pos[0])] >= errors[("pos", pos[1])]


def test_a_recording_id_in_two_datasets_is_two_recordings():
    rows = [dict(model="pos", dataset=d, subject_id="1", recording_id="v1", hr_pred=70.0 + k, hr_true=70.0)
            for k, d in enumerate(("PURE", "UBFC"))]
    assert report.worst_recordings(rows, n=2) == [("pos", "UBFC", "v1"), ("pos", "PURE", "v1")]


def test_write_report_links_valid_pngs_and_shows_the_cohort_numbers(cohort, tmp_path):
    rows, metric_rows, waveforms = cohort
    path = report.write_report(tmp_path, rows, metric_rows, waveforms)
    assert path == str(tmp_path / "report.html")
    text = (tmp_path / "report.html").read_text()
    links = re.findall(r"src='([^']+)'", text)
    assert len(links) == 2 + 2 + len(waveforms)  # Bland-Altman and error by HR per model, waveforms
    for link in links:
        assert not link.startswith("/") and link.startswith("report/")  # relative: the folder can move
        assert (tmp_path / link).read_bytes()[:8] == PNG_SIGNATURE
    for r in (r for r in metric_rows if r["level"] == "cohort"):
        assert f"{r['mae']:.2f} [{r['mae_lo']:.2f}, {r['mae_hi']:.2f}]" in text
        assert f"{r['pearson_r']:.3f}" in text
    for word in ("Bland-Altman", "subj0", "subj4", "motion", "talking", "still"):
        assert word in text


def test_write_report_without_waveforms_or_pairs(tmp_path):
    rows = [dict(model="pos", dataset="D", subject_id="1", recording_id="a", hr_pred=float("nan"), hr_true=70.0)]
    report.write_report(tmp_path, rows, metrics.metrics_table(rows, n_boot=10))
    text = (tmp_path / "report.html").read_text()
    assert "pos: fewer than 2 recordings with both HRs, no plot" in text
    assert "pos: no recording with both HRs, no plot" in text  # not an empty chart that reads as zero error


def test_terminal_tables_name_every_subject_and_model(cohort):
    _, metric_rows, _ = cohort
    subject_table = report.format_subject_table(metric_rows)
    lines = subject_table.splitlines()
    for s in range(5):
        assert sum(f"subj{s} " in line for line in lines) == 1  # one line per subject
    assert "MAE me_rppg" in lines[0] and "MAE pos" in lines[0]
    cohort_line = next(line for line in lines if "cohort" in line)
    for r in (r for r in metric_rows if r["level"] == "cohort"):
        assert f"{r['mae']:.2f} [{r['mae_lo']:.2f}, {r['mae_hi']:.2f}]" in cohort_line
    s1_pos = next(r for r in metric_rows
                  if r["level"] == "subject" and r["subject_id"] == "subj1" and r["model"] == "pos")
    assert f"{s1_pos['mae']:.2f}" in next(line for line in lines if "subj1 " in line)

    cohort_table = report.format_cohort_table(metric_rows).splitlines()
    assert len(cohort_table) == 2 + 2  # header, rule, one line per model
    assert cohort_table[2].startswith("me_rppg") and cohort_table[3].startswith("pos")
    me = next(r for r in metric_rows if r["level"] == "cohort" and r["model"] == "me_rppg")
    # fixed width: each value starts under its header
    assert cohort_table[2].index(f"{me['mae']:.2f} [") == cohort_table[0].index("MAE (BPM)")


def test_failures_the_run_and_a_remote_folder(cohort):
    rows, metric_rows, _ = cohort
    failed = [dict(model=m, dataset="UBFC", subject_id="subj9", recording_id="subj9_v0", status="failed",
                   reason="shards/UBFC/subj9_v0.parquet: cannot read the shard") for m in ("me_rppg", "pos")]
    failed.append(dict(model="pos", dataset="UBFC", subject_id="subj8", recording_id="subj8_v0", status="failed",
                       reason="pos: cannot score its output: the predicted BVP is flat"))
    uri = "memory://report-test/out"
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{uri}/report/stale.png", b"an earlier run's plot")
    assert report.write_report(uri, rows + failed, metric_rows, about={"bootstrap seed": 7}) == f"{uri}/report.html"
    text = fs.cat(f"{uri}/report.html").decode()
    assert "<td>subj9_v0</td><td>all</td><td>shards/UBFC/subj9_v0.parquet: cannot read the shard</td>" in text
    assert "<td>subj8_v0</td><td>pos</td>" in text  # one model failed: named
    assert "<td>bootstrap seed</td><td>7</td>" in text
    assert not fs.exists(f"{uri}/report/stale.png")
    for link in re.findall(r"src='([^']+)'", text):
        assert fs.cat(f"{uri}/{link}")[:8] == PNG_SIGNATURE


def test_a_waveform_with_gaps_in_its_truth_is_drawn_around_them():
    t = np.arange(600) / FS
    truth = np.sin(2 * np.pi * 1.2 * t)
    truth[100:110] = np.nan
    shown = report._for_display(t, truth)
    assert np.isfinite(shown).all() and (shown[100:110] == 0).all()
    assert np.corrcoef(shown[200:400], truth[200:400])[0, 1] > 0.99
