"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}`. Pure: no I/O.

The official SDK maps the HTTP status to its exception class (401 AuthenticationError, 403
PermissionDeniedError, 404 NotFoundError, 400 BadRequestError, 413 APIStatusError, 429 RateLimitError,
503 InternalServerError) and shows `message`; `type` and `code` follow OpenAI's conventions.
"""

from __future__ import annotations

import json
from typing import Final

ERROR_TYPES: Final[dict[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    414: "invalid_request_error",
    431: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "server_error",
    504: "server_error",
}


class RouterError(Exception):
    """An error the router answers itself, with an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> bytes:
    payload = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> RouterError:
    return RouterError(400, message, param=param, code=code or "invalid_request")


def not_found(message: str, *, code: str = "model_not_found") -> RouterError:
    return RouterError(404, message, param="model", code=code)


def unauthorized(message: str = "Incorrect or missing API key: send 'Authorization: Bearer <key>'") -> RouterError:
    return RouterError(401, message, code="invalid_api_key", headers=(("www-authenticate", "Bearer"),))


def too_large(limit: int) -> RouterError:
    return RouterError(413, f"Request body is larger than the limit of {limit} bytes", code="request_too_large")


def too_many(limit: int) -> RouterError:
    return RouterError(
        429,
        f"Too many concurrent requests for this API key (limit {limit})",
        code="concurrency_limit_exceeded",
        headers=(("retry-after", "1"),),
    )


def unavailable(message: str, *, code: str, retry_after: int = 30) -> RouterError:
    return RouterError(503, message, code=code, headers=(("retry-after", str(retry_after)),))


def bad_gateway(message: str) -> RouterError:
    return RouterError(502, message, code="upstream_unavailable")
