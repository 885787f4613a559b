"""Apply the parallelisms to a Qwen3 model from outside, in torchtitan's order, and load full weights into it.

Order: tensor parallel (heads/FFN/vocab over the "tp" mesh dim) -> context parallel attention over the "cp"
dim -> expert parallel (MoE experts split over "ep", then FSDP over "edp": `expert_parallel`) -> FP8 block
linears (`--fp8-format`) -> activation checkpointing per block -> torch.compile per block
-> data parallel over the "dp" mesh dim (the flattened "dp_cp" with context parallelism: CP ranks share the
weights): FSDP2 `fully_shard` per block and at the root, or (`--no-shard`) FSDP2's replicate, which keeps
whole weights and optimizer state on every rank and all-reduces gradients (DDP-style). Both use
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

from qwen3_pretrain.config.layout import RING_CP_ALGO
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
    cp_algo: str = RING_CP_ALGO,
    fp8: tuple[str, str] | None = None,
) -> None:
    """Apply TP -> CP -> EP -> FP8 -> activation checkpointing -> compile -> FSDP2/replicate to `model` in place.

    Without a mesh (one process, no process group) only FP8, recompute and compile apply; the caller
    then computes under autocast. `fp8` = (--fp8-format, recipe) swaps the blocks' linears for FP8 ones
    (`float8.convert_blocks_to_float8`; weights all-gathered in float8 under FSDP2 with tensorwise).
    `recompute_method` and `recompute_num_layers` pick the blocks that full recompute checkpoints
    (`recompute.apply_activation_checkpointing`).
    """
    if env.mesh is not None and env.tp > 1:
        from qwen3_pretrain.distributed.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, env.mesh["tp"], sequence_parallel=sequence_parallel, loss_parallel=True)
    if env.mesh is not None and env.cp > 1:
        from qwen3_pretrain.distributed.context_parallel import apply_context_parallel

        apply_context_parallel(model, cp_algo, env.mesh["cp"].get_group())
    experts: list[nn.Module] = []
    if env.expert_mesh is not None:
        from qwen3_pretrain.distributed.expert_parallel import apply_expert_parallel

        experts = list(apply_expert_parallel(model, env.expert_mesh["ep"]))
    if fp8 is not None:  # (--fp8-format, recipe): the blocks' linears -> torchao Float8Linear
        from qwen3_pretrain.distributed.float8 import convert_blocks_to_float8

        convert_blocks_to_float8(transformer_blocks(model), *fp8, env.device, fsdp_all_gather=env.mesh is not None
                                 and shard)
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
    dp_mesh = env.shard_mesh
    for module in experts:  # expert-parallel experts: sharded over the DP ranks that hold the same experts
        wrap(module, mesh=env.expert_mesh["edp"], mp_policy=policy)  # type: ignore[index]
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
