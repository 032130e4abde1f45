"""The Kopf peering settings of the operator: how long a keep-alive counts, and which replica acts."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loraserve.peering import LIFETIME_ENV, TIEBREAK_BITS, lifetime, priority


def test_lifetime_defaults_to_ten_seconds() -> None:
    assert lifetime({}) == 10
    assert lifetime({LIFETIME_ENV: ""}) == 10


@pytest.mark.parametrize(("text", "seconds"), [("3s", 3), ("5s", 5), ("1m", 60), ("1m30s", 90), ("10m", 600)])
def test_lifetime_takes_go_durations(text: str, seconds: int) -> None:
    assert lifetime({LIFETIME_ENV: text}) == seconds


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("10", 'missing unit in duration "10"'),
        ("1d", 'unknown unit "d" in duration "1d"'),
        ("1.5s", "not a whole number of seconds"),
        ("2s", "must be between 3s and 10m"),
        ("-5s", "must be between 3s and 10m"),
        ("11m", "must be between 3s and 10m"),
    ],
)
def test_a_bad_lifetime_names_the_variable(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=LIFETIME_ENV) as info:
        lifetime({LIFETIME_ENV: text})
    assert says in str(info.value)


def test_the_replica_started_first_has_the_higher_priority() -> None:
    started = 1_790_000_000.0
    assert priority(started, 0) > priority(started + 0.01, 2**TIEBREAK_BITS - 1)
    assert priority(started - 3600, 0) > priority(started, 0)


@given(
    st.floats(min_value=0, max_value=9_000_000_000, allow_nan=False),
    st.integers(0, 2**TIEBREAK_BITS - 1),
    st.integers(0, 2**TIEBREAK_BITS - 1),
)
def test_same_centisecond_is_ordered_by_the_tiebreak_and_exact_in_json(started: float, a: int, b: int) -> None:
    pa, pb = priority(started, a), priority(started, b)
    assert (pa > pb) == (a > b)
    assert (pa == pb) == (a == b)
    assert 0 < pa < 2**53  # an exact integer for every JSON reader of the peering object
    assert json.loads(json.dumps(pa)) == pa


def test_tiebreak_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="tiebreak"):
        priority(1_790_000_000.0, 2**TIEBREAK_BITS)
