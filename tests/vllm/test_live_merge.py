"""Live merge on the real engine: the merged model, served without --enable-lora, generates exactly what
the base model plus the adapter generates on vLLM (greedy decoding, 24 prompts), for a plain adapter and for
the same weights with rank-stabilised scaling (use_rslora: alpha/sqrt(r) instead of alpha/r)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import openai
import pytest

from loraserve.merge import merge
from loraserve.vllm.admin import VllmAdmin
from tests.fixtures.models import WORDS
from tests.fixtures.vllm_server import VllmServer

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
_rng = np.random.default_rng(7)
PROMPTS = [" ".join(WORDS[int(i)] for i in _rng.integers(0, len(WORDS), size=4)) for _ in range(24)]


def greedy(url: str, model: str) -> list[str]:
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
    answer = client.completions.create(model=model, prompt=PROMPTS, max_tokens=12, temperature=0)
    return [choice.text for choice in sorted(answer.choices, key=lambda c: c.index)]


def _rslora_copy(adapter: Path, out: Path) -> Path:
    shutil.copytree(adapter, out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["use_rslora"] = True
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("layout", ["plain", "rslora"])
async def test_merged_model_matches_base_plus_adapter(
    vllm_server: VllmServer, tiny_model: Path, adapters: dict[str, Path], tmp_path: Path, layout: str
) -> None:
    adapter = adapters["alpha"] if layout == "plain" else _rslora_copy(adapters["alpha"], tmp_path / "rslora")
    name = f"merge-check-{layout}"
    async with VllmAdmin(vllm_server.base_url) as admin:
        await admin.load_adapter(name, str(adapter))
    with_adapter = greedy(vllm_server.openai_url, name)
    base = greedy(vllm_server.openai_url, vllm_server.served_model_name)
    assert with_adapter != base

    merged_dir = tmp_path / "merged"
    merge(tiny_model, adapter, merged_dir)
    with VllmServer(merged_dir, tmp_path / "merged.log", served_model_name="merged") as merged:
        assert greedy(merged.openai_url, "merged") == with_adapter
