"""Live merge: a peft LoRA adapter folded into its base model's weights, W' = W + scale * B @ A, shard by
shard (one safetensors file in memory at a time), so vLLM serves one fine-tune with no adapter overhead.

    loraserve-fetch merge --base DIR --adapter-uri URI [--digest sha256:...] --out DIR

Uses torch when it is installed (the model-server image: any dtype, bf16 included), numpy otherwise.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

ADAPTER_PREFIX = "base_model.model."


def adapter_deltas(adapter_dir: Path) -> tuple[dict[str, tuple[Any, Any]], float]:
    """{base weight name: (A, B)} and the scale, from a peft adapter directory."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"not a LoRA adapter: peft_type {config.get('peft_type')!r}")
    r = int(config["r"])
    alpha = float(config.get("lora_alpha", r))
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    tensors = _load(adapter_dir / "adapter_model.safetensors")
    pairs: dict[str, tuple[Any, Any]] = {}
    for key, value in tensors.items():
        if ".lora_A." not in key:
            continue
        base_key = key.removeprefix(ADAPTER_PREFIX).replace(".lora_A.weight", ".weight")
        b_key = key.replace(".lora_A.", ".lora_B.")
        if b_key not in tensors:
            raise ValueError(f"{key} has no matching lora_B")
        pairs[base_key] = (value, tensors[b_key])
    if not pairs:
        raise ValueError(f"no LoRA weights in {adapter_dir}")
    return pairs, scale


def merge(base_dir: Path, adapter_dir: Path, out_dir: Path) -> list[str]:
    """Write the merged model to out_dir; returns the names of the weights that changed."""
    pairs, scale = adapter_deltas(adapter_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged: list[str] = []
    shards = sorted(base_dir.glob("*.safetensors"))
    if not shards:
        raise ValueError(f"no safetensors weights in {base_dir}")
    for path in base_dir.iterdir():
        if path.is_file() and path.suffix != ".safetensors":
            shutil.copy2(path, out_dir / path.name)  # config, tokenizer, index: unchanged
    for shard in shards:
        tensors = _load(shard)
        for name in list(tensors):
            if name in pairs:
                a, b = pairs[name]
                shape = (int(b.shape[0]), int(a.shape[1]))
                if tuple(tensors[name].shape) != shape:
                    raise ValueError(
                        f"{name}: the adapter's update is {shape} but the base weight is "
                        f"{tuple(tensors[name].shape)}: the adapter was trained on another base model"
                    )
                tensors[name] = _add(tensors[name], a, b, scale)
                merged.append(name)
        _save(tensors, out_dir / shard.name)
    missing = sorted(set(pairs) - set(merged))
    if missing:
        raise ValueError(f"the adapter targets weights the base does not have: {missing[:3]}")
    return merged


try:  # the model-server image has torch; the local runtime and tests use numpy
    from safetensors.torch import load_file as _load_torch
    from safetensors.torch import save_file as _save_torch

    def _load(path: Path) -> dict[str, Any]:
        return dict(_load_torch(str(path)))

    def _save(tensors: dict[str, Any], path: Path) -> None:
        _save_torch({k: v.contiguous() for k, v in tensors.items()}, str(path))

    def _add(w: Any, a: Any, b: Any, scale: float) -> Any:
        return (w.float() + scale * (b.float() @ a.float())).to(w.dtype)

except ImportError:
    import numpy as np
    from safetensors.numpy import load_file as _load_numpy
    from safetensors.numpy import save_file as _save_numpy

    def _load(path: Path) -> dict[str, Any]:
        return dict(_load_numpy(str(path)))

    def _save(tensors: dict[str, Any], path: Path) -> None:
        _save_numpy({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))

    def _add(w: Any, a: Any, b: Any, scale: float) -> Any:
        return (w.astype(np.float32) + scale * (b.astype(np.float32) @ a.astype(np.float32))).astype(w.dtype)
