"""Expert parallelism and the global-batch expert loads of Qwen3-MoE layers.

- `ExpertParallelExperts` (`--expert-model-parallel-size`, every `--moe-token-dispatcher-type`): the experts of
  a MoE layer split over the "ep" ranks, which are data-parallel ranks (Megatron's and torchtitan's layout); the
  tokens travel by all-to-all (`all_to_all_single`, which gloo, NCCL and HCCL all provide). The expert weights
  are DTensors sharded on the expert dim over "ep", and FSDP shards them further over "edp", the DP ranks that
  hold the same experts (`parallelize`); dense weights stay sharded over all DP ranks.
- `GlobalExpertLoad`: the `MoEMLP.global_expert_load` hook of "global_aux_loss" (Megatron's semantics): each
  micro batch's expert loads are summed over the data-parallel ranks and added to a running total; the loss uses
  the running mean over the step's micro batches so far. A forward run again during backward (activation
  recompute) gets back the value its first run had, in first-in first-out order (pipeline schedules run
  backward in forward order), so each micro batch counts once and the recomputed graph equals the original.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from qwen3_pretrain.model.moe import GroupedExperts, Routing, combine, expert_swiglu, moe_layers, sort_by_expert


def in_backward() -> bool:
    """Whether autograd is running a backward pass now (activation recompute runs forwards inside it)."""
    return torch._C._current_graph_task_id() != -1


class GlobalExpertLoad:
    """One MoE layer's hook: this micro batch's loads [E] -> the step's running mean of DP-summed loads [E]."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.total: torch.Tensor | None = None
        self.micro_batches = 0
        self.replay: deque[torch.Tensor] = deque()

    def __call__(self, load: torch.Tensor) -> torch.Tensor:
        if in_backward() and self.replay:
            return self.replay.popleft()
        summed = load.detach().clone()
        if self.group is not None:
            dist.all_reduce(summed, group=self.group)
        self.total = summed if self.total is None else self.total + summed
        self.micro_batches += 1
        mean = self.total / self.micro_batches
        self.replay.append(mean)
        return mean

    def reset(self) -> None:
        """Start a new step."""
        self.total, self.micro_batches = None, 0
        self.replay.clear()


def install_global_expert_load(model: nn.Module, group: dist.ProcessGroup | None) -> list[GlobalExpertLoad]:
    """Give every "global_aux_loss" MoE layer of `model` a `GlobalExpertLoad` over `group` (the DP ranks)."""
    hooks = []
    for layer in moe_layers(model).values():
        if layer.load_balancing == "global_aux_loss":
            layer.global_expert_load = hook = GlobalExpertLoad(group)
            hooks.append(hook)
    return hooks


# ---- expert parallelism -----------------------------------------------------------------------------------------


class _AllToAll(torch.autograd.Function):
    """Rows [n, hidden] -> the rows other ranks send here; `send[r]` rows go to rank r, `recv[r]` come from it.
    Backward sends the gradients the other way. Works on gloo (CPU) and NCCL/HCCL alike (`all_to_all_single`)."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup
                ) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = rows.new_empty(sum(recv), rows.shape[1])
        dist.all_to_all_single(out, rows.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        out = grad.new_empty(sum(ctx.send), grad.shape[1])
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return out, None, None, None


class ExpertParallelExperts(GroupedExperts):
    """`GroupedExperts` whose stacked weights are split over the EP ranks (DTensors sharded on the expert dim):
    rank r of the EP group holds experts [r E/ep, (r + 1) E/ep).

    Forward: sort this rank's (token, expert) rows by expert, send each expert's rows to its rank (all-to-all,
    after one all-to-all of the per-expert counts), run the local experts as one grouped computation, send the
    outputs back and combine them with the router weights. Dropless: every row travels, however uneven.
    """

    def __init__(self, experts: GroupedExperts, ep_mesh: DeviceMesh) -> None:
        nn.Module.__init__(self)  # takes over `experts`' (meta) weights instead of creating full-size ones
        self.kernels = experts.kernels
        self.gate_up_proj = nn.Parameter(distribute_tensor(experts.gate_up_proj.data, ep_mesh, [Shard(0)]))
        self.down_proj = nn.Parameter(distribute_tensor(experts.down_proj.data, ep_mesh, [Shard(0)]))
        self.group = ep_mesh.get_group()
        self.ep = ep_mesh.size()

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        num_experts, top_k = self.gate_up_proj.shape[0], routing.experts.shape[1]
        local = num_experts // self.ep
        order, counts = sort_by_expert(routing.experts, num_experts)
        rows = x[order // top_k]  # [T k, hidden]: each token once per chosen expert, grouped by expert
        recv_counts = torch.empty_like(counts)  # [ep local]: from rank s, rows for my local expert e at s local + e
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        splits = torch.stack([counts.view(self.ep, local).sum(1), recv_counts.view(self.ep, local).sum(1)])  # [2, ep]
        send, recv = splits.tolist()  # the one host sync: all-to-all sizes
        received = _AllToAll.apply(rows, send, recv, self.group)  # [n, hidden] by source rank, then local expert
        segment = torch.repeat_interleave(torch.arange(recv_counts.numel(), device=x.device), recv_counts)  # [n]
        by_expert = ((segment % local) * self.ep + segment // local).argsort(stable=True)  # [n]: expert-major order
        gate_up, down = _local(self.gate_up_proj), _local(self.down_proj)  # [local, 2 ffn, h], [local, h, ffn]
        outputs = expert_swiglu(received[by_expert], recv_counts.view(self.ep, local).sum(0), gate_up, down,
                                self.kernels)  # [n, hidden] in expert-major order
        outputs = outputs.new_empty(outputs.shape).index_copy(0, by_expert, outputs)  # [n, hidden] back by source
        returned = _AllToAll.apply(outputs, recv, send, self.group)  # [T k, hidden] in `order`
        return combine(returned, order, routing.weights)


def _local(param: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an expert weight (a DTensor on the EP mesh once FSDP has gathered it)."""
    return param.to_local() if isinstance(param, DTensor) else param


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> list[ExpertParallelExperts]:
    """Replace the experts of every MoE layer of `model` (a model or pipeline stage, on the meta device) by
    `ExpertParallelExperts` over the 1-D `ep_mesh`; returns them (FSDP shards them over the expert-DP ranks)."""
    replaced = []
    for layer in moe_layers(model).values():
        if not isinstance(layer.experts, GroupedExperts):
            raise TypeError(f"expected GroupedExperts, got {type(layer.experts).__name__}")
        layer.experts = ExpertParallelExperts(layer.experts, ep_mesh)
        replaced.append(layer.experts)
    return replaced
