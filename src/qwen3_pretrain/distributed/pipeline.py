"""Pipeline parallelism (`--pipeline-model-parallel-size`) with `torch.distributed.pipelining`.

- `split_into_stages` cuts a Qwen3ForCausalLM into this rank's stages: layers split evenly (or by
  `--num-layer-list`), embedding on the first stage, final norm + LM head on the last; parameters keep
  their global HF names (`model.layers.17...` stays 17). With virtual stages (interleaved 1F1B) rank r
  holds stages r, r + pp, r + 2 pp, ...
- Tied embeddings: the last stage holds its own `lm_head.weight`, a copy of the embedding. Its
  gradient and the first stage's embedding gradient are summed by `sync_tied_embedding_grads` before
  every optimizer step, so both copies see the single-process gradient and stay equal.
- `build_pipeline_schedule` wraps the stages in `PipelineStage`s and a 1F1B / GPipe / interleaved
  1F1B schedule. The loss of a micro batch is its summed token cross entropy divided by the number of
  tokens of the whole step, and the schedule does not rescale gradients, so the step's loss and
  gradients equal one process's mean over all tokens, however the tokens fall into micro batches.
- Stages exchange hidden states only. Per-token inputs every stage needs (position ids with
  `--reset-position-ids`, document ids with `--reset-attention-mask`) go beside them: the schedule
  splits them into micro batches like the labels and queues them on every local stage.
"""

from __future__ import annotations

import collections
import copy
import itertools
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from torch.distributed.pipelining.schedules import PipelineScheduleMulti, PipelineScheduleSingle
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from qwen3_pretrain.config.layout import PP_FLAG, VIRTUAL_FLAG, stage_layer_counts
from qwen3_pretrain.config.model import Qwen3Config
from qwen3_pretrain.model.qwen3 import IGNORE_INDEX, Qwen3ForCausalLM, Qwen3Model, lm_head_loss

SCHEDULES = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe, "interleaved_1f1b": ScheduleInterleaved1F1B}


# ---- splitting -------------------------------------------------------------------------------------


class TokenInputs(NamedTuple):
    """One micro batch's per-token inputs besides the tokens: position ids and document ids [b, s], or None."""

    position_ids: torch.Tensor | None = None
    document_ids: torch.Tensor | None = None


class PipelineStageModule(nn.Module):
    """One pipeline stage of a Qwen3ForCausalLM with the same child names (`model.*`, `lm_head`).

    Takes token ids (first stage) or hidden states [b, s, hidden] and returns hidden states; the
    last stage returns the summed token cross entropy of its micro batch instead (`lm_head_loss`:
    the chunked LM head without TP, so no full-vocab logits), reading the micro batch's labels from
    `labels`, which the schedule fills in micro-batch order (a stage runs its forwards in that order).
    Likewise every stage reads its micro batch's position / document ids from `token_inputs` when the
    schedule was given them (else positions 0..s-1, no document mask).
    Outputs are plain tensors, as `torch.distributed.pipelining` needs.
    """

    def __init__(
        self, config: Qwen3Config, decoder: Qwen3Model, lm_head: nn.Linear | None, loss_chunk_tokens: int | None
    ) -> None:
        super().__init__()
        self.config = config
        self.model = decoder
        self.lm_head = lm_head
        self.loss_chunk_tokens = loss_chunk_tokens
        self.labels: collections.deque[torch.Tensor] = collections.deque()  # last stage: labels [b, s] to come
        self.token_inputs: collections.deque[TokenInputs] = collections.deque()  # every stage: ids to come

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        extra = self.token_inputs.popleft() if self.token_inputs else TokenInputs()
        hidden = self.model(inputs, extra.position_ids, extra.document_ids)  # [b, s, hidden]
        if self.lm_head is None:
            return hidden
        if not self.labels:
            raise RuntimeError(
                "the last pipeline stage has no labels for this micro batch: run it through PipelineSchedule"
            )
        loss = lm_head_loss(hidden, self.lm_head, self.labels.popleft(), self.loss_chunk_tokens, "sum")
        return _local(loss)  # a replicated DTensor under loss_parallel

    def holds_tied_head_copy(self) -> bool:
        """True on a last stage whose lm_head is its own copy of a tied embedding living on the first stage."""
        return self.config.tie_word_embeddings and self.lm_head is not None and self.model.embed_tokens is None


def _cut_stage(model: Qwen3ForCausalLM, layer_names: list[str], first: bool, last: bool) -> PipelineStageModule:
    """Deep-copy only the parts of `model` that one stage owns."""
    decoder = model.model
    dropped: list[nn.Module | None] = [layer for name, layer in decoder.layers.items() if name not in layer_names]
    dropped += [] if first else [decoder.embed_tokens]
    dropped += [] if last else [decoder.norm]
    # deepcopy returns what the memo maps an object to: dropped modules become None instead of being copied.
    memo = {id(module): None for module in dropped if module is not None}
    stage_decoder, stage_head = copy.deepcopy((decoder, model.lm_head if last else None), memo)
    for name in [name for name, layer in stage_decoder.layers.items() if layer is None]:
        del stage_decoder.layers[name]
    return PipelineStageModule(model.config, stage_decoder, stage_head, model.loss_chunk_tokens)


def split_into_stages(
    model: Qwen3ForCausalLM,
    pp_rank: int,
    pp_size: int,
    num_layer_list: list[int] | None = None,
    virtual_stages: int = 1,
) -> list[PipelineStageModule]:
    """This pp rank's stages (copies; drop `model` afterwards), in execution order.

    Split first, then apply tensor parallelism, recompute and FSDP to each stage, materialise, and
    build the schedule. Splitting a materialised tied model initialises the last stage's lm_head copy from the
    embedding; after materialising or loading stages cut from a meta model, call
    `broadcast_tied_embedding` instead.
    """
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pipeline rank {pp_rank} is outside {PP_FLAG} {pp_size}")
    counts = stage_layer_counts(model.config.num_hidden_layers, pp_size, virtual_stages, num_layer_list)
    starts = [0, *itertools.accumulate(counts)]
    num_stages = len(counts)
    stages = []
    for stage_index in range(pp_rank, num_stages, pp_size):
        names = [str(i) for i in range(starts[stage_index], starts[stage_index + 1])]
        stages.append(_cut_stage(model, names, first=stage_index == 0, last=stage_index == num_stages - 1))
    return stages


# ---- this rank's stages as one module ------------------------------------------------------------


class StagesView(nn.Module):
    """This rank's stages seen as one Qwen3ForCausalLM-shaped module, for the optimizer and checkpoints.

    Its parameters are the stages' own (shared, not copied) under their global HF names, so state
    dicts of any pipeline layout line up with those of one process. A last stage's copy of a tied
    embedding appears as `model.embed_tokens.weight` (as in a tied single-process model, it is
    `lm_head.weight` too): saved under those names (DCP keeps one of the equal copies) and loaded
    from them, which lets a checkpoint move between PP and non-PP layouts.
    Holds no forward: the trainer runs the stages through the pipeline schedule.
    """

    def __init__(self, stages: list[PipelineStageModule]) -> None:
        super().__init__()
        self.config = stages[0].config
        decoder, layers = nn.Module(), nn.ModuleDict()
        self.model = decoder  # registered before lm_head: a shared tied weight is named model.embed_tokens.weight
        decoder.add_module("layers", layers)
        for stage in stages:
            layers.update(dict(stage.model.layers.items()))
            for name in ("embed_tokens", "norm"):
                if getattr(stage.model, name) is not None:
                    decoder.add_module(name, getattr(stage.model, name))
            if stage.holds_tied_head_copy():
                decoder.add_module("embed_tokens", stage.lm_head)
            if stage.lm_head is not None:
                self.lm_head = stage.lm_head


def as_one_module(model_parts: list[nn.Module]) -> nn.Module:
    """This rank's parameters under their global HF names, for the optimizer, weight loading and checkpoints:
    the model itself without pipeline parallelism, else a `StagesView` of its stages."""
    if len(model_parts) == 1 and not isinstance(model_parts[0], PipelineStageModule):
        return model_parts[0]
    stages = [part for part in model_parts if isinstance(part, PipelineStageModule)]
    if len(stages) != len(model_parts):
        raise TypeError("model parts must be one whole model or pipeline stages (PipelineStageModule)")
    return StagesView(stages)


# ---- tied embedding across the first and last stage -------------------------------------------------


def group_of(pp: dist.ProcessGroup | DeviceMesh) -> dist.ProcessGroup:
    return pp.get_group() if isinstance(pp, DeviceMesh) else pp


def tied_embedding_group(
    stages: list[PipelineStageModule], pp: dist.ProcessGroup | DeviceMesh
) -> dist.ProcessGroup | None:
    """The process group of the first and last pipeline ranks when they hold the two copies of a tied embedding.

    Call once at setup on every pp rank; returns None where there is nothing to synchronise.
    """
    pp_group = group_of(pp)
    pp_size = dist.get_world_size(pp_group)
    if not stages[0].config.tie_word_embeddings or pp_size == 1:
        return None
    ends = [dist.get_global_rank(pp_group, 0), dist.get_global_rank(pp_group, pp_size - 1)]
    if dist.get_rank() not in ends:
        return None
    return dist.new_group(ends, use_local_synchronization=True)


def _tied_weights(stages: list[PipelineStageModule]) -> list[torch.Tensor]:
    """This rank's copies of the tied embedding: the first stage's embedding and/or the last stage's lm_head."""
    weights = []
    for stage in stages:
        if stage.model.embed_tokens is not None:
            weights.append(stage.model.embed_tokens.weight)
        if stage.holds_tied_head_copy() and stage.lm_head is not None:
            weights.append(stage.lm_head.weight)
    return weights


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def sync_tied_embedding_grads(stages: list[PipelineStageModule], group: dist.ProcessGroup | None) -> None:
    """Sum the embedding and lm_head-copy gradients across the first and last stage (before the optimizer step)."""
    if group is None:
        return
    for weight in _tied_weights(stages):
        if weight.grad is None:
            raise RuntimeError("tied embedding has no gradient: run the pipeline step before syncing")
        dist.all_reduce(_local(weight.grad), group=group)


@torch.no_grad()
def broadcast_tied_embedding(stages: list[PipelineStageModule], group: dist.ProcessGroup | None) -> None:
    """Copy the first stage's embedding into the last stage's lm_head (after materialising or loading weights)."""
    if group is None:
        return
    source = dist.get_global_rank(group, 0)
    for weight in _tied_weights(stages):
        dist.broadcast(_local(weight), src=source, group=group)


# ---- loss, schedule, gradient norm ------------------------------------------------------------------


class TokenMeanLoss:
    """Micro-batch loss = the last stage's summed token cross entropy x `scale` (set per step: 1 / tokens
    of the whole step), so the micro-batch losses add up to the mean over all tokens of the step."""

    def __init__(self) -> None:
        self.scale: float | torch.Tensor | None = None

    def __call__(self, loss_sum: torch.Tensor, _labels: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            raise RuntimeError("TokenMeanLoss.scale is unset: run steps through PipelineSchedule.step")
        return loss_sum * self.scale


@dataclass
class PipelineSchedule:
    """A pipeline schedule over this rank's stages; `step` runs one training step's forward and backward."""

    stages: list[PipelineStage]
    schedule: PipelineScheduleSingle | PipelineScheduleMulti
    loss_fn: TokenMeanLoss
    group: dist.ProcessGroup
    n_microbatches: int

    def step(
        self, input_ids: torch.Tensor, labels: torch.Tensor, num_tokens: float | None = None,
        loss_scale: float | torch.Tensor = 1.0, extra: TokenInputs | None = None,
    ) -> torch.Tensor:
        """Forward + backward of a batch [b, s] split into the micro batches; returns the mean loss on every pp rank.

        Every pp rank passes the same batch (the first stage reads input_ids, the last labels, every stage
        the position / document ids [b, s] in `extra`).
        `num_tokens` (the divisor of the summed token losses) defaults to the labels that are not
        -100 in this batch; with data parallel, whose gradient reduction averages over dp ranks, pass
        the dp-global count / dp size to get the global token mean (with FSDP's sum reduction, the
        dp-global count). Gradients are those of the loss x `loss_scale` (fp16 loss scaling); the
        returned loss is unscaled. The loss is computed inside `loss_parallel()`, so vocab-sharded
        (tensor-parallel) logits work too.
        """
        counted = int((labels != IGNORE_INDEX).sum()) if num_tokens is None else num_tokens
        if counted <= 0:
            raise ValueError("the batch has no label other than -100: nothing to train on")
        return self._run(self.schedule.step, input_ids, labels, loss_scale / counted, extra) * (1.0 / loss_scale)

    @torch.no_grad()
    def loss_sum(
        self, input_ids: torch.Tensor, labels: torch.Tensor, extra: TokenInputs | None = None
    ) -> torch.Tensor:
        """Forward only (evaluation): the summed token loss of the batch [b, s], on every pp rank."""
        return self._run(self.schedule.eval, input_ids, labels, 1.0, extra)

    def _run(
        self, run: Callable[..., Any], input_ids: torch.Tensor, labels: torch.Tensor, scale: float | torch.Tensor,
        extra: TokenInputs | None,
    ) -> torch.Tensor:
        """Run the schedule with micro-batch losses scaled by `scale`; their sum, broadcast from the last stage."""
        self.loss_fn.scale = scale
        modules = [typing.cast(PipelineStageModule, stage.submod) for stage in self.stages]
        last_stages = [module for stage, module in zip(self.stages, modules, strict=True) if stage.is_last]
        for module in last_stages:
            module.labels.extend(torch.tensor_split(labels, self.n_microbatches))  # as the schedule splits inputs
        if extra is not None:  # every stage: each micro batch's ids, split as the labels
            split = [[None] * self.n_microbatches if ids is None else torch.tensor_split(ids, self.n_microbatches)
                     for ids in extra]
            for module in modules:
                module.token_inputs.extend(TokenInputs(*ids) for ids in zip(*split, strict=True))
        losses: list[torch.Tensor] = []
        with loss_parallel():
            if any(stage.is_first for stage in self.stages):
                run(input_ids, target=labels, losses=losses, return_outputs=False)
            else:
                run(target=labels, losses=losses, return_outputs=False)
        if any(module.token_inputs for module in modules):
            raise RuntimeError("the pipeline schedule ran fewer micro batches than it was given token inputs for")
        if last_stages:
            if any(module.labels for module in last_stages):
                raise RuntimeError("the pipeline schedule ran fewer micro batches than it was given labels for")
            total = torch.stack([loss.detach().float() for loss in losses]).sum()
        else:
            total = torch.zeros((), device=self.stages[0].device)
        last_rank = dist.get_global_rank(self.group, dist.get_world_size(self.group) - 1)
        dist.broadcast(total, src=last_rank, group=self.group)
        return total


@dataclass(frozen=True)
class MicroBatchShape:
    """What crosses the stage boundaries for one micro batch: token ids [batch, seq] into the first stage,
    hidden states [batch, seq / sequence_shards, hidden] in `hidden_dtype` between stages (a sequence-
    parallel stage sends its local sequence shard), and the float32 loss sum out of the last stage."""

    batch: int
    seq: int
    hidden_dtype: torch.dtype
    sequence_shards: int = 1

    def stage_io(self, config: Qwen3Config, first: bool, last: bool) -> dict[str, Any]:
        """Meta tensors of a stage's input, output and their gradients, as PipelineStage's keyword arguments."""
        hidden = torch.empty(self.batch, self.seq // self.sequence_shards, config.hidden_size,
                             dtype=self.hidden_dtype, device="meta", requires_grad=True)
        tokens = torch.empty(self.batch, self.seq, dtype=torch.long, device="meta")
        loss_sum = torch.empty((), dtype=torch.float32, device="meta", requires_grad=True)
        return {
            "input_args": tokens if first else hidden,
            "output_args": loss_sum if last else hidden,
            "input_grads": None if first else hidden,
            "output_grads": None if last else hidden,
        }


def build_pipeline_schedule(
    stages: list[PipelineStageModule],
    pp: dist.ProcessGroup | DeviceMesh,
    n_microbatches: int,
    micro_batch: MicroBatchShape,
    loss_fn: TokenMeanLoss | None = None,
    schedule: str = "1f1b",
) -> PipelineSchedule:
    """Wrap this rank's stages (from `split_into_stages`) in PipelineStages and a schedule.

    `schedule` is "1f1b", "gpipe" (one stage per rank) or "interleaved_1f1b" (several). The stages get
    their boundary shapes from `micro_batch` (static metadata: no extra forward to infer them, which
    would also consume a micro batch's labels on the last stage).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"pipeline schedule {schedule!r} is not supported; use one of {', '.join(SCHEDULES)}")
    interleaved = schedule == "interleaved_1f1b"
    if interleaved != (len(stages) > 1):
        raise ValueError(
            f"schedule {schedule!r} got {len(stages)} stage(s) on this rank: interleaved_1f1b needs virtual "
            f"stages ({VIRTUAL_FLAG}), 1f1b and gpipe need exactly one"
        )
    group = group_of(pp)
    pp_rank, pp_size = dist.get_rank(group), dist.get_world_size(group)
    if n_microbatches < 1:
        raise ValueError(f"number of micro batches must be >= 1, got {n_microbatches}")
    loss_fn = TokenMeanLoss() if loss_fn is None else loss_fn
    num_stages = pp_size * len(stages)
    pipeline_stages = []
    for i, module in enumerate(stages):
        index = pp_rank + i * pp_size
        io = micro_batch.stage_io(module.config, first=index == 0, last=index == num_stages - 1)
        pipeline_stages.append(PipelineStage(module, index, num_stages, _device_of(module), group=group, **io))
    schedule_class = SCHEDULES[schedule]
    runner = schedule_class(
        pipeline_stages if interleaved else pipeline_stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False
    )
    return PipelineSchedule(pipeline_stages, runner, loss_fn, group, n_microbatches)


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def norm_parameters(stages: list[nn.Module]) -> list[nn.Parameter]:
    """This rank's parameters for the gradient norm: a tied embedding counts once across the pipeline."""
    counted = []
    for stage in stages:
        copy_of_embedding = None
        if isinstance(stage, PipelineStageModule) and stage.holds_tied_head_copy() and stage.lm_head is not None:
            copy_of_embedding = stage.lm_head.weight
        counted += [p for p in stage.parameters() if p is not copy_of_embedding]
    return counted
