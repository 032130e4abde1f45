"""Tests against a real vLLM server (marker `vllm`)."""
