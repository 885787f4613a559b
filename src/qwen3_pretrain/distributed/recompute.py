"""Activation checkpointing (`--recompute-granularity full|selective`) per transformer block.

Granularities (Megatron's meaning of the flag):

- ``full``: a block keeps only its input; its whole forward is re-run during backward. Which blocks,
  by `--recompute-method` / `--recompute-num-layers` (`config.layout.recompute_groups`): every block
  on its own (no method), all blocks in groups of N checkpointed as one unit that keeps only the
  group's input (``uniform``), or only the first N blocks of the model or pipeline stage (``block``).
- ``selective``: a block keeps the outputs of its matrix multiplications (q/k/v/o, gate/up/down
  projections) and recomputes everything else during backward: the norms (incl. q_norm/k_norm),
  RoPE, the attention core (softmax(QK^T)V) and the MLP activation silu(gate) * up. This is
  Megatron's "recompute the core attention" plus the cheap element-wise work; no extra matmul
  FLOPs are spent except inside the attention core.

Blocks are changed in place by swapping their class for a subclass whose forward runs under
`torch.utils.checkpoint` (non-reentrant), the way `fully_shard` swaps classes; for groups of several
blocks the decoder's class is swapped instead, so that its `run_layers` checkpoints each group. Unlike
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

from qwen3_pretrain.config.layout import check_recompute, recompute_groups

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


def _run_layers(layers: list[nn.Module], h: torch.Tensor, *layer_args: torch.Tensor | None) -> torch.Tensor:
    for layer in layers:
        h = layer(h, *layer_args)
    return h


@functools.cache
def _grouped_class(decoder_class: type[nn.Module], units: tuple[tuple[str, ...], ...]) -> type[nn.Module]:
    """A subclass of the decoder `decoder_class` that runs each unit (layer names) as one checkpointed unit."""

    class GroupCheckpointed(decoder_class):  # type: ignore[misc, valid-type]
        recompute_units = units

        def run_layers(self, h: torch.Tensor, *layer_args: torch.Tensor | None) -> torch.Tensor:
            for unit in units:
                h = checkpoint(_run_layers, [self.layers[name] for name in unit], h, *layer_args, use_reentrant=False)
            return h

    GroupCheckpointed.__name__ = GroupCheckpointed.__qualname__ = f"RecomputeGroups{decoder_class.__name__}"
    return GroupCheckpointed


def _decoder_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleDict]:
    decoder = getattr(model, "model", model)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleDict):
        raise TypeError(f"{type(model).__name__} has no `model.layers` ModuleDict of transformer blocks")
    return decoder, layers


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of a `Qwen3ForCausalLM` (or of a pipeline stage cut from one)."""
    return list(_decoder_layers(model)[1].values())


def apply_activation_checkpointing(
    model: nn.Module, granularity: Granularity, method: str | None = None, num_layers: int | None = None
) -> None:
    """Make the transformer blocks of `model` (a whole model or one pipeline stage) recompute their activations
    in backward, in place: every block (selective), or with full granularity the blocks `method` and
    `num_layers` pick (`--recompute-method`, `--recompute-num-layers`; every block without them)."""
    if granularity not in GRANULARITIES:
        raise ValueError(
            f"--recompute-granularity {granularity!r} is not supported; use one of {', '.join(GRANULARITIES)}"
        )
    check_recompute(granularity, method, num_layers)
    decoder, layers = _decoder_layers(model)
    for module in (decoder, *layers.values()):
        if hasattr(module, "recompute_granularity") or hasattr(module, "recompute_units"):
            raise RuntimeError(f"activation checkpointing is already applied to {type(module).__name__}")
    names = list(layers.keys())
    groups = recompute_groups(len(names), method, num_layers) if granularity == "full" else [
        range(i, i + 1) for i in range(len(names))
    ]
    # A class is hashable, but typeshed's functools.cache wants `Hashable` arguments, and mypy checks a class
    # object against that protocol through its unbound `__hash__(self)`, which it then rejects: hence the ignores.
    if any(len(group) > 1 for group in groups):  # uniform groups: they cover every layer
        units = tuple(tuple(names[i] for i in group) for group in groups)
        decoder.__class__ = _grouped_class(type(decoder), units)  # type: ignore[arg-type]
        return
    for (index,) in groups:
        block = layers[names[index]]
        block.__class__ = _checkpointed_class(type(block), granularity)  # type: ignore[arg-type]
