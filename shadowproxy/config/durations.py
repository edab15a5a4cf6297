"""DURATION values on the command line: 90s, 15m, 24h, 7d."""

from __future__ import annotations

import re

from shadowproxy.base.errors import UsageError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")


def parse_duration(text: str) -> float:
    """Seconds in a DURATION such as '15m'; UsageError naming the value otherwise."""
    match = _PATTERN.match(text)
    if match is None:
        raise UsageError(
            f"invalid duration {text!r}: expected a number and a unit, e.g. 90s, 15m, 24h, 7d"
        )
    return float(match.group(1)) * _UNITS[match.group(2)]
