"""The mixture-of-experts MLP of Qwen3-MoE: route -> dispatch, compute and combine experts, load-balancing loss.

`MoEMLP` (HF `mlp` of a MoE layer) runs three replaceable parts:

- `gate` (`Router`, HF `mlp.gate`, weight [experts, hidden]): logits -> float32 softmax -> top-k ->
  renormalised over the k when `norm_topk_prob` (HF's semantics; megatron-core's default top-k-then-softmax
  equals norm_topk_prob=True, its `moe_router_pre_softmax` equals False). Dropless: every token reaches its k
  experts, no capacity factor.
- `experts` (`GroupedExperts`, HF in-memory names `mlp.experts.gate_up_proj` [experts, 2 ffn, hidden] = per
  expert cat(gate, up), `mlp.experts.down_proj` [experts, hidden, ffn]): sorts the (token, expert) pairs by
  expert (`sort_by_expert`), runs every expert's SwiGLU as one grouped computation (`expert_swiglu`, through
  `kernels.grouped_linear`) and sums each token's k outputs weighted by the router (`combine`). Expert
  parallelism replaces this module with one of the same call signature that sends the sorted rows to the ranks
  holding their experts (all-to-all), runs `expert_swiglu` on its local experts and sends the rows back.
- the load-balancing loss (`load_balancing_loss`), Switch style as Megatron computes it per layer:
  E * sum_e f_e * P_e, f_e = share of the k * T assignments routed to expert e, P_e = mean router probability of
  expert e over the T tokens. Modes (`--moe-router-load-balancing-type`): "aux_loss" over the micro batch
  (Megatron's default), "seq_aux_loss" per sequence then averaged, "global_aux_loss" with f from expert loads
  over the global batch, which the caller supplies by setting `MoEMLP.global_expert_load` (a function from
  this micro batch's loads [E] to the global batch's; the distributed layer all-reduces and accumulates
  them; unset, the micro batch is the global batch), "none". The hook runs once per forward, so twice per
  micro batch under activation recompute: an accumulating hook must count each micro batch once.

DECISION (exposing the loss): each MoE layer attaches `router_aux_loss_coef * aux_loss_scale * loss` to its
output's gradient (`_AttachAuxLoss`, as megatron-core does): `backward()` of the language-model loss adds the
load-balancing gradients with no change to the decoder layers' interface, so pipeline stages, activation
recompute and torch.compile need nothing extra. A trainer sets `aux_loss_scale` (`set_aux_loss_scale`) to the
factor its LM loss of this micro batch gets (e.g. 1 / micro batches per step). The values are kept for
logging: `MoEMLP.stats` (`RouterStats`: tokens per expert, mean router probabilities, the layer's loss) of the
last forward, and `aux_loss(model)` sums the layers' weighted losses.

HF transformers' `load_balancing_loss_func` is a different number: one loss for the whole model from expert
loads and probabilities averaged over all layers, and f sums to k instead of 1 (E * sum_e F_e P_e with
F_e = assignments to e / (layers * T)); `tests/test_moe_model.py` rebuilds it from `RouterStats`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import nn

from qwen3_pretrain.config.model import Qwen3MoeConfig
from qwen3_pretrain.model import kernels as ops
from qwen3_pretrain.model.kernels import KernelOptions

ExpertLoad = Callable[[torch.Tensor], torch.Tensor]  # this micro batch's assignments per expert [E] -> global [E]


class Routing(NamedTuple):
    """The router's decision for T tokens."""

    probs: torch.Tensor  # [T, E] float32 softmax over all experts
    experts: torch.Tensor  # [T, k] int64 chosen experts
    weights: torch.Tensor  # [T, k] combine weights, in the router logits' dtype


class RouterStats(NamedTuple):
    """Detached statistics of one MoE layer's last forward (this process's tokens), for metrics."""

    tokens_per_expert: torch.Tensor  # [E] float32 (token, expert) assignments
    mean_probs: torch.Tensor  # [E] float32 router probability per expert, averaged over the tokens
    load_balancing_loss: torch.Tensor  # float32 scalar, the mode's loss without its coefficient


class Router(nn.Linear):
    """Linear [hidden -> experts] scores, float32 softmax, top-k, optionally renormalised over the k."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool) -> None:
        super().__init__(hidden_size, num_experts, bias=False)
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob

    def forward(self, x: torch.Tensor) -> Routing:  # type: ignore[override]  # returns the routing, not a tensor
        """x [T, hidden] -> Routing (probabilities, chosen experts, their combine weights)."""
        logits = ops.linear(x, self.weight)  # [T, E]
        probs = logits.float().softmax(dim=-1)  # [T, E]
        top_probs, experts = probs.topk(self.top_k, dim=-1)  # [T, k] each
        if self.norm_topk_prob:
            top_probs = top_probs / top_probs.sum(dim=-1, keepdim=True)
        return Routing(probs, experts, top_probs.to(logits.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, top_k={self.top_k}, norm_topk_prob={self.norm_topk_prob}"


def sort_by_expert(experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen experts [T, k] -> (order [T k], counts [E]): order lists the flat (token, slot) pairs grouped by
    expert (stable, so by token within an expert); counts[e] = pairs routed to expert e."""
    flat = experts.flatten()  # [T k]
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    return flat.argsort(stable=True), counts


def expert_swiglu(
    rows: torch.Tensor, counts: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, kernels: KernelOptions
) -> torch.Tensor:
    """Rows [n, hidden] sorted by expert (`counts` [E] each) -> down_e(silu(gate_e(x)) * up_e(x)) [n, hidden]."""
    gate, up = ops.grouped_linear(rows, gate_up, counts, kernels).chunk(2, dim=-1)  # [n, ffn] each
    return ops.grouped_linear(ops.swiglu(gate, up, kernels), down, counts, kernels)


def combine(outputs: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Expert outputs [T k, hidden] in `order` -> the router-weighted sum over each token's k experts [T, hidden]."""
    tokens, top_k = weights.shape
    by_token = outputs.new_empty(outputs.shape).index_copy(0, order, outputs)  # [T k, hidden], (token, slot) order
    by_token = by_token.view(tokens, top_k, -1)  # [T, k, hidden]
    return (by_token * weights.unsqueeze(-1)).sum(dim=1)  # [T, hidden]


class GroupedExperts(nn.Module):
    """E SwiGLU experts with stacked weights, run as one grouped computation (see the module doc)."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_size: int, kernels: KernelOptions) -> None:
        super().__init__()
        self.kernels = kernels
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * ffn_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_size))
        if not self.down_proj.is_meta:  # as nn.Linear: usable once built (the model re-initialises with its std)
            self.reset_parameters()

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Tokens x [T, hidden] and their routing -> the weighted sum of their experts' outputs [T, hidden]."""
        top_k = routing.experts.shape[1]
        order, counts = sort_by_expert(routing.experts, self.gate_up_proj.shape[0])
        rows = x[order // top_k]  # [T k, hidden]: each token once per chosen expert, grouped by expert
        outputs = expert_swiglu(rows, counts, self.gate_up_proj, self.down_proj, self.kernels)  # [T k, hidden]
        return combine(outputs, order, routing.weights)

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.gate_up_proj, mean=0.0, std=std)
        nn.init.normal_(self.down_proj, mean=0.0, std=std)

    def hf_tensors(self, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF on-disk name, view of the stacked weight) per expert: `{prefix}.{i}.gate_proj/up_proj/down_proj.weight`.

        Views share storage with the parameters, so copying into them loads the experts in place.
        """
        ffn = self.down_proj.shape[2]
        for i, (gate_up, down) in enumerate(zip(self.gate_up_proj.detach(), self.down_proj.detach(), strict=True)):
            yield f"{prefix}.{i}.gate_proj.weight", gate_up[:ffn]  # [ffn, hidden]
            yield f"{prefix}.{i}.up_proj.weight", gate_up[ffn:]  # [ffn, hidden]
            yield f"{prefix}.{i}.down_proj.weight", down  # [hidden, ffn]


def tokens_per_expert(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Chosen experts [b, s, k] -> float32 assignments per sequence and expert [b, E]."""
    b = experts.shape[0]
    flat = experts.reshape(b, -1)  # [b, s k]
    counts = torch.zeros(b, num_experts, dtype=torch.float32, device=experts.device)
    return counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float32))


def load_balancing_loss(
    probs: torch.Tensor, counts: torch.Tensor, mode: str, top_k: int, global_load: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch load-balancing loss E * sum_e f_e P_e (float32 scalar) of one layer; see the module doc.

    probs [b, s, E] float32 router probabilities, counts [b, E] assignments per sequence; `global_load` [E]
    (assignments over the global batch) is used by "global_aux_loss" in place of this batch's.
    """
    _, s, num_experts = probs.shape
    if mode == "none":
        return probs.new_zeros(())
    if mode == "seq_aux_loss":
        f = counts / (top_k * s)  # [b, E]
        return num_experts * (f * probs.mean(dim=1)).sum(dim=-1).mean()
    if mode == "aux_loss":
        load = counts.sum(dim=0)  # [E]
    elif mode == "global_aux_loss":
        load = counts.sum(dim=0) if global_load is None else global_load  # [E]
    else:
        raise ValueError(f"unknown load-balancing type {mode!r}")
    f = load / load.sum()  # [E]: the k T assignments' shares
    return num_experts * (f * probs.mean(dim=(0, 1))).sum()


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on `output`; its backward also sends gradient 1 into `aux_loss` (the loss joins backward())."""

    @staticmethod
    def forward(ctx: Any, output: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (aux_loss,) = ctx.saved_tensors
        return grad, torch.ones_like(aux_loss)


class MoEMLP(nn.Module):
    """The MLP of a MoE layer: `gate` routes, `experts` compute and combine, the load-balancing loss joins backward."""

    def __init__(self, config: Qwen3MoeConfig, kernels: KernelOptions) -> None:
        super().__init__()
        self.gate = Router(config.hidden_size, config.num_experts, config.num_experts_per_tok, config.norm_topk_prob)
        self.experts = GroupedExperts(config.num_experts, config.hidden_size, config.moe_intermediate_size, kernels)
        self.load_balancing = config.moe_router_load_balancing_type
        self.aux_loss_coef = config.router_aux_loss_coef
        self.aux_loss_scale = 1.0
        self.global_expert_load: ExpertLoad | None = None
        self.stats: RouterStats | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        tokens = x.reshape(b * s, h)  # [T, hidden]
        routing = self.gate(tokens)
        out = self.experts(tokens, routing).view(b, s, h)  # [T, hidden] -> [b, s, hidden]
        num_experts = routing.probs.shape[-1]
        chosen = routing.experts.view(b, s, -1)  # [T, k] -> [b, s, k]
        counts = tokens_per_expert(chosen, num_experts)  # [b, E]
        load = counts.sum(dim=0)  # [E]
        global_load = None
        if self.load_balancing == "global_aux_loss" and self.global_expert_load is not None:
            global_load = self.global_expert_load(load)
        probs = routing.probs.view(b, s, num_experts)  # [T, E] -> [b, s, E]
        loss = load_balancing_loss(probs, counts, self.load_balancing, chosen.shape[-1], global_load)
        self.stats = RouterStats(load, probs.detach().mean(dim=(0, 1)), loss.detach())
        if self.load_balancing != "none" and self.aux_loss_coef > 0 and torch.is_grad_enabled():
            out = _AttachAuxLoss.apply(out, loss * (self.aux_loss_coef * self.aux_loss_scale))
        return out


def moe_layers(model: nn.Module) -> dict[str, MoEMLP]:
    """Every MoE MLP under `model`, by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, MoEMLP)}


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """Scale the load-balancing gradients of every MoE layer (the factor the trainer gives this micro batch's loss)."""
    for layer in moe_layers(model).values():
        layer.aux_loss_scale = scale


def aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum over MoE layers of router_aux_loss_coef x their last load-balancing loss (detached); None without any."""
    losses = [layer.aux_loss_coef * layer.stats.load_balancing_loss for layer in moe_layers(model).values()
              if layer.stats is not None]
    return torch.stack(losses).sum() if losses else None

