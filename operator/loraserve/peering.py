"""Which operator replica acts: the Kopf peering settings, decided without I/O.

Kopf peering (kopf/_core/engines/peering.py): every replica writes a keep-alive (identity, priority, lifetime,
time) into a shared KopfPeering object and pauses while a live peer has a higher priority; a peer counts as
dead once its last keep-alive is older than its lifetime. Kopf refreshes the keep-alive every
``max(1, lifetime - 5..10)`` seconds, and a paused replica re-checks exactly when the peer it yields to
expires. So:

* **lifetime** (``LORASERVE_PEERING_LIFETIME``, a Go duration of whole seconds, 3s to 10m, default 10s): a
  SIGKILLed leader is replaced ``lifetime`` seconds after its last keep-alive at the latest (1-5 s keep-alives
  at 10s: within 5-10 s), while a live leader keeps at least 5 s of slack (a slow apiserver, a busy event
  loop) before a standby would think it dead and both act. Kopf's own default, 60 s, is a minute without an
  operator. Shorter still (down to 3s: a keep-alive every second) trades slack for speed.
* **priority**: the replica that started first acts. A replica that (re)starts beside a healthy leader then
  becomes the standby instead of taking over (with random priorities a restart hands over half the time, and
  a handover overlaps while the old leader's daemons stop). A random tiebreak in the low bits keeps two
  replicas started in the same centisecond apart (equal priorities pause both).
"""

from __future__ import annotations

from collections.abc import Mapping

from loraserve.durations import SECOND, DurationError, parse_duration

LIFETIME_ENV = "LORASERVE_PEERING_LIFETIME"
DEFAULT_LIFETIME = "10s"
MIN_LIFETIME = 3  # seconds: Kopf's keep-alive is then every second, leaving 2 s of slack
MAX_LIFETIME = 600

# Logged at start: until Kopf logs "Resuming operations" after it, a replica stands by (Kopf itself logs
# "Pausing operations" only when a leader appears later, not for a replica that starts paused).
STANDING_BY = "standing by until no older replica is alive"
RESUMED = "Resuming operations"
PAUSED = "Pausing operations"

TIEBREAK_BITS = 10
# Centiseconds since 1970 stay below 2**40 until the 2300s; with the tiebreak a priority is below 2**50, an
# exact integer in any JSON reader.
_HORIZON = 2**40


def lifetime(environ: Mapping[str, str]) -> int:
    """Seconds a keep-alive counts, from ``LORASERVE_PEERING_LIFETIME``; a bad value names the variable."""
    text = environ.get(LIFETIME_ENV) or DEFAULT_LIFETIME
    try:
        ns = parse_duration(text)
    except DurationError as exc:
        raise ValueError(f"{LIFETIME_ENV}: {exc}") from None
    if ns % SECOND:
        raise ValueError(f"{LIFETIME_ENV}: {text!r} is not a whole number of seconds (Kopf counts in seconds)")
    seconds = ns // SECOND
    if not MIN_LIFETIME <= seconds <= MAX_LIFETIME:
        raise ValueError(f"{LIFETIME_ENV}: {text!r} must be between {MIN_LIFETIME}s and {MAX_LIFETIME // 60}m")
    return seconds


def priority(started_at: float, tiebreak: int) -> int:
    """Kopf priority of a replica started at `started_at` (epoch seconds): earlier start, higher priority.

    `tiebreak` (0 <= tiebreak < 2**TIEBREAK_BITS, random) orders replicas started in the same centisecond.
    """
    if not 0 <= tiebreak < 2**TIEBREAK_BITS:
        raise ValueError(f"tiebreak must be in [0, {2**TIEBREAK_BITS})")
    centiseconds = int(started_at * 100)
    if not 0 <= centiseconds < _HORIZON:
        raise ValueError(f"started_at {started_at!r} is outside the clock range peering priorities cover")
    return ((_HORIZON - 1 - centiseconds) << TIEBREAK_BITS) | tiebreak
