"""The foundation's accuracy bar through `pulsepipe infer`'s code path: 8 synthetic subjects x 30 s, ME-rPPG
chunk within 3 BPM of the truth on every subject and POS within 5 BPM on at least 6 of 8."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines.infer import infer_models
from pipelines.predictors import ModelSet
from transforms.face import FaceDetector
from ground_truth import true_hr
from transforms.synth import write_cohort


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort8")
    write_cohort(out, subjects=8, seconds=30, seed=0)
    models = ModelSet(["me-chunk", "pos"])
    rows = []
    with FaceDetector() as detector:
        for rec in json.loads((out / "cohort.json").read_text())["recordings"]:
            video = out / rec["video"]
            results = infer_models(str(video), models, detector=detector)
            rows.append({"subject_id": rec["subject_id"], "true_hr": true_hr(video.parent / "ppg.csv"),
                         **{m: r.hr_bpm for m, r in results.items()}})
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
