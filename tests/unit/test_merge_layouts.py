"""Live merge, exact or refused, for every adapter layout peft saves: real peft adapters (LoraConfig with
init_lora_weights=False, every trainable part perturbed) on tiny multi-shard Llama and GPT-2 models; the merged
model, loaded with plain transformers, gives the same greedy tokens (and logits to float32 rounding) as peft's
base+adapter, and the adapter visibly changes the base's tokens. Refused layouts are refused with the field's
name, and nothing is written. The models and the reference run in the vLLM venv (torch, transformers) with a
pinned peft beside it: see tests/fixtures/peft_layouts.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from loraserve.merge import MergeRefused, merge, plan_merge
from tests.fixtures.peft_layouts import LAYOUTS, PROMPTS, generate

pytestmark = pytest.mark.slow

SUPPORTED = [n for n, spec in LAYOUTS.items() if "refused" not in spec and spec.get("dtype") != "bfloat16"]
REFUSED = [n for n, spec in LAYOUTS.items() if "refused" in spec]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("layouts")
    generate(out)
    return out


def _result(layouts: Path, name: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((layouts / name / "result.json").read_text())
    assert "error" not in result, result["error"]
    return result


@pytest.mark.parametrize("name", SUPPORTED)
def test_merged_model_generates_what_peft_generates(layouts: Path, name: str) -> None:
    result = _result(layouts, name)
    assert "refused" not in result, result["refused"]
    assert len(result["peft_tokens"]) == PROMPTS
    assert result["peft_tokens"] != result["base_tokens"], "the adapter must change the outputs, or this proves nothing"
    assert result["merged_tokens"] == result["peft_tokens"]
    assert result["max_logit_diff"] <= 1e-4 * max(1.0, result["logit_scale"])
    assert result["merged_shards"] > 1  # streamed shard by shard, several of them


def test_tied_embeddings_are_untied_when_the_adapter_changes_one_side(layouts: Path) -> None:
    for name in ("tied_lora_on_embed_tokens", "tied_lora_on_lm_head", "tied_modules_to_save"):
        assert _result(layouts, name)["merged_tied"] is False, name
    # peft ties trainable tokens to the output projection, so the merged weights stay tied
    assert _result(layouts, "tied_trainable_tokens")["merged_tied"] is True


def test_bf16_weights_round_exactly_as_torch_does(layouts: Path) -> None:
    result = _result(layouts, "bf16_base")
    assert result["peft_tokens"] != result["base_tokens"]
    assert result["bf16_tensors_compared"] > 10
    # float32 matmuls may sum in another order: at most one unit in the last place of a bf16
    assert result["bf16_max_ulps"] <= 1


@pytest.mark.parametrize("name", REFUSED)
def test_unmergeable_layout_is_refused_naming_the_field(layouts: Path, name: str, tmp_path: Path) -> None:
    field = LAYOUTS[name]["refused"]
    base, adapter = layouts / name / "base", layouts / name / "adapter"
    with pytest.raises(MergeRefused, match=field):
        plan_merge(base, adapter)
    with pytest.raises(MergeRefused, match=field):
        merge(base, adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert list(tmp_path.iterdir()) == []  # no half-written staging directory either


def _with_config(layouts: Path, tmp_path: Path, **changes: Any) -> Path:
    source = layouts / "plain" / "adapter"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes((source / "adapter_model.safetensors").read_bytes())
    config = json.loads((source / "adapter_config.json").read_text())
    config.update(changes)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return adapter


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"target_parameters": ["mlp.experts.gate_up_proj"]}, "target_parameters"),
        ({"use_qalora": True}, "use_qalora"),
        ({"megatron_config": {"tensor_model_parallel_size": 2}}, "megatron_config"),
        ({"init_lora_weights": "olora"}, "init_lora_weights"),
        ({"init_lora_weights": "loftq"}, "init_lora_weights"),
        ({"some_future_setting": {"on": True}}, "some_future_setting"),
        ({"r": 4}, "r"),  # the saved weights have rank 8
        ({"rank_pattern": {"q_proj": 2}}, "rank_pattern"),
        ({"use_dora": True}, "use_dora"),  # no magnitudes saved
        ({"bias": "sometimes"}, "bias"),
    ],
)
def test_config_fields_that_do_not_fit_are_refused(
    layouts: Path, tmp_path: Path, changes: dict[str, Any], field: str
) -> None:
    adapter = _with_config(layouts, tmp_path, **changes)
    with pytest.raises(MergeRefused, match=field):
        merge(layouts / "plain" / "base", adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_fields_peft_writes_at_their_defaults_are_accepted(layouts: Path, tmp_path: Path) -> None:
    # a future peft field left at its default (off) changes nothing: accepted; the known no-effect ones too
    adapter = _with_config(
        layouts, tmp_path, some_future_setting=None, lora_dropout=0.3, inference_mode=False, revision="abc"
    )
    assert merge(layouts / "plain" / "base", adapter, tmp_path / "merged")


def test_pickled_adapter_weights_are_refused(layouts: Path, tmp_path: Path) -> None:
    adapter = _with_config(layouts, tmp_path)
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(MergeRefused, match=r"adapter_model\.bin"):
        merge(layouts / "plain" / "base", adapter, tmp_path / "merged")


def test_base_that_does_not_match_the_pinned_digest_is_refused(layouts: Path, tmp_path: Path) -> None:
    from loraserve.digest import directory_digest

    base, adapter = layouts / "plain" / "base", layouts / "plain" / "adapter"
    with pytest.raises(MergeRefused, match="does not match the pinned revision"):
        merge(base, adapter, tmp_path / "merged", base_digest="sha256:" + "0" * 64)
    assert not (tmp_path / "merged").exists()
    assert merge(base, adapter, tmp_path / "merged", base_digest=directory_digest(base))
