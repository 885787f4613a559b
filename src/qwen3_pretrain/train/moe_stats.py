"""The router statistics of a training step, for the log line and metrics: per MoE layer, the tokens routed to
each expert (summed over the global batch) and the load-balancing loss (mean over micro batches and ranks).

Each MoE layer's `stats` are read by a forward hook after every forward that is not an activation recompute
(those repeat a micro batch already counted). `ExpertLoadTracker.take()` returns the step's totals as one device
tensor, summed over all ranks without a host sync; `summarize` turns it into numbers when the log reads it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from qwen3_pretrain.distributed.expert_parallel import in_backward
from qwen3_pretrain.model.moe import MoEMLP, moe_layers

# Megatron's log-line names of the load-balancing loss per --moe-router-load-balancing-type (its tracker's names).
LOSS_NAMES = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss",
              "global_aux_loss": "global_load_balancing_loss"}
_LAYER = re.compile(r"layers\.(\d+)\.")


@dataclass(frozen=True)
class RouterSummary:
    """One step's router figures over the global batch."""

    loss: float  # mean over MoE layers of the load-balancing loss (without its coefficient)
    layers: list[int]  # the MoE layers' numbers
    tokens_max: list[float]  # per MoE layer: tokens at its busiest expert
    tokens_mean: list[float]  # per MoE layer: tokens per expert on average


class ExpertLoadTracker:
    """Sums the router statistics of `model`'s MoE layers over a step (see the module doc)."""

    def __init__(self, model: nn.Module, moe_layer_numbers: list[int], num_experts: int,
                 device: torch.device) -> None:
        self.rows = {layer: row for row, layer in enumerate(moe_layer_numbers)}
        self.totals = torch.zeros(len(moe_layer_numbers), num_experts + 2, device=device)  # [layers, E loads|loss|n]
        for name, layer in moe_layers(model).items():
            found = _LAYER.search(name + ".")
            if found is not None:
                layer.register_forward_hook(self._hook(self.rows[int(found.group(1))]))

    def _hook(self, row: int) -> Any:
        def record(module: MoEMLP, _args: Any, _output: Any) -> None:
            if module.stats is None or in_backward():
                return
            stats = module.stats
            self.totals[row, :-2] += stats.tokens_per_expert
            self.totals[row, -2] += stats.load_balancing_loss
            self.totals[row, -1] += 1
        return record

    def reset(self) -> None:
        self.totals.zero_()

    def take(self, group: dist.ProcessGroup | None) -> torch.Tensor:
        """The step's totals summed over `group` (every rank of the run), then reset."""
        totals = self.totals.clone()
        self.reset()
        if group is not None:
            dist.all_reduce(totals, group=group)
        return totals


def summarize(totals: torch.Tensor, layers: list[int], tp: int) -> RouterSummary:
    """Device totals of `ExpertLoadTracker.take` -> figures; TP ranks route the same tokens, so loads count once."""
    values = totals.double().cpu()
    loads = values[:, :-2] / tp  # [layers, E]
    losses = values[:, -2] / values[:, -1].clamp(min=1)  # [layers]
    return RouterSummary(float(losses.mean()), layers, loads.max(dim=1).values.tolist(), loads.mean(dim=1).tolist())
