"""Qwen3 causal language model in pure PyTorch, with HF module names (its state dict is HF's layout).

Architecture only: the model is built from its config and the `KernelOptions` its blocks keep (which
kernels they run, see `model.kernels`); reading and writing HF checkpoint directories lives in
`checkpoint.hf` (`load_pretrained`, `save_pretrained`). Build big models on the meta device and
materialise them explicitly:

    with torch.device("meta"):
        model = Qwen3ForCausalLM(config, kernels=KernelOptions(attention="flash"))
    model.to_empty(device=device)
    model.tie_weights()   # to_empty replaces every parameter, which unties lm_head from embed_tokens
    model.init_weights(std=0.01)

A pipeline splitter may set `model.embed_tokens`, `model.norm` or `lm_head` to None and delete entries
of `model.layers` (keyed "0".."L-1", so surviving layers keep their HF names); the forward skips what
is absent.

A Qwen3-MoE config (`Qwen3MoeConfig`) gives its MoE layers a `model.moe.MoEMLP`; their load-balancing loss
joins the gradients of `backward()` by itself and its value is read with `model.moe.aux_loss(model)` (see
`model.moe` for why and for the trainer's scale).

Training asks for the loss only, `model(input_ids, labels, return_logits=False, loss_reduction="sum")`:
then the LM head and cross entropy run fused over chunks of `model.loss_chunk_tokens` tokens
(`model.loss.chunked_lm_head_loss`) and the [tokens, vocab] logits never exist whole. Set
`model.loss_chunk_tokens = None` to use the plain logits path (tensor parallelism with
`loss_parallel` does; a DTensor head weight falls back to it by itself).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from typing import NamedTuple

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from qwen3_pretrain.config.model import Qwen3Config
from qwen3_pretrain.model.kernels import DEFAULT_KERNELS, KernelOptions
from qwen3_pretrain.model.layers import DecoderLayer, Linear, RMSNorm, RotaryEmbedding
from qwen3_pretrain.model.loss import IGNORE_INDEX as IGNORE_INDEX  # re-exported: trainer, pipeline
from qwen3_pretrain.model.loss import LossReduction, causal_lm_loss, chunked_lm_head_loss
from qwen3_pretrain.model.moe import GroupedExperts

# Tokens per chunk of the fused LM head + cross entropy: a chunk's float32 logits take
# 4 x 1024 x 151,936 bytes = 0.6 GB for the real vocabulary, instead of 2.5 GB per 4096 tokens.
DEFAULT_LOSS_CHUNK_TOKENS = 1024
LM_HEAD_KEY = "lm_head.weight"
EMBED_KEY = "model.embed_tokens.weight"


class CausalLMOutput(NamedTuple):
    """Logits [b, s, vocab] in the model dtype (None when not asked for) and, with labels, the float32 loss."""

    logits: torch.Tensor | None
    loss: torch.Tensor | None = None


class Qwen3Model(nn.Module):
    """Embedding, decoder layers and final norm (HF `model.*`)."""

    def __init__(self, config: Qwen3Config, kernels: KernelOptions) -> None:
        super().__init__()
        self.embed_tokens: nn.Embedding | None = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleDict(
            {str(i): DecoderLayer(config, kernels, i) for i in range(config.num_hidden_layers)}
        )
        self.norm: RMSNorm | None = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)

    def forward(
        self, inputs: torch.Tensor, position_ids: torch.Tensor | None = None, document_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token ids [b, s] (or hidden states [b, s, hidden] when embed_tokens is None) -> hidden states.

        `position_ids` [b or 1, s] default to 0..s-1; `document_ids` [b, s] (equal ids = same document) keep
        attention within each document.
        """
        h = self.embed_tokens(inputs) if self.embed_tokens is not None else inputs  # [b, s, hidden]
        if position_ids is None:
            position_ids = torch.arange(h.shape[1], device=h.device).unsqueeze(0)  # [1, s]
        cos, sin = self.rotary_emb(position_ids, h.dtype)
        h = self.run_layers(h, cos, sin, document_ids)
        return self.norm(h) if self.norm is not None else h

    def run_layers(self, h: torch.Tensor, *layer_args: torch.Tensor | None) -> torch.Tensor:
        """The decoder layers in order, each called as `layer(h, *layer_args)` (recompute of layer groups
        overrides this)."""
        for layer in self.layers.values():
            h = layer(h, *layer_args)
        return h


def lm_head_loss(
    hidden: torch.Tensor,
    lm_head: nn.Linear,
    labels: torch.Tensor,
    chunk_tokens: int | None,
    reduction: LossReduction = "mean",
) -> torch.Tensor:
    """Cross entropy of `lm_head` over hidden states [b, s, hidden] against aligned labels [b, s].

    The chunked fused LM head + loss when `chunk_tokens` is an int and the tensors are plain (also
    inside an FSDP2 forward, which gathers the weight; it reads `lm_head.weight` directly, so hooks on
    `lm_head` itself do not run); otherwise full logits (the vocab-sharded DTensor head under `loss_parallel`).
    """
    if chunk_tokens is not None and not isinstance(hidden, DTensor) and not isinstance(lm_head.weight, DTensor):
        return chunked_lm_head_loss(hidden, lm_head.weight, labels, chunk_tokens, reduction)
    return causal_lm_loss(lm_head(hidden), labels, reduction)  # logits [b, s, vocab]


@torch.no_grad()
def copy_named_tensors(
    targets: Mapping[str, torch.Tensor],
    tensors: Iterable[tuple[str, torch.Tensor]],
    source: str,
    error: type[ValueError],
    copy: Callable[[torch.Tensor, torch.Tensor], object] = torch.Tensor.copy_,
    skip: Collection[str] = (),
) -> torch.Tensor | None:
    """Copy each named tensor of the stream into `targets[name]` with `copy(target, tensor)`, strictly.

    Names in `skip` are passed over. An `lm_head.weight` without a target (a tied model) is set aside
    and returned, for the caller to compare with the embedding. Any other unknown name, a shape
    mismatch or a target left unfilled raises `error` naming `source`.
    """
    loaded: set[str] = set()
    unexpected: list[str] = []
    tied_head: torch.Tensor | None = None
    for name, tensor in tensors:
        if name in skip:
            continue
        target = targets.get(name)
        if target is None:
            if name == LM_HEAD_KEY:
                tied_head = tensor
            else:
                unexpected.append(name)
            continue
        if tuple(tensor.shape) != tuple(target.shape):
            raise error(
                f"{source}: tensor {name} has shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}; "
                "the model's shape and the weights disagree"
            )
        copy(target, tensor)
        loaded.add(name)
    missing = sorted(set(targets) - loaded)
    if missing or unexpected:
        raise error(
            f"{source} does not match the model: missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
            f"unexpected keys {sorted(unexpected)[:10]}{' ...' if len(unexpected) > 10 else ''}"
        )
    return tied_head


def init_module_weights(root: nn.Module, std: float) -> None:
    """Initialise every Linear/Embedding/expert weight under `root` ~ normal(0, std), norms = 1, RoPE tables."""
    if std <= 0:
        raise ValueError(f"init std must be > 0, got {std}")
    for module in root.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, GroupedExperts):
            module.reset_parameters(std)
        elif isinstance(module, (RMSNorm, RotaryEmbedding)):
            module.reset_parameters()


class Qwen3ForCausalLM(nn.Module):
    """Qwen3 decoder + LM head; `state_dict()` keys equal HF's (plus `lm_head.weight` when tied).

    Construction on a real device initialises weights with `init_weights()`; on meta it does not.
    `kernels` picks the kernels every block runs (default: from the tensors' device, torch's SDPA order).
    `loss_chunk_tokens` (int or None) selects how a loss-only forward computes the loss; see `forward`.
    """

    def __init__(self, config: Qwen3Config, kernels: KernelOptions = DEFAULT_KERNELS) -> None:
        super().__init__()
        self.config = config
        self.loss_chunk_tokens: int | None = DEFAULT_LOSS_CHUNK_TOKENS
        self.model = Qwen3Model(config, kernels)
        self.lm_head: nn.Linear | None = Linear(config.hidden_size, config.vocab_size)
        self.tie_weights()
        if not self.lm_head.weight.is_meta:  # meta tensors hold no values; materialise, then init_weights()
            self.init_weights()
        self.register_load_state_dict_post_hook(_tied_head_is_not_missing)

    # ---- construction ----------------------------------------------------------------------------

    def tie_weights(self) -> None:
        """Share `model.embed_tokens.weight` as `lm_head.weight` when the config ties them.

        Call again after `to_empty()` (and anything else that replaces parameters): materialising
        creates a new parameter per module and silently unties them. No-op when either end is absent.
        """
        if self.config.tie_word_embeddings and self.lm_head is not None and self.model.embed_tokens is not None:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        """Linear/Embedding weights ~ normal(0, std) (default config.initializer_range), norms = 1, RoPE tables."""
        init_module_weights(self, self.config.initializer_range if std is None else std)

    # ---- forward ---------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        return_logits: bool = True,
        loss_reduction: LossReduction = "mean",
    ) -> CausalLMOutput | torch.Tensor:
        """Token ids [b, s] -> CausalLMOutput(logits [b, s, vocab] or None, loss or None).

        DECISION: `labels` are already aligned to positions (labels[:, t] is the target of position t,
        -100 ignored), the Megatron convention our data pipeline produces; see `causal_lm_loss`.
        `position_ids` [b, s] default to 0..s-1; with `document_ids` [b, s] (equal ids = same document, as
        `--reset-attention-mask` gives a packed sample) a token attends only to earlier tokens of its document.
        `loss_reduction` is "mean" over the non-ignored labels or "sum" (for a trainer that divides
        by the token count of the whole global batch).

        With labels and `return_logits=False` the output has no logits and the loss comes from
        `lm_head_loss`: the chunked fused LM head + cross entropy when `loss_chunk_tokens` is an int
        (same loss and gradients, the logits of at most `loss_chunk_tokens` tokens alive at a time).

        A pipeline stage without `lm_head` returns its hidden states [b, s, hidden] instead, and one
        without `model.embed_tokens` takes hidden states in place of `input_ids`.
        """
        if not return_logits and labels is None:
            raise ValueError("forward(return_logits=False) needs labels: without them there is nothing to return")
        hidden = self.model(input_ids, position_ids, document_ids)
        if self.lm_head is None:
            return hidden
        if labels is not None and not return_logits:
            return CausalLMOutput(
                None, lm_head_loss(hidden, self.lm_head, labels, self.loss_chunk_tokens, loss_reduction)
            )
        logits = self.lm_head(hidden)  # [b, s, vocab]
        loss = causal_lm_loss(logits, labels, loss_reduction) if labels is not None else None
        return CausalLMOutput(logits, loss)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Prompt [b, s] -> [b, s + n] with n <= max_new_tokens; greedy when temperature == 0.

        Recomputes the whole sequence each step (no KV cache): for smoke checks, not serving.
        Sequences that emitted `eos_token_id` are padded with it; stops early once all have.
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k <= 0:
            raise ValueError(f"top_k must be > 0 or None, got {top_k}")
        tokens = input_ids
        done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        for _ in range(max_new_tokens):
            logits = self(tokens).logits[:, -1, :].float()  # [b, vocab]
            if temperature == 0:
                next_token = logits.argmax(dim=-1)  # [b]
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # [b, 1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = logits.softmax(dim=-1)
                next_token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # [b]
            if eos_token_id is not None:
                next_token = next_token.masked_fill(done, eos_token_id)
                done |= next_token == eos_token_id
            tokens = torch.cat((tokens, next_token.unsqueeze(-1)), dim=-1)  # [b, s + 1]
            if eos_token_id is not None and bool(done.all()):
                break
        return tokens

    # ---- HF layout -------------------------------------------------------------------------------

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict in HF's on-disk layout: like `state_dict()` but without `lm_head.weight` when tied, and
        the stacked experts of a MoE layer as per-expert views (`GroupedExperts.hf_tensors`; copying into them
        loads the model)."""
        experts = {name: module for name, module in self.named_modules() if isinstance(module, GroupedExperts)}
        state: dict[str, torch.Tensor] = {}
        for name, tensor in self.state_dict().items():
            owner, _, leaf = name.rpartition(".")
            if owner not in experts:
                state[name] = tensor
            elif leaf == "gate_up_proj":  # down_proj comes with it
                state.update(experts[owner].hf_tensors(owner))
        if self.config.tie_word_embeddings:
            state.pop(LM_HEAD_KEY, None)
        return state


def _tied_head_is_not_missing(model: Qwen3ForCausalLM, incompatible: nn.modules.module._IncompatibleKeys) -> None:
    """`load_state_dict` hook: an HF state dict of a tied model has no lm_head.weight, which is fine."""
    head, embed = model.lm_head, model.model.embed_tokens
    tied = head is not None and embed is not None and head.weight is embed.weight
    if tied and LM_HEAD_KEY in incompatible.missing_keys:
        incompatible.missing_keys.remove(LM_HEAD_KEY)
