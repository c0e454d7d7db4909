"""Durations as users write them: seconds, a timedelta, or a string of number-unit parts
as Inngest and Go write them: "90s", "30m", "2h", "7d", "1w", "1h30m", "250ms"."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Final

_UNITS: Final = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_NUMBER: Final = r"\d+(?:\.\d+)?"
#: One part: a number and its unit (``ms`` before ``m``: the longest unit wins).
_PART: Final = re.compile(rf"({_NUMBER})\s*(ms|s|m|h|d|w)")
_COMPOUND: Final = re.compile(rf"^(?:\s*{_NUMBER}\s*(?:ms|s|m|h|d|w))+\s*$")
_BARE: Final = re.compile(rf"^\s*({_NUMBER})\s*$")
_HINT: Final = "use seconds, or '90s', '30m', '2h', '7d', '1w', '1h30m'"


def parse_duration(value: float | timedelta | str) -> float:
    """Seconds in ``value``; raises ValueError for anything else or a negative duration."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    elif isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (bare := _BARE.match(value)):
        seconds = float(bare.group(1))
    elif isinstance(value, str) and _COMPOUND.match(value):
        seconds = sum(float(number) * _UNITS[unit] for number, unit in _PART.findall(value))
    else:
        raise ValueError(f"not a duration: {value!r} ({_HINT})")
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative: {value!r}")
    return seconds
