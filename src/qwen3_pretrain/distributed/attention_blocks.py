"""Attention of one query block against one key/value block, with the log-sum-exp of every query row, and its
backward given the output and log-sum-exp of the WHOLE row: the two pieces ring attention is made of.

`block_forward` returns the block's normalised output and lse; merging blocks by their lse gives the attention
over all of them. `block_backward` takes the final output and lse of the query rows (so exp(score - lse) is the
row's true probability) and returns this block's share of dq, dk, dv: the flash-attention backward.

Two kernels, same numbers (`fused`, default: on CPU): torch's fused CPU flash attention
(`_scaled_dot_product_flash_attention_for_cpu` and its backward, which never hold a [queries, keys] matrix), or
the plain math in float32 (scores, probabilities and their gradients of one block pair at a time) elsewhere.
Layout: q, out [b, heads, sq, d]; k, v [b, heads, sk, d] (KV heads already repeated per query head); lse
[b, heads, sq] float32. `causal` means the lower-triangular mask of a diagonal block; `allowed` ([b or 1, 1, sq,
sk], True = attend, causality included) is an arbitrary mask instead (document masking). A row with nothing
allowed has lse = -inf and out 0.
"""

from __future__ import annotations

import torch

_NO_DROPOUT = 0.0


def _fused(fused: bool | None, q: torch.Tensor) -> bool:
    """Whether to run torch's fused CPU kernel: as asked, by default for CPU tensors."""
    return q.device.type == "cpu" if fused is None else fused


def finite_lse(lse: torch.Tensor) -> torch.Tensor:
    """lse with -inf (a row with nothing to attend) replaced by 0, so exp(score - lse) is 0 there, not NaN."""
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def _math_allowed(
    causal: bool, allowed: torch.Tensor | None, sq: int, sk: int, device: torch.device
) -> torch.Tensor | None:
    """The boolean mask the math kernel applies ([sq, sk] lower triangle for `causal`), or None for none."""
    if causal:
        return torch.ones(sq, sk, dtype=torch.bool, device=device).tril()  # [sq, sk]
    return allowed


def _math_scores(
    q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool, allowed: torch.Tensor | None
) -> torch.Tensor:
    """Scores [b, heads, sq, sk] in float32, -inf where masked."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [b, heads, sq, sk]
    mask = _math_allowed(causal, allowed, q.shape[2], k.shape[2], q.device)
    return s if mask is None else s.masked_fill(~mask, float("-inf"))


def _flash_mask(allowed: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """`allowed` as the additive mask (0 / -inf, in the inputs' dtype) the CPU flash kernel takes."""
    if allowed is None:
        return None
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))


def block_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool, allowed: torch.Tensor | None,
    fused: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [b, heads, sq, d] float32, lse [b, heads, sq] float32) of q's rows over this key block."""
    if _fused(fused, q):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, _NO_DROPOUT, causal, attn_mask=_flash_mask(allowed, q.dtype), scale=scale
        )
        if allowed is not None:  # the kernel reports lse 0 for a row with nothing allowed
            lse = lse.masked_fill(~allowed.any(-1), float("-inf"))  # [b, heads, sq]
        return out.float(), lse
    s = _math_scores(q, k, scale, causal, allowed)
    lse = torch.logsumexp(s, dim=-1)  # [b, heads, sq]
    return torch.matmul(torch.exp(s - finite_lse(lse)[..., None]), v.float()), lse  # [b, heads, sq, d]


def block_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    scale: float, causal: bool, allowed: torch.Tensor | None, fused: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This block's (dq, dk, dv) in float32, given the rows' final `out` and `lse` (finite for every row)."""
    if _fused(fused, q):
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, _NO_DROPOUT, causal, attn_mask=_flash_mask(allowed, q.dtype), scale=scale
        )
        return dq.float(), dk.float(), dv.float()
    p = torch.exp(_math_scores(q, k, scale, causal, allowed) - lse[..., None])  # [b, heads, sq, sk]
    do = grad_out.float()
    dv = torch.matmul(p.transpose(-1, -2), do)  # [b, heads, sk, d]
    delta = (do * out.float()).sum(-1, keepdim=True)  # [b, heads, sq, 1]: rowsum(dO * O)
    ds = p * (torch.matmul(do, v.float().transpose(-1, -2)) - delta)  # [b, heads, sq, sk]
    return torch.matmul(ds, k.float()) * scale, torch.matmul(ds.transpose(-1, -2), q.float()) * scale, dv
