"""Go `time.ParseDuration`, exactly, for the windows in a Deployment spec.

Admission checks durations with CEL's `duration()`, which is Go's own parser. The Python side must accept
exactly what admission accepts (no `1d`, no `1h 30m`, overflow refused), so this is a line-by-line port of
Go's algorithm rather than `durationpy`, which is more lenient.
"""

from __future__ import annotations

NANOSECOND = 1
MICROSECOND = 1000 * NANOSECOND
MILLISECOND = 1000 * MICROSECOND
SECOND = 1000 * MILLISECOND
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE

_UNITS: dict[str, int] = {
    "ns": NANOSECOND,
    "us": MICROSECOND,
    "\u00b5s": MICROSECOND,  # U+00B5 micro sign
    "\u03bcs": MICROSECOND,  # U+03BC Greek small letter mu
    "ms": MILLISECOND,
    "s": SECOND,
    "m": MINUTE,
    "h": HOUR,
}
_LIMIT = 1 << 63

# The same language as a JSON-schema / RE2 pattern, without a sign: windows are never negative. A pattern
# cannot see overflow; admission adds a CEL `duration()` rule for that, and parse_duration refuses it here.
NON_NEGATIVE_DURATION_PATTERN = r"^(0|(([0-9]+(\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h))+)$"


class DurationError(ValueError):
    """A string that Go's time.ParseDuration refuses; the message is Go's."""


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _leading_int(s: str) -> tuple[int, str]:
    x = 0
    i = 0
    while i < len(s) and "0" <= s[i] <= "9":
        if x > _LIMIT // 10:
            raise OverflowError
        x = x * 10 + ord(s[i]) - ord("0")
        if x > _LIMIT:
            raise OverflowError
        i += 1
    return x, s[i:]


def _leading_fraction(s: str) -> tuple[int, float, str]:
    # Used only for fractions: on overflow it stops accumulating precision instead of failing.
    x = 0
    scale = 1.0
    overflow = False
    i = 0
    while i < len(s) and "0" <= s[i] <= "9":
        if not overflow:
            if x > (_LIMIT - 1) // 10:
                overflow = True
            else:
                y = x * 10 + ord(s[i]) - ord("0")
                if y > _LIMIT:
                    overflow = True
                else:
                    x = y
                    scale *= 10
        i += 1
    return x, scale, s[i:]


def parse_duration(text: str) -> int:
    """Parse a Go duration string (`300ms`, `-1.5h`, `2h45m`, `0`) into integer nanoseconds."""
    orig = text
    s = text
    total = 0
    neg = False
    if s and s[0] in "+-":
        neg = s[0] == "-"
        s = s[1:]
    if s == "0":
        return 0
    if s == "":
        raise DurationError("time: invalid duration " + _quote(orig))
    while s:
        if not (s[0] == "." or "0" <= s[0] <= "9"):
            raise DurationError("time: invalid duration " + _quote(orig))
        before = len(s)
        try:
            v, s = _leading_int(s)
        except OverflowError:
            raise DurationError("time: invalid duration " + _quote(orig)) from None
        pre = before != len(s)
        post = False
        f, scale = 0, 1.0
        if s and s[0] == ".":
            s = s[1:]
            before = len(s)
            f, scale, s = _leading_fraction(s)
            post = before != len(s)
        if not pre and not post:
            raise DurationError("time: invalid duration " + _quote(orig))
        i = 0
        while i < len(s) and not (s[i] == "." or "0" <= s[i] <= "9"):
            i += 1
        if i == 0:
            raise DurationError("time: missing unit in duration " + _quote(orig))
        unit_name, s = s[:i], s[i:]
        unit = _UNITS.get(unit_name)
        if unit is None:
            raise DurationError(f"time: unknown unit {_quote(unit_name)} in duration {_quote(orig)}")
        if v > _LIMIT // unit:
            raise DurationError("time: invalid duration " + _quote(orig))
        v *= unit
        if f > 0:
            # Go computes the fraction in float64 (nanosecond-accurate even for fractions of hours).
            v += int(float(f) * (float(unit) / scale))
            if v > _LIMIT:
                raise DurationError("time: invalid duration " + _quote(orig))
        total += v
        if total > _LIMIT:
            raise DurationError("time: invalid duration " + _quote(orig))
    if neg:
        return -total
    if total > _LIMIT - 1:
        raise DurationError("time: invalid duration " + _quote(orig))
    return total


def parse_window(text: str) -> float:
    """A non-negative Go duration, in seconds (what the windows in a spec are)."""
    ns = parse_duration(text)
    if ns < 0 or text.startswith(("-", "+")):
        raise DurationError(f"duration {_quote(text)} must not carry a sign")
    return ns / SECOND
