"""The merge itself: inputs opened, the plan made, the output written (see the package docstring)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from loraserve.digest import directory_digest
from loraserve.merge.plan import MergeRefused, Plan, TensorPlan, make_plan
from loraserve.merge.tensors import TensorFile, TensorFileError, TensorInfo, from_float, row_chunks, write_header

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise MergeRefused(f"{path.name} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MergeRefused(f"{path.name}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise MergeRefused(f"{path.name}: expected a JSON object")
    return data


def _open(path: Path) -> TensorFile:
    try:
        return TensorFile(path)
    except (TensorFileError, KeyError, TypeError) as exc:
        raise MergeRefused(str(exc) if isinstance(exc, TensorFileError) else f"{path.name}: damaged ({exc})") from None


class _Inputs:
    def __init__(self, base_dir: Path, adapter_dir: Path) -> None:
        if not (adapter_dir / ADAPTER_WEIGHTS).exists():
            legacy = adapter_dir / "adapter_model.bin"
            if legacy.exists():
                raise MergeRefused(f"{legacy.name}: pickled adapter weights are not loaded; save with safetensors")
        self.adapter_config = _read_json(adapter_dir / "adapter_config.json")
        if not (adapter_dir / ADAPTER_WEIGHTS).exists():
            raise MergeRefused(f"{ADAPTER_WEIGHTS} is missing from the adapter")
        self.adapter = _open(adapter_dir / ADAPTER_WEIGHTS)
        self.base_config = _read_json(base_dir / "config.json")
        shard_paths = sorted(base_dir.glob("*.safetensors"))
        if not shard_paths:
            raise MergeRefused(f"no safetensors weights in the base model {base_dir}")
        self.shards = {p.name: _open(p) for p in shard_paths}
        self.base: dict[str, TensorInfo] = {}
        self.shard_of: dict[str, str] = {}
        for shard_name, tf in self.shards.items():
            for name, info in tf.tensors.items():
                if name in self.base:
                    raise MergeRefused(f"base tensor {name} is in two shards ({self.shard_of[name]}, {shard_name})")
                self.base[name] = info
                self.shard_of[name] = shard_name


def plan_merge(base_dir: Path, adapter_dir: Path) -> Plan:
    """The merge plan, or MergeRefused naming what cannot be merged exactly. Reads headers only."""
    inputs = _Inputs(base_dir, adapter_dir)
    return make_plan(inputs.adapter_config, inputs.adapter.tensors, inputs.base, inputs.shard_of, inputs.base_config)


def merge(base_dir: Path, adapter_dir: Path, out_dir: Path, base_digest: str | None = None) -> list[str]:
    """Write the merged model to out_dir (replacing it, all at once at the end); returns the names of the
    weights that changed. `base_digest`: the pinned sha256 of the base directory, refused when it differs."""
    if base_digest is not None and base_digest.startswith("sha256:"):
        actual = directory_digest(base_dir)
        if actual != base_digest:
            raise MergeRefused(f"the base model's digest {actual} does not match the pinned revision {base_digest}")
    inputs = _Inputs(base_dir, adapter_dir)
    plan = make_plan(inputs.adapter_config, inputs.adapter.tensors, inputs.base, inputs.shard_of, inputs.base_config)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _write(inputs, plan, base_dir, staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return plan.changed


def _write(inputs: _Inputs, plan: Plan, base_dir: Path, out: Path) -> None:
    out.chmod(0o755)  # mkdtemp makes it private; vLLM may run as another user
    for path in base_dir.iterdir():
        if path.is_file() and path.suffix != ".safetensors":
            shutil.copy2(path, out / path.name)  # tokenizer, generation config: unchanged
    if plan.untie:
        config = dict(inputs.base_config)
        config["tie_word_embeddings"] = False
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        index_path = out / "model.safetensors.index.json"
        if index_path.exists():
            index = json.loads(index_path.read_text())
            index.setdefault("weight_map", {}).update({n: s for n, s in plan.shard_of.items() if n not in inputs.base})
            index_path.write_text(json.dumps(index, indent=2) + "\n")
    for shard_name, tf in inputs.shards.items():
        names = sorted((n for n, s in plan.shard_of.items() if s == shard_name), key=_offset_order(tf))
        entries = [(n, plan.tensors[n].dtype, plan.tensors[n].shape) for n in names]
        with open(out / shard_name, "wb") as f:
            write_header(f, entries, tf.metadata)
            for name in names:
                _write_tensor(inputs, plan.tensors[name], f)
            f.flush()
            os.fsync(f.fileno())


def _offset_order(tf: TensorFile) -> Any:
    # base tensors keep their order (sequential reads); added ones (an untied lm_head) go last
    return lambda name: tf.tensors[name].begin if name in tf.tensors else 1 << 62


def _write_tensor(inputs: _Inputs, t: TensorPlan, f: Any) -> None:
    origin, source_name = t.source
    source_file = inputs.adapter if origin == "adapter" else inputs.shards[inputs.shard_of[source_name]]
    source = source_file.tensors[source_name]
    if not t.computed and source.dtype == t.dtype:  # unchanged, or replaced as it is: bytes copied
        source_file.copy_raw(source, f)
        return
    adapter = inputs.adapter
    if t.delta is not None:
        a_name, b_name, scale, transposed = t.delta
        a, b = adapter.full(adapter.tensors[a_name]), adapter.full(adapter.tensors[b_name])
    magnitude = adapter.full(adapter.tensors[t.dora]) if t.dora else None
    rows = adapter.full(adapter.tensors[t.rows]) if t.rows else None
    bias = adapter.full(adapter.tensors[t.bias_delta[0]]) if t.bias_delta else None

    def block_of(start: int, stop: int) -> Any:
        block = source_file.full(source) if not t.shape else source_file.rows(source, start, stop)
        if rows is not None:
            for i, index in enumerate(t.rows_at):
                if start <= index < stop:
                    block[index - start] = rows[i]
        if t.delta is not None:
            # rows [start, stop) of s*B@A (out x in), or of its transpose s*(A^T @ B^T) for embeddings / Conv1D
            update = a[:, start:stop].T @ b.T if transposed else b[start:stop] @ a
            block = block + np.asarray(scale, dtype=block.dtype) * update.astype(block.dtype)
        if bias is not None and t.bias_delta is not None:
            block = block + np.asarray(t.bias_delta[1], dtype=block.dtype) * bias[start:stop].astype(block.dtype)
        return block

    chunks = list(row_chunks(TensorInfo(t.name, t.dtype, t.shape, 0, 0)))
    column_scale = None
    if magnitude is not None and t.dora_columns:
        # DoRA on a stored-transposed weight normalises columns: one pass for the norms, one to write
        squares = np.zeros(t.shape[1], dtype=np.float64)
        for start, stop in chunks:
            squares += np.square(block_of(start, stop), dtype=np.float64).sum(axis=0)
        column_scale = (magnitude / np.sqrt(squares)).astype(np.float32)
    for start, stop in chunks:
        block = block_of(start, stop)
        if column_scale is not None:
            block = block * column_scale.astype(block.dtype)[None, :]
        elif magnitude is not None:
            norm = np.linalg.norm(block, axis=1)
            block = block * (magnitude[start:stop] / norm)[:, None].astype(block.dtype)
        f.write(from_float(block, t.dtype))
