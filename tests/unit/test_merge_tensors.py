"""The merge's own safetensors reading and writing: bf16 rounded as torch rounds it (nearest, ties to even),
damaged files refused by name, and a merge that holds a few blocks of rows, not a tensor or a shard."""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from loraserve.merge import MergeRefused, merge, tensors
from loraserve.merge.tensors import TensorFile, from_float, to_float, write_header


def _bf16_bits(values: list[float]) -> list[int]:
    raw = from_float(np.array(values, dtype=np.float32), "BF16")
    return list(struct.unpack(f"<{len(values)}H", raw))


def test_bf16_rounds_to_nearest_with_ties_to_even() -> None:
    one = 0x3F80  # 1.0
    ulp = 2.0**-7  # one bf16 unit at 1.0
    assert _bf16_bits([1.0, 1.0 + ulp]) == [one, one + 1]
    assert _bf16_bits([1.0 + ulp / 2]) == [one]  # a tie: down to the even 1.0
    assert _bf16_bits([1.0 + 3 * ulp / 2]) == [one + 2]  # a tie: up to the even one
    assert _bf16_bits([1.0 + ulp / 2 + 2.0**-20]) == [one + 1]  # just above the tie
    assert _bf16_bits([-2.0, 0.0]) == [0xC000, 0x0000]
    assert np.isnan(to_float(from_float(np.array([np.nan], dtype=np.float32), "BF16"), "BF16")[0])


def test_bf16_round_trip_is_exact_for_bf16_values() -> None:
    bits = np.arange(0, 0x7F80, 7, dtype="<u2")  # finite positive bf16 values
    assert from_float(to_float(bits.tobytes(), "BF16"), "BF16") == bits.tobytes()


def test_header_and_rows_round_trip(tmp_path: Path) -> None:
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    path = tmp_path / "m.safetensors"
    with open(path, "wb") as f:
        write_header(f, [("w", "F16", (4, 3))], {"format": "pt"})
        f.write(from_float(w, "F16"))
    tf = TensorFile(path)
    assert tf.metadata == {"format": "pt"}
    np.testing.assert_array_equal(tf.rows(tf.tensors["w"], 1, 3), w[1:3])
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"tensor w .* damaged or truncated"):
        TensorFile(path)


def _model(tmp_path: Path, rows: int, cols: int) -> tuple[Path, Path]:
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    adapter.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": False}))
    rng = np.random.default_rng(0)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    with open(base / "model.safetensors", "wb") as f:
        write_header(f, [("model.layers.0.mlp.up_proj.weight", "F32", (rows, cols))], None)
        f.write(w.tobytes())
    a = rng.standard_normal((4, cols)).astype(np.float32)
    b = rng.standard_normal((rows, 4)).astype(np.float32)
    prefix = "base_model.model.model.layers.0.mlp.up_proj."
    with open(adapter / "adapter_model.safetensors", "wb") as f:
        write_header(
            f, [(prefix + "lora_A.weight", "F32", (4, cols)), (prefix + "lora_B.weight", "F32", (rows, 4))], None
        )
        f.write(a.tobytes())
        f.write(b.tobytes())
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["up_proj"]}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    np.save(tmp_path / "expected.npy", w + 2.0 * (b @ a))
    return base, adapter


def test_merge_holds_blocks_of_rows_not_the_tensor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows, cols = 4096, 512  # an 8 MiB tensor, merged 256 KiB of rows at a time
    base, adapter = _model(tmp_path, rows, cols)
    monkeypatch.setattr(tensors, "CHUNK_BYTES", 256 * 1024)
    tracemalloc.start()
    try:
        merge(base, adapter, tmp_path / "merged")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < rows * cols * 4 / 4, f"peak {peak} bytes for a {rows * cols * 4}-byte tensor"
    merged = TensorFile(tmp_path / "merged" / "model.safetensors")
    info = merged.tensors["model.layers.0.mlp.up_proj.weight"]
    np.testing.assert_allclose(merged.full(info), np.load(tmp_path / "expected.npy"), rtol=1e-5, atol=1e-5)


def test_a_damaged_base_shard_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    base, adapter = _model(tmp_path, 64, 32)
    shard = base / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(MergeRefused, match=r"model\.safetensors: tensor .* truncated"):
        merge(base, adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
