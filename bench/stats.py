"""Samples and their summary: percentiles, spread, failures."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

# A milestone is flagged "wide" (noisy) when max/min exceeds this factor.
WIDE_FACTOR = 3.0


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default method)."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass
class Series:
    """Raw samples of one milestone, plus the failures seen while collecting them."""

    name: str
    unit: str  # "ms" or "MB/s"
    what: str  # one line: exactly what one sample measures
    samples: list[float] = field(default_factory=list)
    errors: int = 0
    error_messages: list[str] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.samples.append(value)

    def fail(self, message: str) -> None:
        self.errors += 1
        if len(self.error_messages) < 5:  # keep the first few, count all
            self.error_messages.append(message[:300])


@dataclass
class Summary:
    name: str
    unit: str
    what: str
    n: int
    errors: int
    p50: float | None
    p95: float | None
    p99: float | None
    min: float | None
    max: float | None
    mean: float | None
    spread: float | None  # max / min
    wide: bool
    error_messages: list[str]
    samples: list[float]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _round(v: float) -> float:
    return round(v, 3)


def summarize(series: Series) -> Summary:
    vals = sorted(series.samples)
    if not vals:
        return Summary(series.name, series.unit, series.what, 0, series.errors, None, None, None, None, None,
                       None, None, False, series.error_messages, [])
    lo, hi = vals[0], vals[-1]
    spread = hi / lo if lo > 0 else math.inf
    return Summary(
        name=series.name,
        unit=series.unit,
        what=series.what,
        n=len(vals),
        errors=series.errors,
        p50=_round(percentile(vals, 50)),
        p95=_round(percentile(vals, 95)),
        p99=_round(percentile(vals, 99)),
        min=_round(lo),
        max=_round(hi),
        mean=_round(sum(vals) / len(vals)),
        spread=_round(spread) if math.isfinite(spread) else None,
        wide=spread > WIDE_FACTOR,
        error_messages=series.error_messages,
        samples=[_round(v) for v in series.samples],
    )
