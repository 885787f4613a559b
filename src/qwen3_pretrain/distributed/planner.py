"""Layout planner: memory per device and step time for (tp, pp, dp, micro batch, recompute) layouts.

The memory model counts what our implementation keeps alive at the peak of a step, per device:
- weights, gradients and AdamW states of the device's parameters: fp32 master weights + fp32 grads
  + two fp32 moments, sharded over dp by FSDP2 (replicated with `no_shard`), plus the compute
  copies: FSDP2's unsharded root parameters (embedding, head, final norm; kept from forward to the
  end of backward) and two unsharded blocks (one computing, one prefetched); with `no_shard`,
  FSDP2's replicate keeps the unsharded copy of every weight through the step, and one process
  with bf16/fp16 autocast a cast copy of every block weight (of the LM head too on the plain loss path);
- activations saved for backward, per token and layer, counted tensor by tensor for our Qwen3
  block (see `_layer_activation_bytes`; under full recompute only the input of each checkpointed
  group of blocks, and everything for the blocks `--recompute-method block` leaves alone), times the
  tokens in flight: micro batch x seq for each of the `pp - stage` micro batches 1F1B keeps in flight
  on the first stage;
- then the larger of two phases that never overlap: the loss (`logits`: final norm, LM head and
  cross-entropy buffers on the last stage, see `_loss_bytes`) and the backward of one block
  (`backward`: the recomputed block, or the largest group of blocks recomputed at once, plus its MLP
  gradients);
- a fixed runtime overhead (allocator slack, communication buffers, device context).
Gradients count as alive during the forward, as they are from the second micro batch of a step with
gradient accumulation on (with one micro batch per step the estimate is an upper bound).
Qwen3-MoE: FLOPs count the active parameters (top-k experts); a MoE block holds its router and 1/ep of its experts
(expert parallelism over `ep` of the DP ranks; never split by tp), whose weights, gradients and AdamW states FSDP2
shards over the dp / ep ranks holding the same experts; its activations are the k routed copies of each token, their
expert intermediates (k x the expert width, on every tp rank) and the float32 router probabilities.
Context parallelism (`cp` ranks per sequence) divides the tokens each device holds by cp (activations,
loss and backward buffers) and shards weights over dp x cp. Ring attention also keeps each row's float32
log-sum-exp; Ulysses keeps its attention output twice (head-sharded for the attention's backward, sequence-
sharded for o_proj's) and the KV heads repeated when cp does not divide them.
The step-time model is FLOPs (full recompute adds one forward of the recomputed blocks) / (peak x
efficiency) + the tensor-parallel all-reduces and expert-parallel all-to-alls that cannot
overlap + the pipeline bubble; data-parallel (FSDP2) traffic is assumed overlapped except the last layer's, or
what exceeds the compute time (a MoE model without EP all-gathers every expert for every micro batch). Context
parallel traffic: the ring's K/V blocks (and their gradients in backward) overlap with the attention of the
block in hand, so only what exceeds the attention time counts; Ulysses' eight all-to-alls per block do not overlap.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
from dataclasses import dataclass

from qwen3_pretrain.config.layout import (
    RING_CP_ALGO,
    SEQUENCE_PARALLEL_FLAG,
    TP_FLAG,
    ULYSSES_CP_ALGO,
    check_batch_split,
    check_context_parallel,
    check_recompute,
    check_tensor_parallel,
    recompute_groups,
    sequence_parallel_ignored,
    stage_layer_counts,
)
from qwen3_pretrain.config.model import ConfigError, Qwen3Config, Qwen3MoeConfig, get_preset
from qwen3_pretrain.config.moe import check_expert_parallel, check_moe_context_parallel
from qwen3_pretrain.model.qwen3 import DEFAULT_LOSS_CHUNK_TOKENS

GIB = 2**30
P2P_LATENCY_S = 20e-6  # start-up time of one context-parallel message (ring step, all-to-all) on a fast link
RECOMPUTE_CHOICES = ("none", "selective", "full")

# Dense bf16 peaks (TFLOP/s) and per-device interconnect bandwidth (GB/s) of common devices.
DEVICE_SPECS: dict[str, tuple[float, float]] = {
    "h100": (989.0, 450.0),
    "h200": (989.0, 450.0),
    "a100": (312.0, 300.0),
    "910b": (313.0, 196.0),
    "910b4": (280.0, 196.0),
}


@dataclass(frozen=True)
class Layout:
    """One parallel layout of a training job."""

    tp: int
    pp: int
    dp: int
    micro_batch_size: int
    recompute: str = "none"
    sequence_parallel: bool = False
    recompute_method: str | None = None  # with recompute "full": uniform | block (None: every block on its own)
    recompute_num_layers: int | None = None  # blocks per uniform group, or recomputed blocks per stage (block)
    shard: bool = True  # FSDP2 over dp (x cp); False = replicated (DDP-style)
    cp: int = 1  # context parallel ranks per sequence
    cp_algo: str = RING_CP_ALGO
    ep: int = 1  # expert parallel ranks (data-parallel ranks that split a MoE layer's experts)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    @property
    def ulysses(self) -> bool:
        return self.cp > 1 and self.cp_algo == ULYSSES_CP_ALGO


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device, by kind."""

    weights: float
    gradients: float
    optimizer: float
    activations: float  # saved for backward by every block
    logits: float  # final norm, LM head and loss: alive during the loss only
    overhead: float
    backward: float = 0.0  # one block's backward working set (recomputed activations, MLP gradients)

    @property
    def total(self) -> float:
        """The peak: the loss and one block's backward never hold their buffers at the same time."""
        state = self.weights + self.gradients + self.optimizer
        return state + self.activations + max(self.logits, self.backward) + self.overhead

    def as_gib(self) -> dict[str, float]:
        fields = {f.name: getattr(self, f.name) / GIB for f in dataclasses.fields(self)}
        return {**fields, "total": self.total / GIB}


def _block_params(cfg: Qwen3Config, layout: Layout, layer: int) -> tuple[float, float]:
    """(dense, expert) parameters of block `layer` per device: attention, norms and a dense FFN split by tp; a MoE
    block's router whole and its experts (never tp-split) split by ep."""
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    attention = (2 * h * q + 2 * h * kv + 2 * d + 2 * h) / layout.tp
    if not cfg.is_moe_layer(layer):
        return attention + cfg.mlp_parameters(layer) / layout.tp, 0.0
    router = h * cfg.expert_shape()[0]
    return attention + router, (cfg.mlp_parameters(layer) - router) / layout.ep


def _layer_params(cfg: Qwen3Config, layout: Layout) -> float:
    """Parameters of the largest transformer block per device (a MoE block's when the model has experts)."""
    return max(sum(_block_params(cfg, layout, i)) for i in range(cfg.num_hidden_layers))


def _mlp_width(cfg: Qwen3Config, layout: Layout) -> float:
    """Intermediate MLP activations per token and device, averaged over the layers: the FFN width / tp in a dense
    layer, top-k x the expert width in a MoE layer (each token's rows run through its k experts, on every tp rank)."""
    _, top_k, expert_ffn = cfg.expert_shape()
    widths = [cfg.intermediate_size / layout.tp if not cfg.is_moe_layer(i) else top_k * expert_ffn
              for i in range(cfg.num_hidden_layers)]
    return sum(widths) / len(widths)


def _moe_routing_bytes(cfg: Qwen3Config, compute_bytes: int) -> float:
    """Bytes per token a MoE layer keeps besides its experts' intermediates, averaged over the layers: the float32
    router probabilities and the k routed copies of the token going in and coming out (`model.moe`)."""
    moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)) / cfg.num_hidden_layers
    experts, top_k, _ = cfg.expert_shape()
    return moe * (4 * experts + 2 * top_k * compute_bytes * cfg.hidden_size)


def _head_params(cfg: Qwen3Config, layout: Layout) -> int:
    """Parameters outside the blocks on the most loaded stage: embedding, LM head, final norm."""
    embedding = cfg.vocab_size * cfg.hidden_size
    if layout.pp == 1:
        return embedding * (1 if cfg.tie_word_embeddings else 2) + cfg.hidden_size
    return embedding + cfg.hidden_size  # the last stage: the LM head (its own copy when tied) + final norm


def _stage_params(cfg: Qwen3Config, layout: Layout) -> tuple[float, float]:
    """(dense, expert) parameters held by the most loaded device (first stage; last stage when it is heavier)
    before data-parallel sharding; a stage's blocks counted as the model's average block."""
    layers = math.ceil(cfg.num_hidden_layers / layout.pp)
    blocks = [_block_params(cfg, layout, i) for i in range(cfg.num_hidden_layers)]
    dense, experts = (layers * sum(part) / len(blocks) for part in zip(*blocks, strict=True))
    return dense + _head_params(cfg, layout) / layout.tp, experts


def _norm_bytes(cfg: Qwen3Config, layout: Layout, compute_bytes: int) -> float:
    """Bytes per token an RMSNorm feeding column-parallel linears keeps for backward.

    The norm keeps its fp32 input and its normalised output (4 + c bytes per element) and the
    linears keep its scaled output (c). With sequence parallelism the norm runs on the local
    sequence shard, but the linears keep the all-gathered, full-sequence output.
    """
    c, h = compute_bytes, cfg.hidden_size
    if layout.sequence_parallel:
        return (4 + c) * h / layout.tp + c * h
    return (4 + 2 * c) * h


def _layer_activation_bytes(cfg: Qwen3Config, layout: Layout, compute_bytes: int) -> float:
    """Bytes saved for backward per token by one block, as our Qwen3 block computes it.

    The two block norms (`_norm_bytes`); q/k norms keep their fp32 input and normalised output on
    q and k; attention keeps q, k (after RoPE), v and its output; the MLP keeps gate, up,
    silu(gate) and their product. Heads and FFN are split by tp.
    """
    c = compute_bytes
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    qk_norms = (4 + c) * (q + kv)
    attention = c * (2 * q + 2 * kv)
    if layout.ulysses:  # the head-sharded output besides o_proj's input; repeated KV heads after the all-to-all
        attention += c * (q + 2 * kv * (_kv_repeats(cfg, layout) - 1))
    elif layout.cp > 1:  # the ring's float32 log-sum-exp per query head
        attention += 4 * cfg.num_attention_heads
    mlp = 4 * c * _mlp_width(cfg, layout) + _moe_routing_bytes(cfg, c)
    return (qk_norms + attention) / layout.tp + mlp + 2 * _norm_bytes(cfg, layout, compute_bytes)


def _kv_repeats(cfg: Qwen3Config, layout: Layout) -> int:
    """How often Ulysses repeats each (TP-local) KV head so that cp divides them (`context_parallel`)."""
    return layout.cp // math.gcd(cfg.num_key_value_heads // layout.tp, layout.cp)


def _projection_bytes(cfg: Qwen3Config, layout: Layout, compute_bytes: int) -> float:
    """Bytes per token of a block's input and its q, k, v, gate and up projection outputs: what a
    selective-recompute block keeps (`recompute._SAVED_OPS`) that the full block keeps too."""
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    block_input = cfg.hidden_size / (layout.tp if layout.sequence_parallel else 1)
    return compute_bytes * (block_input + (q + 2 * kv) / layout.tp + 2 * _mlp_width(cfg, layout))


def _full_recompute_groups(layout: Layout, layers: int) -> list[range]:
    """The groups of a stage's `layers` blocks that full recompute checkpoints (`recompute_groups`)."""
    return recompute_groups(layers, layout.recompute_method, layout.recompute_num_layers)


def _blocks_recomputed_at_once(layout: Layout, layers: int) -> int:
    """Blocks whose forward the backward of a stage of `layers` blocks reruns at once (the largest group)."""
    if layout.recompute != "full":
        return 1
    return max(len(group) for group in _full_recompute_groups(layout, layers))


def _saved_stage_bytes(cfg: Qwen3Config, layout: Layout, compute_bytes: int, layers: int) -> float:
    """Bytes per token that a stage of `layers` blocks keeps for backward under the layout's recompute setting."""
    if layout.recompute == "full":  # the input of every checkpointed group; the other blocks keep everything
        groups = _full_recompute_groups(layout, layers)
        kept = layers - sum(len(group) for group in groups)
        block_input = compute_bytes * cfg.hidden_size / (layout.tp if layout.sequence_parallel else 1)
        return len(groups) * block_input + kept * _layer_activation_bytes(cfg, layout, compute_bytes)
    if layout.recompute == "selective":  # + the o_proj and down_proj outputs (partial sums under tp)
        return layers * (_projection_bytes(cfg, layout, compute_bytes) + 2 * compute_bytes * cfg.hidden_size)
    return layers * _layer_activation_bytes(cfg, layout, compute_bytes)


def _backward_bytes(cfg: Qwen3Config, layout: Layout, compute_bytes: int, layers: int) -> float:
    """Bytes per token a block's backward adds to the saved activations: the gradients of two MLP
    intermediates at once, plus what recompute rematerialises (under full recompute the whole largest
    group of blocks a stage of `layers` recomputes at once, under selective all but the kept projection
    outputs of one block). The blocks that keep their activations come after the recomputed ones
    (`--recompute-method block`), so their backward has freed those before any recompute runs."""
    mlp_grads = 2 * compute_bytes * _mlp_width(cfg, layout)
    full = _layer_activation_bytes(cfg, layout, compute_bytes)
    if layout.recompute == "full":
        kept = layers - sum(len(group) for group in _full_recompute_groups(layout, layers))
        return mlp_grads + max(0, _blocks_recomputed_at_once(layout, layers) - kept) * full
    if layout.recompute == "selective":
        return mlp_grads + full - _projection_bytes(cfg, layout, compute_bytes)
    return mlp_grads


def _loss_bytes(
    cfg: Qwen3Config, layout: Layout, compute_bytes: int, tokens: int, loss_chunk_tokens: int | None,
    weight_copy_bytes: float,
) -> float:
    """Bytes alive on the last stage during the loss of one micro batch of `tokens` tokens.

    The final norm (`_norm_bytes`, its output kept by the LM head), then either the chunked LM
    head + loss (`model.loss`, used without tp: a vocab-sharded head takes the plain path) or the
    plain path. Chunked, per (token, word) of a chunk: the float32 logits and their float32
    log-softmax, and from the second chunk on also the previous chunk's log-softmax, which the loop
    still holds while the next chunk's matmul runs (8 or 12 bytes, in bf16 as in fp32); plus the
    gradients it computes in the forward, the LM-head weight's (float32) and the hidden states'
    (compute dtype), and the copy of the LM-head weight its matmuls read (`_loss_weight_copy_bytes`).
    Plain, per (token, local word), at the start of backward: the saved float32 log-softmax, the
    buffer nll_loss scatters into and the log-softmax gradient (12 bytes), plus the exp() temporary
    of `loss_parallel`'s backward under tp or, in bf16, the gradient's cast to the logits' dtype.
    """
    c, h = compute_bytes, cfg.hidden_size
    final_norm = _norm_bytes(cfg, layout, c) * tokens
    vocab = cfg.vocab_size / layout.tp
    if loss_chunk_tokens is None or not _chunked_loss(layout, loss_chunk_tokens):
        per_logit = 12 + (4 if layout.tp > 1 else 0) + (c if c != 4 else 0)
        return final_norm + per_logit * tokens * vocab
    chunk = min(tokens, loss_chunk_tokens)
    per_logit = 8 if tokens <= loss_chunk_tokens else 12
    return final_norm + per_logit * chunk * vocab + 4 * vocab * h + c * tokens * h + weight_copy_bytes


def _chunked_loss(layout: Layout, loss_chunk_tokens: int | None) -> bool:
    """Whether the loss takes the chunked path (a vocab-sharded head under tp takes the plain one)."""
    return loss_chunk_tokens is not None and layout.tp == 1


def _loss_weight_copy_bytes(
    cfg: Qwen3Config, layout: Layout, compute_bytes: int, master_bytes: int, bf16_float32_matmuls: bool
) -> float:
    """Bytes of the LM-head weight copy the chunked loss casts for its matmuls (`model.loss`).

    The loss reads the weight rounded to the compute dtype, as float32 where bf16 matmuls run on
    float32 units (`bf16_float32_matmuls`), else in the compute dtype. The weight it is given is the
    fp32 master weight in one process, FSDP2's unsharded copy in the compute dtype otherwise; only
    when that already is the dtype and precision the matmuls need is no copy made.
    """
    given = master_bytes if layout.world_size == 1 else compute_bytes
    operand = 4 if bf16_float32_matmuls and compute_bytes == 2 else compute_bytes
    if given == compute_bytes == operand:
        return 0.0
    return operand * cfg.vocab_size * cfg.hidden_size


def estimate_memory(
    cfg: Qwen3Config,
    layout: Layout,
    seq_length: int,
    compute_dtype_bytes: int = 2,
    master_bytes: int = 4,
    overhead_bytes: float = 0.5 * GIB,
    loss_chunk_tokens: int | None = None,
    bf16_float32_matmuls: bool = False,
) -> MemoryEstimate:
    """Peak memory per device of one training step.

    compute_dtype_bytes: 2 for bf16/fp16 compute, 4 for fp32. master_bytes: bytes per stored
    weight/gradient element (fp32 = 4). loss_chunk_tokens: tokens per LM-head chunk when the loss is
    computed in chunks (None = all tokens of the micro batch at once). bf16_float32_matmuls: bf16
    matmuls run as float32 matmuls of rounded operands (`kernels.bf16_via_float32`: CPUs without
    bf16 units).
    """
    c = compute_dtype_bytes
    dense, experts = _stage_params(cfg, layout)
    params = dense + experts
    layers_per_stage = math.ceil(cfg.num_hidden_layers / layout.pp)
    shard = layout.dp * layout.cp if layout.shard else 1
    state = dense / shard + experts / (shard // layout.ep if layout.shard else 1)  # experts: FSDP over dp / ep
    weights = master_bytes * state
    gradients = master_bytes * state
    optimizer = 8 * state
    if layout.world_size == 1:
        if c != master_bytes:  # autocast caches a cast copy of every weight it casts, and backward keeps it:
            # the blocks', and the LM head's on the plain loss path (the embedding lookup casts nothing)
            lm_head = 0 if _chunked_loss(layout, loss_chunk_tokens) else cfg.vocab_size * cfg.hidden_size
            weights += c * (params - _head_params(cfg, layout) + lm_head)
    elif not layout.shard:  # FSDP2's replicate keeps every unsharded compute copy from forward to backward
        weights += c * params
    else:  # FSDP2 gathers unsharded compute copies (even over one dp rank): the root's, kept until the
        # end of backward, and two blocks' (one computing, one prefetched); a recomputed group of blocks
        # stays unsharded from its recompute to each block's backward
        blocks = 1 + _blocks_recomputed_at_once(layout, layers_per_stage)
        weights += c * (_head_params(cfg, layout) / layout.tp + blocks * _layer_params(cfg, layout))
    tokens = layout.micro_batch_size * seq_length // layout.cp  # this device's share of each sequence
    in_flight = layout.pp  # 1F1B: the first stage holds pp micro batches
    activations = _saved_stage_bytes(cfg, layout, c, layers_per_stage) * tokens * in_flight
    weight_copy = _loss_weight_copy_bytes(cfg, layout, c, master_bytes, bf16_float32_matmuls)
    logits = _loss_bytes(cfg, layout, c, tokens, loss_chunk_tokens, weight_copy)
    backward = _backward_bytes(cfg, layout, c, layers_per_stage) * tokens
    return MemoryEstimate(weights, gradients, optimizer, activations, logits, overhead_bytes, backward)


@dataclass(frozen=True)
class TimeEstimate:
    """Seconds per iteration and the derived throughput."""

    step_seconds: float
    tokens_per_second: float
    mfu: float


def estimate_step_time(
    cfg: Qwen3Config,
    layout: Layout,
    seq_length: int,
    global_batch_size: int,
    peak_tflops: float,
    link_gbps: float,
    efficiency: float = 0.6,
) -> TimeEstimate:
    """Step time from FLOPs, the tp all-reduces on the critical path, and the pipeline bubble."""
    tokens = global_batch_size * seq_length
    model_flops = cfg.flops_per_token(seq_length) * tokens
    layers = math.ceil(cfg.num_hidden_layers / layout.pp)
    recompute_factor = 1.05 if layout.recompute == "selective" else 1.0
    if layout.recompute == "full":  # one more forward (a third of forward + backward) of the recomputed blocks
        recompute_factor += sum(len(group) for group in _full_recompute_groups(layout, layers)) / layers / 3
    flops = model_flops * recompute_factor
    compute = flops / layout.world_size / (peak_tflops * 1e12 * efficiency)
    micro_batches = global_batch_size // (layout.micro_batch_size * layout.dp)
    tp_seconds = 0.0
    if layout.tp > 1:
        # 4 all-reduces (or reduce-scatter + all-gather pairs) of b*s*h bf16 per block, fwd + bwd
        volume = 2 * layout.micro_batch_size * seq_length // layout.cp * cfg.hidden_size
        ring = 2 * (layout.tp - 1) / layout.tp * volume / (link_gbps * 1e9)
        tp_seconds = 4 * ring * layers * micro_batches
    cp_block = _cp_block_seconds(cfg, layout, seq_length, peak_tflops * efficiency, link_gbps)
    cp_seconds = layers * micro_batches * cp_block
    dp_seconds = 0.0
    shards = layout.dp * layout.cp
    if shards > 1:  # the last block's gradient reduce-scatter cannot overlap with compute
        grad_bytes = 4 * _layer_params(cfg, layout)
        dp_seconds = (shards - 1) / shards * grad_bytes / (link_gbps * 1e9)
    # FSDP2 traffic hides behind compute until it outlasts it (a MoE model's experts without EP: it gathers them all)
    dp_seconds = max(dp_seconds, _fsdp_bytes(cfg, layout, micro_batches) / (link_gbps * 1e9) - compute)
    ep_seconds = all_to_all_bytes(cfg, layout, seq_length, global_batch_size) / (link_gbps * 1e9)
    bubble = (layout.pp - 1) / (micro_batches + layout.pp - 1) if layout.pp > 1 else 0.0
    step = (compute + tp_seconds + cp_seconds + ep_seconds) / (1 - bubble) + dp_seconds
    ideal = model_flops / layout.world_size / (peak_tflops * 1e12)
    return TimeEstimate(step, tokens / step, ideal / step)


def _fsdp_bytes(cfg: Qwen3Config, layout: Layout, micro_batches: int) -> float:
    """Bytes FSDP2 moves per device and step: per micro batch, every weight all-gathered (bf16) for forward and
    again for backward and its gradient reduce-scattered (fp32), (n - 1) / n of each over the n ranks sharing it
    (dense weights over dp x cp, a MoE layer's experts over the dp / ep ranks holding the same ones)."""
    if not layout.shard:
        return 0.0
    dense, experts = _stage_params(cfg, layout)
    shards, expert_shards = layout.dp * layout.cp, layout.dp * layout.cp // layout.ep
    moved = dense * (shards - 1) / shards + experts * (expert_shards - 1) / expert_shards
    return micro_batches * (2 + 2 + 4) * moved


def all_to_all_bytes(cfg: Qwen3Config, layout: Layout, seq_length: int, global_batch_size: int) -> float:
    """Expert-parallel bytes one device sends per step (`expert_parallel`; none without EP): in every MoE layer of
    its stage, per micro batch, the k routed copies of each token (bf16) go out and come back in forward and their
    gradients in backward, (ep - 1) / ep of them to other ranks (balanced routing). Counted as not overlapped."""
    if layout.ep == 1:
        return 0.0
    layers = math.ceil(cfg.num_hidden_layers / layout.pp)
    moe_layers = layers * sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)) / cfg.num_hidden_layers
    micro_batches = global_batch_size // (layout.micro_batch_size * layout.dp)
    rows = layout.micro_batch_size * seq_length * cfg.expert_shape()[1]
    return 4 * (layout.ep - 1) / layout.ep * rows * 2 * cfg.hidden_size * moe_layers * micro_batches


def _cp_block_seconds(cfg: Qwen3Config, layout: Layout, seq_length: int, tflops: float, link_gbps: float) -> float:
    """Context-parallel communication of one block's forward + backward for one micro batch that compute does not hide.

    Ring: C-1 K/V blocks (bf16) forward; C-1 K/V blocks plus C float32 K/V gradients backward, each step hidden
    behind the attention of the block in hand (its share of 12 x attention dim x seq FLOPs per token). Ulysses:
    all-to-alls of q, k, v and the output forward and of their gradients backward, (C-1)/C of each leaving the rank.
    """
    cp = layout.cp
    if cp == 1:
        return 0.0
    messages = 8 if layout.ulysses else 2 * cp  # all-to-alls, or ring steps forward and backward
    latency = messages * P2P_LATENCY_S
    tokens = layout.micro_batch_size * seq_length / cp  # this rank's tokens of the micro batch
    q = cfg.num_attention_heads * cfg.head_dim / layout.tp
    kv = cfg.num_key_value_heads * cfg.head_dim / layout.tp
    link = link_gbps * 1e9
    if layout.ulysses:
        volume = 2 * (cp - 1) / cp * tokens * 2 * (2 * q + 2 * kv * _kv_repeats(cfg, layout))  # bf16, fwd + bwd
        return volume / link + latency
    kv_block = 2 * tokens * 2 * kv  # k and v of one rank, bf16
    step_bytes = 4 * kv_block  # forward K/V; backward K/V and their float32 gradient (twice the bytes)
    attention_step = 12 * q * seq_length * tokens / cp / (tflops * 1e12)  # fwd + bwd attention of one K/V block
    return cp * max(0.0, step_bytes / link - attention_step) + latency


def validate_layout(
    cfg: Qwen3Config, layout: Layout, global_batch_size: int, seq_length: int | None = None
) -> str | None:
    """The reason this layout is impossible, naming the flag to change, or None (`config.layout`'s rules)."""
    if sequence_parallel_ignored(layout.sequence_parallel, layout.tp):
        return f"{SEQUENCE_PARALLEL_FLAG} does nothing at {TP_FLAG} 1 (train turns it off): plan the layout without it"
    try:
        check_tensor_parallel(cfg, layout.tp)
        if seq_length is not None:
            check_context_parallel(layout.cp, layout.cp_algo, seq_length, layout.tp, layout.sequence_parallel, cfg)
        check_recompute(None if layout.recompute == "none" else layout.recompute, layout.recompute_method,
                        layout.recompute_num_layers)
        stage_layer_counts(cfg.num_hidden_layers, layout.pp)
        check_batch_split(global_batch_size, layout.micro_batch_size, layout.dp)
        check_expert_parallel(cfg.expert_shape()[0], layout.ep, layout.dp, None, layout.cp)
        if isinstance(cfg, Qwen3MoeConfig):
            check_moe_context_parallel(cfg.moe_router_load_balancing_type, cfg.router_aux_loss_coef, layout.cp)
    except ConfigError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class PlanRow:
    layout: Layout
    memory: MemoryEstimate
    time: TimeEstimate
    fits: bool


def enumerate_layouts(devices: int, max_micro_batch: int = 8, num_experts: int = 0) -> list[Layout]:
    """Every (tp, pp, cp and its algorithm, dp, micro batch, recompute) whose product of parallel sizes is `devices`;
    with `num_experts` (a MoE model) also every EP size dividing dp and the experts (without CP)."""
    layouts = []
    powers = [2**i for i in range(int(math.log2(max_micro_batch)) + 1)]
    for tp in _divisors(devices):
        for pp in _divisors(devices // tp):
            for cp in _divisors(devices // (tp * pp)):
                dp = devices // (tp * pp * cp)
                eps = [ep for ep in _divisors(dp) if num_experts % ep == 0] if num_experts and cp == 1 else [1]
                for algo, ep in itertools.product((RING_CP_ALGO, ULYSSES_CP_ALGO) if cp > 1 else (RING_CP_ALGO,), eps):
                    for mbs in powers:
                        for recompute in RECOMPUTE_CHOICES:
                            layouts.append(Layout(tp, pp, dp, mbs, recompute, sequence_parallel=tp > 1, cp=cp,
                                                  cp_algo=algo, ep=ep))
    return layouts


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan(
    cfg: Qwen3Config,
    devices: int,
    device_memory_bytes: float,
    seq_length: int,
    global_batch_size: int,
    peak_tflops: float,
    link_gbps: float,
    loss_chunk_tokens: int | None = None,
) -> list[PlanRow]:
    """All valid layouts with estimates, fitting ones first, fastest first."""
    rows = []
    for layout in enumerate_layouts(devices, num_experts=cfg.expert_shape()[0]):
        if validate_layout(cfg, layout, global_batch_size, seq_length):
            continue
        memory = estimate_memory(cfg, layout, seq_length, loss_chunk_tokens=loss_chunk_tokens)
        time = estimate_step_time(cfg, layout, seq_length, global_batch_size, peak_tflops, link_gbps)
        rows.append(PlanRow(layout, memory, time, memory.total <= device_memory_bytes))
    rows.sort(key=lambda r: (not r.fits, r.time.step_seconds, r.memory.total))
    return rows


def parse_size(text: str) -> float:
    """'32GB', '32GiB', '64g', '8000MB' -> bytes (GB and GiB both read as GiB, as device specs do)."""
    units = {"t": 2**40, "g": 2**30, "m": 2**20, "k": 2**10, "": 1}
    raw = text.strip().lower().removesuffix("b").removesuffix("i")
    unit = raw[-1] if raw and raw[-1] in units else ""
    number = raw[: len(raw) - len(unit)] if unit else raw
    try:
        return float(number) * units[unit]
    except ValueError:
        raise ValueError(f"--device-memory {text!r}: use a size such as 32GB or 80GiB") from None


def _algo_name(layout: Layout) -> str:
    """The table's short name of the CP algorithm: ring, a2a (Ulysses) or - without CP."""
    return "-" if layout.cp == 1 else "a2a" if layout.ulysses else "ring"


def format_table(rows: list[PlanRow], limit: int | None = None) -> str:
    """A fixed-width table of plan rows (with an `ep` column when some layout uses expert parallelism)."""
    ep_header = f" {'ep':>3}" if any(row.layout.ep > 1 for row in rows) else ""
    header = (
        f"{'tp':>3} {'pp':>3} {'cp':>3} {'algo':>4} {'dp':>3}{ep_header} {'mbs':>4} {'recompute':>10} | "
        f"{'weights':>8} {'grads':>7} {'optim':>7} "
        f"{'activ':>7} {'logits':>7} {'bwd':>7} {'total':>7} GiB | {'step s':>7} {'tok/s':>9} {'MFU':>5} | fits"
    )
    lines = [header, "-" * len(header)]
    for row in rows[:limit]:
        m = row.memory.as_gib()
        lay = row.layout
        lines.append(
            f"{lay.tp:>3} {lay.pp:>3} {lay.cp:>3} {_algo_name(lay):>4} {lay.dp:>3}"
            f"{f' {lay.ep:>3}' if ep_header else ''} {lay.micro_batch_size:>4} "
            f"{lay.recompute:>10} | "
            f"{m['weights']:>8.2f} {m['gradients']:>7.2f} {m['optimizer']:>7.2f} {m['activations']:>7.2f} "
            f"{m['logits']:>7.2f} {m['backward']:>7.2f} {m['total']:>7.2f}     | {row.time.step_seconds:>7.2f} "
            f"{row.time.tokens_per_second:>9.0f} {row.time.mfu:>5.1%} | {'yes' if row.fits else 'no'}"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """`qwen3-pretrain plan`: which layouts fit, and the recommended one."""
    parser = argparse.ArgumentParser(prog="qwen3-pretrain plan", description=main.__doc__)
    parser.add_argument("--model", default="qwen3-1.7b", help="preset name or HF directory with config.json")
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--global-batch-size", type=int, default=64)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--device-memory", default="32GB", help="memory per device, e.g. 32GB, 80GB")
    parser.add_argument("--device", default="910b4", help=f"peak/bandwidth preset: {', '.join(DEVICE_SPECS)}")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak per device (overrides --device)")
    parser.add_argument("--link-gbps", type=float, help="per-device interconnect GB/s (overrides --device)")
    parser.add_argument("--loss-chunk-tokens", type=int, default=DEFAULT_LOSS_CHUNK_TOKENS,
                        help="tokens per LM-head loss chunk (the trainer's default)")
    parser.add_argument("--all", action="store_true", help="show every layout, not only the best 25")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    try:
        cfg = _load_model_config(args.model)
        memory = parse_size(args.device_memory)
    except (ConfigError, ValueError) as exc:
        print(f"qwen3-pretrain plan: {exc}", file=sys.stderr)
        return 2
    if args.device.lower() not in DEVICE_SPECS and (args.peak_tflops is None or args.link_gbps is None):
        print(f"qwen3-pretrain plan: unknown --device {args.device!r}; use one of {', '.join(DEVICE_SPECS)} "
              "or give --peak-tflops and --link-gbps", file=sys.stderr)
        return 2
    peak, link = DEVICE_SPECS.get(args.device.lower(), (0.0, 0.0))
    peak, link = args.peak_tflops or peak, args.link_gbps or link
    rows = plan(cfg, args.devices, memory, args.seq_length, args.global_batch_size, peak, link, args.loss_chunk_tokens)
    if not rows:
        print("qwen3-pretrain plan: no valid layout for these sizes", file=sys.stderr)
        return 1
    print(f"{args.model}: {cfg.num_parameters() / 1e9:.2f}B parameters, seq {args.seq_length}, "
          f"global batch {args.global_batch_size}, {args.devices} x {args.device_memory} ({args.device}, "
          f"{peak:.0f} TFLOP/s bf16, {link:.0f} GB/s)")
    print(format_table(rows, None if args.all else 25))
    best = rows[0]
    if best.fits:
        lay = best.layout
        print(f"\nrecommended: --tensor-model-parallel-size {lay.tp} --pipeline-model-parallel-size {lay.pp} "
              f"--micro-batch-size {lay.micro_batch_size}" + (" --sequence-parallel" if lay.sequence_parallel else "")
              + (f" --recompute-granularity {lay.recompute}" if lay.recompute != "none" else "")
              + (f" --context-parallel-size {lay.cp} --context-parallel-algo {lay.cp_algo}" if lay.cp > 1 else "")
              + (f" --expert-model-parallel-size {lay.ep}" if lay.ep > 1 else "")
              + f"  (data parallel {lay.dp}, {best.memory.total / GIB:.1f} GiB per device)")
    else:
        print("\nno layout fits: add devices, use recompute, or a smaller --seq-length", file=sys.stderr)
    if args.json:
        payload = [{"layout": dataclasses.asdict(r.layout), "memory_gib": r.memory.as_gib(),
                    "step_seconds": r.time.step_seconds, "tokens_per_second": r.time.tokens_per_second,
                    "mfu": r.time.mfu, "fits": r.fits} for r in rows]
        with open(args.json, "w") as handle:
            json.dump(payload, handle, indent=1)
    return 0 if best.fits else 1


def _load_model_config(name: str) -> Qwen3Config:
    from pathlib import Path

    return Qwen3Config.from_pretrained(name) if Path(name).is_dir() else get_preset(name)
