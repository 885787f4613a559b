"""Global-norm gradient clipping over every parallel dimension: DTensor shards (TP, FSDP) and pipeline ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from qwen3_pretrain.distributed.pipeline import group_of, norm_parameters


def clip_grad_norm_(
    model_parts: list[nn.Module], max_norm: float, pp: dist.ProcessGroup | DeviceMesh | None = None
) -> torch.Tensor:
    """The global L2 norm of the gradients of `model_parts` (this rank's model, or its pipeline stages) as a
    device scalar; scales every gradient by min(1, max_norm / (norm + 1e-6)) when max_norm > 0 (Megatron's
    clipping).

    The norm covers every DTensor shard and, summed over the `pp` group, every pipeline rank; a last
    stage's copy of a tied embedding counts once. No host synchronisation.
    """
    parameters = [p for part in model_parts for p in part.parameters()]
    grads = [p.grad for p in norm_parameters(model_parts) if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    group = group_of(pp) if pp is not None else None
    if group is not None and dist.get_world_size(group) > 1:
        squared = total.pow(2)
        dist.all_reduce(squared, group=group)
        total = squared.sqrt()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total, foreach=True)
    return total
