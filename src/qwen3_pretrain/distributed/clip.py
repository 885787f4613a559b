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
    parameters: list[torch.Tensor] = [p for part in model_parts for p in part.parameters()]
    grads = [p.grad for p in norm_parameters(model_parts) if p.grad is not None]
    total = _norm_over_meshes(grads)
    group = group_of(pp) if pp is not None else None
    if group is not None and dist.get_world_size(group) > 1:
        squared = total.pow(2)
        dist.all_reduce(squared, group=group)
        total = squared.sqrt()
    if max_norm > 0:
        for same_mesh in _by_mesh(parameters).values():  # foreach kernels take DTensors of one mesh at a time
            torch.nn.utils.clip_grads_with_norm_(same_mesh, max_norm, total, foreach=True)
    return total


def _by_mesh(tensors: list[torch.Tensor]) -> dict[DeviceMesh | None, list[torch.Tensor]]:
    """Tensors grouped by their DTensor mesh (None for plain tensors): expert-parallel experts live on the expert
    mesh, the other weights on the data-parallel (x TP) mesh."""
    groups: dict[DeviceMesh | None, list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault(tensor.device_mesh if isinstance(tensor, DTensor) else None, []).append(tensor)
    return groups


def _norm_over_meshes(grads: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of gradients that may be DTensors on different meshes: per mesh over all shards, combined."""
    norms = []
    for same_mesh in _by_mesh(grads).values() or [[]]:
        norm = torch.nn.utils.get_total_norm(same_mesh, norm_type=2.0, foreach=True)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    return norms[0] if len(norms) == 1 else torch.stack(norms).norm()
