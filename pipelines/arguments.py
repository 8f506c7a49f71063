"""Argparse types for numbers: each refuses a bad value as it is parsed, saying what it expected."""
from __future__ import annotations

import argparse
import math


def whole_number(minimum: int = 0):
    """A whole number of at least `minimum`."""
    def parse(text: str) -> int:
        if not text.strip().isdigit() or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number, {minimum} or more, got {text!r}")
        return int(text)
    return parse


def number_at_least(minimum: float, what: str = "a number"):
    """A finite number of at least `minimum`; the error names `what` it is."""
    return _number(lambda v: v >= minimum, f"{what} of at least {minimum:g}")


def positive_number(what: str = "a number"):
    """A finite number above zero; the error names `what` it is."""
    return _number(lambda v: v > 0, f"{what} above 0")


def _number(accept, expected: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and accept(value)):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse
