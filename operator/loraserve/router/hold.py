"""Holding requests for a deployment that has no replica to take them, and waking it. No network I/O.

A request that finds no ready replica (the deployment is at zero, or no replica has its adapter loaded yet)
is queued per deployment, first come first served. Whenever the topology of that deployment changes, the
queue is walked in order and every request that can now be placed gets its replica, reserved at once
(in-flight + 1) so the least-in-flight choice of the next one sees it: dispatch order is arrival order.
A request that still cannot be placed keeps its place. A deployment with no ready replica at all is woken
through the `Waker` as soon as a request is held, and again if it changes while requests wait and it still
has no replica (someone scaled it back to zero); at most one wake is in flight per deployment, and wakes
are at least `min_wake_interval` apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from loraserve.router.balancer import choose_replica
from loraserve.router.topology import DeploymentKey, Replica, TopologyStore

log = logging.getLogger(__name__)


class Waker(Protocol):
    """Asks for a deployment at zero to get a replica (the Kubernetes one patches the scale subresource)."""

    async def wake(self, namespace: str, name: str) -> None: ...


class NullWaker:
    """For static topologies: nothing to wake, the request just waits for a replica to appear."""

    async def wake(self, namespace: str, name: str) -> None:
        return None


class DeploymentGone(Exception):
    """The deployment a request was held for was deleted."""


class RouterStopping(Exception):
    """The router is shutting down: a held request is refused (503) rather than dropped unanswered."""


@dataclass(eq=False, slots=True)
class HeldRequest:
    key: DeploymentKey
    adapter: str | None
    future: asyncio.Future[Replica]
    exclude: frozenset[Replica] = field(default_factory=frozenset)


class HoldQueue:
    def __init__(
        self,
        store: TopologyStore,
        waker: Waker,
        *,
        min_wake_interval: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        on_wake: Callable[[DeploymentKey], None] | None = None,
    ) -> None:
        self._store = store
        self._waker = waker
        self._queues: dict[DeploymentKey, deque[HeldRequest]] = {}
        self._wakes: dict[DeploymentKey, asyncio.Task[None]] = {}
        self._last_wake: dict[DeploymentKey, float] = {}
        self._min_wake_interval = min_wake_interval
        self._clock = clock
        self._on_wake = on_wake
        store.add_listener(self.release)

    def count(self, key: DeploymentKey | None = None) -> int:
        if key is None:
            return sum(len(q) for q in self._queues.values())
        q = self._queues.get(key)
        return len(q) if q else 0

    def hold(self, key: DeploymentKey, adapter: str | None, exclude: frozenset[Replica] = frozenset()) -> HeldRequest:
        """Queue a request; wake the deployment if it has no ready replica at all."""
        held = HeldRequest(key, adapter, asyncio.get_running_loop().create_future(), exclude)
        self._queues.setdefault(key, deque()).append(held)
        state = self._store.get(*key)
        if state is not None and not state.replicas:
            self.wake(key)
        return held

    def wake(self, key: DeploymentKey) -> None:
        running = self._wakes.get(key)
        if running is not None and not running.done():
            return
        now = self._clock()
        last = self._last_wake.get(key)
        if last is not None and now - last < self._min_wake_interval:
            return
        self._last_wake[key] = now
        if self._on_wake is not None:
            self._on_wake(key)
        self._wakes[key] = asyncio.get_running_loop().create_task(self._wake(key))

    async def _wake(self, key: DeploymentKey) -> None:
        try:
            await self._waker.wake(*key)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the request keeps waiting; the next held request tries again
            log.warning("waking deployment %s/%s failed: %s", key[0], key[1], exc)

    def release(self, key: DeploymentKey) -> None:
        """Place, in arrival order, every held request of `key` that can be placed now."""
        queue = self._queues.get(key)
        if not queue:
            return
        state = self._store.get(*key)
        if state is None:
            while queue:
                held = queue.popleft()
                if not held.future.done():
                    held.future.set_exception(DeploymentGone(f"{key[0]}/{key[1]}"))
            del self._queues[key]
            return
        if not state.replicas:
            self.wake(key)  # still nothing ready (or back at zero): make sure it was asked to scale up
            return
        keep: deque[HeldRequest] = deque()
        replicas = state.replicas.values()
        while queue:
            held = queue.popleft()
            if held.future.done():
                continue
            replica = choose_replica(replicas, held.adapter, held.exclude)
            if replica is None:
                keep.append(held)
                continue
            replica.in_flight += 1  # reserved: the next one's least-in-flight choice sees it
            held.future.set_result(replica)
        if keep:
            self._queues[key] = keep
        else:
            del self._queues[key]

    async def wait(self, held: HeldRequest, limit: float) -> Replica:
        """The replica `held` was given (already reserved), or TimeoutError / DeploymentGone / cancellation;
        on any of those the request leaves the queue and nothing stays reserved."""
        try:
            async with asyncio.timeout(limit):
                return await held.future
        except BaseException:
            self.discard(held)
            raise

    def discard(self, held: HeldRequest) -> None:
        """Forget a request that stopped waiting (timeout, client gone). A replica it was given is given back."""
        queue = self._queues.get(held.key)
        if queue is not None:
            with contextlib.suppress(ValueError):
                queue.remove(held)
            if not queue:
                del self._queues[held.key]
        fut = held.future
        if fut.done():
            if not fut.cancelled() and fut.exception() is None:
                fut.result().in_flight -= 1
        else:
            fut.cancel()

    def fail_all(self) -> int:
        """Refuse every held request (shutdown). Returns how many there were."""
        n = 0
        for queue in self._queues.values():
            for held in queue:
                if not held.future.done():
                    held.future.set_exception(RouterStopping())
                    n += 1
        self._queues.clear()
        return n

    async def close(self) -> None:
        for task in self._wakes.values():
            task.cancel()
        for task in self._wakes.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
