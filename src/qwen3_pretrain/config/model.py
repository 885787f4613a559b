"""Qwen3 model configuration: HF `config.json` in and out, presets, validation."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

QWEN3_VOCAB_SIZE = 151936
EOD_TOKEN_ID = 151643  # <|endoftext|>: end of document and padding for Qwen3 base models

_DTYPE_NAMES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A configuration value is impossible; the message names the field and what to do."""


@dataclass
class Qwen3Config:
    """Shape and numerics of a dense Qwen3 model, with HF `config.json` field names."""

    MODEL_TYPE: ClassVar[str] = "qwen3"
    ARCHITECTURE: ClassVar[str] = "Qwen3ForCausalLM"

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

    def is_moe_layer(self, layer: int) -> bool:
        """Whether decoder layer `layer` (0-based) has a mixture-of-experts MLP; never in a dense model."""
        return False

    def expert_shape(self) -> tuple[int, int, int]:
        """(experts, experts per token, expert FFN width); (0, 0, 0) in a dense model."""
        return 0, 0, 0

    def mlp_parameters(self, layer: int, active: bool = False) -> int:
        """Parameters of layer `layer`'s MLP (`active`: those one token uses; the same for a dense MLP)."""
        return 3 * self.hidden_size * self.intermediate_size

    def num_parameters(self, active: bool = False) -> int:
        """Closed-form parameter count (tied embeddings counted once); `active`: those one token uses."""
        h, d = self.hidden_size, self.head_dim
        q_width = self.num_attention_heads * d
        kv_width = self.num_key_value_heads * d
        attention = h * q_width + 2 * h * kv_width + q_width * h + 2 * d
        layers = sum(attention + self.mlp_parameters(i, active) + 2 * h for i in range(self.num_hidden_layers))
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return layers + embeddings + h

    def flops_per_token(self, seq_length: int) -> float:
        """Training FLOPs per token: 6 x active matmul params (LM head counted even when tied) + attention."""
        matmul_params = self.num_parameters(active=True) - self.vocab_size * self.hidden_size
        matmul_params += self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 0)
        attention_dim = self.num_attention_heads * self.head_dim
        return 6.0 * matmul_params + 12.0 * self.num_hidden_layers * attention_dim * seq_length

    # ---- HF config.json ----------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> Qwen3Config:
        """Build from an HF config dict, old (`rope_theta`, `torch_dtype`) or new (`rope_parameters`, `dtype`).

        `model_type` picks the class: "qwen3" (dense) or "qwen3_moe" (`Qwen3MoeConfig`).
        """
        model_type = data.get("model_type", cls.MODEL_TYPE)
        target = CONFIG_CLASSES.get(model_type)
        if target is None or not issubclass(target, cls):
            supported = [name for name, kind in CONFIG_CLASSES.items() if issubclass(kind, cls)]
            raise ConfigError(f"config.json has model_type {model_type!r}; supported: {', '.join(supported)}")
        return target(**target.hf_values(data))

    @classmethod
    def hf_values(cls, data: dict[str, Any]) -> dict[str, Any]:
        """The constructor arguments an HF config dict gives; absent fields keep the class defaults."""
        values: dict[str, Any] = {}
        for item in dataclasses.fields(cls):
            if item.name in data and data[item.name] is not None:
                values[item.name] = data[item.name]
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
        return values

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
            architectures=[self.ARCHITECTURE],
            model_type=self.MODEL_TYPE,
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


# --moe-router-load-balancing-type (Megatron's names): the Switch load-balancing loss over the micro batch,
# per sequence, over the global batch (expert loads supplied by the caller), or none. See `model.moe`.
LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")


@dataclass
class Qwen3MoeConfig(Qwen3Config):
    """A Qwen3-MoE model: transformers' `Qwen3MoeConfig` fields, and its defaults for absent ones.

    Layer i has a mixture-of-experts MLP when num_experts > 0, i is not in `mlp_only_layers` and
    (i + 1) % decoder_sparse_step == 0 (transformers' rule); the other layers keep the dense MLP of
    width `intermediate_size`. `moe_router_load_balancing_type` is a training choice, not an HF field
    (never written to config.json); `router_aux_loss_coef` is Megatron's --moe-aux-loss-coeff.
    """

    MODEL_TYPE: ClassVar[str] = "qwen3_moe"
    ARCHITECTURE: ClassVar[str] = "Qwen3MoeForCausalLM"

    # transformers' Qwen3MoeConfig defaults where they differ from the dense class (a config.json may omit them)
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    head_dim: int = 64  # HF: hidden_size // num_attention_heads when absent
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    num_experts: int = 128
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = False
    router_aux_loss_coef: float = 0.001
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    moe_router_load_balancing_type: str = "aux_loss"

    def validate(self) -> None:
        super().validate()
        for name in ("num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"Qwen3MoeConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.num_experts, int) or isinstance(self.num_experts, bool) or self.num_experts < 0:
            raise ConfigError(f"Qwen3MoeConfig.num_experts must be an integer >= 0, got {self.num_experts!r}")
        if 0 < self.num_experts < self.num_experts_per_tok:
            raise ConfigError(
                f"Qwen3MoeConfig.num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts "
                f"({self.num_experts}); lower --moe-router-topk or raise --num-experts"
            )
        bad = [i for i in self.mlp_only_layers if not isinstance(i, int) or not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ConfigError(
                f"Qwen3MoeConfig.mlp_only_layers holds {bad}, not layer numbers 0..{self.num_hidden_layers - 1}"
            )
        if self.router_aux_loss_coef < 0:
            raise ConfigError(f"Qwen3MoeConfig.router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")
        if self.moe_router_load_balancing_type not in LOAD_BALANCING_TYPES:
            raise ConfigError(
                f"Qwen3MoeConfig.moe_router_load_balancing_type must be one of {LOAD_BALANCING_TYPES}, "
                f"got {self.moe_router_load_balancing_type!r}"
            )

    def expert_shape(self) -> tuple[int, int, int]:
        return self.num_experts, self.num_experts_per_tok, self.moe_intermediate_size

    def is_moe_layer(self, layer: int) -> bool:
        return (
            self.num_experts > 0
            and layer not in self.mlp_only_layers
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    def mlp_parameters(self, layer: int, active: bool = False) -> int:
        """Experts (all, or the top-k one token uses when `active`) + router in a MoE layer, else the dense MLP."""
        if not self.is_moe_layer(layer):
            return super().mlp_parameters(layer, active)
        experts = self.num_experts_per_tok if active else self.num_experts
        return experts * 3 * self.hidden_size * self.moe_intermediate_size + self.num_experts * self.hidden_size

    @classmethod
    def hf_values(cls, data: dict[str, Any]) -> dict[str, Any]:
        """As the dense reader, plus transformers 5's `num_local_experts` for `num_experts`."""
        values = super().hf_values(data)
        if "num_experts" not in values and data.get("num_local_experts") is not None:
            values["num_experts"] = data["num_local_experts"]
        return values

    def to_hf_dict(self) -> dict[str, Any]:
        """An HF config dict that transformers' Qwen3MoeConfig loads (`num_experts`, as the published configs)."""
        data = super().to_hf_dict()
        del data["moe_router_load_balancing_type"]
        data.update(mlp_only_layers=list(self.mlp_only_layers), output_router_logits=False)
        return data


CONFIG_CLASSES: dict[str, type[Qwen3Config]] = {"qwen3": Qwen3Config, "qwen3_moe": Qwen3MoeConfig}


def _preset(hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, tied: bool, **kw: Any) -> Qwen3Config:
    return Qwen3Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=ffn, tie_word_embeddings=tied, **kw,
    )


def _moe_preset(
    hidden: int, layers: int, heads: int, ffn: int, experts: int, top_k: int, moe_ffn: int, **kw: Any
) -> Qwen3MoeConfig:
    """Qwen3-MoE sizes; what every published Qwen3-MoE shares: 4 kv heads, head_dim 128, untied, top-k renormalised."""
    values: dict[str, Any] = {
        "num_key_value_heads": 4, "head_dim": 128, "max_position_embeddings": 40960, "tie_word_embeddings": False,
        "norm_topk_prob": True, "vocab_size": QWEN3_VOCAB_SIZE,
    }
    return Qwen3MoeConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=ffn,
        num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=moe_ffn, **(values | kw),
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
    # Qwen3-MoE (the published config.json files of Qwen/Qwen3-30B-A3B and Qwen/Qwen3-235B-A22B)
    "qwen3-30b-a3b": _moe_preset(2048, 48, 32, 6144, experts=128, top_k=8, moe_ffn=768),
    "qwen3-235b-a22b": _moe_preset(4096, 94, 64, 12288, experts=128, top_k=8, moe_ffn=1536),
    # The MoE CPU benchmark (real vocabulary) and unit tests (layer 1 dense, as mlp_only_layers makes it).
    "qwen3-moe-bench": _moe_preset(512, 4, 8, 1536, experts=32, top_k=4, moe_ffn=256, head_dim=64,
                                   max_position_embeddings=4096),
    "qwen3-moe-tiny": _moe_preset(64, 3, 4, 96, experts=8, top_k=2, moe_ffn=32, head_dim=16, vocab_size=512,
                                  max_position_embeddings=512, mlp_only_layers=[1]),
}


def get_preset(name: str) -> Qwen3Config:
    """A fresh copy of a named preset."""
    key = name.lower()
    if key not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[key])  # deep: a MoE preset's mlp_only_layers list is not shared
