"""Talking to vLLM servers: `loraserve.vllm.admin` (async HTTP client for health, models and runtime LoRA
loading) and `loraserve.vllm.metrics` (pure parser of vLLM's Prometheus metrics).

Nothing is imported here, so that importing the pure `metrics` module does not pull in aiohttp.
"""
