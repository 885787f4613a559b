"""Checkpoint formats: HF safetensors, native (torch.distributed.checkpoint), Megatron mcore."""
