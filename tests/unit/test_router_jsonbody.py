"""Strict JSON for request bodies: what parses, what is refused and how it is named."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loraserve.router.errors import RouterError
from loraserve.router.jsonbody import depth_exceeds, parse_json


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def test_ordinary_bodies_parse() -> None:
    body = {"model": "m#d", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.7, "n": 2}
    assert parse_json(json.dumps(body).encode()) == body


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e999", "-1e400"])
def test_non_standard_numbers_are_named(token: str) -> None:
    with pytest.raises(RouterError) as err:
        parse_json(b'{"temperature": ' + token.encode() + b"}")
    assert err.value.status == 400
    assert err.value.code == "invalid_json_number"
    assert token.lstrip("-") in err.value.message


def test_depth_limit_is_exact() -> None:
    assert parse_json(nested(8), max_depth=8) == json.loads(nested(8))
    with pytest.raises(RouterError) as err:
        parse_json(nested(9), max_depth=8)
    assert err.value.code == "json_too_deep"
    # many brackets side by side are not depth
    wide = b"[" + b",".join([b"[]"] * 500) + b"]"
    assert len(parse_json(wide, max_depth=8)) == 500


def test_nesting_past_the_parser_recursion_is_a_400_not_a_crash() -> None:
    with pytest.raises(RouterError) as err:
        parse_json(nested(200_000))
    assert err.value.status == 400
    assert err.value.code == "json_too_deep"


@pytest.mark.parametrize("raw", [b"", b"{", b'{"a": 1,}', b"\xff\xfe\x00", b"9" * 5000])
def test_unparseable_is_a_400(raw: bytes) -> None:
    with pytest.raises(RouterError) as err:
        parse_json(raw)
    assert err.value.status == 400


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=30,
)


def depth_of(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth_of(v) for v in value), default=0)
    return 0


@given(json_values, st.integers(min_value=1, max_value=6))
def test_depth_check_agrees_with_a_recursive_count(value: object, limit: int) -> None:
    assert depth_exceeds(value, limit) == (depth_of(value) > limit)
    raw = json.dumps(value).encode()
    if depth_of(value) > limit:
        with pytest.raises(RouterError):
            parse_json(raw, max_depth=limit)
    else:
        assert parse_json(raw, max_depth=limit) == json.loads(raw)
