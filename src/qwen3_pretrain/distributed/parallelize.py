"""Apply the parallelisms to a Qwen3 model from outside, in torchtitan's order, and load full weights into it.

Order: tensor parallel (heads/FFN/vocab over the "tp" mesh dim) -> activation checkpointing per
block -> torch.compile per block -> data parallel over the "dp" mesh dim: FSDP2 `fully_shard` per
block and at the root, or (`--no-shard`) FSDP2's replicate, which keeps whole weights and
optimizer state on every rank and all-reduces gradients (DDP-style). Both use
MixedPrecisionPolicy(param_dtype=compute dtype, reduce_dtype=fp32) on fp32 master weights, and
reduce gradients by plain SUM: the loss is already divided by the token count of the whole global
batch, so N ranks equal one process. Parameter names stay HF's throughout.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from qwen3_pretrain.distributed.mesh import ParallelEnv
from qwen3_pretrain.distributed.recompute import apply_activation_checkpointing, transformer_blocks
from qwen3_pretrain.model.qwen3 import copy_named_tensors


class WeightLoadError(ValueError):
    """Named tensors do not match the model's parameters; the message names the source and keys."""


def parallelize_model(
    model: nn.Module,
    env: ParallelEnv,
    compute_dtype: torch.dtype,
    sequence_parallel: bool = False,
    recompute_granularity: str | None = None,
    recompute_method: str | None = None,
    recompute_num_layers: int | None = None,
    compile_blocks: bool = False,
    shard: bool = True,
) -> None:
    """Apply TP -> activation checkpointing -> compile -> FSDP2/replicate to `model` in place.

    Without a mesh (one process, no process group) only recompute and compile apply; the caller
    then computes under autocast. `recompute_method` and `recompute_num_layers` pick the blocks that full
    recompute checkpoints (`recompute.apply_activation_checkpointing`).
    """
    if env.mesh is not None and env.tp > 1:
        from qwen3_pretrain.distributed.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, env.mesh["tp"], sequence_parallel=sequence_parallel, loss_parallel=True)
    if recompute_granularity is not None:
        apply_activation_checkpointing(
            model, recompute_granularity, recompute_method, recompute_num_layers  # type: ignore[arg-type]
        )
    blocks = transformer_blocks(model)
    if compile_blocks:
        for block in blocks:
            block.compile()
    if env.mesh is None:
        return
    wrap: Callable[..., Any] = fully_shard
    if not shard:
        from torch.distributed._composable.replicate_with_fsdp import replicate

        wrap = replicate
    policy = MixedPrecisionPolicy(
        param_dtype=None if compute_dtype == torch.float32 else compute_dtype, reduce_dtype=torch.float32
    )
    dp_mesh = env.mesh["dp"]
    for block in blocks:
        wrap(block, mesh=dp_mesh, mp_policy=policy)
    wrap(model, mesh=dp_mesh, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


@torch.no_grad()
def load_full_weights(
    model: nn.Module,
    tensors: Iterable[tuple[str, torch.Tensor]],
    source: str,
    held_elsewhere: Collection[str] = (),
) -> None:
    """Copy full (unsharded) tensors, by HF name, into the model's parameters whatever their layout.

    Each rank keeps only its own slice of every tensor (no communication). A tied model ignores an
    `lm_head.weight` in the stream, and tensors named in `held_elsewhere` (other pipeline stages')
    are skipped. Missing or unexpected names, or a shape mismatch, raise WeightLoadError naming `source`.
    """
    params = dict(model.named_parameters())  # a tied LM head appears only as the embedding (ignored in the stream)

    def copy_slice(param: torch.Tensor, full: torch.Tensor) -> None:
        full = full.to(dtype=param.dtype)
        if isinstance(param, DTensor):
            piece = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(piece.to_local())
        else:
            param.copy_(full)

    copy_named_tensors(params, tensors, source, WeightLoadError, copy=copy_slice, skip=held_elsewhere)
