"""Qwen3 model configuration: HF `config.json` in and out, presets, validation."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

QWEN3_VOCAB_SIZE = 151936
EOD_TOKEN_ID = 151643  # <|endoftext|>: end of document and padding for Qwen3 base models

_DTYPE_NAMES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A configuration value is impossible; the message names the field and what to do."""


@dataclass
class Qwen3Config:
    """Shape and numerics of a dense Qwen3 model, with HF `config.json` field names."""

    vocab_size: int = QWEN3_VOCAB_SIZE
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    max_position_embeddings: int = 40960
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    torch_dtype: str = "bfloat16"
    bos_token_id: int = EOD_TOKEN_ID
    eos_token_id: int = EOD_TOKEN_ID

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first impossible field."""
        positive = (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"Qwen3Config.{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"Qwen3Config.num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads}); change one of them"
            )
        if self.head_dim % 2:
            raise ConfigError(f"Qwen3Config.head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_theta <= 0:
            raise ConfigError(f"Qwen3Config.rope_theta must be > 0, got {self.rope_theta}")
        if self.rms_norm_eps <= 0:
            raise ConfigError(f"Qwen3Config.rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.initializer_range <= 0:
            raise ConfigError(f"Qwen3Config.initializer_range must be > 0, got {self.initializer_range}")
        if self.torch_dtype not in _DTYPE_NAMES:
            raise ConfigError(f"Qwen3Config.torch_dtype must be one of {_DTYPE_NAMES}, got {self.torch_dtype!r}")

    # ---- sizes -------------------------------------------------------------------------------

    def num_parameters(self) -> int:
        """Closed-form parameter count (tied embeddings counted once)."""
        h, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        q_width = self.num_attention_heads * d
        kv_width = self.num_key_value_heads * d
        attention = h * q_width + 2 * h * kv_width + q_width * h + 2 * d
        per_layer = attention + 3 * h * f + 2 * h
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + embeddings + h

    def flops_per_token(self, seq_length: int) -> float:
        """Training FLOPs per token: 6 x matmul params (LM head counted even when tied) + attention."""
        matmul_params = self.num_parameters() - self.vocab_size * self.hidden_size
        matmul_params += self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 0)
        attention_dim = self.num_attention_heads * self.head_dim
        return 6.0 * matmul_params + 12.0 * self.num_hidden_layers * attention_dim * seq_length

    # ---- HF config.json ----------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> Qwen3Config:
        """Build from an HF config dict, old (`rope_theta`, `torch_dtype`) or new (`rope_parameters`, `dtype`)."""
        model_type = data.get("model_type", "qwen3")
        if model_type != "qwen3":
            raise ConfigError(f"config.json has model_type {model_type!r}; only dense 'qwen3' models are supported")
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.name in data and data[field.name] is not None:
                values[field.name] = data[field.name]
        rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
        if "rope_theta" not in values and isinstance(rope, dict) and "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
        dtype = data.get("dtype") or data.get("torch_dtype")
        if dtype is not None:
            values["torch_dtype"] = str(dtype).removeprefix("torch.")
        if "num_key_value_heads" not in values and "num_attention_heads" in values:
            values["num_key_value_heads"] = values["num_attention_heads"]  # HF: absent or null means no GQA
        if "head_dim" not in values and "hidden_size" in values and "num_attention_heads" in values:
            values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]
        values["rope_theta"] = float(values.get("rope_theta", cls.rope_theta))
        return cls(**values)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str]) -> Qwen3Config:
        """Read `<directory>/config.json`."""
        path = Path(directory) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path} not found: point to an HF model directory that contains config.json")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc}); re-download or regenerate it") from exc
        return cls.from_hf_dict(data)

    def to_hf_dict(self) -> dict[str, Any]:
        """An HF config dict that transformers' Qwen3Config loads (old and new readers alike)."""
        data = dataclasses.asdict(self)
        data.update(
            architectures=["Qwen3ForCausalLM"],
            model_type="qwen3",
            hidden_act="silu",
            attention_bias=False,
            attention_dropout=0.0,
            use_cache=True,
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=self.num_hidden_layers,
            rope_scaling=None,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            dtype=self.torch_dtype,
        )
        return data

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write `<directory>/config.json` atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "config.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
        return path


def _preset(hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, tied: bool, **kw: Any) -> Qwen3Config:
    return Qwen3Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=ffn, tie_word_embeddings=tied, **kw,
    )


PRESETS: dict[str, Qwen3Config] = {
    "qwen3-0.6b": _preset(1024, 28, 16, 8, 3072, True),
    "qwen3-1.7b": _preset(2048, 28, 16, 8, 6144, True),
    "qwen3-4b": _preset(2560, 36, 32, 8, 9728, True),
    "qwen3-8b": _preset(4096, 36, 32, 8, 12288, False),
    "qwen3-14b": _preset(5120, 40, 40, 8, 17408, False),
    "qwen3-32b": _preset(5120, 64, 64, 8, 25600, False),
    # Small bodies on the real vocabulary: the demo and CPU benchmarks.
    "qwen3-demo": _preset(256, 4, 4, 2, 768, True, head_dim=64, max_position_embeddings=4096),
    "qwen3-bench": _preset(512, 4, 8, 4, 1536, True, head_dim=64, max_position_embeddings=4096),
    # Tiny vocabulary and body for unit tests.
    "qwen3-tiny": _preset(64, 2, 4, 2, 128, True, head_dim=16, vocab_size=512, max_position_embeddings=512),
}


def get_preset(name: str) -> Qwen3Config:
    """A fresh copy of a named preset."""
    key = name.lower()
    if key not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[key])
