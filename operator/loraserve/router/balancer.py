"""Which adapter version and which replica a request goes to. Pure: no I/O.

A/B split: an addon's versions are laid out as consecutive buckets of their weights in spec order, and a
request lands at a point in [0, total). With a `user` the point is a stable hash of (addon, user): the same
user keeps the same version while the weights stay, and moving weight from v1 to v2 only moves the users
in the bucket range that changed hands (a ramp-up never sends a v2 user back to v1). Without `user` the
point is random.

Replica choice: ready replicas only. For an adapter, only replicas that report it loaded; when none does,
there is no choice (None) and the router holds the request, as at scale from zero, until one reports it or
the deployment's hold timeout passes. vLLM would answer 404 for an adapter it has not loaded, so sending
the request anyway would turn a short wait for the operator's load into an error. Among the candidates:
least in-flight, ties broken at random so sequential requests spread.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Collection, Iterable

from loraserve.router.topology import AdapterVersion, Replica

_TWO_64 = 1 << 64


def sticky_point(addon: str, user: str, total: int) -> int:
    """A stable point in [0, total) for (addon, user): same inputs, same point, in every process."""
    digest = hashlib.blake2b(f"{addon}\x00{user}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") * total) // _TWO_64


def pick_version(
    addon: str,
    versions: tuple[AdapterVersion, ...],
    user: str | None = None,
    rng: random.Random | None = None,
) -> AdapterVersion | None:
    """One version by weight: sticky per `user` when given, random otherwise. None when there is none."""
    if not versions:
        return None
    if len(versions) == 1:
        return versions[0]
    total = 0
    for v in versions:
        total += v.weight
    if total <= 0:
        weighted: Iterable[tuple[AdapterVersion, int]] = ((v, 1) for v in versions)
        total = len(versions)
    else:
        weighted = ((v, v.weight) for v in versions)
    point = sticky_point(addon, user, total) if user else int((rng or random).random() * total)
    for version, weight in weighted:
        if point < weight:
            return version
        point -= weight
    return versions[-1]  # pragma: no cover - point < total always lands in a bucket


def choose_replica(
    replicas: Iterable[Replica],
    adapter: str | None = None,
    exclude: Collection[Replica] = (),
    rng: random.Random | None = None,
) -> Replica | None:
    """The ready replica to send to: with `adapter` loaded (if any), least in-flight. None if none fits."""
    best: Replica | None = None
    ties = 0
    for replica in replicas:
        if exclude and replica in exclude:
            continue
        if adapter is not None and adapter not in replica.loaded:
            continue
        if best is None or replica.in_flight < best.in_flight:
            best = replica
            ties = 1
        elif replica.in_flight == best.in_flight:
            ties += 1
            if (rng or random).random() * ties < 1.0:
                best = replica
    return best
