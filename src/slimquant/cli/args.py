"""Argument types shared by the subcommands."""

from __future__ import annotations

import argparse
import math

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def str2bool(value: str) -> bool:
    """``True``/``False`` in any case (as in msModelSlim's examples), also 1/0 and yes/no."""
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False), got {value!r}")


def positive_float(value: str) -> float:
    try:
        f = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not (math.isfinite(f) and f > 0):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {value!r}")
    return f


def positive_int(value: str) -> int:
    try:
        i = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if i <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return i
