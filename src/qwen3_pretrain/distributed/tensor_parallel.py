"""Tensor parallelism (`--tensor-model-parallel-size`) and sequence parallelism for Qwen3, with DTensor.

Plan per decoder block (Megatron's split, written with `torch.distributed.tensor.parallel`):

- q/k/v, gate/up: column-wise (each rank owns whole heads / a slice of the FFN);
  o/down: row-wise (partial sums reduced on the way out).
- q_norm/k_norm: one weight shared by all heads while every rank sees only its heads. The weight is
  made a replicated DTensor and its input a DTensor sharded on the head dim, so its gradient is a
  sum over TP ranks, carried out when the gradient is accumulated (`_grad_to_param_placements`).
  (Left as a plain tensor it would silently get the gradient of the local heads only.)
- embed_tokens: vocab-parallel (row-wise on the vocab dim, replicated token ids in);
  lm_head: column-wise on the vocab dim. With `loss_parallel` the logits stay sharded on the vocab
  dim (a DTensor) and the cross entropy runs on the shards inside `vocab_parallel_loss()`.
- Tied embeddings: embed_tokens and lm_head end up as the same DTensor Parameter (both Shard(0)).
- Sequence parallel: the residual stream between blocks, the layer norms and the final norm are
  sharded on the sequence dim; attention and MLP inputs are all-gathered, their outputs
  reduce-scattered. Pipeline stages exchange their local sequence shard. Attention thus sees the
  whole sequence, and the per-token position / document ids stay whole [b, s] tensors throughout.
- Every parameter becomes a DTensor on the TP mesh (norms replicated), and every gradient ends
  with its parameter's placements, so gradient clipping, pipeline sync and optimizers see
  ordinary sharded/replicated gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.distributed.tensor.parallel import loss_parallel as _torch_loss_parallel

from qwen3_pretrain.config.layout import check_tensor_parallel
from qwen3_pretrain.config.model import Qwen3Config
from qwen3_pretrain.model.moe import MoEMLP
from qwen3_pretrain.model.qwen3 import Qwen3Model

_HEAD_DIM = 2  # q_proj(x).view(b, s, heads, head_dim): q_norm/k_norm see heads on dim 2
_SEQUENCE = Shard(1)  # hidden states [b, s, hidden] sharded on the sequence dim


class _ReplicatedParallel(ParallelStyle):
    """Parameters become replicated DTensors; the (already replicated) input and output stay plain tensors.

    Used for the layer norms without sequence parallel, so that every parameter of a TP model is a
    DTensor on the TP mesh and DTensor-aware gradient clipping and checkpointing see one kind of tensor.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(
            module,
            device_mesh,
            # torch annotates input_fn as returning None, but installs it as a forward pre-hook, whose
            # return value (the DTensor inputs here) replaces the inputs.
            input_fn=lambda _module, inputs, mesh: tuple(  # type: ignore[arg-type]
                DTensor.from_local(x, mesh, [Replicate()], run_check=False) for x in inputs
            ),
            output_fn=lambda _module, output, _mesh: output.to_local(),
        )


def _causal_lm_parts(model: nn.Module) -> tuple[Qwen3Config, Qwen3Model, nn.Linear | None]:
    """(config, decoder `model.model`, `lm_head`) of a Qwen3ForCausalLM or of a pipeline stage cut from one."""
    config, decoder, head = model.config, model.model, model.lm_head
    if not (
        isinstance(config, Qwen3Config)
        and isinstance(decoder, Qwen3Model)
        and (head is None or isinstance(head, nn.Linear))
    ):
        raise TypeError(f"{type(model).__name__} is neither a Qwen3ForCausalLM nor a pipeline stage of one")
    return config, decoder, head


def _block_plan(sequence_parallel: bool, moe: bool = False) -> dict[str, ParallelStyle]:
    """Parallel styles for one decoder block, keyed by module path inside the block. A MoE MLP (`moe`) is not
    split: every TP rank routes the same (whole-sequence) tokens through whole experts (expert parallelism
    splits the experts, `expert_parallel`), so its weights get the same gradient on every TP rank."""
    plan = _dense_block_plan(sequence_parallel)
    if not moe:
        return plan
    plan = {key: style for key, style in plan.items() if not key.startswith("mlp")}
    if sequence_parallel:
        plan["mlp"] = PrepareModuleInputOutput(
            input_layouts=(_SEQUENCE,), desired_input_layouts=(Replicate(),), use_local_input=True,
            output_layouts=(Replicate(),), desired_output_layouts=(_SEQUENCE,), use_local_output=False,
        )
    return plan


def _dense_block_plan(sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """Parallel styles for one decoder block with a dense MLP."""
    plan: dict[str, ParallelStyle] = {
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.q_norm": SequenceParallel(sequence_dim=_HEAD_DIM, use_local_output=True),
        "self_attn.k_norm": SequenceParallel(sequence_dim=_HEAD_DIM, use_local_output=True),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
    }
    if not sequence_parallel:
        plan.update({
            "input_layernorm": _ReplicatedParallel(),
            "post_attention_layernorm": _ReplicatedParallel(),
            "self_attn.o_proj": RowwiseParallel(),
            "mlp.down_proj": RowwiseParallel(),
        })
        return plan
    # The residual stream stays a DTensor sharded on the sequence dim, so shapes read from it
    # (the model's position ids) are global.
    plan.update({
        "input_layernorm": SequenceParallel(),
        "post_attention_layernorm": SequenceParallel(),
        "self_attn": PrepareModuleInput(
            input_layouts=(_SEQUENCE, None, None, None),  # (x, cos, sin, document_ids): the ids are full [b, s]
            desired_input_layouts=(Replicate(), None, None, None),
            use_local_output=True,
        ),
        "mlp": PrepareModuleInput(
            input_layouts=(_SEQUENCE,), desired_input_layouts=(Replicate(),), use_local_output=True
        ),
        "self_attn.o_proj": RowwiseParallel(output_layouts=_SEQUENCE, use_local_output=False),
        "mlp.down_proj": RowwiseParallel(output_layouts=_SEQUENCE, use_local_output=False),
    })
    return plan


def _outer_plan(model: nn.Module, sequence_parallel: bool, loss_parallel: bool) -> dict[str, ParallelStyle]:
    """Parallel styles for the embedding, final norm and LM head, those present on `model` (or stage)."""
    _, decoder, head = _causal_lm_parts(model)
    embed, norm = decoder.embed_tokens, decoder.norm
    residual = _SEQUENCE if sequence_parallel else Replicate()
    plan: dict[str, ParallelStyle] = {}
    if embed is not None:
        plan["model.embed_tokens"] = RowwiseParallel(
            input_layouts=Replicate(), output_layouts=residual, use_local_output=not sequence_parallel
        )
    if norm is not None:
        plan["model.norm"] = SequenceParallel() if sequence_parallel else _ReplicatedParallel()
    if head is not None:
        plan["lm_head"] = ColwiseParallel(
            input_layouts=residual,
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        )
    return plan


def _stage_boundary_styles(model: nn.Module) -> list[ParallelStyle]:
    """With sequence parallel, a pipeline stage receives / sends its local sequence shard as a plain tensor."""
    _, decoder, _ = _causal_lm_parts(model)
    styles: list[ParallelStyle] = []
    if decoder.embed_tokens is None:  # inputs (hidden, position_ids, document_ids); the ids cover the whole sequence
        styles.append(PrepareModuleInput(input_layouts=(_SEQUENCE, None, None),
                                         desired_input_layouts=(_SEQUENCE, None, None)))
    if decoder.norm is None:
        styles.append(PrepareModuleOutput(output_layouts=_SEQUENCE, desired_output_layouts=_SEQUENCE))
    return styles


def apply_tensor_parallel(
    model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = False, loss_parallel: bool = True
) -> None:
    """Shard `model` (a Qwen3ForCausalLM or a pipeline stage of one) over the 1-D `tp_mesh`, in place.

    With `loss_parallel` the logits are a DTensor sharded on the vocab dim: compute the loss and run
    backward inside `vocab_parallel_loss()`.
    """
    if tp_mesh.ndim != 1:
        raise ValueError(f"apply_tensor_parallel needs a 1-D tensor-parallel mesh, got {tp_mesh.ndim} dims")
    config, decoder, head = _causal_lm_parts(model)  # modules changed in place below, never replaced
    check_tensor_parallel(config, tp_mesh.size())
    tied = _tied_embeddings(model)
    parallelize_module(model, tp_mesh, _outer_plan(model, sequence_parallel, loss_parallel))
    if sequence_parallel:
        for style in _stage_boundary_styles(model):
            parallelize_module(decoder, tp_mesh, style)
    for block in decoder.layers.values():
        parallelize_module(block, tp_mesh, _block_plan(sequence_parallel, isinstance(block.mlp, MoEMLP)))
    if tied:
        assert head is not None and decoder.embed_tokens is not None  # as _tied_embeddings found
        head.weight = decoder.embed_tokens.weight
    for param in model.parameters():
        param.register_post_accumulate_grad_hook(_grad_to_param_placements)


def _grad_to_param_placements(param: torch.Tensor) -> None:
    """Give a gradient its parameter's placements as soon as it is accumulated.

    DTensor autograd leaves the q_norm/k_norm (and sequence-parallel norm) gradients Partial, i.e.
    still to be summed over TP, and the vocab-parallel embedding's gradient Replicate (full vocab).
    Anything reading local gradient shards (gradient sync across pipeline stages, a data-parallel
    all-reduce, a custom optimizer) would silently use wrong values; here the Partial ones are
    all-reduced and the full embedding gradient is cut to this rank's vocab shard. (FSDP2 replaces
    the parameters, so these hooks only act without it; FSDP2 does the same redistribution itself.)
    """
    grad = param.grad
    if isinstance(grad, DTensor) and isinstance(param, DTensor) and grad.placements != param.placements:
        param.grad = grad.redistribute(param.device_mesh, param.placements)


def _tied_embeddings(model: nn.Module) -> bool:
    """True when this module holds both embed_tokens and lm_head and they share one Parameter."""
    _, decoder, head = _causal_lm_parts(model)
    embed = decoder.embed_tokens
    return embed is not None and head is not None and head.weight is embed.weight


@contextlib.contextmanager
def vocab_parallel_loss(enabled: bool = True) -> Iterator[None]:
    """Wrap forward + backward in this when TP was applied with `loss_parallel=True`."""
    if not enabled:
        yield
        return
    with _torch_loss_parallel():
        yield
