"""Argument types for the client's numeric flags.

A bad value is refused by argparse, naming the flag (``argument --since-s: must be a
number above 0, not '-5'``), before any call: otherwise it would reach the server and
come back as an error about a request field the user never set.

>>> positive_float("2.5")
2.5
>>> positive_int("0")
Traceback (most recent call last):
...
argparse.ArgumentTypeError: must be a whole number above 0, not '0'
"""

from __future__ import annotations

import argparse
import math


def positive_float(text: str) -> float:
    """A finite number above 0."""
    return _number(text, 0.0, "a number above 0", inclusive=False)


def non_negative_float(text: str) -> float:
    """A finite number, 0 or more."""
    return _number(text, 0.0, "a number of 0 or more", inclusive=True)


def positive_int(text: str) -> int:
    """A whole number above 0."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"must be a whole number above 0, not {text!r}"
        )
    return value


def _number(text: str, low: float, wanted: str, inclusive: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    above = value >= low if inclusive else value > low
    if not (math.isfinite(value) and above):
        raise argparse.ArgumentTypeError(f"must be {wanted}, not {text!r}")
    return value
