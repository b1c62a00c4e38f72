"""Go `time.ParseDuration` / `Duration.String()` compatible helpers (contract appendix A)."""

from __future__ import annotations

import re
from datetime import timedelta

_UNITS_NS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,
    "\u03bcs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
_MAX_NS = (1 << 63) - 1


class DurationError(ValueError):
    pass


def parse_go_duration_ns(text: str) -> int:
    """Parse a Go duration string to integer nanoseconds. Raises DurationError."""
    if not isinstance(text, str):
        raise DurationError("duration must be a string")
    s = text
    sign = 1
    if s[:1] in "+-" and s:
        sign = -1 if s[0] == "-" else 1
        s = s[1:]
    if s == "0":
        return 0
    if not s:
        raise DurationError(f'time: invalid duration "{text}"')
    pos = 0
    total = 0
    while pos < len(s):
        m = _PART.match(s, pos)
        if not m:
            if re.match(r"(\d+\.?\d*|\.\d+)$", s[pos:]):
                raise DurationError(f'time: missing unit in duration "{text}"')
            raise DurationError(f'time: invalid duration "{text}"')
        number, unit = m.group(1), m.group(2)
        whole, _, frac = number.partition(".")
        scale = _UNITS_NS[unit]
        value = int(whole or "0") * scale
        if frac:
            value += int(frac) * scale // (10 ** len(frac))
        total += value
        if total > _MAX_NS:
            raise DurationError(f'time: invalid duration "{text}"')
        pos = m.end()
    return sign * total


def parse_go_duration(text: str) -> timedelta:
    return timedelta(microseconds=parse_go_duration_ns(text) / 1000)


def _fmt_frac(value: int, digits: int) -> str:
    """Render value / 10**digits with trailing zeros trimmed."""
    whole, frac = divmod(value, 10**digits)
    if frac == 0:
        return str(whole)
    return f"{whole}." + f"{frac:0{digits}d}".rstrip("0")


def format_go_duration_ns(ns: int) -> str:
    if ns == 0:
        return "0s"
    neg = ns < 0
    ns = abs(ns)
    if ns < 1_000:
        out = f"{ns}ns"
    elif ns < 1_000_000:
        out = _fmt_frac(ns, 3) + "\u00b5s"
    elif ns < 1_000_000_000:
        out = _fmt_frac(ns, 6) + "ms"
    else:
        hours, rem = divmod(ns, 3_600_000_000_000)
        minutes, rem = divmod(rem, 60_000_000_000)
        secs = _fmt_frac(rem, 9) + "s"
        if hours:
            out = f"{hours}h{minutes}m{secs}"
        elif minutes:
            out = f"{minutes}m{secs}"
        else:
            out = secs
    return ("-" if neg else "") + out


def format_go_duration(td: timedelta | float) -> str:
    """Format a timedelta (or seconds as float) like Go's Duration.String()."""
    if isinstance(td, timedelta):
        ns = (td.days * 86_400 + td.seconds) * 1_000_000_000 + td.microseconds * 1_000
    else:
        ns = round(td * 1_000_000_000)
    return format_go_duration_ns(ns)
