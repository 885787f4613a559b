"""Qwen3 in pure PyTorch (no parallel code) and its configuration."""

from qwen3_pretrain.config.model import PRESETS, ConfigError, Qwen3Config, Qwen3MoeConfig, get_preset
from qwen3_pretrain.model.loss import causal_lm_loss, chunked_lm_head_loss
from qwen3_pretrain.model.moe import MoEMLP, aux_loss, moe_layers, set_aux_loss_scale
from qwen3_pretrain.model.qwen3 import CausalLMOutput, Qwen3ForCausalLM, Qwen3Model

__all__ = [
    "PRESETS",
    "CausalLMOutput",
    "ConfigError",
    "MoEMLP",
    "Qwen3Config",
    "Qwen3ForCausalLM",
    "Qwen3Model",
    "Qwen3MoeConfig",
    "aux_loss",
    "causal_lm_loss",
    "chunked_lm_head_loss",
    "get_preset",
    "moe_layers",
    "set_aux_loss_scale",
]
