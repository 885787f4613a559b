"""qwen3-pretrain: pretrain Qwen3 models on plain PyTorch distributed."""

__version__ = "0.1.0"
