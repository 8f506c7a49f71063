"""Parity fixtures made by the published implementation (tests/fixtures/make_*_parity.py, `make fixtures`)."""
from pathlib import Path

import numpy as np
import pytest


def load_parity_fixture(path: Path) -> dict:
    """The fixture's arrays; the test is skipped, saying how to make it, when the file is missing."""
    if not path.exists():
        pytest.skip(f"{path} missing: run `make fixtures`")
    return dict(np.load(path))
