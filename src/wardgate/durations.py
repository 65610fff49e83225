"""Go-style durations ("90s", "30m", "12h", "1h30m") as people write them in YAML and flags."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_duration(text: str | int | float | timedelta) -> timedelta:
    """Parse "1h30m" (or a number of seconds); raise ValueError naming the bad text."""
    if isinstance(text, timedelta):
        return text
    if isinstance(text, bool):
        raise ValueError(f"invalid duration {text!r}: use a form like 30s, 15m, 12h or 1h30m")
    if isinstance(text, int | float):
        return timedelta(seconds=text)
    s = str(text).strip()
    if not s:
        raise ValueError("empty duration: use a form like 30s, 15m, 12h or 1h30m")
    pos, total = 0, 0.0
    for m in _PART.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s):
        raise ValueError(f"invalid duration {s!r}: use a form like 30s, 15m, 12h or 1h30m")
    return timedelta(seconds=total)


def format_duration(d: timedelta) -> str:
    """Shortest exact form: 43200s -> "12h", 5400s -> "1h30m"."""
    secs = int(d.total_seconds())
    if secs == 0:
        return "0s"
    sign = "-" if secs < 0 else ""
    secs = abs(secs)
    out = []
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        n, secs = divmod(secs, size)
        if n:
            out.append(f"{n}{unit}")
    return sign + "".join(out)


def _validate(v: Any) -> timedelta:
    return parse_duration(v)


Duration = Annotated[
    timedelta,
    BeforeValidator(_validate),
    PlainSerializer(format_duration, return_type=str, when_used="json-unless-none"),
]
"""A pydantic field type: accepts "12h" or seconds, dumps back to "12h" in JSON/YAML."""
