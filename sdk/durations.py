"""Durations as users write them: seconds, a timedelta, or "90s", "30m", "2h", "7d"."""

from __future__ import annotations

import re
from datetime import timedelta

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def parse_duration(value: float | timedelta | str) -> float:
    """Seconds in ``value``; raises ValueError for anything else or a negative duration."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    elif isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (found := _PATTERN.match(value)):
        seconds = float(found.group(1)) * _UNITS[found.group(2) or "s"]
    else:
        raise ValueError(f"not a duration: {value!r} (use seconds, or '90s', '30m', '2h', '7d')")
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative: {value!r}")
    return seconds
