"""Human rates: the documented rule, refusals of ambiguous input, and round trips."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from chadthrottle.names import RATE_MAX, RATE_MIN
from chadthrottle.units import (
    RULES,
    RateError,
    check_rate,
    format_bytes,
    format_limit,
    format_rate,
    parse_rate,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("51200", 51_200),
        ("50K", 50_000),
        ("50k", 50_000),
        ("50KB", 50_000),
        ("50kB/s", 50_000),
        ("1.5M", 1_500_000),
        ("1.5m", 1_500_000),
        ("2MB/s", 2_000_000),
        ("1G", 1_000_000_000),
        ("1T", 1_000_000_000_000),
        ("512KiB/s", 524_288),
        ("512 KiB/s", 524_288),
        ("1MiB", 1_048_576),
        ("1 MiB/s", 1_048_576),
        ("1TiB", 2**40),
        ("10mbit", 1_250_000),
        ("10Mbit/s", 1_250_000),
        ("10 MBIT", 1_250_000),
        ("100kbit", 12_500),
        ("1gbit", 125_000_000),
        ("8Mibit", 1_048_576),
        ("16384bit", 2_048),
        ("2048B", 2_048),
        ("2048 B/s", 2_048),
        (".5M", 500_000),
        ("  50K  ", 50_000),
        ("0", 0),
        ("0K", 0),
        ("0.0M", 0),
        ("unlimited", 0),
        ("Unlimited", 0),
        ("none", 0),
        ("off", 0),
        ("2.0005K", 2_001),  # 2000.5 rounds half up
    ],
)
def test_documented_examples(text: str, expected: int) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("10Mb", "ambiguous"),
        ("10mb", "ambiguous"),
        ("10Kb/s", "ambiguous"),
        ("10Kib", "ambiguous"),
        ("10b", "ambiguous"),
        ("10Mbps", "ambiguous"),
        ("10MBps", "ambiguous"),
        ("10kbps", "ambiguous"),
        ("10bps", "ambiguous"),
        ("50Ki", "KiB"),
        ("50X", "unknown unit"),
        ("50KK", "unknown unit"),
        ("1e6", "not a rate"),
        ("-5K", "sign"),
        ("+5K", "sign"),
        ("", "not a rate"),
        ("fast", "not a rate"),
        ("1,000K", "not a rate"),
        ("5K/min", "only '/s'"),
        ("0.1", "less than one byte"),
        ("500", "below the smallest limit"),
        ("1023", "below the smallest limit"),
        ("2TiB", "above the largest limit"),
        ("1.1T", "above the largest limit"),
    ],
)
def test_refusals_say_why(text: str, fragment: str) -> None:
    with pytest.raises(RateError, match=fragment.replace("(", r"\(")):
        parse_rate(text)


def test_ambiguous_message_suggests_both_spellings() -> None:
    with pytest.raises(RateError) as info:
        parse_rate("10Mb")
    assert "Mbit" in str(info.value) and "MB" in str(info.value)


def test_range_edges() -> None:
    assert parse_rate("1KiB") == RATE_MIN
    assert parse_rate(str(RATE_MAX)) == RATE_MAX
    assert parse_rate("500", check=False) == 500
    assert check_rate(0) == 0
    with pytest.raises(RateError):
        check_rate(RATE_MAX + 1)


def test_non_text_is_refused() -> None:
    with pytest.raises(RateError):
        parse_rate(5)  # type: ignore[arg-type]


def test_rules_text_names_each_family() -> None:
    for word in ("decimal bytes", "binary bytes", "decimal bits", "unlimited", "ambiguous"):
        assert word in RULES


# --- property-based ---------------------------------------------------------------------------
_UNITS: dict[str, Fraction] = {
    "": Fraction(1), "B": Fraction(1), "B/s": Fraction(1),
    "K": Fraction(1000), "KB": Fraction(1000), "kB/s": Fraction(1000),
    "M": Fraction(10**6), "MB": Fraction(10**6), "G": Fraction(10**9), "GB/s": Fraction(10**9),
    "KiB": Fraction(1024), "MiB/s": Fraction(1024**2), "GiB": Fraction(1024**3),
    "kbit": Fraction(1000, 8), "Mbit/s": Fraction(10**6, 8), "gbit": Fraction(10**9, 8),
    "bit": Fraction(1, 8), "Kibit": Fraction(1024, 8),
}


@given(
    whole=st.integers(min_value=0, max_value=99_999),
    frac=st.one_of(st.just(""), st.integers(min_value=0, max_value=999).map(lambda f: f"{f:03d}")),
    unit=st.sampled_from(sorted(_UNITS)),
    space=st.sampled_from(["", " "]),
)
def test_parse_matches_exact_arithmetic(whole: int, frac: str, unit: str, space: str) -> None:
    number = f"{whole}.{frac}" if frac else str(whole)
    exact = Fraction(number) * _UNITS[unit]
    expected = int(exact + Fraction(1, 2))  # floor(x + 1/2) for x >= 0
    text = f"{number}{space}{unit}"
    if exact > 0 and expected == 0:
        with pytest.raises(RateError):
            parse_rate(text, check=False)
        return
    assert parse_rate(text, check=False) == expected
    if expected == 0 or RATE_MIN <= expected <= RATE_MAX:
        assert parse_rate(text) == expected
    else:
        with pytest.raises(RateError):
            parse_rate(text)


@given(st.integers(min_value=0, max_value=10**15))
@example(51_200)
@example(1_048_576)
@example(1_250_000)
@example(RATE_MAX)
def test_format_limit_round_trips_exactly(rate: int) -> None:
    shown = format_limit(rate)
    assert parse_rate(shown, check=False) == rate
    if rate:
        assert shown.endswith("B/s")
        # never longer than the plain byte count
        assert len(shown.split()[0]) <= len(str(rate))
    else:
        assert shown == "unlimited"


@given(st.integers(min_value=RATE_MIN, max_value=RATE_MAX))
def test_format_limit_output_is_accepted_by_the_range_check(rate: int) -> None:
    assert parse_rate(format_limit(rate)) == rate


@given(st.floats(min_value=0, max_value=9.99e14, allow_nan=False, allow_infinity=False))
@example(999.6)
@example(999_949.0)
@example(999_951.0)
def test_format_rate_is_within_display_precision(bps: float) -> None:
    shown = format_rate(bps)
    assert shown.endswith("B/s")
    back = parse_rate(shown, check=False)
    if bps < 999.5:
        assert back == round(bps)
    else:
        number = shown.split()[0]
        assert "." in number and len(number.split(".")[1]) == 1
        assert float(number) < 1000  # the unit was chosen after rounding
        assert abs(back - bps) <= 0.05 * bps + 1  # half a unit of the last shown digit


def test_format_rate_examples() -> None:
    assert format_rate(48_200) == "48.2 KB/s"
    assert format_rate(50_000.0) == "50.0 KB/s"
    assert format_rate(0) == "0 B/s"
    assert format_rate(512.4) == "512 B/s"
    assert format_rate(999_951) == "1.0 MB/s"
    assert format_rate(float("nan")) == "?"
    assert format_rate(-1) == "?"
    assert format_bytes(12_345_678) == "12.3 MB"


def test_format_limit_examples() -> None:
    assert format_limit(0) == "unlimited"
    assert format_limit(50_000) == "50 KB/s"
    assert format_limit(51_200) == "50 KiB/s"
    assert format_limit(1_500_000) == "1.5 MB/s"
    assert format_limit(1_250_000) == "1.25 MB/s"
    assert format_limit(1_048_576) == "1 MiB/s"
    assert format_limit(1_234_567) == "1234567 B/s"
    with pytest.raises(ValueError):
        format_limit(-1)
