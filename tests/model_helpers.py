"""Shared pieces of the model and kernel tests."""

from __future__ import annotations

import torch


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference, relative to the largest magnitude in `ref` (in float32)."""
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
