"""Scale from zero: held requests are woken for, released in arrival order when a replica is ready, never lost."""

from __future__ import annotations

import asyncio
import functools
import json

import aiohttp
import pytest

from loraserve.router.hold import DeploymentGone, HoldQueue
from loraserve.router.topology import (
    SCALE_FROM_ZERO_TIMEOUT_ANNOTATION,
    DeploymentKey,
    DeploymentView,
    TopologyStore,
    build_deployments,
)
from tests.router.fakes import FakeBackend
from tests.router.harness import NS, RecordingWaker, addon, deployment, model_version, start_router, wait_until

KEY = (NS, "d")


def views(*urls: str) -> dict[DeploymentKey, DeploymentView]:
    return build_deployments(
        [deployment("d")],
        [addon("bot", "d", [("bot-v1", 100)])],
        [model_version("bot-v1", "v1")],
        [],
        extra_replicas={KEY: list(urls)},
    )


async def test_release_in_arrival_order_and_wake_once() -> None:
    store = TopologyStore()
    store.replace(views())
    waker = RecordingWaker()
    holds = HoldQueue(store, waker)
    order: list[int] = []
    held = []
    for i in range(10):
        h = holds.hold(KEY, "bot-v1" if i % 3 == 0 else None)
        h.future.add_done_callback(functools.partial(lambda i, _f: order.append(i), i))
        held.append(h)
    await asyncio.sleep(0)
    assert waker.calls == [KEY]  # woken at once, and once for all of them
    assert holds.count(KEY) == 10

    # A replica without the adapter: the base-model requests go, in order; adapter requests keep their place.
    store.replace(views("http://10.0.0.1:8000"))
    await asyncio.sleep(0)
    assert order == [1, 2, 4, 5, 7, 8]
    assert holds.count(KEY) == 4
    (_, replica), *_ = store.replicas()
    assert replica.in_flight == 6  # each was reserved as it was released
    store.set_loaded(replica, frozenset({"bot-v1"}))
    await asyncio.sleep(0)
    assert order == [1, 2, 4, 5, 7, 8, 0, 3, 6, 9]
    assert holds.count() == 0
    assert all(h.future.result() is replica for h in held)


async def test_wait_timeout_and_cancel_leave_nothing_behind() -> None:
    store = TopologyStore()
    store.replace(views())
    holds = HoldQueue(store, RecordingWaker())
    with pytest.raises(TimeoutError):
        await holds.wait(holds.hold(KEY, None), 0.001)
    assert holds.count() == 0
    task = asyncio.create_task(holds.wait(holds.hold(KEY, None), 60))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert holds.count() == 0
    # Released and cancelled in the same turn: the reservation is given back.
    h = holds.hold(KEY, None)
    task = asyncio.create_task(holds.wait(h, 60))
    await asyncio.sleep(0)
    store.replace(views("http://10.0.0.1:8000"))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (_, replica), *_ = store.replicas()
    assert replica.in_flight == 0


async def test_deleted_deployment_fails_held_requests() -> None:
    store = TopologyStore()
    store.replace(views())
    holds = HoldQueue(store, RecordingWaker())
    h = holds.hold(KEY, None)
    store.replace({})
    with pytest.raises(DeploymentGone):
        await holds.wait(h, 60)


async def test_http_held_requests_all_complete_after_wake() -> None:
    backend = FakeBackend(adapters={"bot-v1"})
    await backend.start()
    waker = RecordingWaker()
    h = await start_router(waker=waker)
    resources = [deployment("d"), addon("bot", "d", [("bot-v1", 100)]), model_version("bot-v1", "v1")]
    h.set(resources)
    try:
        async with aiohttp.ClientSession() as session:

            async def one(i: int) -> tuple[int, str]:
                body = {"model": "tiny-llama#d" if i % 2 else "bot#d", "prompt": f"request-{i}"}
                async with session.post(h.url + "/v1/completions", json=body) as r:
                    return r.status, (await r.json())["model"]

            tasks = []
            for i in range(12):
                tasks.append(asyncio.create_task(one(i)))
                # One at a time: arrival order is request order.
                await wait_until(functools.partial(lambda n: h.gateway.holds.count(KEY) >= n, i + 1))
            assert waker.calls == [KEY]
            assert "loraserve_router_requests_held" in h.gateway.metrics.render().decode()
            h.set(resources, replicas={KEY: [backend.url]}, loaded={backend.url: {"bot-v1"}})
            results = await asyncio.gather(*tasks)
        assert results == [(200, "tiny-llama" if i % 2 else "bot-v1") for i in range(12)]
        prompts = sorted(s.body["prompt"] for s in backend.seen)
        assert prompts == sorted(f"request-{i}" for i in range(12))  # none lost, none twice
        metrics = h.gateway.metrics.render().decode()
        assert 'loraserve_router_holds_total{addon="bot",deployment="d",namespace="default"} 6.0' in metrics
        assert 'loraserve_router_requests_held{addon="",deployment="d",namespace="default"} 0.0' in metrics
        assert 'loraserve_router_wakeups_total{deployment="d",namespace="default"} 1.0' in metrics
    finally:
        await h.close()
        await backend.stop()


async def test_http_client_gone_while_held() -> None:
    h = await start_router()
    h.set([deployment("d", annotations={SCALE_FROM_ZERO_TIMEOUT_ANNOTATION: "1h"})])
    try:
        _reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
        body = json.dumps({"model": "tiny-llama#d", "prompt": "x"}).encode()
        writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body))
        await writer.drain()
        await wait_until(lambda: h.gateway.holds.count(KEY))
        writer.close()
        await wait_until(lambda: not h.gateway.holds.count(KEY))
        assert 'code="499"' in h.gateway.metrics.render().decode()
    finally:
        await h.close()
