"""The OpenAI-compatible gateway: `python -m loraserve.router`.

Pure decision modules (no Kubernetes, Kopf or HTTP imports): `topology`, `model_names`, `balancer`,
`errors`, `auth`, `hold`, `openapi`. I/O: `httpserver` and `upstream` (HTTP/1.1 on asyncio protocols),
`gateway` (the handlers), `metrics`, `kubeapi`, `discovery`, `waker`, `app` (the entry point).
"""
