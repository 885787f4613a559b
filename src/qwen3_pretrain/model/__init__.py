"""Qwen3 in pure PyTorch (no parallel code) and its configuration."""

from qwen3_pretrain.config.model import PRESETS, ConfigError, Qwen3Config, get_preset
from qwen3_pretrain.model.loss import causal_lm_loss, chunked_lm_head_loss
from qwen3_pretrain.model.qwen3 import CausalLMOutput, Qwen3ForCausalLM, Qwen3Model

__all__ = [
    "PRESETS",
    "CausalLMOutput",
    "ConfigError",
    "Qwen3Config",
    "Qwen3ForCausalLM",
    "Qwen3Model",
    "causal_lm_loss",
    "chunked_lm_head_loss",
    "get_preset",
]
