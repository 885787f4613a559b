"""Causal-LM cross entropy, from full logits or fused with the LM head over chunks of tokens.

Labels are ALREADY ALIGNED to positions (labels[..., t] is the target of position t, the Megatron
convention our data pipeline produces); entries equal to -100 are ignored. Reductions: "mean" over
the non-ignored labels (NaN when all are ignored), or "sum".

`chunked_lm_head_loss` never holds the logits of more than `chunk_tokens` tokens: with Qwen3's
151,936-word vocabulary the full float32 logits (and the softmax saved for backward) are the largest
activations of the model. It computes the gradients of hidden states and LM-head weight chunk by
chunk inside the forward pass (the softmax of a chunk is at hand there), keeps those two
(hidden-sized and weight-sized) tensors, and its backward only scales them by the incoming gradient.
That costs the same three vocab-sized matmuls per token as the plain path, where recomputing the
logits in backward would cost a fourth. When no gradient is wanted (no_grad, eval) it computes the
loss alone.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

from qwen3_pretrain.model import kernels

IGNORE_INDEX = -100
LossReduction = Literal["mean", "sum"]
REDUCTIONS: tuple[str, ...] = ("mean", "sum")


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"loss reduction {reduction!r} is not supported; use one of {', '.join(REDUCTIONS)}")


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: LossReduction = "mean") -> torch.Tensor:
    """Float32 cross entropy of logits [b, s, vocab] against aligned labels [b, s], -100 ignored.

    HF's `labels=input_ids` corresponds to `labels = cat(input_ids[:, 1:], -100)` here.
    """
    _check_reduction(reduction)
    return F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction
    )  # logits [b * s, vocab], labels [b * s]


def chunked_lm_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int,
    reduction: LossReduction = "mean",
) -> torch.Tensor:
    """`causal_lm_loss(hidden @ weight.T, labels, reduction)` with the logits of at most `chunk_tokens` tokens alive.

    hidden [..., hidden_size], weight [vocab, hidden_size] (the LM head), labels [...] (hidden's
    leading shape). The matmuls run in the autocast dtype when autocast is on for hidden's device,
    else in hidden's dtype, as `nn.Linear` would; where `kernels.bf16_via_float32` says so, bf16 runs
    as float32 matmuls of the bf16-rounded weight and hidden states, all else in float32. Softmax and
    loss in float32. Plain tensors only (a vocab-sharded DTensor head needs the plain path under
    `loss_parallel`).
    """
    _check_reduction(reduction)
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match hidden states {tuple(hidden.shape)}")
    operand_dtype = kernels.compute_dtype(hidden)
    compute_dtype = torch.float32 if kernels.bf16_via_float32(hidden.device, operand_dtype) else operand_dtype
    with torch.autocast(hidden.device.type, enabled=False):
        return _ChunkedLinearCrossEntropy.apply(
            hidden.flatten(0, -2), weight, labels.flatten(),  # [n, hidden_size], [vocab, hidden_size], [n]
            chunk_tokens, reduction, operand_dtype, compute_dtype, torch.is_grad_enabled(),
        )


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """loss(hidden [n, h] @ weight [v, h].T, labels [n]); gradients computed per chunk in forward."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        chunk_tokens: int,
        reduction: str,
        operand_dtype: torch.dtype,
        compute_dtype: torch.dtype,
        grad_enabled: bool,
    ) -> torch.Tensor:
        want_hidden_grad = grad_enabled and ctx.needs_input_grad[0]
        want_weight_grad = grad_enabled and ctx.needs_input_grad[1]
        w = weight.to(operand_dtype).to(compute_dtype)  # rounded to the operand dtype, computed in compute_dtype
        valid = labels != IGNORE_INDEX  # [n]
        targets = labels.masked_fill(~valid, 0).unsqueeze(1)  # [n, 1], ignored rows point at word 0
        # d(loss)/d(logit) of each token carries the reduction's factor: 1 / (non-ignored count) or 1.
        token_weight = valid.float() / valid.sum() if reduction == "mean" else valid.float()  # [n]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden_grad else None
        grad_weight: torch.Tensor | None = None  # float32 [v, h], from the first chunk's product (no zero fill)
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            h = hidden[rows].to(operand_dtype).to(compute_dtype)  # [c, h]
            row_weight = token_weight[rows]  # [c]
            log_probs = (h @ w.T).float().log_softmax(dim=-1)  # [c, v]: one fused pass, no separate logsumexp
            loss -= (log_probs.gather(1, targets[rows]).squeeze(1) * row_weight).sum()
            if not (want_hidden_grad or want_weight_grad):
                continue
            grad_logits = log_probs.exp_()  # softmax [c, v], in place
            grad_logits.scatter_add_(1, targets[rows], torch.full_like(row_weight, -1.0).unsqueeze(1))
            # softmax - one_hot [c, v]; the token weights scale the small [c, h] side instead of this one
            grad_logits = grad_logits.to(compute_dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = (grad_logits @ w) * row_weight.unsqueeze(1)  # [c, h]
            if want_weight_grad:
                h = h * row_weight.unsqueeze(1).to(compute_dtype)  # [c, h]
                if grad_weight is None:
                    grad_weight = (grad_logits.T @ h).float()  # [v, h]
                elif grad_weight.dtype == compute_dtype:
                    grad_weight.addmm_(grad_logits.T, h)  # [v, h]
                else:
                    grad_weight += grad_logits.T @ h  # [v, h], rounded per chunk, summed in float32
        ctx.grads = (grad_hidden, grad_weight)  # plain attributes: freed by the one backward that uses them
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.grads is None:
            raise RuntimeError(
                "a second backward through the chunked LM-head loss (retain_graph=True) is not supported: its "
                "gradients are released by the first; set model.loss_chunk_tokens = None to use the plain logits path"
            )
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_loss)  # in place: no second hidden- or weight-sized buffer
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None
