"""Test helper: the true heart rate of a synthetic recording, by the same recipe as predictions."""
from __future__ import annotations

import numpy as np

from transforms.signal import heart_rate


def true_hr(ppg_csv) -> float:
    """Ground-truth HR from a recording's ppg.csv (t_s, ppg at the PPG's own rate)."""
    ppg = np.loadtxt(ppg_csv, delimiter=",", skiprows=1)
    return heart_rate(ppg[:, 1], 1.0 / np.median(np.diff(ppg[:, 0])))[0]
