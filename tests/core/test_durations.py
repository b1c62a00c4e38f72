"""Go duration parsing and formatting match Go's time package (contract appendix A)."""

from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stacyvm_server.durations import DurationError, format_go_duration, format_go_duration_ns, parse_go_duration_ns


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("0", 0),
        ("30s", 30_000_000_000),
        ("5m", 300_000_000_000),
        ("1h30m", 5_400_000_000_000),
        ("1h30m10.5s", 5_410_500_000_000),
        ("300ms", 300_000_000),
        ("-1.5h", -5_400_000_000_000),
        ("1.5\u00b5s", 1_500),
        ("2us", 2_000),
        ("10ns", 10),
        (".5s", 500_000_000),
    ],
)
def test_parse(text: str, ns: int) -> None:
    assert parse_go_duration_ns(text) == ns


@pytest.mark.parametrize("text", ["", "x", "10", "1d", "1w", "s", "1.2.3s", "--1s", " 1s"])
def test_parse_rejects(text: str) -> None:
    with pytest.raises(DurationError):
        parse_go_duration_ns(text)


@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (0, "0s"),
        (850, "850ns"),
        (1_500, "1.5\u00b5s"),
        (12_345_678, "12.345678ms"),
        (1_000_000_000, "1s"),
        (1_500_000_000, "1.5s"),
        (90_000_000_000, "1m30s"),
        (1_800_000_000_000, "30m0s"),
        (3_600_000_000_000, "1h0m0s"),
        (86_400_000_000_000, "24h0m0s"),
        (7_985_123_456_789, "2h13m5.123456789s"),
        (-1_000_000_000, "-1s"),
    ],
)
def test_format(ns: int, text: str) -> None:
    assert format_go_duration_ns(ns) == text


def test_format_timedelta() -> None:
    assert format_go_duration(timedelta(hours=24)) == "24h0m0s"
    assert format_go_duration(0.0123) == "12.3ms"


@given(st.integers(min_value=-(10**17), max_value=10**17))
def test_round_trip(ns: int) -> None:
    assert parse_go_duration_ns(format_go_duration_ns(ns)) == ns
