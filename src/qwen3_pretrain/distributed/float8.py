"""FP8 training of the decoder blocks' linears with torchao's float8 (Megatron's `--fp8-format` / `--fp8-recipe`).

Applied from outside like the other parallelisms (`parallelize.parallelize_model`, before activation
checkpointing, compile and FSDP2): each transformer block's `nn.Linear`s (q/k/v/o projections, the MLP's
gate/up/down) become torchao `Float8Linear`s. The embedding, the LM head and a MoE router (`mlp.gate`) stay in
bf16, and so do the grouped experts (no `nn.Linear`). Weights stay fp32 master weights in their usual
parameters (checkpoints are unchanged); each matmul casts its operands to float8 with current (dynamic)
scales: one per tensor (tensorwise) or one per row (rowwise, torchao's recipe with power-of-two scales).

`--fp8-format e4m3` casts inputs, weights and output gradients to e4m3; `hybrid` keeps e4m3 forward and
casts the output gradients to e5m2 (more range, less precision), Megatron's two formats.

With FSDP2 sharding and the tensorwise recipe, weights are all-gathered in float8 (half the bytes of bf16);
`attach_fp8_scale_precompute` then computes each step's weight scales with one all-reduce instead of one per
weight. Devices without FP8 matmuls (CPUs, NPUs, CUDA below compute capability 8.9) run torchao's emulation:
the same casts, with the matmul in float32 on the dequantised operands, so the wiring and numerics run in
tests; it is slower than bf16.
"""

from __future__ import annotations

import logging
import types
import typing
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from qwen3_pretrain.config.fp8 import FP8_FORMATS, FP8_RECIPES

if TYPE_CHECKING:
    from torchao.float8 import Float8LinearConfig

ROUTER_NAME = "gate"  # MoEMLP.gate: the router's scores stay in the compute dtype
FP8_DIVISOR = 16  # torch._scaled_mm needs both sides of every weight divisible by 16


def fp8_emulated(device: torch.device) -> bool:
    """True where the device has no FP8 matmul: CPUs, NPUs and CUDA GPUs below compute capability 8.9."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9)


def _float8() -> types.ModuleType:
    """torchao.float8, imported on first use; torchao's failures to load C extensions of other features (on CPU
    builds of torch) are not logged."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    import torchao.float8

    return torchao.float8


def float8_linear_config(fmt: str, recipe: str, emulate: bool, fsdp_all_gather: bool) -> Float8LinearConfig:
    """torchao's `Float8LinearConfig` for `--fp8-format fmt --fp8-recipe recipe`.

    tensorwise: one scale per tensor; rowwise: one per row (per column for the operand read column-wise),
    scales rounded down to powers of two. Inputs and weights are e4m3; output gradients e4m3 (`e4m3`) or e5m2
    (`hybrid`). `fsdp_all_gather` (tensorwise only) all-gathers FSDP2 weight shards in float8.
    """
    if fmt not in FP8_FORMATS or recipe not in FP8_RECIPES:
        raise ValueError(f"--fp8-format {fmt} --fp8-recipe {recipe}: use {FP8_FORMATS} and {FP8_RECIPES}")
    ao = _float8().config
    rowwise = recipe == "rowwise"
    granularity = ao.ScalingGranularity.AXISWISE if rowwise else ao.ScalingGranularity.TENSORWISE
    grad_dtype = ao.e5m2_dtype if fmt == "hybrid" else ao.e4m3_dtype
    return ao.Float8LinearConfig(
        cast_config_input=ao.CastConfig(scaling_granularity=granularity, target_dtype=ao.e4m3_dtype),
        cast_config_weight=ao.CastConfig(scaling_granularity=granularity, target_dtype=ao.e4m3_dtype),
        cast_config_grad_output=ao.CastConfig(scaling_granularity=granularity, target_dtype=grad_dtype),
        round_scales_to_power_of_2=rowwise,
        emulate=emulate,
        enable_fsdp_float8_all_gather=fsdp_all_gather and not rowwise,
    )


def is_fp8_linear(module: nn.Module, name: str) -> bool:
    """Whether a block's module (by its name inside the block) is converted: every `nn.Linear` but the router."""
    return isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] != ROUTER_NAME


def convert_blocks_to_float8(
    blocks: Iterable[nn.Module], fmt: str, recipe: str, device: torch.device, fsdp_all_gather: bool
) -> list[str]:
    """Swap the linears of each block for torchao `Float8Linear`s in place; returns their names in the blocks.

    Emulated where `device` has no FP8 matmul (`fp8_emulated`); on FP8 hardware a weight with a side not
    divisible by 16 raises ValueError (torch._scaled_mm cannot run it).
    """
    emulate = fp8_emulated(device)
    config = float8_linear_config(fmt, recipe, emulate, fsdp_all_gather)
    convert = _float8().convert_to_float8_training
    converted: list[str] = []
    for index, block in enumerate(blocks):
        names = [name for name, module in block.named_modules() if is_fp8_linear(module, name)]
        if not emulate:
            shapes = {n: tuple(typing.cast(nn.Linear, block.get_submodule(n)).weight.shape) for n in names}
            odd = [n for n, shape in shapes.items() if any(side % FP8_DIVISOR for side in shape)]
            if odd:
                raise ValueError(f"FP8 matmuls need weight sides divisible by {FP8_DIVISOR}; block {index}: {odd}")
        convert(block, module_filter_fn=is_fp8_linear, config=config)
        converted += [f"{index}.{name}" for name in names]
    return converted


def attach_fp8_scale_precompute(optimizer: torch.optim.Optimizer, parts: Iterable[nn.Module]) -> bool:
    """With float8 all-gather: compute the weight scales of all parts with one all-reduce per part (instead of one
    per weight in the all-gathers) before the first forward after each `optimizer.step()`. Returns whether it
    attached.

    Computed at the forward, not in the step hook itself: loading a checkpoint changes the weights after a step
    (DCP initialises optimizer state with one), and a scale kept from before would be stale.
    """
    float8_linear = _float8().float8_linear.Float8Linear
    parts = list(parts)
    if not any(isinstance(m, float8_linear) and m.config.enable_fsdp_float8_all_gather
               for part in parts for m in part.modules()):
        return False
    precompute = _float8().precompute_float8_dynamic_scale_for_fsdp
    stale = [True]  # the weights changed since the last precompute

    def weights_changed(*_: object) -> None:
        stale[0] = True

    def precompute_if_stale(*_: object) -> None:
        if stale[0]:
            for part in parts:
                precompute(part)
            stale[0] = False

    optimizer.register_step_post_hook(weights_changed)
    for part in parts:  # before FSDP's own pre-forward hook, which may start all-gathers
        part.register_forward_pre_hook(precompute_if_stale, prepend=True)
    return True
