"""The router's published OpenAPI 3 description (served at GET /openapi.json). Pure: no I/O.

docs/router-openapi.json is this document, committed; regenerate it with
`python -m loraserve.router.openapi --write docs/router-openapi.json` (a test fails when it is stale).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from loraserve.autoscale.signals import RouterLoad
from loraserve.router.errors import ERROR_TYPES

MODEL_DESCRIPTION = (
    'What to run, as "<model>#<deployment>": <model> is the deployment\'s base model name, a LoraAddon '
    "on it, or one exact adapter version (<addon>-<version>, bypassing the A/B split); either side may be "
    "fully qualified (accounts/<namespace>/models/<model>#accounts/<namespace>/deployments/<deployment>). "
    "A live-merge deployment is also reachable by its own name alone, and a serverless LoraAddon (one without "
    "a deployment) by its own name alone or as accounts/<namespace>/models/<addon>. The router rewrites it to "
    "the name the replica serves before forwarding, and adds the version's pinned system prompt to chat "
    "messages (see the LoraAddon's systemPromptPolicy)."
)


def _error_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _errors(*codes: int) -> dict[str, Any]:
    texts = {
        400: "Malformed body (not JSON, nested deeper than --max-json-depth, or NaN/Infinity/overflowing "
        "numbers), missing or malformed model, or an ambiguous deployment name.",
        408: "The request head or body did not arrive in time (--header-timeout, --body-timeout).",
        401: "No API key, or an unknown one.",
        404: "Unknown model or deployment, or one the API key may not use (answered alike, so a key cannot "
        "probe what exists outside its scope), or no such route.",
        413: "The body is larger than the router's limit (--max-body-bytes).",
        414: "The request target is longer than --max-request-target-bytes.",
        431: "The request headers exceed --max-header-bytes or --max-headers.",
        429: "The API key has as many requests in flight as it may.",
        502: "No replica could be reached (each one that received nothing was tried), or one broke the "
        "response off before it started.",
        503: "No replica became ready within the deployment's scale-from-zero timeout, or the router is at its "
        "connection cap or memory budget for request bodies (Retry-After is set).",
        504: "The replica sent no response head within --head-timeout.",
    }
    out: dict[str, Any] = {str(c): _error_response(texts[c]) for c in codes}
    if 503 in codes:
        out["503"]["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds."}}
    if 429 in codes:
        out["429"]["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds."}}
    return out


_DEPRECATION_HEADERS = {
    "Deprecation": {
        "description": 'Sent as "true" when the request used the legacy deployedModel key.',
        "schema": {"type": "string"},
    },
    "Warning": {
        "description": 'With deployedModel: 299 - "deployedModel is deprecated; use model=\\"<m>#<d>\\"".',
        "schema": {"type": "string"},
    },
}


def _generation(kind: str, schema: str, example: dict[str, Any]) -> dict[str, Any]:
    return {
        "post": {
            "operationId": f"create{kind}",
            "summary": f"Create a {kind.lower().replace('chat', 'chat ')} (OpenAI-compatible), routed by model",
            "description": "Forwarded to a ready replica of the deployment, with the adapter already loaded "
            "when an addon is named (least in-flight first). A deployment at zero replicas is woken and the "
            "request is held until a replica is ready, up to the deployment's scale-from-zero timeout "
            "(annotation serving.loraserve.dev/scale-from-zero-timeout, default 10m). With stream: true the "
            "replica's server-sent events are passed through as they arrive; a client that disconnects "
            "cancels the request on the replica. Fields other than model and deployedModel are passed to "
            "vLLM unchanged.",
            "security": [{"bearer": []}, {}],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}, "example": example}
                },
            },
            "responses": {
                "200": {
                    "description": "The replica's answer: a JSON object, or text/event-stream with stream: true.",
                    "headers": _DEPRECATION_HEADERS,
                    "content": {
                        "application/json": {"schema": {"type": "object", "additionalProperties": True}},
                        "text/event-stream": {"schema": {"type": "string"}},
                    },
                },
                **_errors(400, 401, 404, 408, 413, 414, 429, 431, 502, 503, 504),
            },
        }
    }


def _request_schema(required: list[str], extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": required,
        "additionalProperties": True,
        "properties": {
            "model": {
                "type": "string",
                "minLength": 1,
                "description": MODEL_DESCRIPTION,
                "example": "support-bot#llama-multi",
            },
            **extra,
            "stream": {
                "type": "boolean",
                "default": False,
                "description": "Server-sent events, passed through. A stream the replica stops feeding for "
                "--stream-idle-timeout, or that breaks off, ends with an error event "
                '(data: {"error": {...}}), which the OpenAI SDKs raise.',
            },
            "user": {
                "type": "string",
                "description": "End-user id. When the model is an addon with several versions, the same user "
                "is always sent to the same version (a stable hash) while the weights stay.",
            },
            "deployedModel": {
                "type": "string",
                "minLength": 1,
                "deprecated": True,
                "description": "Legacy: the deployment (<deployment> or accounts/<ns>/deployments/<d>), with "
                "model naming the model. Routes, and the response carries Deprecation and Warning headers; "
                'use model="<m>#<d>".',
            },
        },
    }


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of what the router accepts."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "loraserve router",
            "version": "v1",
            "description": "OpenAI-compatible gateway in front of loraserve Deployments (vLLM, multi-LoRA, live "
            'merge). Point the OpenAI SDK at it with model="<model>#<deployment>". Errors are OpenAI-style: '
            '{"error": {"message", "type", "param", "code"}}.',
        },
        "paths": {
            "/v1/chat/completions": _generation(
                "ChatCompletion",
                "ChatCompletionRequest",
                {"model": "support-bot#llama-multi", "messages": [{"role": "user", "content": "Hello"}]},
            ),
            "/v1/completions": _generation(
                "Completion",
                "CompletionRequest",
                {"model": "Llama-3.1-8B-Instruct#llama-multi", "prompt": "Hello", "max_tokens": 16},
            ),
            "/v1/models": {
                "get": {
                    "operationId": "listModels",
                    "summary": "Deployments and their addons the API key may use, ids in <model>#<deployment> form",
                    "security": [{"bearer": []}, {}],
                    "responses": {
                        "200": {
                            "description": "OpenAI list shape.",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ModelList"}}},
                        },
                        **_errors(401),
                    },
                }
            },
            "/health": {
                "get": {
                    "operationId": "health",
                    "summary": "Liveness: the router process answers",
                    "responses": {
                        "200": {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics (loraserve_router_*): the autoscaler's inputs",
                    "responses": {
                        "200": {
                            "description": "Prometheus text format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/load": {
                "get": {
                    "operationId": "load",
                    "summary": "The operator's feed: the load and rollback numbers of /metrics, as compact JSON",
                    "responses": {
                        "200": {
                            "description": "Per addon and per adapter version, format 1",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RouterLoad"}}},
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3.1",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key from the router's keys file (compared by SHA-256). When the router "
                    "runs without a keys file, no key is needed.",
                }
            },
            "schemas": {
                **_load_schemas(),
                "ChatCompletionRequest": _request_schema(
                    ["model", "messages"],
                    {
                        "messages": {
                            "type": "array",
                            "items": {"type": "object", "additionalProperties": True},
                            "minItems": 1,
                        }
                    },
                ),
                "CompletionRequest": _request_schema(
                    ["model", "prompt"],
                    {
                        "prompt": {
                            "description": "A string, a list of strings, token ids, or lists of token ids.",
                            "anyOf": [
                                {"type": "string"},
                                {"type": "array", "items": {"type": "string"}},
                                {"type": "array", "items": {"type": "integer"}},
                                {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
                            ],
                        }
                    },
                ),
                "Model": {
                    "type": "object",
                    "required": ["id", "object", "created", "owned_by"],
                    "properties": {
                        "id": {"type": "string", "description": "<model>#<deployment> (qualified when names collide)"},
                        "object": {"const": "model"},
                        "created": {"type": "integer"},
                        "owned_by": {"type": "string", "description": "The namespace."},
                        "root": {"type": "string", "description": "The base model's served name."},
                        "parent": {"type": ["string", "null"], "description": "For an addon: the base model id."},
                        "deployment": {"type": "string", "description": "accounts/<ns>/deployments/<d>"},
                        "ready_replicas": {"type": "integer"},
                        "versions": {
                            "type": ["array", "null"],
                            "items": {
                                "type": "object",
                                "properties": {
                                    "name": {"type": "string"},
                                    "version": {"type": "string"},
                                    "weight": {"type": "integer"},
                                },
                            },
                        },
                    },
                },
                "ModelList": {
                    "type": "object",
                    "required": ["object", "data"],
                    "properties": {
                        "object": {"const": "list"},
                        "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}},
                    },
                },
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["message", "type", "param", "code"],
                            "properties": {
                                "message": {"type": "string"},
                                "type": {"type": "string", "enum": sorted(set(ERROR_TYPES.values()))},
                                "param": {"type": ["string", "null"]},
                                "code": {"type": ["string", "null"]},
                            },
                        }
                    },
                },
            },
        },
    }


def _load_schemas() -> dict[str, Any]:
    """RouterLoad and what it refers to, from the model the operator reads /load with."""
    schema = RouterLoad.model_json_schema(ref_template="#/components/schemas/{model}")
    return {**schema.pop("$defs"), "RouterLoad": schema}


def render() -> str:
    return json.dumps(document(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraserve.router.openapi", description=__doc__)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", type=Path, help="write the document to this file")
    group.add_argument("--check", type=Path, help="fail if this file differs from the document")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(text)
        return 0
    if args.check:
        current = args.check.read_text() if args.check.exists() else ""
        if current != text:
            print(
                f"{args.check} is stale: run python -m loraserve.router.openapi --write {args.check}", file=sys.stderr
            )
            return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
