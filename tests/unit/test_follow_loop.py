"""The loop each followed Deployment runs, and the timer-driven looks of each LoraAddon, under a fake clock
(looptime, as Kopf's own tests): they look at once, again when woken or when the deadline the last look
returned comes, serve a burst of wakes with one look, and stop when told. No wall-clock waits: a 5-minute
deadline takes no real time."""

from __future__ import annotations

import asyncio
import contextvars

import pytest
from kopf._cogs.aiokits.aioenums import AsyncFlagWaiter, FlagSetter

from loraserve.handlers.follow import Looks, follow, spread

COALESCE = 0.2


class Recorder:
    def __init__(self, dues: list[float | None]) -> None:
        self.dues = dues
        self.looks: list[tuple[float, bool]] = []

    async def look(self, woken: bool) -> float | None:
        self.looks.append((round(asyncio.get_running_loop().time(), 3), woken))
        return self.dues.pop(0) if self.dues else 300.0


@pytest.mark.looptime
async def test_a_daemon_looks_at_once_and_its_stop_ends_the_look_under_way_without_another() -> None:
    """A Deployment's Kopf daemon: looks at once (events may have come before it started), then at the
    deadlines; Kopf stopping it (the object deleted, a peer takes over) lets the look under way end and leaves
    no look behind."""
    ended: list[float] = []

    async def slow_look(woken: bool) -> float | None:
        await recorder.look(woken)
        await asyncio.sleep(3)  # a reconcile under way when Kopf stops the daemon
        ended.append(round(asyncio.get_running_loop().time(), 3))
        return 100.0

    recorder = Recorder([])
    looks = Looks(slow_look, COALESCE, 5.0)
    setter: FlagSetter[object] = FlagSetter()
    daemon = asyncio.create_task(follow(AsyncFlagWaiter(setter), [looks], grace=8.0))
    await asyncio.sleep(104)  # looks at 0.2 and 103.2 (its deadline), which is under way
    setter.set()
    await asyncio.wait_for(daemon, timeout=10)
    assert asyncio.get_running_loop().time() == pytest.approx(106.2, abs=0.01)  # the look ended first
    assert recorder.looks == [(0.2, True), (103.2, False)]
    assert ended == [3.2, 106.2]
    await asyncio.sleep(1000)
    assert len(recorder.looks) == 2


# -- Looks: the same rules without a task while idle (the addons) ----------------------------------------------
RETRY = 5.0


async def idle(seconds: float) -> None:
    await asyncio.sleep(seconds)


@pytest.mark.looptime
async def test_looks_follow_the_returned_deadlines_with_no_task_while_idle() -> None:
    recorder = Recorder([30.0, 600.0, None])
    looks = Looks(recorder.look, COALESCE, RETRY)
    tasks_before = len(asyncio.all_tasks())
    looks.wake()
    await idle(10)
    assert len(asyncio.all_tasks()) == tasks_before  # waiting for its deadline: a timer, not a task
    await idle(2000)
    assert recorder.looks == [(0.2, True), (30.2, False), (630.2, False)]  # None: no more looks


@pytest.mark.looptime
async def test_a_burst_of_wakes_is_one_look_and_a_wake_during_a_look_looks_again() -> None:
    started = asyncio.Event()
    release = asyncio.Event()
    times: list[float] = []

    async def slow_look(woken: bool) -> float | None:
        times.append(round(asyncio.get_running_loop().time(), 3))
        started.set()
        await release.wait()
        return 300.0

    looks = Looks(slow_look, COALESCE, RETRY)
    for _ in range(5):
        looks.wake()
        await idle(0.02)
    await started.wait()
    looks.wake()  # comes while looking: served after this look, not beside it
    assert looks.looking
    await idle(10)
    release.set()
    await idle(1)
    assert times == [0.2, 10.4]  # one look for the burst; the wake during it: one more, coalesced after it


@pytest.mark.looptime
async def test_a_look_that_raises_is_looked_at_again_and_stop_waits_for_the_look() -> None:
    calls: list[float] = []

    async def flaky(_: bool) -> float | None:
        calls.append(round(asyncio.get_running_loop().time(), 3))
        if len(calls) == 1:
            raise RuntimeError("boom")
        await asyncio.sleep(3)
        return 300.0

    looks = Looks(flaky, COALESCE, RETRY)
    looks.wake()
    await idle(6)
    assert calls == [0.2, 5.2]  # retried after RETRY
    await looks.stop(grace=20)  # the look under way (until 8.2) ends first
    assert asyncio.get_running_loop().time() == pytest.approx(8.2, abs=0.01)
    looks.wake()
    await idle(1000)
    assert calls == [0.2, 5.2]  # stopped: no more looks


@pytest.mark.looptime
async def test_a_gated_look_is_skipped_until_woken_again() -> None:
    recorder = Recorder([300.0, 300.0])
    allowed = False
    looks = Looks(recorder.look, COALESCE, RETRY, lambda: allowed)
    looks.wake()
    await idle(100)
    assert recorder.looks == []  # e.g. its Deployment's loop not started yet
    allowed = True
    looks.wake()  # whoever opened the gate
    await idle(1)
    assert recorder.looks == [(100.2, True)]


@pytest.mark.looptime
async def test_stop_cancels_a_look_that_overruns_its_grace() -> None:
    async def stuck(_: bool) -> float | None:
        await asyncio.sleep(10_000)
        return None

    looks = Looks(stuck, COALESCE, RETRY)
    looks.wake()
    await idle(1)
    await looks.stop(grace=20)
    assert not looks.looking
    assert asyncio.get_running_loop().time() == pytest.approx(21, abs=0.01)


MADE_IN = contextvars.ContextVar[str]("made_in")


@pytest.mark.looptime
async def test_looks_run_in_the_context_they_were_made_in_whoever_wakes_them() -> None:
    seen: list[str] = []

    async def look(_: bool) -> float | None:
        seen.append(MADE_IN.get("none"))
        return 300.0

    async def handler() -> Looks:  # e.g. Kopf's event handler, whose context posting Events needs
        MADE_IN.set("handler")
        return Looks(look, COALESCE, RETRY)

    looks = await asyncio.create_task(handler())
    looks.wake()  # from here: another task's context (e.g. the routers' scraper)
    await idle(400)
    assert seen == ["handler", "handler"]


def test_a_period_is_spread_so_objects_created_together_come_due_apart() -> None:
    # e.g. the GPU meter's status write of 1,000 Deployments that became ready in one GitOps sync
    periods = [spread(300.0) for _ in range(1000)]
    assert all(240.0 <= p <= 360.0 for p in periods)
    # the whole band is used, not one value
    assert min(periods) < 250.0
    assert max(periods) > 350.0
