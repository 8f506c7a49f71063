"""The foundation's accuracy bar: 8 synthetic subjects x 30 s, ME-rPPG chunk within 3 BPM of the truth on
every subject and POS within 5 BPM on at least 6 of 8, measured through the demo's own code path."""
from __future__ import annotations

import numpy as np
import pytest

from pipelines.demo import format_table, measure_cohort
from transforms.synth import write_cohort


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort8")
    write_cohort(out, subjects=8, seconds=30, seed=0)
    rows = measure_cohort(out, models=("me-chunk", "pos"), log=lambda *_: None)
    print("\n" + format_table(rows, models=("me-chunk", "pos")))
    return rows


def test_cohort_spans_the_heart_rate_range(rows):
    truth = [r["true_hr"] for r in rows]
    assert len(rows) == 8 and min(truth) < 60 and max(truth) > 140


def test_me_chunk_within_3_bpm_on_every_subject(rows):
    errors = {r["subject_id"]: abs(r["me-chunk"] - r["true_hr"]) for r in rows}
    assert all(e <= 3.0 for e in errors.values()), errors


def test_pos_within_5_bpm_on_at_least_6_of_8(rows):
    errors = np.array([abs(r["pos"] - r["true_hr"]) for r in rows])
    assert (errors <= 5.0).sum() >= 6, errors
