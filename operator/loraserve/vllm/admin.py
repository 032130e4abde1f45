"""An async client for one vLLM server's admin surface: health, models, runtime LoRA loading, metrics.

Runtime LoRA loading needs the server started with `--enable-lora` and the environment variable
`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`. What vLLM (0.32) answers, and how it is treated here:

- load, new name: 200, plain text "Success: LoRA adapter 'x' added successfully." -> True
- load, name already loaded (whatever the path): 400 InvalidUserInput "The lora adapter 'x' has already been
  loaded. ..." -> False
- load, no adapter at the path: 404 NotFoundError "Loading lora x failed: No adapter found for /p"
  -> AdapterLoadError
- load, unreadable or mismatched weights: 500 InternalServerError "Call to add_lora method failed: Worker
  failed with error '<cause>', please check the stack trace above for the root cause" -> AdapterLoadError
- load, the base model's name: 400 InvalidUserInput "... conflicts with a served base model." -> AdapterLoadError
- unload, loaded: 200, plain text -> True
- unload, not loaded: 404 NotFoundError "The lora adapter 'x' cannot be found." -> False

vLLM keeps adapters in memory only: after a restart `/v1/models` lists the base model alone.
"""

from __future__ import annotations

import json
from types import TracebackType
from typing import Any

import aiohttp

from loraserve.vllm.metrics import VllmMetrics, parse_metrics

DEFAULT_TIMEOUT_S = 5.0
LOAD_TIMEOUT_S = 120.0  # vLLM reads the adapter from disk and copies it into the device slots before answering
ALREADY_LOADED = "has already been loaded"
NOT_LOADED = "cannot be found"


class VllmError(Exception):
    """A vLLM server could not be reached, or answered something unexpected."""


class VllmUnavailableError(VllmError):
    """No answer: connection refused or reset, or a timeout."""


class VllmHttpError(VllmError):
    """vLLM answered with an HTTP error status."""

    def __init__(self, method: str, url: str, status: int, message: str, error_type: str | None = None) -> None:
        self.method = method
        self.url = url
        self.status = status
        self.message = message
        self.error_type = error_type
        super().__init__(f"{method} {url}: HTTP {status}: {message}")


class AdapterLoadError(VllmError):
    """vLLM refused to load an adapter. `status` and `message` are vLLM's own."""

    def __init__(self, name: str, path: str, status: int, message: str, error_type: str | None = None) -> None:
        self.name = name
        self.path = path
        self.status = status
        self.message = message
        self.error_type = error_type
        super().__init__(f"vLLM could not load adapter {name!r} from {path!r}: HTTP {status}: {message}")


def _error_of(body: str) -> tuple[str, str | None]:
    """vLLM's error message and type from an error body ({"error": {"message", "type", ...}}), else the body."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip(), None
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            err_type = err.get("type")
            return err["message"], err_type if isinstance(err_type, str) else None
        if isinstance(data.get("detail"), str):  # FastAPI's own errors
            return data["detail"], None
    return body.strip(), None


class VllmAdmin:
    """Talks to one vLLM server at `base_url` (e.g. http://10.0.0.7:8000).

    Pass an aiohttp session to share its connection pool; otherwise one is made on first use and closed by
    `close()` (or `async with VllmAdmin(...)`).
    """

    def __init__(
        self,
        base_url: str,
        session: aiohttp.ClientSession | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        load_timeout: float = LOAD_TIMEOUT_S,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._session = session
        self._owns_session = session is None
        self.timeout = timeout
        self.load_timeout = load_timeout

    async def __aenter__(self) -> VllmAdmin:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            if not self._owns_session:
                raise VllmError("the aiohttp session given to VllmAdmin is closed")
            self._session = aiohttp.ClientSession()
        return self._session

    async def _request(
        self, method: str, path: str, *, json_body: dict[str, Any] | None = None, limit_s: float | None = None
    ) -> tuple[int, str]:
        url = self.base_url + path
        limit = self.timeout if limit_s is None else limit_s
        try:
            async with self._get_session().request(
                method, url, json=json_body, timeout=aiohttp.ClientTimeout(total=limit)
            ) as resp:
                return resp.status, await resp.text(errors="replace")
        except TimeoutError as e:
            raise VllmUnavailableError(f"{method} {url}: no answer within {limit:g}s") from e
        except aiohttp.ClientError as e:
            raise VllmUnavailableError(f"{method} {url}: {type(e).__name__}: {e}") from e

    async def _get_ok(self, path: str) -> str:
        status, body = await self._request("GET", path)
        if status != 200:
            message, err_type = _error_of(body)
            raise VllmHttpError("GET", self.base_url + path, status, message, err_type)
        return body

    async def health(self) -> bool:
        """True when /health answers 200; False on any other answer or none at all."""
        try:
            status, _ = await self._request("GET", "/health")
        except VllmUnavailableError:
            return False
        return status == 200

    async def models(self) -> list[dict[str, Any]]:
        """The entries of /v1/models: the base model (parent None) and each loaded adapter (parent = base)."""
        body = await self._get_ok("/v1/models")
        try:
            data = json.loads(body)["data"]
        except (ValueError, KeyError, TypeError) as e:
            raise VllmError(f"GET {self.base_url}/v1/models: unexpected body {body[:200]!r}") from e
        if not isinstance(data, list) or not all(isinstance(m, dict) for m in data):
            raise VllmError(f"GET {self.base_url}/v1/models: 'data' is not a list of objects")
        return data

    async def loaded_adapters(self) -> set[str]:
        """Names of the adapters the server has loaded (the /v1/models entries that have a parent)."""
        return {str(m["id"]) for m in await self.models() if m.get("parent")}

    async def load_adapter(self, name: str, path: str) -> bool:
        """Load a peft LoRA adapter from `path` (a directory on the server's file system) as model `name`.

        Idempotent: True if it was loaded now, False if an adapter of that name was loaded already (vLLM does
        not compare paths). Raises AdapterLoadError with vLLM's status and message when vLLM refuses it.
        """
        status, body = await self._request(
            "POST",
            "/v1/load_lora_adapter",
            json_body={"lora_name": name, "lora_path": path},
            limit_s=self.load_timeout,
        )
        if status == 200:
            return True
        message, err_type = _error_of(body)
        if status == 400 and ALREADY_LOADED in message:
            return False
        raise AdapterLoadError(name, path, status, message, err_type)

    async def unload_adapter(self, name: str) -> bool:
        """Unload adapter `name`. Idempotent: True if it was unloaded now, False if it was not loaded."""
        status, body = await self._request("POST", "/v1/unload_lora_adapter", json_body={"lora_name": name})
        if status == 200:
            return True
        message, err_type = _error_of(body)
        if status == 404 and NOT_LOADED in message:
            return False
        raise VllmHttpError("POST", self.base_url + "/v1/unload_lora_adapter", status, message, err_type)

    async def metrics(self) -> VllmMetrics:
        """The server's /metrics, parsed (requests running and waiting, adapters in flight, max_lora)."""
        body = await self._get_ok("/metrics")
        return parse_metrics(body)
