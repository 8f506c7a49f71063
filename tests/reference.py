"""Brute-force references the library's numerical code is checked against: plain loops, written from the definitions."""
from __future__ import annotations

import math
from typing import Callable, Hashable

import numpy as np


def bootstrap_ci(per_subject_values: dict[Hashable, list[tuple]], statistic: Callable,
                 n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap confidence interval (Efron & Tibshirani 1993, ch. 13), resampling subjects.

    per_subject_values: subject -> list of tuples, one per recording, usually (pred, true).
    Each of `n_boot` replicates draws as many subjects as there are, with replacement, pools all
    recordings of the drawn subjects and evaluates statistic(pred_array, true_array) (in general one
    array per tuple position). Returns the (1-level)/2 and (1+level)/2 percentiles of the replicates;
    replicates where the statistic is NaN or raises ValueError are left out.

    The draws are those `metrics_table` makes, so its CIs must come out equal: subjects in sorted(repr)
    order, replicate b drawing row b of default_rng(seed).integers(0, n_subjects, (n_boot, n_subjects)).
    Everything after the draws is a loop over replicates, subjects and recordings.
    """
    subjects = [list(per_subject_values[key]) for key in sorted(per_subject_values, key=repr)]
    subjects = [values for values in subjects if values]
    draws = np.random.default_rng(seed).integers(0, len(subjects), size=(n_boot, len(subjects)))
    replicates = []
    for drawn in draws:
        pool = []
        for i in drawn:
            pool.extend(subjects[i])  # a subject drawn twice counts twice
        columns = [np.array(column, dtype=np.float64) for column in zip(*pool)]
        try:
            value = float(statistic(*columns))
        except ValueError:
            continue
        if math.isfinite(value):
            replicates.append(value)
    if not replicates:
        return float("nan"), float("nan")
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(replicates, [tail, 100.0 - tail])
    return float(low), float(high)
