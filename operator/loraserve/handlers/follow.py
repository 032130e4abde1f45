"""How a followed object is looked at: when woken (an event about it or what it depends on) or when its own next
deadline comes, never on a short timer: `Looks` (a timer while idle, a task only while looking). A Deployment's
looks live as long as its Kopf daemons (`follow`); an addon's from its first watch event to its deletion."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
from collections.abc import Awaitable, Callable, Sequence

import kopf

from loraserve.settings import operator_settings

LOG = logging.getLogger(__name__)


def spread(seconds: float) -> float:
    """`seconds` spread by +-20 %: a period of objects created together (a GitOps sync, an operator restart)
    drifts apart, instead of coming due for all of them in one wave of API calls."""
    return seconds * random.uniform(0.8, 1.2)


def resync_seconds() -> float:
    """Until the slow resync of an object nothing woke (`LORASERVE_RESYNC_INTERVAL`, spread)."""
    return spread(operator_settings().resync_every)


async def follow(stopped: kopf.DaemonStopped, looks: Sequence[Looks], grace: float) -> None:
    """A Kopf daemon's life, driven by `looks`: a look of each at once, then as `Looks` rules, until Kopf stops
    the daemon (the object is deleted, the operator stops or pauses for a peer); then the looks under way end,
    cancelled after `grace`. While idle the daemon's task only waits for that stop: one waiter for the loop's
    whole life (each `stopped.wait()` makes a Kopf promise and a task)."""
    for each in looks:
        each.wake()
    try:
        await stopped.wait()
    finally:
        await asyncio.gather(*(each.stop(grace) for each in looks))


class Looks:
    """Look when woken, or when the seconds the last look returned have passed; a burst of wakes within
    `coalesce` is one look; never two looks at once. No task while idle: a timer for the next deadline, a task
    only while looking (for objects counted in thousands, a loop each was 7 KB per object).

    A look is woken at once (`wake`) by whoever starts following the object. A look returning None has no
    deadline: only a wake looks again. A look that raises is logged and looked at again after `retry` seconds.
    `may_look` is asked when a look is due: False skips it (no deadline kept); whoever makes it True again
    calls `wake`.

    Looks run in `context` (by default, the one this is made in), whoever wakes them (the routers' scraper, a
    timer): a Kopf handler's context is how kopf.info/warn post Events. One context can serve many objects:
    each copy holds the cause of the handler it was made in (its body and patch), kilobytes per object."""

    def __init__(
        self,
        look: Callable[[bool], Awaitable[float | None]],
        coalesce: float,
        retry: float,
        may_look: Callable[[], bool] = lambda: True,
        context: contextvars.Context | None = None,
    ) -> None:
        self._look = look
        self._retry = retry
        self._coalesce = coalesce
        self._may_look = may_look
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._woken = False
        self._stopped = False
        self._context = context or contextvars.copy_context()

    def wake(self) -> None:
        if self._stopped:
            return
        self._woken = True
        if self._task is None:  # a look under way looks again when it ends
            self._arm(self._coalesce)

    def _arm(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        at = loop.time() + delay
        if self._timer is not None:
            if self._timer.when() <= at:
                return  # an earlier look is already due
            self._timer.cancel()
        self._timer = loop.call_at(at, self._start, context=self._context)

    def _start(self) -> None:
        self._timer = None
        if self._stopped or self._task is not None or not self._may_look():
            return
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        woken, self._woken = self._woken, False
        due: float | None
        try:
            due = await self._look(woken)
        except Exception:  # a look of its own task: nothing above it would report the error
            LOG.exception("look failed; looking again in %ss", self._retry)
            due = self._retry
        finally:
            self._task = None
        if self._stopped:
            return
        if self._woken:
            self._arm(self._coalesce)
        elif due is not None:
            self._arm(due)

    @property
    def looking(self) -> bool:
        return self._task is not None

    async def stop(self, grace: float) -> None:
        """No look from now on; returns once the look under way (if any) has ended, cancelled after `grace`."""
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task = self._task
        if task is not None:
            done, _ = await asyncio.wait((task,), timeout=grace)
            if not done:
                task.cancel()
                await asyncio.wait((task,))
