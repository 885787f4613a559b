"""Activation checkpointing (`--recompute-granularity full|selective`) per transformer block.

Granularities (Megatron's meaning of the flag):

- ``full``: a block keeps only its input; its whole forward is re-run during backward.
- ``selective``: a block keeps the outputs of its matrix multiplications (q/k/v/o, gate/up/down
  projections) and recomputes everything else during backward: the norms (incl. q_norm/k_norm),
  RoPE, the attention core (softmax(QK^T)V) and the MLP activation silu(gate) * up. This is
  Megatron's "recompute the core attention" plus the cheap element-wise work; no extra matmul
  FLOPs are spent except inside the attention core.

Blocks are changed in place by swapping their class for a subclass whose forward runs under
`torch.utils.checkpoint` (non-reentrant), the way `fully_shard` swaps classes. Unlike
`checkpoint_wrapper`, parameter names stay exactly `model.layers.N....`, so HF loading, DCP
checkpoints and optimizer-state names do not depend on whether recompute is on.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

Granularity = Literal["full", "selective"]
GRANULARITIES: tuple[str, ...] = ("full", "selective")

# Matmul outputs a "selective" block keeps; every other op is recomputed in backward.
_SAVED_OPS = frozenset({torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default})


def _keep_matmul_outputs(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Selective-checkpoint policy: save matmul outputs, recompute the rest."""
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts() -> tuple[Any, Any]:
    return create_selective_checkpoint_contexts(_keep_matmul_outputs)


@functools.cache
def _checkpointed_class(block_class: type[nn.Module], granularity: str) -> type[nn.Module]:
    """A subclass of `block_class` whose forward is activation-checkpointed."""
    context_fn: Callable[[], tuple[Any, Any]] | None = _selective_contexts if granularity == "selective" else None

    class Checkpointed(block_class):  # type: ignore[misc, valid-type]
        recompute_granularity = granularity

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            if context_fn is None:
                return checkpoint(super().forward, *args, use_reentrant=False, **kwargs)
            return checkpoint(super().forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs)

    Checkpointed.__name__ = Checkpointed.__qualname__ = f"Recompute{granularity.capitalize()}{block_class.__name__}"
    return Checkpointed


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of a `Qwen3ForCausalLM` (or of a pipeline stage cut from one)."""
    decoder = getattr(model, "model", model)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleDict):
        raise TypeError(f"{type(model).__name__} has no `model.layers` ModuleDict of transformer blocks")
    return list(layers.values())


def apply_activation_checkpointing(model: nn.Module, granularity: Granularity) -> None:
    """Make every transformer block of `model` recompute its activations in backward (in place)."""
    if granularity not in GRANULARITIES:
        raise ValueError(
            f"--recompute-granularity {granularity!r} is not supported; use one of {', '.join(GRANULARITIES)}"
        )
    for block in transformer_blocks(model):
        if hasattr(block, "recompute_granularity"):
            raise RuntimeError(f"activation checkpointing is already applied to {type(block).__name__}")
        # A class is hashable, but typeshed's functools.cache wants `Hashable` arguments, and mypy checks a class
        # object against that protocol through its unbound `__hash__(self)`, which it then rejects.
        block.__class__ = _checkpointed_class(type(block), granularity)  # type: ignore[arg-type]
