"""Threads for the handlers' blocking Kubernetes calls (the client is synchronous): a pool per kind of call
whose slowness must not hold the others' threads, made once per event loop and shut down with it."""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class Threads:
    def __init__(self, size: int, name: str) -> None:
        self.size, self.name = size, name
        self._pools: dict[asyncio.AbstractEventLoop, ThreadPoolExecutor] = {}

    async def call(self, call: Callable[..., T], *args: Any) -> T:
        """`call(*args)` on one of these threads, in the caller's context (as asyncio.to_thread does on the
        loop's default ones)."""
        loop = asyncio.get_running_loop()
        pool = self._pools.get(loop)
        if pool is None:
            pool = self._pools[loop] = ThreadPoolExecutor(self.size, thread_name_prefix=self.name)
        return await loop.run_in_executor(pool, functools.partial(contextvars.copy_context().run, call, *args))

    def shutdown(self) -> None:
        """The calls under way finish on their own; nothing new starts on this loop's pool."""
        pool = self._pools.pop(asyncio.get_running_loop(), None)
        if pool is not None:
            pool.shutdown(wait=False)
