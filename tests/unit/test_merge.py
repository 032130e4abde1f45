"""Live merge on the tiny model and a real peft adapter: W' = W + alpha/r * B @ A for exactly the targeted
weights, everything else byte-identical, shard by shard."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from loraserve.fetcher import main as fetch_main
from loraserve.merge import merge
from tests.fixtures.models import adapter_dirs, tiny_model_dir


def _weights(directory: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def test_merge_adds_the_scaled_low_rank_update(tmp_path: Path) -> None:
    base, adapter = tiny_model_dir(), adapter_dirs()["alpha"]
    changed = merge(base, adapter, tmp_path / "merged")
    before, after = _weights(base), _weights(tmp_path / "merged")
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    assert changed
    assert set(after) == set(before)
    for name in before:
        if name in changed:
            prefix = "base_model.model." + name.removesuffix(".weight")
            expected = before[name] + scale * (lora[prefix + ".lora_B.weight"] @ lora[prefix + ".lora_A.weight"])
            np.testing.assert_allclose(after[name], expected, rtol=1e-5, atol=1e-6)
            assert not np.array_equal(after[name], before[name])
        else:
            assert np.array_equal(after[name], before[name])
    assert (tmp_path / "merged" / "config.json").read_text() == (base / "config.json").read_text()
    assert (tmp_path / "merged" / "tokenizer.json").exists()


def test_adapter_for_another_base_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="trained on another base model"):
        merge(tiny_model_dir(), adapter_dirs()["foreign"], tmp_path / "merged")


def test_merge_command_checks_the_digest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter = adapter_dirs()["alpha"]
    args = ["merge", f"--base={tiny_model_dir()}", f"--adapter-uri=file://{adapter}", f"--out={tmp_path / 'm'}"]
    assert fetch_main([*args, "--digest=sha256:" + "0" * 64]) == 1
    assert "does not match" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    assert fetch_main(args) == 0
    assert (tmp_path / "m" / "config.json").exists()
