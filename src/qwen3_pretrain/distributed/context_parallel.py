"""Context parallelism (`--context-parallel-size C`, `--context-parallel-algo`): attention over a sequence split
across the C ranks of the "cp" mesh dim, installed from outside on each `Attention.core_attention`.

Every other op of a block is per token, so only attention needs the other ranks' tokens. Two algorithms
(MindSpeed's names):

- ``megatron_cp_algo`` (ring attention): the sequence is cut into 2C chunks and rank i holds chunks i and
  2C-1-i (Megatron's load balance for causal attention: every rank then does the same work). K/V blocks go
  around the CP ring with P2P sends (overlapped with the block's compute); each rank merges its partial
  outputs by their log-sum-exp. Chunk pairs wholly in the future are skipped, wholly in the past run
  unmasked, the diagonal ones causal. Backward re-runs the ring (nothing but q, k, v, the output and its
  log-sum-exp is saved), sending each K/V block's gradient along with it, home after C steps. The blocks run
  `attention_blocks` (torch's fused flash kernel on CPU, float32 math elsewhere) whatever `--attention-backend`.
- ``ulysses_cp_algo`` (DeepSpeed-Ulysses): contiguous shards; an all-to-all trades the sequence shard for a
  shard of 1/C of the heads, a full causal `kernels.attention` runs on it, and a second all-to-all trades back.
  Needs heads % C == 0. When C does not divide the KV heads, each KV head is repeated C / gcd(kv_heads, C)
  times before the all-to-all (GQA grouping preserved; the repeats' gradients sum back).

Both support document masking (`document_ids`, `--reset-attention-mask`; the ids of all ranks are
all-gathered) and any position ids (`--reset-position-ids`): rotary positions are the tokens' global
positions, which the caller passes with its shard (`shard_sequence`); causality is by sequence index.
Layout: q/k/v [batch, local seq, heads, head_dim] as `kernels.attention` takes them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from qwen3_pretrain.config.layout import CP_ALGOS_IMPLEMENTED as CP_ALGOS
from qwen3_pretrain.config.layout import RING_CP_ALGO as RING
from qwen3_pretrain.config.layout import context_parallel_chunks
from qwen3_pretrain.distributed.attention_blocks import block_backward, block_forward, finite_lse
from qwen3_pretrain.model import kernels as ops
from qwen3_pretrain.model.kernels import KernelOptions
from qwen3_pretrain.model.layers import Attention

# ---- which tokens a rank holds -----------------------------------------------------------------------


def ring_chunks(rank: int, cp: int) -> tuple[int, int]:
    """The two of the 2C sequence chunks that CP rank `rank` holds under the ring algorithm."""
    return rank, 2 * cp - 1 - rank


def shard_indices(seq_len: int, rank: int, cp: int, algo: str) -> torch.Tensor:
    """Global sequence indices [seq_len / cp] of the tokens CP rank `rank` holds, in its local order."""
    if algo not in CP_ALGOS:
        raise ValueError(f"unknown context parallel algorithm {algo!r}; use one of {', '.join(CP_ALGOS)}")
    parts = context_parallel_chunks(cp, algo)
    if seq_len % parts:
        raise ValueError(f"sequence length {seq_len} is not divisible by {parts} ({algo} at CP {cp})")
    size = seq_len // parts
    chunks = ring_chunks(rank, cp) if algo == RING else (rank,)
    return torch.cat([torch.arange(c * size, (c + 1) * size) for c in chunks])


def shard_sequence(t: torch.Tensor, rank: int, cp: int, algo: str, dim: int = 1) -> torch.Tensor:
    """The tokens of `t` (sequence on `dim`) that CP rank `rank` holds."""
    return t.index_select(dim, shard_indices(t.shape[dim], rank, cp, algo).to(t.device))


# ---- communication -------------------------------------------------------------------------------


def _gather_sequence(t: torch.Tensor, group: dist.ProcessGroup) -> list[torch.Tensor]:
    """All ranks' [b, s_local] tensors (no gradient), in CP rank order."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


class _Ring:
    """Sends to the next CP rank and receives from the previous one, started now and waited on later."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        self.group = group
        self.next = dist.get_global_rank(group, (rank + 1) % size)
        self.prev = dist.get_global_rank(group, (rank - 1) % size)

    def shift(self, tensors: list[torch.Tensor]) -> Callable[[], list[torch.Tensor]]:
        """Start passing `tensors` on; the returned call waits and gives the tensors from the previous rank."""
        tensors = [t.contiguous() for t in tensors]
        received = [torch.empty_like(t) for t in tensors]
        ops_ = [dist.P2POp(dist.isend, t, self.next, self.group) for t in tensors]
        ops_ += [dist.P2POp(dist.irecv, r, self.prev, self.group) for r in received]
        works = dist.batch_isend_irecv(ops_)

        def wait() -> list[torch.Tensor]:
            for work in works:
                work.wait()
            return received

        return wait


class _AllToAll(torch.autograd.Function):
    """all_to_all_single over dim 0 (split evenly over the group); its gradient is the reverse all-to-all."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _all_to_all(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_to_all(grad, ctx.group), None


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """all_to_all_single of a contiguous copy (an empty_like of a permuted view would keep its strides)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


# ---- ring attention ------------------------------------------------------------------------------


def _pair_mask(
    q_chunk: int, k_chunk: int, q_docs: torch.Tensor | None, k_docs: torch.Tensor | None, size: int
) -> tuple[bool, bool, torch.Tensor | None]:
    """(whether chunk pair (q, k) needs computing, whether it is plain causal, its mask [b, 1, cq, ck] or None).

    A pair wholly in the future is skipped, one in the past attends everywhere, a diagonal one causally; document
    ids turn the causal / full pattern into an explicit mask (True = attend).
    """
    if q_chunk < k_chunk:
        return False, False, None
    diagonal = q_chunk == k_chunk
    if q_docs is None or k_docs is None:
        return True, diagonal, None
    allowed = q_docs[:, :, None] == k_docs[:, None, :]  # [b, cq, ck]
    if diagonal:
        allowed = allowed & torch.ones(size, size, dtype=torch.bool, device=allowed.device).tril()
    return True, False, allowed.unsqueeze(1)  # [b, 1, cq, ck]


def _chunk_pairs(q_rank: int, kv_rank: int, cp: int, c: int) -> list[tuple[tuple[int, slice], tuple[int, slice]]]:
    """((q chunk, its local slice), (kv chunk, its local slice)) for the four chunk pairs of two ranks' blocks."""
    halves = (slice(0, c), slice(c, 2 * c))
    q_side = list(zip(ring_chunks(q_rank, cp), halves, strict=True))
    kv_side = list(zip(ring_chunks(kv_rank, cp), halves, strict=True))
    return [(qp, kp) for qp in q_side for kp in kv_side]


def _docs(docs: list[torch.Tensor] | None, rank: int, half: slice) -> torch.Tensor | None:
    """Document ids [b, c] of one local chunk of `rank`, or None without document masking."""
    return None if docs is None else docs[rank][:, half]


def _heads_first(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[b, s, n, d] -> float32 [b, heads, s, d], each of the n (KV) heads repeated heads / n times (GQA)."""
    return t.float().transpose(1, 2).repeat_interleave(heads // t.shape[2], dim=1)  # [b, heads, s, d]


def _sum_groups(t: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Gradients [b, heads, s, d] of repeated KV heads -> [b, s, kv_heads, d], summed over each head's group."""
    b, h, s, d = t.shape
    return t.view(b, kv_heads, h // kv_heads, s, d).sum(2).transpose(1, 2)  # [b, s, kv_heads, d]


class _RingAttention(torch.autograd.Function):
    """Causal GQA over the 2C-chunk layout with K/V passed around the ring (see the module doc).

    The two local chunks are the halves of the local sequence; `docs` holds every rank's document ids
    [b, s_local] (or is None). Blocks run in float32 (`attention_blocks`); saved for backward are q, k, v,
    the output (in q's dtype) and the float32 lse.
    """

    @staticmethod
    def forward(
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, docs: list[torch.Tensor] | None,
        group: dist.ProcessGroup,
    ) -> torch.Tensor:
        rank, cp, ring = dist.get_rank(group), dist.get_world_size(group), _Ring(group)
        heads, c = q.shape[2], q.shape[1] // 2
        qh = _heads_first(q, heads)  # [b, heads, s, d]
        kv = torch.stack((k, v))  # [2, b, s, kv_heads, d]
        out = torch.zeros_like(qh)  # [b, heads, s, d]
        lse = torch.full(qh.shape[:-1], float("-inf"), device=q.device)  # [b, heads, s]
        for step in range(cp):
            src = (rank - step) % cp
            receive = ring.shift([kv]) if step < cp - 1 else None  # the next block travels while this one computes
            kh, vh = (_heads_first(t, heads) for t in kv)  # [b, heads, s, d]
            for (qc, qs), (kc, ks) in _chunk_pairs(rank, src, cp, c):
                run, causal, allowed = _pair_mask(qc, kc, _docs(docs, rank, qs), _docs(docs, src, ks), c)
                if not run:
                    continue
                part, part_lse = block_forward(qh[:, :, qs], kh[:, :, ks], vh[:, :, ks], scale, causal, allowed)
                new_lse = torch.logaddexp(lse[:, :, qs], part_lse)  # [b, heads, c]
                keep, add = (torch.exp(x - finite_lse(new_lse)).unsqueeze(-1) for x in (lse[:, :, qs], part_lse))
                out[:, :, qs] = out[:, :, qs] * keep + part * add
                lse[:, :, qs] = new_lse
            if receive is not None:
                (kv,) = receive()
        result = out.transpose(1, 2).to(q.dtype).contiguous()  # [b, s, heads, d]
        ctx.save_for_backward(q, k, v, result, lse)
        ctx.scale, ctx.docs, ctx.group = scale, docs, group
        return result

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        group, scale, docs = ctx.group, ctx.scale, ctx.docs
        rank, cp, ring = dist.get_rank(group), dist.get_world_size(group), _Ring(group)
        heads, kv_heads, c = q.shape[2], k.shape[2], q.shape[1] // 2
        qh, oh, doh = (_heads_first(t, heads) for t in (q, out, grad_out))  # [b, heads, s, d]
        dq = torch.zeros_like(qh)
        kv = torch.stack((k, v))  # [2, b, s, kv_heads, d]
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)  # gradient of the K/V block held
        for step in range(cp):
            src = (rank - step) % cp
            receive_kv = ring.shift([kv]) if step < cp - 1 else None  # K/V travel while this block computes
            kh, vh = (_heads_first(t, heads) for t in kv)  # [b, heads, s, d]
            dk, dv = torch.zeros_like(kh), torch.zeros_like(vh)
            for (qc, qs), (kc, ks) in _chunk_pairs(rank, src, cp, c):
                run, causal, allowed = _pair_mask(qc, kc, _docs(docs, rank, qs), _docs(docs, src, ks), c)
                if not run:
                    continue
                grads = block_backward(doh[:, :, qs], qh[:, :, qs], kh[:, :, ks], vh[:, :, ks], oh[:, :, qs],
                                       lse[:, :, qs], scale, causal, allowed)
                dq[:, :, qs] += grads[0]
                dk[:, :, ks] += grads[1]
                dv[:, :, ks] += grads[2]
            dkv = dkv + torch.stack((_sum_groups(dk, kv_heads), _sum_groups(dv, kv_heads)))  # [2, b, s, kv, d]
            (dkv,) = ring.shift([dkv])()  # the gradient follows its K/V block and is home after C shifts
            if receive_kv is not None:
                (kv,) = receive_kv()
        return dq.transpose(1, 2).to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


def ring_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, group: dist.ProcessGroup,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal GQA of this rank's two ring chunks against the whole sequence: [b, s_local, heads, d] out."""
    if q.shape[1] % 2:
        raise ValueError(f"ring attention needs an even local sequence (two chunks), got {q.shape[1]}")
    docs = None if document_ids is None else _gather_sequence(document_ids, group)
    dtype = ops.compute_dtype(q)
    with torch.autocast(q.device.type, enabled=False):
        out = _RingAttention.apply(q, k, v, scale, docs, group)
    return out.to(dtype)


# ---- Ulysses -------------------------------------------------------------------------------------


def _sequence_to_heads(t: torch.Tensor, group: dist.ProcessGroup, cp: int) -> torch.Tensor:
    """[b, s/C, n, d] sequence shard -> [b, s, n/C, d] head shard."""
    b, s, n, d = t.shape
    t = t.reshape(b, s, cp, n // cp, d).permute(2, 0, 1, 3, 4)  # [C (head group), b, s/C, n/C, d]
    t = _AllToAll.apply(t, group)  # [C (sequence shard), b, s/C, n/C, d]
    return t.permute(1, 0, 2, 3, 4).reshape(b, cp * s, n // cp, d)  # [b, s, n/C, d]


def _heads_to_sequence(t: torch.Tensor, group: dist.ProcessGroup, cp: int) -> torch.Tensor:
    """[b, s, n/C, d] head shard -> [b, s/C, n, d] sequence shard (the inverse of `_sequence_to_heads`)."""
    b, s, n, d = t.shape
    t = t.reshape(b, cp, s // cp, n, d).transpose(0, 1)  # [C (sequence shard), b, s/C, n/C, d]
    t = _AllToAll.apply(t, group)  # [C (head group), b, s/C, n/C, d]
    return t.permute(1, 2, 0, 3, 4).reshape(b, s // cp, cp * n, d)  # [b, s/C, n, d]


def ulysses_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, group: dist.ProcessGroup,
    options: KernelOptions, document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal GQA of this rank's contiguous shard via two all-to-alls around `kernels.attention`."""
    cp, heads, kv_heads = dist.get_world_size(group), q.shape[2], k.shape[2]
    if heads % cp:
        raise ValueError(f"ulysses_cp_algo needs the (TP-local) attention heads {heads} divisible by CP {cp}")
    repeats = cp // math.gcd(kv_heads, cp)
    if repeats > 1:  # KV replication so every rank gets whole KV heads for its query heads
        k, v = k.repeat_interleave(repeats, dim=2), v.repeat_interleave(repeats, dim=2)  # [b, s/C, kv * r, d]
    q, k, v = (_sequence_to_heads(t, group, cp) for t in (q, k, v))
    docs = None if document_ids is None else torch.cat(_gather_sequence(document_ids, group), dim=1)  # [b, s]
    out = ops.attention(q, k, v, scale, options, document_ids=docs)  # [b, s, heads / C, d]
    return _heads_to_sequence(out, group, cp)


# ---- installing ----------------------------------------------------------------------------------


class ContextParallelAttention:
    """The `Attention.core_attention` replacement: `kernels.attention`'s signature, run with `algo` over `group`."""

    def __init__(self, algo: str, group: dist.ProcessGroup) -> None:
        if algo not in CP_ALGOS:
            raise ValueError(f"unknown context parallel algorithm {algo!r}; use one of {', '.join(CP_ALGOS)}")
        self.algo, self.group = algo, group

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, options: KernelOptions,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.algo == RING:
            return ring_attention(q, k, v, scale, self.group, document_ids)
        return ulysses_attention(q, k, v, scale, self.group, options, document_ids)


def apply_context_parallel(model: nn.Module, algo: str, group: dist.ProcessGroup) -> None:
    """Make every attention block of `model` attend over the sequence shards of the ranks in `group`."""
    attention = ContextParallelAttention(algo, group)
    for module in model.modules():
        if isinstance(module, Attention):
            module.core_attention = attention
