"""The loop every followed object runs in its Kopf daemon: look when woken (an event about it or what it depends
on) or when its own next deadline comes, never on a short timer."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import kopf


async def follow(
    wake: asyncio.Event,
    stopped: kopf.DaemonStopped,
    look: Callable[[bool], Awaitable[float | None]],
    coalesce: float,
) -> None:
    """Call `look(woken)` at once, then whenever `wake` is set or the seconds the last look returned have
    passed (`woken` says which), until `stopped` or a look returns None. A burst of wakes within `coalesce`
    seconds (a pod: scheduled, started, ready) is served by one look."""
    due = 0.0
    wake.set()
    # One waiter on `stopped` for the loop's whole life: each `stopped.wait()` makes a Kopf promise and a task,
    # which per wake of 10,000 followed objects was a quarter of the operator's CPU.
    stopping = asyncio.ensure_future(stopped.wait())
    try:
        while not stopping.done():
            woken = asyncio.ensure_future(wake.wait())
            await asyncio.wait((woken, stopping), timeout=due, return_when=asyncio.FIRST_COMPLETED)
            woken.cancel()
            if stopping.done():
                return
            await asyncio.wait((stopping,), timeout=coalesce)
            was_woken = wake.is_set()
            wake.clear()
            if stopping.done():
                return
            result = await look(was_woken)
            if result is None:
                return
            due = result
    finally:
        stopping.cancel()
