"""The loop each followed Deployment and LoraAddon runs, under a fake clock (looptime, as Kopf's own tests):
it looks at once, again when woken or when the deadline its last look returned comes, serves a burst of wakes
with one look, and stops when told. No wall-clock waits: a 5-minute deadline takes no real time."""

from __future__ import annotations

import asyncio

import pytest
from kopf._cogs.aiokits.aioenums import AsyncFlagWaiter, FlagSetter

from loraserve.handlers.follow import follow

COALESCE = 0.2


class Recorder:
    def __init__(self, dues: list[float | None]) -> None:
        self.dues = dues
        self.looks: list[tuple[float, bool]] = []

    async def look(self, woken: bool) -> float | None:
        self.looks.append((round(asyncio.get_running_loop().time(), 3), woken))
        return self.dues.pop(0) if self.dues else 300.0


@pytest.mark.looptime
async def test_looks_at_once_then_at_each_returned_deadline() -> None:
    recorder = Recorder([30.0, 600.0, None])  # e.g. a retry in 30 s, then a warm grace ending in 10 min
    setter: FlagSetter[object] = FlagSetter()
    await follow(asyncio.Event(), AsyncFlagWaiter(setter), recorder.look, COALESCE)
    assert recorder.looks == [(0.2, True), (30.4, False), (630.6, False)]


@pytest.mark.looptime
async def test_a_wake_comes_before_the_deadline_and_a_burst_is_one_look() -> None:
    recorder = Recorder([300.0, 300.0, None])
    wake = asyncio.Event()
    setter: FlagSetter[object] = FlagSetter()
    loop = asyncio.create_task(follow(wake, AsyncFlagWaiter(setter), recorder.look, COALESCE))
    await asyncio.sleep(10)
    for _ in range(5):  # a pod: scheduled, started, ready, ... within 0.1 s
        wake.set()
        await asyncio.sleep(0.02)
    await asyncio.wait_for(loop, timeout=1000)
    assert recorder.looks == [(0.2, True), (10.2, True), (310.4, False)]


@pytest.mark.looptime
async def test_stopping_ends_the_loop_without_another_look() -> None:
    recorder = Recorder([])
    wake = asyncio.Event()
    setter: FlagSetter[object] = FlagSetter()
    loop = asyncio.create_task(follow(wake, AsyncFlagWaiter(setter), recorder.look, COALESCE))
    await asyncio.sleep(100)
    setter.set()
    wake.set()
    await asyncio.wait_for(loop, timeout=1)
    assert recorder.looks == [(0.2, True)]
    assert asyncio.get_running_loop().time() == pytest.approx(100, abs=0.01)
