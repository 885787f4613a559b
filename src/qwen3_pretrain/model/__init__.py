"""Qwen3 in pure PyTorch (no parallel code) and its configuration."""

from qwen3_pretrain.model.config import PRESETS, ConfigError, Qwen3Config, get_preset

__all__ = ["PRESETS", "ConfigError", "Qwen3Config", "get_preset"]
