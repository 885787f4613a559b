"""Qwen3Config: preset sizes on the meta device, HF config.json in both forms, validation messages."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from qwen3_pretrain.model import PRESETS, ConfigError, Qwen3Config, Qwen3ForCausalLM, get_preset

transformers.logging.set_verbosity_error()
logging.getLogger("transformers").setLevel(logging.ERROR)

# The fields of Qwen3-1.7B-Base's config.json as published (old form: top-level rope_theta, torch_dtype).
OLD_STYLE_1_7B: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151643, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 32768,
    "max_window_layers": 28, "model_type": "qwen3", "num_attention_heads": 16, "num_hidden_layers": 28,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}


def new_style(old: dict[str, Any]) -> dict[str, Any]:
    """The same config as transformers 5 writes it (rope_parameters, dtype)."""
    data = {k: v for k, v in old.items() if k not in ("rope_theta", "torch_dtype", "rope_scaling")}
    rope = {"rope_type": "default", "rope_theta": old["rope_theta"]}
    return data | {"rope_parameters": rope, "dtype": old["torch_dtype"]}


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_count_on_meta_matches_closed_form(name: str) -> None:
    config = get_preset(name)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == config.num_parameters()


def test_qwen3_1_7b_is_exact() -> None:
    with torch.device("meta"):
        model = Qwen3ForCausalLM(get_preset("qwen3-1.7b"))
    assert sum(p.numel() for p in model.parameters()) == 1_720_574_976


@pytest.mark.parametrize("form", ["old", "new"])
def test_reads_old_and_new_config_json(form: str, tmp_path: Path) -> None:
    data = OLD_STYLE_1_7B if form == "old" else new_style(OLD_STYLE_1_7B)
    (tmp_path / "config.json").write_text(json.dumps(data))
    config = Qwen3Config.from_pretrained(tmp_path)
    assert config == dataclasses.replace(get_preset("qwen3-1.7b"), max_position_embeddings=32768)
    assert isinstance(config.rope_theta, float) and config.rope_theta == 1e6


def test_reads_config_written_by_transformers(tmp_path: Path) -> None:
    ref = transformers.Qwen3Config(**new_style(OLD_STYLE_1_7B) | {"tie_word_embeddings": False, "head_dim": 64})
    ref.save_pretrained(tmp_path)
    config = Qwen3Config.from_pretrained(tmp_path)
    assert config.tie_word_embeddings is False and config.head_dim == 64 and config.rope_theta == 1e6
    assert (config.hidden_size, config.num_key_value_heads, config.torch_dtype) == (2048, 8, "bfloat16")


@pytest.mark.parametrize("name", ["qwen3-0.6b", "qwen3-8b", "qwen3-tiny"])
def test_written_config_loads_in_transformers(name: str, tmp_path: Path) -> None:
    ours = get_preset(name)
    ours.save_pretrained(tmp_path)
    ref = transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(ref, transformers.Qwen3Config)
    for field in dataclasses.fields(Qwen3Config):
        if field.name not in ("rope_theta", "torch_dtype"):
            assert getattr(ref, field.name) == getattr(ours, field.name), field.name
    assert ref.rope_parameters["rope_theta"] == ours.rope_theta
    assert str(ref.dtype).removeprefix("torch.") == ours.torch_dtype
    assert Qwen3Config.from_pretrained(tmp_path) == ours


def test_hf_defaults_for_absent_fields() -> None:
    config = Qwen3Config.from_hf_dict({"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 96})
    assert config.num_key_value_heads == 4  # HF: absent kv heads means plain multi-head attention
    assert config.head_dim == 16


@pytest.mark.parametrize(("field", "value"), [
    ("hidden_size", 0),
    ("num_hidden_layers", -2),
    ("vocab_size", 1.5),
    ("num_attention_heads", True),
    ("num_key_value_heads", 3),
    ("head_dim", 15),
    ("rope_theta", 0.0),
    ("rms_norm_eps", -1e-6),
    ("initializer_range", 0.0),
    ("torch_dtype", "int8"),
])
def test_impossible_values_are_rejected_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=field):
        dataclasses.replace(get_preset("qwen3-tiny"), **{field: value})


def test_bad_config_files_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"{tmp_path / 'config.json'} not found"):
        Qwen3Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        Qwen3Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(OLD_STYLE_1_7B | {"model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type 'llama'; supported: qwen3, qwen3_moe"):
        Qwen3Config.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="unknown model preset 'qwen3-2b'"):
        get_preset("qwen3-2b")
