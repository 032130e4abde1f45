"""Live merge on the real engine: the merged model, served without --enable-lora, generates exactly what
the base model plus the adapter generates (greedy decoding)."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from loraserve.merge import merge
from loraserve.vllm.admin import VllmAdmin
from tests.fixtures.vllm_server import VllmServer

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
PROMPTS = ["the river and the", "a golden matrix", "black white scale"]


def greedy(url: str, model: str) -> list[str]:
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
    return [
        client.completions.create(model=model, prompt=p, max_tokens=12, temperature=0).choices[0].text for p in PROMPTS
    ]


async def test_merged_model_matches_base_plus_adapter(
    vllm_server: VllmServer, tiny_model: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    async with VllmAdmin(vllm_server.base_url) as admin:
        await admin.load_adapter("merge-check", str(adapters["alpha"]))
    with_adapter = greedy(vllm_server.openai_url, "merge-check")
    base = greedy(vllm_server.openai_url, vllm_server.served_model_name)
    assert with_adapter != base

    merged_dir = tmp_path / "merged"
    merge(tiny_model, adapters["alpha"], merged_dir)
    with VllmServer(merged_dir, tmp_path / "merged.log", served_model_name="merged") as merged:
        assert greedy(merged.openai_url, "merged") == with_adapter
