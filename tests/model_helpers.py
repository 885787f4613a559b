"""Shared pieces of the model and kernel tests."""

from __future__ import annotations

import torch


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference, relative to the largest magnitude in `ref` (in float32)."""
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def per_expert_loop(
    x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """Reference MoE experts, one expert at a time (HF transformers' way): x [T, h], chosen experts and their
    weights [T, k], stacked gate_up [E, 2f, h] (gate rows first) and down [E, h, f] -> [T, h]."""
    out = torch.zeros_like(x)
    ffn = down.shape[2]
    for e in range(gate_up.shape[0]):
        token, slot = torch.where(experts == e)  # [n_e] each
        projected = x[token] @ gate_up[e].T  # [n_e, 2f]
        hidden = torch.nn.functional.silu(projected[:, :ffn]) * projected[:, ffn:]  # [n_e, f]
        out = out.index_add(0, token, (hidden @ down[e].T) * weights[token, slot, None])
    return out
