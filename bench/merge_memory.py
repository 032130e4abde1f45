"""Peak memory of the live merge on a Llama-3.1-8B-shaped bf16 model with large shards, against the largest
tensor and the shard size; optionally the merge as it was at an earlier commit (`--before REV`), run the same
way, for a before/after ratio measured in one run.

    .venv/bin/python bench/merge_memory.py [--layers 4] [--shard-gb 2] [--before REV] [--workdir DIR]

The full 8B shape is `--layers 32 --shard-gb 5` (16 GB of weights, twice that on disk with the output).
Each merge runs in a fresh process; its peak RSS is the kernel's ru_maxrss for that process. The earlier
merge loaded whole shards through torch, so `--before` runs it with $LORASERVE_VLLM_PYTHON (torch, bf16).
Weights are synthetic (a repeating pattern): memory does not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "operator"))

from loraserve.merge.tensors import write_header  # noqa: E402

HIDDEN, INTER, KV, VOCAB, RANK = 4096, 14336, 1024, 128256, 16


def _shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (HIDDEN,)),
            (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
            (p + "self_attn.k_proj.weight", (KV, HIDDEN)),
            (p + "self_attn.v_proj.weight", (KV, HIDDEN)),
            (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
            (p + "post_attention_layernorm.weight", (HIDDEN,)),
            (p + "mlp.gate_proj.weight", (INTER, HIDDEN)),
            (p + "mlp.up_proj.weight", (INTER, HIDDEN)),
            (p + "mlp.down_proj.weight", (HIDDEN, INTER)),
        ]
    return [*out, ("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def _write_base(base: Path, layers: int, shard_bytes: int) -> tuple[int, int]:
    """Writes the shards (bf16) and the index; returns (largest tensor, largest shard) in bytes."""
    base.mkdir(parents=True)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in _shapes(layers):
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    pattern = (np.arange(1 << 20, dtype=np.uint32) % 251 + 0x3C00).astype("<u2").tobytes()  # small bf16 values
    weight_map: dict[str, str] = {}
    largest_shard = 0
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        with open(base / name, "wb") as f:
            write_header(f, [(n, "BF16", s) for n, s in tensors], {"format": "pt"})
            for n, s in tensors:
                left = math.prod(s) * 2
                while left:
                    chunk = pattern[: min(left, len(pattern))]
                    f.write(chunk)
                    left -= len(chunk)
                weight_map[n] = name
        largest_shard = max(largest_shard, (base / name).stat().st_size)
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "num_hidden_layers": layers, "vocab_size": VOCAB, "tie_word_embeddings": False}  # fmt: skip
    (base / "config.json").write_text(json.dumps(config))
    return max(math.prod(s) * 2 for _, s in _shapes(layers)), largest_shard


def _write_adapter(adapter: Path, layers: int) -> None:
    adapter.mkdir(parents=True)
    rng = np.random.default_rng(0)
    entries, blobs = [], []
    for i in range(layers):
        for module, out_dim in (("q_proj", HIDDEN), ("v_proj", KV)):
            p = f"base_model.model.model.layers.{i}.self_attn.{module}."
            for suffix, shape in (("lora_A.weight", (RANK, HIDDEN)), ("lora_B.weight", (out_dim, RANK))):
                entries.append((p + suffix, "F32", shape))
                blobs.append((rng.standard_normal(shape) * 0.01).astype("<f4").tobytes())
    with open(adapter / "adapter_model.safetensors", "wb") as f:
        write_header(f, entries, {"format": "pt"})
        for blob in blobs:
            f.write(blob)
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]}
    (adapter / "adapter_config.json").write_text(json.dumps(config))


def _peak_rss(python: str, code: str, env: dict[str, str]) -> tuple[int, float]:
    """Runs `code` in a fresh process; returns (its peak RSS in bytes, seconds)."""
    start = time.monotonic()
    proc = subprocess.Popen([python, "-c", code], env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"the merge failed (exit {proc.returncode})")
    return usage.ru_maxrss * 1024, time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--shard-gb", type=float, default=2.0)
    parser.add_argument("--before", help="a git revision whose merge to measure too (needs torch)")
    parser.add_argument("--workdir", type=Path, help="where to write the model (default: a temporary directory)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="merge-memory-", dir=args.workdir))
    gb = 1024**3
    try:
        largest_tensor, largest_shard = _write_base(work / "base", args.layers, int(args.shard_gb * gb))
        _write_adapter(work / "adapter", args.layers)
        total = sum(p.stat().st_size for p in (work / "base").glob("*.safetensors"))
        print(f"model: {args.layers} layers, 8B-shaped, bf16: {total / gb:.2f} GB in "
              f"{len(list((work / 'base').glob('*.safetensors')))} shards; largest shard {largest_shard / gb:.2f} GB, "
              f"largest tensor {largest_tensor / gb:.2f} GB")  # fmt: skip
        env = dict(os.environ, PYTHONPATH=str(REPO / "operator"))
        call = f"from pathlib import Path; from loraserve.merge import merge; merge(Path({str(work / 'base')!r}), "
        after, secs = _peak_rss(
            sys.executable, call + f"Path({str(work / 'adapter')!r}), Path({str(work / 'out')!r}))", env
        )
        print(f"now:    peak RSS {after / gb:.2f} GB ({after / largest_tensor:.2f}x the largest tensor, "
              f"{after / largest_shard:.2f}x the largest shard), {secs:.0f} s")  # fmt: skip
        shutil.rmtree(work / "out")
        if args.before:
            old = work / "old" / "loraserve_merge_before"
            old.mkdir(parents=True)
            source = subprocess.run(["git", "show", f"{args.before}:operator/loraserve/merge/__init__.py"],
                                    cwd=REPO, check=True, capture_output=True, text=True).stdout  # fmt: skip
            (old / "__init__.py").write_text(source)
            python = os.environ.get("LORASERVE_VLLM_PYTHON", sys.executable)
            env_old = dict(os.environ, PYTHONPATH=str(work / "old"))
            call_old = call.replace("loraserve.merge", "loraserve_merge_before")
            before, secs = _peak_rss(
                python, call_old + f"Path({str(work / 'adapter')!r}), Path({str(work / 'out')!r}))", env_old
            )
            print(f"before: peak RSS {before / gb:.2f} GB ({before / largest_tensor:.2f}x the largest tensor, "
                  f"{before / largest_shard:.2f}x the largest shard), {secs:.0f} s")  # fmt: skip
            print(f"ratio:  now / before = {after / before:.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
