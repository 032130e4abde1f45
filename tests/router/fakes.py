"""A fast fake OpenAI / vLLM backend (aiohttp) for the router tests: fixed answers, a fixed SSE stream.

It behaves like vLLM where the router cares: it serves one base model and the adapters it has "loaded"
(listed by GET /v1/models with `parent` = the base), answers 404 for any other model, streams
`data: {...}` events ending in `data: [DONE]`, reports `usage`, and notices a client that goes away.
Faults on demand: reset the connection before answering, stall a stream, or die in the middle of one.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

STREAM_TEXT = ("Hello", " from", " the", " fake")


@dataclass
class Seen:
    path: str
    model: str
    body: dict[str, Any]
    headers: dict[str, str]


@dataclass
class FakeBackend:
    base_model: str = "tiny-llama"
    adapters: set[str] = field(default_factory=set)
    chunk_delay: float = 0.0  # seconds between stream chunks
    hold: asyncio.Event | None = None  # when set: requests wait for it before answering
    stream_events: tuple[str, ...] = STREAM_TEXT  # the pieces a stream sends
    reset_before_head: int = 0  # the next N generation requests: connection reset, nothing answered
    stall_after: int | None = None  # streams send this many events, then nothing (until the client goes)
    die_after: int | None = None  # streams send this many events, then the connection is reset
    seen: list[Seen] = field(default_factory=list)
    failing: set[str] = field(default_factory=set)  # models answered 500 (a fault injected at the replica)
    disconnects: int = 0
    completed_streams: int = 0
    url: str = ""
    port: int = 0
    _runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        return app

    async def start(self, port: int = 0) -> str:
        self._runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        server = site._server
        assert server is not None
        self.port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def _models(self, request: web.Request) -> web.Response:
        data = [{"id": self.base_model, "object": "model", "root": self.base_model, "parent": None}]
        data += [
            {"id": a, "object": "model", "root": f"/adapters/{a}", "parent": self.base_model}
            for a in sorted(self.adapters)
        ]
        return web.json_response({"object": "list", "data": data})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = body.get("model")
        self.seen.append(Seen(request.path, model, body, dict(request.headers)))
        if self.reset_before_head > 0:
            self.reset_before_head -= 1
            assert request.transport is not None
            request.transport.abort()
            await asyncio.sleep(3600)  # cancelled at once: the connection is gone
        if self.hold is not None:
            await self.hold.wait()
        if model in self.failing:
            return web.json_response(
                {"error": {"message": "injected fault", "type": "InternalServerError"}}, status=500
            )
        if model != self.base_model and model not in self.adapters:
            return web.json_response(
                {
                    "error": {
                        "message": f"The model `{model}` does not exist.",
                        "type": "NotFoundError",
                        "param": None,
                        "code": 404,
                    }
                },
                status=404,
            )
        chat = request.path.endswith("/chat/completions")
        created = int(time.time())
        pieces = self.stream_events
        if not body.get("stream"):
            text = "".join(pieces)
            choice: dict[str, Any] = (
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                if chat
                else {"index": 0, "text": text, "finish_reason": "stop"}
            )
            return web.json_response(
                {
                    "id": "cmpl-fake",
                    "object": "chat.completion" if chat else "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [choice],
                    "usage": {
                        "prompt_tokens": 3,
                        "completion_tokens": len(pieces),
                        "total_tokens": 3 + len(pieces),
                    },
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        try:
            for i, piece in enumerate(pieces):
                if i == self.stall_after:
                    await asyncio.sleep(3600)
                if i == self.die_after:
                    assert request.transport is not None
                    request.transport.abort()
                    await asyncio.sleep(3600)
                if chat:
                    delta: dict[str, Any] = {"content": piece} if i else {"role": "assistant", "content": piece}
                    event: dict[str, Any] = {
                        "id": "chatcmpl-fake",
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
                    }
                else:
                    event = {
                        "id": "cmpl-fake",
                        "object": "text_completion",
                        "created": created,
                        "model": model,
                        "choices": [{"index": 0, "text": piece, "finish_reason": None}],
                    }
                await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                if self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
            options = body.get("stream_options")
            if isinstance(options, dict) and options.get("include_usage"):
                usage = {
                    "id": "x",
                    "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": {
                        "prompt_tokens": 3,
                        "completion_tokens": len(pieces),
                        "total_tokens": 3 + len(pieces),
                    },
                }
                await resp.write(b"data: " + json.dumps(usage).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            self.completed_streams += 1
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnects += 1
            raise
        return resp
