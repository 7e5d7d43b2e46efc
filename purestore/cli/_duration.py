"""Durations given on the command line: ``3600`` (seconds), ``90m``, ``12h``, ``7d``, ``2w``."""

from __future__ import annotations

import re

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([smhdw]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def duration(text: str) -> float:
    """argparse type of a duration option: seconds, a number >= 0 (``3600``, ``1.5``), or a
    number with a unit ``s``, ``m``, ``h``, ``d`` or ``w`` (``90m``, ``7d``).

    Raises :class:`argparse.ArgumentTypeError` (argparse's error names the option) for anything
    else: a negative number, ``nan``, ``inf``, an unknown unit.
    """
    m = _DURATION.fullmatch(text.strip())
    if not m:
        import argparse
        raise argparse.ArgumentTypeError(
            f"expected a duration: seconds (a number >= 0) or a number with a unit s, m, h, d or w "
            f"(e.g. 90m, 7d), not {text!r}")
    return float(m[1]) * _UNITS[m[2]]
