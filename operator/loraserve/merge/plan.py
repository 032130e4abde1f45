"""What a merge will do, decided from headers alone (the adapter's config and the names, dtypes and shapes of
every tensor), before one byte is written: every field of peft's LoraConfig and every tensor of the adapter
is either understood exactly or the merge is refused, naming it.

For a base weight W (out x in), an adapter changes the model that peft runs (base + adapter, unmerged) as:

  - LoRA:      W' = W + s * B @ A, with s = alpha / r, or alpha / sqrt(r) with `use_rslora`; r and alpha per
               module from `rank_pattern` / `alpha_pattern` (peft's own matching); transposed for
               `fan_in_fan_out` (Conv1D weights stored in x out);
  - embedding: W' = W + s * (B @ A)^T (lora_embedding_A is r x vocab, lora_embedding_B is hidden x r);
  - DoRA:      W' = m / ||W + s*B@A||_row * (W + s*B@A), the norm per output feature (rows; columns for an
               embedding or a Conv1D, whose weights are stored transposed); the bias is not scaled;
  - lora_bias: b' = b + s * lora_B.bias;
  - bias="all"/"lora_only", modules_to_save, a saved `base_layer` weight: the tensor is replaced;
  - trainable_token_indices: those rows of the embedding are replaced.

Tied embeddings (`tie_word_embeddings`, or no lm_head in the checkpoint): peft changes the input embedding and the
output projection apart (a LoRA or a modules_to_save copy on one is not seen by the other), so when an adapter
changes either one the merged model is written untied: an explicit lm_head and `tie_word_embeddings: false`.
Trainable tokens are the exception: peft ties them to the output projection too, so the weight stays tied.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from loraserve.merge.errors import MergeRefused
from loraserve.merge.tensors import FLOAT_DTYPES, TensorInfo

__all__ = ["MergeRefused", "Plan", "TensorPlan", "make_plan"]

PREFIX = "base_model.model."


# --- config fields ----------------------------------------------------------------------------------------

# Fields that never change what the saved adapter computes at inference: bookkeeping, training-time settings,
# and the module selection (which is already written down by the names of the saved tensors).
NO_EFFECT = frozenset(
    {
        "task_type",
        "peft_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "lora_dropout",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "megatron_core",
        "runtime_config",
        "eva_config",  # EVA only chooses the initial A from data; the base is untouched
        "qalora_group_size",  # only read with use_qalora (refused)
        "loftq_config",  # only read with init_lora_weights="loftq" (refused)
        "corda_config",  # only read with init_lora_weights="corda" (refused)
        "lora_ga_config",  # only read with init_lora_weights="lora_ga" (refused)
    }
)
# Fields whose effect the merge reproduces exactly.
HANDLED = frozenset(
    {
        "r",
        "lora_alpha",
        "use_rslora",
        "rank_pattern",
        "alpha_pattern",
        "fan_in_fan_out",
        "bias",
        "modules_to_save",
        "trainable_token_indices",
        "use_dora",
        "lora_bias",
        "init_lora_weights",
        "ensure_weight_tying",
    }
)
# Fields that make an adapter unmergeable, or that we do not reproduce, whenever they are set.
REFUSED = {
    "megatron_config": "Megatron-parallel LoRA layers",
    "target_parameters": "LoRA on bare parameters (MoE experts)",
    "layer_replication": "layer replication changes the base's architecture",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens, which no merge can do",
    "use_qalora": "QA-LoRA for quantized bases",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing between adapters",
    "kasa_config": "KaSA (singular-value adaptation of the base)",
    "monteclora_config": "MonteCLoRA",
    "velora_config": "VeLoRA",
}
# Initialisations that rewrite the base weights: the adapter only fits that rewritten base, not the one we have.
BASE_REWRITING_INIT = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _is_set(value: Any) -> bool:
    return value not in (None, False, 0, "", [], {})


def check_config(config: dict[str, Any]) -> None:
    """Refuse adapters whose config asks for something the merge does not reproduce exactly."""
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise MergeRefused(f"adapter_config.json: peft_type {peft_type!r}: only LORA adapters can be merged")
    for name, value in sorted(config.items()):
        if name in NO_EFFECT or name in HANDLED:
            continue
        if name in REFUSED:
            if _is_set(value):
                raise MergeRefused(f"adapter_config.json: {name}={value!r}: {REFUSED[name]} cannot be merged")
            continue
        if _is_set(value):  # a field from a newer peft: its meaning is unknown here, so it is not guessed
            raise MergeRefused(f"adapter_config.json: {name}={value!r}: unknown LoRA setting, not merged")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INIT):
        raise MergeRefused(
            f"adapter_config.json: init_lora_weights={init!r}: this initialisation rewrites the base weights, so "
            "the adapter only fits that rewritten base; save it converted (peft's "
            "path_initial_model_for_weight_conversion) to merge it"
        )
    bias = config.get("bias", "none")
    if bias not in ("none", "all", "lora_only"):
        raise MergeRefused(f"adapter_config.json: bias={bias!r}: expected none, all or lora_only")
    if int(config.get("r", 8)) < 1:
        raise MergeRefused(f"adapter_config.json: r={config.get('r')!r}: must be at least 1")


def pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """peft's get_pattern_key: the first pattern that matches the module name as a (regex) suffix."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def module_scale(config: dict[str, Any], module: str, rank_in_file: int) -> float:
    """s for one module (its name as peft saw it, e.g. `model.layers.0.self_attn.q_proj`)."""
    ranks: dict[str, Any] = config.get("rank_pattern") or {}
    alphas: dict[str, Any] = config.get("alpha_pattern") or {}
    r_key, a_key = pattern_key(ranks, module), pattern_key(alphas, module)
    r = int(ranks[r_key]) if r_key is not None else int(config.get("r", 8))
    alpha = float(alphas[a_key]) if a_key is not None else float(config.get("lora_alpha", 8))
    if r != rank_in_file:
        field_name = f"rank_pattern[{r_key!r}]" if r_key is not None else "r"
        raise MergeRefused(
            f"adapter_config.json: {field_name}={r} but {module}'s saved LoRA weights have rank {rank_in_file}"
        )
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


# --- the plan ---------------------------------------------------------------------------------------------


@dataclass
class TensorPlan:
    """How one output tensor is made. Steps apply in this order: source, rows, delta, dora."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: tuple[str, str]  # ("base" | "adapter", tensor name)
    rows: str | None = None  # adapter tensor whose rows replace `rows_at` (trainable tokens)
    rows_at: tuple[int, ...] = ()
    delta: tuple[str, str, float, bool] | None = None  # (A, B, s, transposed): + s*B@A, or its transpose
    bias_delta: tuple[str, float] | None = None  # (lora_B.bias, s)
    dora: str | None = None  # magnitude vector
    dora_columns: bool = False  # the weight is stored transposed: DoRA's norms are per column

    @property
    def changed(self) -> bool:
        return self.source != ("base", self.name) or self.computed

    @property
    def computed(self) -> bool:
        return any((self.rows, self.delta, self.bias_delta, self.dora))


@dataclass
class Plan:
    tensors: dict[str, TensorPlan] = field(default_factory=dict)  # every output tensor by name
    shard_of: dict[str, str] = field(default_factory=dict)  # output tensor -> shard file name
    untie: bool = False  # write tie_word_embeddings: false

    @property
    def changed(self) -> list[str]:
        return sorted(n for n, t in self.tensors.items() if t.changed)


LORA_SUFFIXES = (
    ".lora_A.weight",
    ".lora_B.weight",
    ".lora_B.bias",
    ".lora_embedding_A",
    ".lora_embedding_B",
    ".lora_magnitude_vector",
    ".lora_magnitude_vector.weight",
    ".token_adapter.trainable_tokens_delta",
)


def _split(key: str) -> tuple[str, str]:
    """(module path, what) for an adapter tensor name without PREFIX."""
    for suffix in LORA_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    return key, ""


def _embedding_name(base: dict[str, TensorInfo]) -> str | None:
    found = [n for n in base if re.search(r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in)\.weight$", n)]
    return found[0] if len(found) == 1 else None


def _token_indices(config: dict[str, Any], module: str) -> tuple[int, ...]:
    spec = config.get("trainable_token_indices")
    if isinstance(spec, list):
        return tuple(int(i) for i in spec)
    if isinstance(spec, dict):
        for key, indices in spec.items():
            if re.match(rf"(.*\.)?({key})$", module):
                return tuple(int(i) for i in indices)
    raise MergeRefused(
        f"trainable tokens saved for {module} but adapter_config.json's trainable_token_indices does not name it"
    )


def make_plan(
    config: dict[str, Any],
    adapter: dict[str, TensorInfo],
    base: dict[str, TensorInfo],
    base_shard: dict[str, str],
    base_config: dict[str, Any],
) -> Plan:
    """The merge of `adapter` (tensor headers of adapter_model.safetensors) into `base` (tensor headers of all
    shards, `base_shard` saying which file holds each); raises MergeRefused naming what cannot be merged."""
    check_config(config)
    lm_head = "lm_head.weight"
    tied_flag = base_config.get("tie_word_embeddings")
    tied = bool(tied_flag) if tied_flag is not None else lm_head not in base
    embedding = _embedding_name(base)
    plan = Plan(shard_of=dict(base_shard))
    for name, info in base.items():
        plan.tensors[name] = TensorPlan(name, info.dtype, info.shape, ("base", name))
    # With tied embeddings peft's lm_head is the embedding's parameter; these are its changes, kept apart.
    head = None
    if tied:  # loaders tie even when the checkpoint also holds an lm_head: the embedding is what they use
        emb = base.get(embedding or "")
        head = TensorPlan(lm_head, emb.dtype if emb else "", emb.shape if emb else (), ("base", embedding or ""))
    touched_tied: list[str] = []

    def target(module_key: str, what: str, unties: bool = True) -> TensorPlan:
        name = module_key + what
        if head is not None and name == lm_head:
            touched_tied.append(f"{PREFIX}{lm_head}")
            return head
        if name not in plan.tensors:
            if what == ".bias" and module_key + ".weight" in plan.tensors:
                raise MergeRefused(
                    f"adapter_config.json: lora_bias=True, but the base's {module_key} has no bias to fold it into"
                )
            raise MergeRefused(
                f"the adapter changes {name}, which the base model does not have: it was made for another base model"
            )
        if head is not None and name == embedding and unties:
            touched_tied.append(f"{PREFIX}{name}")
        return plan.tensors[name]

    groups: dict[str, dict[str, str]] = {}
    for key in adapter:
        if not key.startswith(PREFIX):
            raise MergeRefused(f"adapter tensor {key}: expected names under {PREFIX!r} (a peft LoRA for a causal LM)")
        module, what = _split(key.removeprefix(PREFIX))
        if what:
            groups.setdefault(module, {})[what] = key
            continue
        # Any other saved tensor replaces the base's: modules_to_save copies, bias="all"/"lora_only", and the
        # base layer of a LoRA'd embedding (peft saves it in case the vocabulary was resized).
        in_place = f".{module}".count(".base_layer.") == 1
        replaced = target(module.replace(".base_layer.", ".").removeprefix("base_layer."), "")
        info = adapter[key]
        _check_shape(key, info.shape, replaced)
        _check_float(key, info.dtype)
        if replaced.source[0] == "adapter":
            raise MergeRefused(f"adapter tensor {key}: {replaced.name} is saved twice")
        replaced.source = ("adapter", key)
        if in_place and replaced is plan.tensors.get(embedding or "") and head is not None:
            # peft loads it into the parameter the output projection shares
            head.source = ("adapter", key)
    for module, parts in sorted(groups.items()):
        _plan_module(config, module, parts, adapter, target)
    if head is not None and touched_tied:
        if embedding is None:
            raise MergeRefused(f"{touched_tied[0]}: the base ties its embeddings and its input embedding was not found")
        if config.get("ensure_weight_tying"):
            raise MergeRefused(
                "adapter_config.json: ensure_weight_tying=True on a base with tied embeddings, with the adapter "
                f"changing them ({touched_tied[0]}): not merged"
            )
        plan.tensors[lm_head] = head
        plan.shard_of[lm_head] = base_shard.get(lm_head, base_shard[embedding])
        plan.untie = True
    return plan


def _check_shape(key: str, shape: tuple[int, ...], into: TensorPlan) -> None:
    if into.shape and tuple(shape) != tuple(into.shape):
        raise MergeRefused(
            f"adapter tensor {key} is {list(shape)} but the base's {into.name} is {list(into.shape)}: the adapter "
            "was trained on another base model (or a resized vocabulary)"
        )


def _check_float(key: str, dtype: str) -> None:
    if dtype not in FLOAT_DTYPES:
        raise MergeRefused(f"tensor {key}: dtype {dtype} (only F64, F32, F16, BF16 are merged)")


def _plan_module(
    config: dict[str, Any],
    module: str,
    parts: dict[str, str],
    adapter: dict[str, TensorInfo],
    target: Any,
) -> None:
    for key in parts.values():
        _check_float(key, adapter[key].dtype)
    if ".token_adapter.trainable_tokens_delta" in parts:
        key = parts.pop(".token_adapter.trainable_tokens_delta")
        into: TensorPlan = target(module, ".weight", unties=False)  # peft ties trainable tokens to the head
        indices = _token_indices(config, module)
        shape = adapter[key].shape
        if len(into.shape) != 2 or shape != (len(indices), into.shape[1]):
            raise MergeRefused(f"adapter tensor {key} is {list(shape)}, not one row per trainable token")
        if any(not 0 <= i < into.shape[0] for i in indices):
            raise MergeRefused(
                f"adapter_config.json: trainable_token_indices {list(indices)} are outside the "
                f"vocabulary of {into.shape[0]}"
            )
        into.rows, into.rows_at = key, indices
    if not parts:
        return
    linear = ".lora_A.weight" in parts or ".lora_B.weight" in parts
    embed = ".lora_embedding_A" in parts or ".lora_embedding_B" in parts
    a_key = parts.get(".lora_A.weight") or parts.get(".lora_embedding_A")
    b_key = parts.get(".lora_B.weight") or parts.get(".lora_embedding_B")
    if linear == embed or a_key is None or b_key is None:
        raise MergeRefused(f"adapter: {PREFIX}{module} has an incomplete LoRA pair: {sorted(parts.values())}")
    into = target(module, ".weight")
    _check_float(into.name, into.dtype or "F32")
    if into.rows is not None:
        raise MergeRefused(f"{PREFIX}{module}: both trainable tokens and LoRA on one weight are not merged")
    a, b = adapter[a_key].shape, adapter[b_key].shape
    if len(a) != 2 or len(b) != 2 or len(into.shape or (0, 0)) != 2:
        raise MergeRefused(f"{PREFIX}{module}: LoRA on a {len(into.shape)}-d weight (a convolution?) is not merged")
    rank = a[0]
    s = module_scale(config, module, rank)
    fan_in_fan_out = bool(config.get("fan_in_fan_out")) and linear
    transposed = embed or fan_in_fan_out
    # B @ A is (out, in); an embedding's update and a Conv1D's weight are stored the other way round.
    update = (a[1], b[0]) if transposed else (b[0], a[1])
    if b[1] != rank or (into.shape and update != tuple(into.shape)):
        raise MergeRefused(
            f"{PREFIX}{module}: the adapter's update is {list(update)} but the base weight {into.name} is "
            f"{list(into.shape)}: the adapter was trained on another base model"
        )
    into.delta = (a_key, b_key, s, transposed)
    magnitude = parts.get(".lora_magnitude_vector") or parts.get(".lora_magnitude_vector.weight")
    if magnitude is not None:
        # one magnitude per output feature: rows of W, or columns when W is stored transposed
        if adapter[magnitude].shape != (into.shape[1] if transposed else into.shape[0],):
            raise MergeRefused(f"adapter tensor {magnitude} is {list(adapter[magnitude].shape)}, not one per output")
        into.dora, into.dora_columns = magnitude, transposed
    elif config.get("use_dora"):
        raise MergeRefused(f"adapter_config.json: use_dora=True but {PREFIX}{module} has no lora_magnitude_vector")
    bias_key = parts.get(".lora_B.bias")
    if bias_key is not None:
        bias = target(module, ".bias")  # no bias in the base: refused there, the model has nowhere to put it
        if adapter[bias_key].shape != (update[0],):
            raise MergeRefused(f"adapter tensor {bias_key} is {list(adapter[bias_key].shape)}, not one per row")
        bias.bias_delta = (bias_key, s)
