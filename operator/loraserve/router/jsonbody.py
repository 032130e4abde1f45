"""Parsing a request body as strict JSON. Pure: no I/O.

Python's `json` accepts more than RFC 8259: `NaN`, `Infinity` and `-Infinity`, and numbers such as `1e999`
that overflow to infinity; none of them can be forwarded as standard JSON, so they are refused (400, naming
the token). Nesting is bounded (`max_depth`): the C parser recurses per level, and a body of a few hundred
thousand `[` would otherwise end in a RecursionError (a 500) or in a deep structure that every later step
walks again. Every refusal is a `RouterError` with an OpenAI-shaped body.

Cost on the hot path: the depth walk runs only when the body has more `{` and `[` bytes than `max_depth`
(a C-speed count), so an ordinary chat request pays two `bytes.count` calls.
"""

from __future__ import annotations

import json
import math
from typing import Any

from loraserve.router.errors import RouterError, bad_request

DEFAULT_MAX_DEPTH = 128


class _NonStandard(Exception):
    def __init__(self, token: str) -> None:
        super().__init__(token)
        self.token = token


def _constant(token: str) -> Any:
    raise _NonStandard(token)


def _float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _NonStandard(text if len(text) <= 40 else text[:40] + "...")
    return value


# One decoder, built once: `json.loads` with hooks would build a new one (and its C scanner) per call.
_DECODER = json.JSONDecoder(parse_constant=_constant, parse_float=_float)


def depth_exceeds(value: Any, limit: int) -> bool:
    """Whether `value` nests dicts/lists more than `limit` deep (iterative: no recursion to exhaust)."""
    if not isinstance(value, dict | list):
        return limit < 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, level = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        if level > limit:
            return True
        for child in children:
            if isinstance(child, dict | list):
                stack.append((child, level + 1))
    return False


def too_deep(limit: int) -> RouterError:
    return bad_request(f"The JSON body is nested more than {limit} levels deep.", code="json_too_deep")


def parse_json(raw: bytes, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """The body as a Python value, or a 400 RouterError saying what is wrong with it."""
    try:
        # As json.loads does for bytes: UTF-8/16/32 by the first bytes, lone surrogates kept (re-escaped later).
        value = _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))
    except _NonStandard as exc:
        raise bad_request(
            f"The JSON body contains {exc.token!r}, which is not a standard JSON number.", code="invalid_json_number"
        ) from None
    except RecursionError:
        raise too_deep(max_depth) from None
    except (ValueError, UnicodeDecodeError):  # also: ints over Python's digit limit, bad UTF-8
        raise bad_request("We could not parse the JSON body of your request.") from None
    if (
        max_depth
        and isinstance(value, dict | list)
        and raw.count(b"{") + raw.count(b"[") > max_depth
        and depth_exceeds(value, max_depth)
    ):
        raise too_deep(max_depth)
    return value
