"""A base that ties its embeddings but also stores an lm_head (loaders ignore it and use the embedding): a LoRA
on the embedding is written untied, the output layer being the embedding as loaders saw it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from loraserve.merge import merge
from loraserve.merge.tensors import TensorFile, write_header

V, H, R = 32, 8, 2


def test_tied_base_with_a_stored_lm_head_is_untied_from_the_embedding(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    embed = rng.standard_normal((V, H)).astype(np.float32)
    stale_head = rng.standard_normal((V, H)).astype(np.float32)  # what a loader of a tied model never reads
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    adapter.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": True}))
    with open(base / "model.safetensors", "wb") as f:
        write_header(f, [("model.embed_tokens.weight", "F32", (V, H)), ("lm_head.weight", "F32", (V, H))], None)
        f.write(embed.tobytes() + stale_head.tobytes())
    a = rng.standard_normal((R, V)).astype(np.float32)  # lora_embedding_A: r x vocab
    b = rng.standard_normal((H, R)).astype(np.float32)  # lora_embedding_B: hidden x r
    p = "base_model.model.model.embed_tokens."
    with open(adapter / "adapter_model.safetensors", "wb") as f:
        write_header(f, [(p + "lora_embedding_A", "F32", (R, V)), (p + "lora_embedding_B", "F32", (H, R))], None)
        f.write(a.tobytes() + b.tobytes())
    config = {"peft_type": "LORA", "r": R, "lora_alpha": 4, "target_modules": ["embed_tokens"]}
    (adapter / "adapter_config.json").write_text(json.dumps(config))

    changed = merge(base, adapter, tmp_path / "merged")

    out = TensorFile(tmp_path / "merged" / "model.safetensors")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    np.testing.assert_allclose(out.full(out.tensors["model.embed_tokens.weight"]), embed + 2.0 * (b @ a).T, rtol=1e-6)
    np.testing.assert_array_equal(out.full(out.tensors["lm_head.weight"]), embed)
    assert set(changed) == {"model.embed_tokens.weight", "lm_head.weight"}
