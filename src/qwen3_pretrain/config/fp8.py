"""FP8 training settings, Megatron's `--fp8-format` / `--fp8-recipe`, and their pure checks.

FP8 here is torchao's float8 training of the decoder blocks' linears with current scaling
(`distributed.float8`). Megatron's `--fp8-recipe` choices are tensorwise (implemented with its meaning: one
current scale per tensor), delayed (its default: Transformer Engine's amax history), mxfp8, blockwise and
custom (refused with a reason); `rowwise` is ours (torchao's per-row scales). Without `--fp8-recipe` the
recipe is tensorwise, not Megatron's delayed, which is not implemented.
"""

from __future__ import annotations

from qwen3_pretrain.config.model import ConfigError

FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("tensorwise", "rowwise")
DEFAULT_FP8_RECIPE = "tensorwise"
REFUSED_FP8_RECIPES = {
    "delayed": "delayed scaling (Transformer Engine's amax history) is not implemented; tensorwise scales each "
               "tensor by its current amax instead",
    "mxfp8": "MXFP8 (32-element blocks with e8m0 scales, Blackwell GPUs) is not implemented",
    "blockwise": "blockwise scaling (Transformer Engine's 1x128 / 128x128 blocks) is not implemented",
    "custom": "a custom Transformer Engine quantizer (--fp8-quantizer-factory) is not implemented",
}


def check_fp8(fmt: str | None, recipe: str | None, precision: str, tp: int) -> None:
    """Refuse an FP8 setting this implementation cannot run, naming the flag to change."""
    if fmt is None:
        if recipe is not None:
            raise ConfigError(f"--fp8-recipe {recipe} needs --fp8-format (e4m3 or hybrid): without it nothing is FP8")
        return
    if recipe in REFUSED_FP8_RECIPES:
        raise ConfigError(f"--fp8-recipe {recipe}: {REFUSED_FP8_RECIPES[recipe]}; use tensorwise or rowwise")
    if recipe is not None and recipe not in FP8_RECIPES:
        raise ConfigError(f"--fp8-recipe {recipe!r}: use one of {', '.join(FP8_RECIPES)}")
    if precision != "bf16":
        raise ConfigError(
            f"--fp8-format needs --bf16 (this run is {precision}): the FP8 matmuls take and return bf16 and every "
            "other op of the model computes in bf16, as in Megatron; add --bf16"
        )
    if tp > 1:
        raise ConfigError(
            "--fp8-format with --tensor-model-parallel-size > 1 is not implemented (the float8 linears have no "
            "tensor-parallel sharding here); use data parallel (FSDP2) with --tensor-model-parallel-size 1"
        )
