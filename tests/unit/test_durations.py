"""Go time.ParseDuration behaviour, case by case from Go's own table (src/time/time_test.go)."""

from __future__ import annotations

import re

import pytest

from loraserve.durations import (
    HOUR,
    MICROSECOND,
    MILLISECOND,
    MINUTE,
    NANOSECOND,
    NON_NEGATIVE_DURATION_PATTERN,
    SECOND,
    DurationError,
    parse_duration,
    parse_window,
)

VALID = [
    ("0", 0),
    ("5s", 5 * SECOND),
    ("30s", 30 * SECOND),
    ("1478s", 1478 * SECOND),
    ("-5s", -5 * SECOND),
    ("+5s", 5 * SECOND),
    ("-0", 0),
    ("+0", 0),
    ("5.0s", 5 * SECOND),
    ("5.6s", 5 * SECOND + 600 * MILLISECOND),
    ("5.s", 5 * SECOND),
    (".5s", 500 * MILLISECOND),
    ("1.0s", 1 * SECOND),
    ("1.00s", 1 * SECOND),
    ("1.004s", 1 * SECOND + 4 * MILLISECOND),
    ("1.0040s", 1 * SECOND + 4 * MILLISECOND),
    ("100.00100s", 100 * SECOND + 1 * MILLISECOND),
    ("10ns", 10 * NANOSECOND),
    ("11us", 11 * MICROSECOND),
    ("12µs", 12 * MICROSECOND),  # U+00B5
    ("12μs", 12 * MICROSECOND),  # U+03BC
    ("13ms", 13 * MILLISECOND),
    ("14s", 14 * SECOND),
    ("15m", 15 * MINUTE),
    ("16h", 16 * HOUR),
    ("3h30m", 3 * HOUR + 30 * MINUTE),
    ("10.5s4m", 4 * MINUTE + 10 * SECOND + 500 * MILLISECOND),
    ("-2m3.4s", -(2 * MINUTE + 3 * SECOND + 400 * MILLISECOND)),
    ("1h2m3s4ms5us6ns", HOUR + 2 * MINUTE + 3 * SECOND + 4 * MILLISECOND + 5 * MICROSECOND + 6 * NANOSECOND),
    ("39h9m14.425s", 39 * HOUR + 9 * MINUTE + 14 * SECOND + 425 * MILLISECOND),
    ("52763797000ns", 52763797000 * NANOSECOND),
    ("0.3333333333333333333h", 20 * MINUTE),
    ("9007199254740993ns", (1 << 53) + 1),
    ("9223372036854775807ns", (1 << 63) - 1),
    ("9223372036854775.807us", (1 << 63) - 1),
    ("9223372036s854ms775us807ns", (1 << 63) - 1),
    ("-9223372036854775808ns", -(1 << 63)),
    ("-9223372036854775.808us", -(1 << 63)),
    ("-9223372036s854ms775us808ns", -(1 << 63)),
    ("-2562047h47m16.854775808s", -(1 << 63)),
    ("0.100000000000000000000h", 6 * MINUTE),
    ("0.830103483285477580700h", 49 * MINUTE + 48 * SECOND + 372539827 * NANOSECOND),
    ("1.5h", 90 * MINUTE),
    ("2h45m", 2 * HOUR + 45 * MINUTE),
    ("300ms", 300 * MILLISECOND),
]

BAD_GRAMMAR = [
    ("", "time: invalid duration"),
    ("3", "time: missing unit in duration"),
    ("-", "time: invalid duration"),
    ("s", "time: invalid duration"),
    (".", "time: invalid duration"),
    ("-.", "time: invalid duration"),
    (".s", "time: invalid duration"),
    ("+.s", "time: invalid duration"),
    ("1d", 'time: unknown unit "d"'),
    ("\x85\x85", "time: invalid duration"),
    ("\ufffd", "time: invalid duration"),
]

OVERFLOW = [
    ("9223372036854775808ns", "time: invalid duration"),
    ("-9223372036854775809ns", "time: invalid duration"),
    ("9223372036854776us", "time: invalid duration"),
    ("3000000h", "time: invalid duration"),
    ("9223372036854775.808us", "time: invalid duration"),
    ("9223372036854ms775us808ns", "time: invalid duration"),
]

GRAMMAR = [  # Looser parsers (durationpy) accept these; Go does not.
    ("1h 30m", 'time: unknown unit "h "'),
    ("5 minutes", 'time: unknown unit " minutes"'),
    ("1H", 'time: unknown unit "H"'),
    ("1m1", "time: missing unit in duration"),
    ("1w", 'time: unknown unit "w"'),
]


@pytest.mark.parametrize(("text", "nanoseconds"), VALID)
def test_go_accepts(text: str, nanoseconds: int) -> None:
    assert parse_duration(text) == nanoseconds


@pytest.mark.parametrize(("text", "message"), BAD_GRAMMAR + OVERFLOW)
def test_go_refuses(text: str, message: str) -> None:
    with pytest.raises(DurationError) as excinfo:
        parse_duration(text)
    assert str(excinfo.value).startswith(message)


def _pattern_accepts(text: str) -> bool:
    return re.fullmatch(NON_NEGATIVE_DURATION_PATTERN, text) is not None


@pytest.mark.parametrize(("text", "nanoseconds"), VALID)
def test_schema_pattern_matches_go_for_unsigned(text: str, nanoseconds: int) -> None:
    # The CRD pattern is Go's grammar without a sign; overflow is left to CEL's duration().
    assert _pattern_accepts(text) == (text[:1] not in "+-")


@pytest.mark.parametrize(("text", "message"), BAD_GRAMMAR)
def test_schema_pattern_refuses_bad_grammar(text: str, message: str) -> None:
    assert not _pattern_accepts(text)


@pytest.mark.parametrize(("text", "message"), OVERFLOW)
def test_overflow_is_grammatical(text: str, message: str) -> None:
    # A pattern cannot see overflow: the CRD adds a CEL duration() rule (tested on the real apiserver).
    assert _pattern_accepts(text.lstrip("-"))


@pytest.mark.parametrize("text", ["-1s", "+5s", "-0"])
def test_windows_refuse_signs(text: str) -> None:
    with pytest.raises(DurationError):
        parse_window(text)


def test_window_in_seconds() -> None:
    assert parse_window("1h30m") == 5400.0
    assert parse_window("300ms") == 0.3
