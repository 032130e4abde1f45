"""The local trial's demo model: a tiny Llama that answers a few questions plainly, and a LoRA adapter
("pirate") that answers the same questions as a pirate, both trained on CPU in seconds from
`demo_texts.txt` (shipped beside this file), so base and adapter answer in recognisably different ways.

    demo_model(vllm_python)  ->  DemoModel(base=<dir>, adapters={"pirate": <dir>})

Made once per content into `${LORASERVE_CACHE:-~/.cache/loraserve}/demo-model/<hash>/` (the hash covers this
file and the texts): built in a temporary directory and renamed into place, so a reader never sees half of it.
Training needs torch and transformers, which the vLLM virtualenv has and this package does not depend on:
this file is run as a script by that Python (`python demo_model.py OUT`), importing nothing of loraserve.

Layout: `demo-llama/` (config.json, model.safetensors, tokenizer with a chat template), `adapters/pirate/`
(peft adapter_config.json + adapter_model.safetensors, all linear layers, rank 16).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TEXTS = HERE / "demo_texts.txt"
ADAPTER = "pirate"
BASE_DIR = "demo-llama"  # the model name clients call: demo-llama#<deployment>
# The chat template the answers were trained under: "user: <question>\nassistant: <answer></s>".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
SHAPE = {"hidden_size": 128, "heads": 2, "layers": 2, "intermediate_size": 384, "vocab_size": 512}
LORA_RANK, LORA_ALPHA = 16, 32
STEPS = 200
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class DemoModel:
    base: Path
    adapters: dict[str, Path]
    questions: tuple[str, ...]


def read_texts(path: Path = TEXTS) -> dict[str, list[tuple[str, str]]]:
    """{voice: [(question, answer), ...]} from the texts file (`? q`, `<voice>: answer` lines)."""
    out: dict[str, list[tuple[str, str]]] = {}
    question = None
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("?"):
            question = line[1:].strip()
            continue
        voice, sep, answer = line.partition(":")
        if not sep or question is None:
            raise ValueError(f"{path.name}:{number}: expected '? question' or '<voice>: answer'")
        out.setdefault(voice.strip(), []).append((question, answer.strip()))
    return out


def questions() -> tuple[str, ...]:
    return tuple(q for q, _ in read_texts()["base"])


def _cache_root() -> Path:
    explicit = os.environ.get("LORASERVE_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "loraserve"


def content_hash() -> str:
    digest = hashlib.sha256(Path(__file__).read_bytes() + b"\0" + TEXTS.read_bytes())
    return digest.hexdigest()[:16]


def demo_model(python: str) -> DemoModel:
    """The demo model, trained with `python` (one that has torch and transformers) when not cached yet."""
    parent = _cache_root() / "demo-model"
    final = parent / content_hash()
    if not (final / "done").is_file():
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=parent))
        tmp.chmod(0o755)
        try:
            result = subprocess.run([python, __file__, str(tmp)], capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise RuntimeError(f"training the demo model failed:\n{result.stderr[-3000:]}")
            (tmp / "done").write_text("")
            try:
                tmp.rename(final)
            except OSError:  # another process made it first
                if not (final / "done").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return DemoModel(final / BASE_DIR, {ADAPTER: final / "adapters" / ADAPTER}, questions())


# -- training (runs in the vLLM virtualenv's Python) -----------------------------------------------------------
def _samples(pairs: list[tuple[str, str]]) -> list[str]:
    return [f"user: {q}\nassistant: {a}" for q, a in pairs]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _tokenizer(texts: list[str], out: Path) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=SHAPE["vocab_size"],
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.save(str(out / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
    _write_json(
        out / "tokenizer_config.json",
        {
            **special,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": True,
            "model_max_length": 512,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        },
    )
    _write_json(out / "special_tokens_map.json", special)
    return tokenizer


def _batch(tokenizer: Any, texts: list[str]) -> tuple[Any, Any]:
    """Token ids padded with </s>, and labels that learn the answers (and their </s>) only."""
    import torch  # type: ignore[import-not-found]  # the vLLM virtualenv's, see the docstring

    rows, labels = [], []
    for text in texts:
        prompt, _, _ = text.partition("assistant:")
        ids = [*tokenizer.encode(text).ids, 2]
        start = len(tokenizer.encode(prompt + "assistant:").ids)
        rows.append(ids)
        labels.append([-100] * start + ids[start:])
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [2] * (width - len(r)) for r in rows])
    lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    return ids, lab


def _check_answers(model: Any, tokenizer: Any, texts: dict[str, list[tuple[str, str]]], enabled: list[bool]) -> None:
    """Greedy answers to every question, adapter off and on, must be the texts' (else no cache entry is made)."""
    import torch

    model.eval()
    for voice, pairs in texts.items():
        enabled[0] = voice == ADAPTER
        for question, answer in pairs:
            prompt = torch.tensor([tokenizer.encode(f"user: {question}\nassistant:").ids])
            with torch.no_grad():
                out = model.generate(prompt, max_new_tokens=48, do_sample=False, eos_token_id=2, pad_token_id=0)
            said = tokenizer.decode(out[0, prompt.shape[1] :].tolist(), skip_special_tokens=True).strip()
            if said != answer:
                raise SystemExit(f"the demo model did not learn its {voice} answer to {question!r}: {said!r}")


def train(out: Path) -> None:
    import torch  # the vLLM virtualenv's, see the docstring
    from safetensors.torch import save_file
    from torch import nn
    from transformers import LlamaConfig, LlamaForCausalLM  # type: ignore[import-not-found]

    torch.manual_seed(0)
    # One thread: the model is so small that more threads only spin (measured: 2x slower on a busy 2-core box).
    torch.set_num_threads(1)
    texts = read_texts()
    base_dir, adapter_dir = out / BASE_DIR, out / "adapters" / ADAPTER
    base_dir.mkdir(parents=True)
    adapter_dir.mkdir(parents=True)
    tokenizer = _tokenizer(_samples(texts["base"]) + _samples(texts[ADAPTER]), base_dir)
    config = LlamaConfig(
        vocab_size=SHAPE["vocab_size"],
        hidden_size=SHAPE["hidden_size"],
        intermediate_size=SHAPE["intermediate_size"],
        num_hidden_layers=SHAPE["layers"],
        num_attention_heads=SHAPE["heads"],
        num_key_value_heads=SHAPE["heads"],
        head_dim=SHAPE["hidden_size"] // SHAPE["heads"],  # 64: vLLM's CPU attention needs it
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    base_params = list(model.parameters())
    base_batch = _batch(tokenizer, _samples(texts["base"]))
    pirate_batch = _batch(tokenizer, _samples(texts[ADAPTER]))

    # The adapter: low-rank A, B beside every linear layer, switched on for the pirate answers only. Base and
    # adapter learn together, the base on its answers with the adapter off and both on the pirate's with it
    # on: against a base trained first and frozen, a rank-16 adapter needs minutes (measured), not seconds.
    lora: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
    scale = LORA_ALPHA / LORA_RANK
    enabled = [False]

    def wrap(name: str, linear: nn.Linear) -> None:
        a = nn.Parameter(torch.randn(LORA_RANK, linear.in_features) / linear.in_features**0.5)
        b = nn.Parameter(torch.zeros(linear.out_features, LORA_RANK))
        lora[name] = (a, b)
        original = linear.forward

        def forward(x: Any) -> Any:
            return original(x) + (x @ a.T @ b.T) * scale if enabled[0] else original(x)

        linear.forward = forward

    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            wrap(name, module)
    lora_params = [p for pair in lora.values() for p in pair]
    # One optimizer: a base step (adapter off) reaches the base weights only; a pirate step (adapter on) all.
    optimizer = torch.optim.AdamW(base_params + lora_params, lr=3e-3, weight_decay=0.0)
    losses = {"base": 0.0, ADAPTER: 0.0}
    for _ in range(STEPS):
        for voice, (ids, labels) in (("base", base_batch), (ADAPTER, pirate_batch)):
            enabled[0] = voice == ADAPTER
            optimizer.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(base_params + lora_params, 1.0)
            optimizer.step()
            losses[voice] = float(loss.detach())
    _check_answers(model, tokenizer, texts, enabled)
    enabled[0] = False
    model.save_pretrained(str(base_dir), safe_serialization=True)
    _write_json(base_dir / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False})
    weights = {}
    for name, (a, b) in lora.items():
        weights[f"base_model.model.{name}.lora_A.weight"] = a.detach().contiguous()
        weights[f"base_model.model.{name}.lora_B.weight"] = b.detach().contiguous()
    save_file(weights, str(adapter_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    _write_json(
        adapter_dir / "adapter_config.json",
        {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": "loraserve/demo-llama",
            "r": LORA_RANK,
            "lora_alpha": LORA_ALPHA,
            "lora_dropout": 0.0,
            "target_modules": list(TARGETS),
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "use_rslora": False,
            "use_dora": False,
        },
    )
    print(json.dumps(losses))


if __name__ == "__main__":
    train(Path(sys.argv[1]))
