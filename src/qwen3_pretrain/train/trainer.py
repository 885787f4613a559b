"""The pretraining loop: `run_training(config) -> TrainResult`, in one process or under torchrun.

One iteration = one optimizer step on `global batch` samples: `num_microbatches` forward/backward
passes of `micro batch` samples on each of the DP ranks. The loss of the step is the sum of the
per-token cross entropy over the whole global batch divided by its number of loss tokens
(Megatron's per-token loss), so any DP size / accumulation split gives the same gradients. A Qwen3-MoE
model's load-balancing loss joins each micro batch's backward with 1 / (micro batches x DP x CP) (Megatron's
scaling: the step adds the mean of the micro batches' losses); its value and the per-layer expert loads are
logged (`train.moe_stats`).
Per-iteration values stay on the device until the next log line (or checkpoint), where they are
read in one go: a step needs no host synchronisation. A non-finite gradient norm skips the update
(on the device) and is counted in "number of skipped iterations"; every iteration whose loss is not
finite counts in "nan iterations"; too many non-finite iterations in a row stop the run with an error
(checked when the values are read), and no checkpoint is written while the last one was non-finite.
As in Megatron a skipped update does not advance the LR schedule: the schedule advances on the
host after every step and is moved back for the skipped ones when their flags are read, so with
`--log-interval 1` the LRs are exactly Megatron's; with longer intervals the steps between a skipped
one and the next log line run one schedule step ahead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.tensor import DTensor

from qwen3_pretrain.checkpoint.loader import open_checkpoint
from qwen3_pretrain.checkpoint.mcore import add_mcore_rank_files
from qwen3_pretrain.checkpoint.mcore_format import McoreLayout
from qwen3_pretrain.checkpoint.native import AsyncSaver, load_model_tensors, resolve_checkpoint_dir, save_checkpoint
from qwen3_pretrain.config import Qwen3Config, Qwen3MoeConfig, TrainConfig
from qwen3_pretrain.data.gpt_dataset import build_gpt_datasets
from qwen3_pretrain.data.loader import build_pretraining_loader
from qwen3_pretrain.data.mock import MockGPTDataset
from qwen3_pretrain.distributed.clip import clip_grad_norm_
from qwen3_pretrain.distributed.context_parallel import shard_sequence
from qwen3_pretrain.distributed.device import device_type, peak_memory_bytes
from qwen3_pretrain.distributed.expert_parallel import GlobalExpertLoad, install_global_expert_load
from qwen3_pretrain.distributed.float8 import attach_fp8_scale_precompute
from qwen3_pretrain.distributed.mesh import ParallelEnv, init_parallel, shutdown_parallel
from qwen3_pretrain.distributed.parallelize import load_full_weights, parallelize_model
from qwen3_pretrain.distributed.pipeline import (
    MicroBatchShape,
    PipelineSchedule,
    PipelineStageModule,
    TokenInputs,
    as_one_module,
    broadcast_tied_embedding,
    build_pipeline_schedule,
    split_into_stages,
    sync_tied_embedding_grads,
    tied_embedding_group,
)
from qwen3_pretrain.distributed.roll_call import describe_failure, is_peer_failure, missing_ranks
from qwen3_pretrain.distributed.tensor_parallel import vocab_parallel_loss
from qwen3_pretrain.model.kernels import KernelOptions
from qwen3_pretrain.model.moe import set_aux_loss_scale
from qwen3_pretrain.model.qwen3 import IGNORE_INDEX, Qwen3ForCausalLM, init_module_weights
from qwen3_pretrain.train import run_lock
from qwen3_pretrain.train.metrics import (
    IterationLog,
    MetricsWriter,
    device_peak_tflops,
    format_iteration_line,
    format_validation_lines,
    startup_summary,
    throughput,
)
from qwen3_pretrain.train.moe_stats import LOSS_NAMES, ExpertLoadTracker, summarize
from qwen3_pretrain.train.optim import (
    build_loss_scaler,
    build_optimizer,
    build_scheduler,
    scale_grads_,
    step_unless_nonfinite,
)
from qwen3_pretrain.train.preflight import compute_dtype, fresh_start_message, memory_estimate, preflight
from qwen3_pretrain.train.profiling import StepProfiler
from qwen3_pretrain.train.watchdog import HangWatchdog

LOW_SPACE_BYTES = 1 << 20  # a save that failed with less free space than this ran out of disk


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. too many non-finite iterations in a row); the message says why."""


@dataclass
class TrainResult:
    """What a call of `run_training` did; per-iteration lists cover the iterations run in this call."""

    iterations: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # global mean loss per token (nan when not finite)
    learning_rates: list[float] = field(default_factory=list)  # the LR each iteration's update used
    grad_norms: list[float] = field(default_factory=list)  # before clipping
    skipped: list[bool] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)  # (iteration, loss) per evaluation
    final_iteration: int = 0
    consumed_samples: int = 0
    stopped_by_signal: bool = False
    exit_flag: str | None = None  # the --exit-* flag that ended training early
    checkpoints: list[Path] = field(default_factory=list)
    tokens_per_sec_per_device: float | None = None
    tflops_per_device: float | None = None
    mfu: float | None = None


@dataclass
class TrainState:
    """The trainer's own counters: saved in every checkpoint (`Trainer.state_dict`) and restored on resume."""

    iteration: int = 0
    consumed_samples: int = 0  # the position in the training data
    consumed_valid_samples: int = 0
    skipped_iterations: int = 0
    nan_iterations: int = 0
    nonfinite_streak: int = 0  # non-finite iterations in a row (--stop-after-nonfinite-iters)


@dataclass
class _Pending:
    """Device values of one iteration, read at the next log or save."""

    iteration: int
    lr: float
    loss_sum: torch.Tensor  # this DP rank's summed token loss
    tokens: int  # loss tokens in the global batch
    grad_norm: torch.Tensor
    found_inf: torch.Tensor
    scale_at_minimum: torch.Tensor | None  # fp16: the loss scale could not back off further
    router: torch.Tensor | None = None  # MoE: the step's router totals (`ExpertLoadTracker.take`)


@dataclass
class _Interval:
    """Counters of the current log interval (Megatron averages the loss over applied iterations)."""

    iterations: int = 0
    applied: int = 0
    loss_sum: float = 0.0
    skipped: int = 0
    nan: int = 0
    skipped_loss_sum: float = 0.0  # finite losses of skipped iterations: the log's loss when none was applied
    skipped_finite: int = 0
    balancing_loss_sum: float = 0.0  # MoE: load-balancing losses of the applied iterations

    @property
    def lm_loss(self) -> float:
        """Mean loss of the applied iterations (else of the skipped finite ones); NaN only beside nan iterations."""
        if self.applied:
            return self.loss_sum / self.applied
        return self.skipped_loss_sum / self.skipped_finite if self.skipped_finite else float("nan")


class StopSignal:
    """SIGTERM/SIGINT request a clean stop after the current iteration; a second SIGINT interrupts."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = name
        print(f"received {name}: finishing the current iteration, then saving and exiting", flush=True)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def token_loss_sum(
    model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor, extra: TokenInputs
) -> torch.Tensor:
    """Sum of the float32 cross entropy over positions whose label is not -100, for one micro batch.

    The model's chunked LM head + loss runs, so no full-vocab logits exist for the micro batch.
    """
    return model(tokens, labels, position_ids=extra.position_ids, document_ids=extra.document_ids,
                 return_logits=False, loss_reduction="sum").loss


def document_ids(tokens: torch.Tensor, eod_token_id: int) -> torch.Tensor:
    """Token ids [b, s] -> document ids [b, s]: the number of EOD tokens strictly before each position.

    Megatron's `--reset-attention-mask`: a document ends at (and includes) an EOD token, the next token starts
    the next document.
    """
    is_eod = (tokens == eod_token_id).long()  # [b, s]
    return is_eod.cumsum(dim=1) - is_eod  # [b, s]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Pipeline:
    """This rank's pipeline stages, the schedule running them and the group syncing a tied embedding."""

    stages: list[PipelineStageModule]
    schedule: PipelineSchedule
    tied_group: dist.ProcessGroup | None


def build_model_parts(config: TrainConfig, env: ParallelEnv) -> tuple[list[nn.Module], frozenset[str]]:
    """Meta model -> (pipeline split) -> parallelize -> to_empty -> tie: this rank's model parts, without weights.

    Returns the parts (the whole model, or this rank's pipeline stages) and the names of the parameters
    that other pipeline ranks hold.
    """
    resolved = config.require_resolved()
    cfg, layout = resolved.model_config, resolved.pipeline
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg, kernels=KernelOptions(attention=config.parallel.attention_backend))
    parts: list[Qwen3ForCausalLM] | list[PipelineStageModule] = [model]
    if layout is not None:
        parts = split_into_stages(model, env.pp_rank, env.pp, layout.stage_layers, layout.virtual_stages)
    par = config.parallel
    for part in parts:
        parallelize_model(
            part, env, compute_dtype(config), sequence_parallel=resolved.sequence_parallel,
            recompute_granularity=par.recompute_granularity, recompute_method=par.recompute_method,
            recompute_num_layers=par.recompute_num_layers, compile_blocks=par.compile, shard=not par.no_shard,
            cp_algo=par.context_parallel_algo, fp8=config.precision.fp8,
        )
        part.to_empty(device=env.device)
        part.model.rotary_emb.reset_parameters()
    if layout is None:
        model.tie_weights()  # to_empty gives embed_tokens and lm_head separate parameters
        return list(parts), frozenset()
    held = {n for n, _ in as_one_module(list(parts)).named_parameters()}
    return list(parts), frozenset(n for n, _ in model.named_parameters()) - held


def build_pipeline(config: TrainConfig, env: ParallelEnv, stages: list[PipelineStageModule]) -> Pipeline:
    """The schedule over this rank's stages, after their weights are set (a tied embedding is copied to the
    last stage here)."""
    resolved = config.require_resolved()
    layout, pp_group = resolved.pipeline, env.pp_group
    if layout is None or pp_group is None:
        raise RuntimeError("a pipeline needs --pipeline-model-parallel-size > 1 and a process group")
    tied_group = tied_embedding_group(stages, pp_group)
    broadcast_tied_embedding(stages, tied_group)
    micro_batch = MicroBatchShape(
        config.training.micro_batch_size, resolved.seq_length // env.cp, compute_dtype(config),
        env.tp if resolved.sequence_parallel else 1,
    )
    schedule = build_pipeline_schedule(stages, pp_group, resolved.num_microbatches, micro_batch,
                                       schedule=layout.schedule)
    return Pipeline(stages, schedule, tied_group)


def _init_weights(
    model: nn.Module, config: Qwen3Config, env: ParallelEnv, seed: int, elsewhere: frozenset[str]
) -> None:
    """Random init with `seed`. On CPU meshes (where DTensor has no distributed RNG) every rank builds
    the same full model and keeps its slices, so any layout starts from the single-process weights.
    On accelerators each pipeline rank draws its own stages' weights from its own seed."""
    torch.manual_seed(seed)
    if env.mesh is None or device_type() != "cpu":
        if env.pp > 1 and env.mesh is not None:
            from torch.distributed.tensor import _random as dtensor_random

            dtensor_random.manual_seed(seed + env.pp_rank, env.mesh)  # no RNG state sync across pp ranks
            torch.manual_seed(seed + env.pp_rank)
        init_module_weights(model, config.initializer_range)
        return
    with torch.device("meta"):
        full = Qwen3ForCausalLM(config)
    full.to_empty(device="cpu")
    full.tie_weights()
    full.init_weights()
    load_full_weights(model, full.named_parameters(), "the initial weights", elsewhere)


class Trainer:
    """Holds the model, optimizer, schedule, data and counters of one run; `run()` trains."""

    def __init__(self, config: TrainConfig, env: ParallelEnv) -> None:
        self.config, self.env = config, env
        self.resolved = config.require_resolved()
        self.compute_dtype = compute_dtype(config)
        seed_everything(config.training.seed)
        self.model_parts, held_elsewhere = build_model_parts(config, env)
        named = as_one_module(self.model_parts)  # the parameters under their global HF names
        self.params = [p for p in named.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(named, config)
        if config.precision.fp8_format is not None:
            attach_fp8_scale_precompute(self.optimizer, self.model_parts)
        self.scheduler = build_scheduler(self.optimizer, config)
        self.scaler = build_loss_scaler(config, env.device)
        self.state = TrainState()
        self.resumed_from: Path | None = None  # the native iteration directory resumed (never pruned)
        self.last_saved = self._load_or_init_weights(named, held_elsewhere)
        self.saver = AsyncSaver() if config.checkpoint.async_save else None
        self.in_flight: int | None = None  # the iteration --async-save writes in the background
        self.pipeline = None
        if self.resolved.pipeline is not None:
            self.pipeline = build_pipeline(config, env, typing.cast(list[PipelineStageModule], self.model_parts))
        self.pending: list[_Pending] = []
        self.last_grad_norm = float("nan")
        self.interval = _Interval()
        self.result = TrainResult()
        self.peak_tflops = device_peak_tflops(env.device, self.compute_dtype)
        self.memory_estimate = int(memory_estimate(config).total)
        self.metrics = MetricsWriter(config, env.is_last_rank)
        self.router, self.global_loads = self._track_router(named)
        self.train_data, self.valid_data, self.test_data = self._build_datasets()

    # ---- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The trainer's counters and the fp16 loss scaler, as a checkpoint stores them."""
        return {**dataclasses.asdict(self.state), "loss_scaler": self.scaler.state_dict() if self.scaler else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved (older checkpoints may lack some counters)."""
        iteration = int(state["iteration"])
        defaults = {"consumed_samples": iteration * self.resolved.global_batch_size}
        self.state = TrainState(**{
            f.name: int(state.get(f.name, defaults.get(f.name, 0))) for f in dataclasses.fields(TrainState)
        })
        if self.scaler is not None and state.get("loss_scaler") is not None:
            self.scaler.load_state_dict(state["loss_scaler"])

    # ---- setup ---------------------------------------------------------------------------------

    def _track_router(self, named: nn.Module) -> tuple[ExpertLoadTracker | None, list[GlobalExpertLoad]]:
        """MoE: the tracker of the steps' router statistics and the "global_aux_loss" expert loads over DP x CP."""
        cfg = self.resolved.model_config
        layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
        if not isinstance(cfg, Qwen3MoeConfig) or not layers:
            return None, []
        tracker = ExpertLoadTracker(named, layers, cfg.num_experts, self.env.device)
        return tracker, install_global_expert_load(named, self.env.batch_group)

    def _start_router_step(self, loss_scale: float | torch.Tensor) -> None:
        """MoE: reset the step's router statistics; each micro batch's load-balancing loss joins backward with
        loss scale / (micro batches x DP x CP), so the step adds their mean, as Megatron (1 / (micro batches x DP))."""
        if self.router is None:
            return
        self.router.reset()
        for hook in self.global_loads:
            hook.reset()
        scale = loss_scale / (self.resolved.num_microbatches * self.env.dp * self.env.cp)
        for part in self.model_parts:
            set_aux_loss_scale(part, typing.cast(float, scale))  # a device tensor under fp16: no host sync

    def _load_or_init_weights(self, named: nn.Module, held_elsewhere: frozenset[str]) -> int:
        """Random init, or --load's weights (and, resuming a native checkpoint, the optimizer, schedule,
        RNG and trainer state); returns the iteration the loaded checkpoint holds (-1: none)."""
        ck, fmt = self.config.checkpoint, self.resolved.load_format
        if ck.load is None or fmt is None:
            if ck.load is not None and self.env.rank == 0:  # --load = --save before its first complete save
                print(fresh_start_message(Path(ck.load)), flush=True)
            _init_weights(named, self.resolved.model_config, self.env, self.config.training.seed, held_elsewhere)
            return -1
        source = open_checkpoint(ck.load, fmt, verify=not ck.no_verify_checkpoint)
        with_optimizer = source.resumes and not (ck.no_load_optim or ck.finetune)
        state = source.load_into(
            named, self.optimizer if with_optimizer else None, self.scheduler if with_optimizer else None,
            load_rng=not (ck.no_load_rng or ck.finetune), held_elsewhere=held_elsewhere,
        )
        if state is None or ck.finetune:
            return -1
        if not with_optimizer:  # fresh optimizer and scaler; the schedule continues from the data position
            state = {k: v for k, v in state.items() if k != "loss_scaler"}
        self.load_state_dict(state)
        if fmt == "native":
            self.resumed_from = resolve_checkpoint_dir(ck.load)
        if not with_optimizer:
            self.scheduler.step(self.state.consumed_samples)
        return self.state.iteration

    def _build_datasets(self) -> tuple[Any, Any, Any]:
        data, log, r = self.config.data, self.config.logging, self.resolved
        gbs = r.global_batch_size
        eval_samples = (r.train_iters // log.eval_interval + 1) * log.eval_iters * gbs
        num_samples = (r.train_iters * gbs, eval_samples, log.eval_iters * gbs)

        seed = self.config.training.seed

        def from_paths(paths: list[str], split: str) -> tuple[Any, Any, Any]:
            return build_gpt_datasets(
                paths, split, r.seq_length, seed, num_samples, cache_dir=data.data_cache_path,
                eod_token_id=data.eod_token_id, eod_mask_loss=data.eod_mask_loss,
                reset_position_ids=data.reset_position_ids,
            )

        def build() -> tuple[Any, Any, Any]:
            if data.mock_data:  # Megatron's --mock-data: random tokens for every split
                vocab = r.model_config.vocab_size
                train, valid, test = (MockGPTDataset(max(n, 1), r.seq_length, vocab, seed + i)
                                      for i, n in enumerate(num_samples))
                return train, valid, test
            if data.train_data_path is None:
                return from_paths(data.data_path or [], data.split)
            per_split = (data.train_data_path, data.valid_data_path, data.test_data_path)  # each split whole
            split_sets = [
                from_paths(paths, ",".join("100" if j == i else "0" for j in range(3)))[i] if paths else None
                for i, paths in enumerate(per_split)
            ]
            return split_sets[0], split_sets[1], split_sets[2]

        if not self.env.distributed:
            return build()
        if self.env.rank == 0:  # rank 0 builds and caches the sample indices, the others read them
            datasets = build()
        dist.barrier(group=self.env.control_group)
        if self.env.rank != 0:
            datasets = build()
        return datasets

    def _micro_batches(self, dataset: Any, consumed: int, cyclic: bool) -> Iterator[dict[str, torch.Tensor]]:
        """This DP rank's micro batches from sample `consumed` on (restarting at 0 when cyclic)."""
        data = self.config.data
        while True:
            if consumed >= len(dataset):
                if not cyclic:
                    return
                consumed = 0
            loader = build_pretraining_loader(
                dataset, consumed, self.config.training.micro_batch_size, self.env.dp_rank, self.env.dp,
                num_workers=data.num_workers, pin_memory=self.env.device.type != "cpu",
            )
            yield from loader
            if not cyclic:
                return
            consumed = len(dataset)

    # ---- one step ------------------------------------------------------------------------------

    def _to_device(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, TokenInputs]:
        """A micro batch's token ids, labels (-100 where masked) and the position / document ids its flags ask for.

        With context parallelism, this CP rank's tokens of each (`context_parallel.shard_sequence`), with their
        global positions given explicitly.
        """
        data, device, env = self.config.data, self.env.device, self.env
        labels = batch["labels"].masked_fill(batch["loss_mask"] == 0, IGNORE_INDEX).to(device, non_blocking=True)
        tokens = batch["tokens"].to(device, non_blocking=True)
        positions = batch["position_ids"].to(device, non_blocking=True) if data.reset_position_ids else None
        documents = document_ids(tokens, data.eod_token_id) if data.reset_attention_mask else None
        if env.cp == 1:
            return tokens, labels, TokenInputs(positions, documents)
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)  # [b, s]
        algo = self.config.parallel.context_parallel_algo
        tokens, labels, positions = (shard_sequence(t, env.cp_rank, env.cp, algo) for t in (tokens, labels, positions))
        if documents is not None:
            documents = shard_sequence(documents, env.cp_rank, env.cp, algo)
        return tokens, labels, TokenInputs(positions, documents)

    def _global_tokens(self, batches: list[dict[str, torch.Tensor]]) -> int:
        """Loss tokens in the global batch (TP/PP/CP ranks of one DP slot hold the same data)."""
        local = sum(int(b["loss_mask"].sum()) for b in batches)
        return self.env.host_sum(local) // self.env.ranks_per_dp_slot

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.env.mesh is None and self.compute_dtype != torch.float32:
            return torch.autocast(self.env.device.type, dtype=self.compute_dtype)
        return contextlib.nullcontext()

    def _loss_parallel(self) -> contextlib.AbstractContextManager[Any]:
        if self.env.tp > 1:
            return vocab_parallel_loss()
        return contextlib.nullcontext()

    def _forward_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        tokens, labels, extra = self._to_device(batch)
        with self._autocast():
            return token_loss_sum(self.model_parts[0], tokens, labels, extra)

    def _stacked(self, batches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, TokenInputs]:
        """Token ids, labels and position / document ids of the micro batches, stacked for the pipeline schedule:
        [n * b, s] each (ids None where the flags ask for none)."""
        tokens, labels, extras = zip(*(self._to_device(batch) for batch in batches), strict=True)
        stacked = [None if ids[0] is None else torch.cat(ids) for ids in zip(*extras, strict=True)]
        return torch.cat(tokens), torch.cat(labels), TokenInputs(*stacked)

    def _forward_backward(self, batches: list[dict[str, torch.Tensor]], divisor: float) -> torch.Tensor:
        """Gradients of (summed token loss / divisor) x loss scale over the micro batches; returns the loss sum."""
        loss_scale = self.scaler.scale if self.scaler is not None else 1.0
        self._start_router_step(loss_scale)
        if self.pipeline is not None:
            tokens, labels, extra = self._stacked(batches)
            mean = self.pipeline.schedule.step(tokens, labels, num_tokens=divisor, loss_scale=loss_scale, extra=extra)
            sync_tied_embedding_grads(self.pipeline.stages, self.pipeline.tied_group)
            return mean * divisor
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.env.device)
        for batch in batches:
            with self._loss_parallel():
                loss = self._forward_loss(batch)
                (loss * (loss_scale / divisor)).backward()
            loss_sum += _plain(loss.detach())
        return loss_sum

    def train_step(self, batches: list[dict[str, torch.Tensor]]) -> _Pending:
        """Forward/backward every micro batch, clip, and update unless the gradients are not finite."""
        tokens = self._global_tokens(batches)
        loss_sum = self._forward_backward(batches, float(max(tokens, 1)))
        if self.scaler is not None:
            scale_grads_(self.params, 1.0 / self.scaler.scale)
        grad_norm = clip_grad_norm_(self.model_parts, self.config.optimizer.clip_grad, pp=self.env.pp_group)
        found_inf = (~torch.isfinite(grad_norm)).float()
        lr = self.optimizer.param_groups[0]["lr"]
        step_unless_nonfinite(self.optimizer, found_inf)
        at_minimum = None
        if self.scaler is not None:
            self.scaler.update(found_inf)
            at_minimum = self.scaler.at_minimum()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step(self.resolved.global_batch_size)  # corrected in _flush if the update was skipped
        self.state.iteration += 1
        self.state.consumed_samples += self.resolved.global_batch_size
        router = self.router.take(dist.group.WORLD if self.env.distributed else None) if self.router else None
        return _Pending(self.state.iteration, lr, loss_sum, tokens, grad_norm, found_inf, at_minimum, router)

    # ---- reading device values (log / save time) ----------------------------------------------

    def _flush(self) -> None:
        """Read the pending iterations' values, update counters and the result; correct the schedule."""
        if not self.pending:
            return
        sums = torch.stack([p.loss_sum for p in self.pending])  # [k]
        if self.env.batch_group is not None:
            dist.all_reduce(sums, group=self.env.batch_group)
        norms = torch.stack([p.grad_norm.float() for p in self.pending]).tolist()
        found = torch.stack([p.found_inf for p in self.pending]).tolist()
        minimum = [bool(p.scale_at_minimum) if p.scale_at_minimum is not None else True for p in self.pending]
        skipped_now = nan_now = 0
        gbs, loss_scale = self.resolved.global_batch_size, float(self.scaler.scale) if self.scaler is not None else 1.0
        for p, loss_sum, norm, inf, at_min in zip(self.pending, sums.tolist(), norms, found, minimum, strict=True):
            loss = loss_sum / max(p.tokens, 1)
            skipped = inf > 0
            nan = not math.isfinite(loss)  # a nan iteration whether or not its gradients were finite
            self.result.iterations.append(p.iteration)
            self.result.losses.append(loss)
            self.result.learning_rates.append(p.lr)
            self.result.grad_norms.append(norm)
            self.result.skipped.append(skipped)
            consumed = self.state.consumed_samples - (self.state.iteration - p.iteration) * gbs
            self.metrics.step(p.iteration, consumed, p.lr, loss, norm, loss_scale, gbs)
            balancing = self._router_metrics(p)
            self.interval.iterations += 1
            skipped_now += int(skipped)
            nan_now += int(nan)
            if nan or (skipped and at_min):
                self.state.nonfinite_streak += 1
            elif not skipped:
                self.state.nonfinite_streak = 0
            if skipped and not nan:
                self.interval.skipped_loss_sum += loss
                self.interval.skipped_finite += 1
            elif not skipped and not nan:
                self.interval.loss_sum += loss
                self.interval.applied += 1
                self.interval.balancing_loss_sum += balancing
        self.interval.skipped += skipped_now
        self.interval.nan += nan_now
        self.state.skipped_iterations += skipped_now
        self.state.nan_iterations += nan_now
        if skipped_now:  # Megatron does not advance the schedule for skipped updates
            self.scheduler.step(-skipped_now * self.resolved.global_batch_size)
        self.last_grad_norm = norms[-1]
        self.pending.clear()
        limit = self.config.training.stop_after_nonfinite_iters
        if self.state.nonfinite_streak >= limit:
            raise TrainingError(
                f"the last {self.state.nonfinite_streak} iterations (up to {self.state.iteration}) "
                "had a non-finite loss or "
                f"gradient and were skipped (--stop-after-nonfinite-iters {limit}); the weights are those of the last "
                "good update. Lower --lr, raise --lr-warmup-*, check the data, or resume from an earlier checkpoint"
            )

    def _router_metrics(self, pending: _Pending) -> float:
        """MoE: write the iteration's per-layer expert loads; returns its load-balancing loss (0 without MoE)."""
        if self.router is None or pending.router is None:
            return 0.0
        summary = summarize(pending.router, list(self.router.rows), self.env.tp)
        self.metrics.router(pending.iteration, summary)
        return summary.loss

    def _balancing_field(self) -> tuple[str, float] | None:
        """MoE: Megatron's name of the load-balancing loss and its mean over the interval's applied iterations;
        None without a loss (no MoE layer, type none, or coefficient 0)."""
        cfg = self.resolved.model_config
        if self.router is None or not isinstance(cfg, Qwen3MoeConfig) or cfg.router_aux_loss_coef == 0:
            return None
        name = LOSS_NAMES.get(cfg.moe_router_load_balancing_type)
        iv = self.interval
        return None if name is None else (name, iv.balancing_loss_sum / iv.applied if iv.applied else float("nan"))

    def _log_line(self, seconds: float) -> None:
        """Print the iteration line (last rank) and write the same numbers to JSONL/TensorBoard."""
        iv = self.interval
        n = max(iv.iterations, 1)
        tokens, tflops, mfu = throughput(self.config, n, seconds, self.env.world_size, self.peak_tflops)
        log = IterationLog(
            iteration=self.state.iteration, train_iters=self.resolved.train_iters,
            consumed_samples=self.state.consumed_samples,
            elapsed_ms_per_iteration=seconds * 1000.0 / n, lr=self.optimizer.param_groups[0]["lr"],
            global_batch_size=self.resolved.global_batch_size,
            lm_loss=iv.lm_loss,
            loss_scale=float(self.scaler.scale) if self.scaler is not None else 1.0,
            grad_norm=self.last_grad_norm, skipped_iterations=iv.skipped, nan_iterations=iv.nan,
            tokens_per_sec_per_device=tokens, tflops_per_device=tflops, mfu=mfu,
            mem_peak_bytes=self.env.host_max(peak_memory_bytes(self.env.device)),
            mem_estimate_bytes=self.memory_estimate, load_balancing=self._balancing_field(),
        )
        if self.env.is_last_rank:
            print(format_iteration_line(log), flush=True)
        self.metrics.iteration(log)
        self.interval = _Interval()

    # ---- evaluation ----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, dataset: Any, consumed: int, label: str) -> float:
        """Mean token loss over `--eval-iters` global batches of `dataset` from sample `consumed`."""
        steps, per_step = self.config.logging.eval_iters, self.resolved.num_microbatches
        batches = self._micro_batches(dataset, consumed, cyclic=True)
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.env.device)
        local_tokens = 0
        for _ in range(steps):
            step_batches = [next(batches) for _ in range(per_step)]
            if self.pipeline is not None:
                loss_sum += self.pipeline.schedule.loss_sum(*self._stacked(step_batches))
            else:
                for batch in step_batches:
                    with self._loss_parallel():
                        loss_sum += _plain(self._forward_loss(batch))
            local_tokens += sum(int(batch["loss_mask"].sum()) for batch in step_batches)
        if self.env.batch_group is not None:
            dist.all_reduce(loss_sum, group=self.env.batch_group)
        tokens = self.env.host_sum(local_tokens) // self.env.ranks_per_dp_slot
        loss = float(loss_sum) / max(tokens, 1)
        if self.env.is_last_rank:
            print("\n".join(format_validation_lines(label, loss)), flush=True)
        return loss

    def _periodic_eval(self) -> float:
        """Validation at --eval-interval; returns the seconds it took (kept out of iteration timing)."""
        log = self.config.logging
        if self.valid_data is None or log.eval_iters == 0 or self.state.iteration % log.eval_interval:
            return 0.0
        start = time.perf_counter()
        loss = self.evaluate(self.valid_data, self.state.consumed_valid_samples % len(self.valid_data),
                             f"iteration {self.state.iteration}")
        self.state.consumed_valid_samples += log.eval_iters * self.resolved.global_batch_size
        self.result.validation.append((self.state.iteration, loss))
        self.metrics.validation(self.state.iteration, loss)
        return time.perf_counter() - start

    # ---- checkpoints ---------------------------------------------------------------------------

    def save(self) -> bool:
        """Save a native checkpoint of the current iteration (reads pending values first); returns False, with a
        printed note, without saving while the last iteration was non-finite. A full disk is a TrainingError.
        With --async-save the files are written in the background after the state is copied to host memory
        (`wait_for_save` blocks until they are committed)."""
        self._flush()
        ck = self.config.checkpoint
        if ck.save is None:
            raise RuntimeError("save() needs --save")
        if self.state.nonfinite_streak:
            if self.env.is_last_rank:
                print(
                    f"not saving a checkpoint at iteration {self.state.iteration}: its loss or gradients were not "
                    f"finite; a later good iteration saves instead (last saved: {self._last_saved_text()})",
                    flush=True,
                )
            return False
        self.wait_for_save()
        iteration, save_dir = self.state.iteration, Path(ck.save)
        with self._out_of_space_is_fatal(iteration, save_dir):
            path = save_checkpoint(
                save_dir, iteration, as_one_module(self.model_parts), self.optimizer, self.scheduler,
                train_state=self.state_dict(), config=self.config.checkpoint_dict(),
                keep_last=ck.keep_last_checkpoints,
                also_write=(lambda directory: self._write_mcore_weights(directory, iteration))
                if ck.ckpt_format == "torch" else None,
                protected=self.resumed_from, background=self.saver,
            )
        self.result.checkpoints.append(path)
        self.last_saved = iteration
        self.in_flight = iteration if self.saver is not None else None
        return True

    def wait_for_save(self) -> None:
        """Block until a save running in the background (--async-save) is committed; a full disk is a TrainingError."""
        if self.saver is None or self.in_flight is None:
            return
        iteration, self.in_flight = self.in_flight, None
        with self._out_of_space_is_fatal(iteration, Path(typing.cast(str, self.config.checkpoint.save))):
            self.saver.wait()

    @contextlib.contextmanager
    def _out_of_space_is_fatal(self, iteration: int, save_dir: Path) -> Iterator[None]:
        """Turn a save's failure for lack of disk space into a TrainingError, its partial files removed."""
        before = _entries(save_dir)
        try:
            yield
        except (Exception, CheckpointException) as exc:
            if not _out_of_space(exc, save_dir):
                raise
            if self.env.rank == 0:  # the partial save: hidden entries (its staging directory) it created
                for entry in _entries(save_dir) - before:
                    if entry.name.startswith("."):
                        shutil.rmtree(entry, ignore_errors=True)
            raise TrainingError(
                f"no space left on device while saving the checkpoint of iteration {iteration} to "
                f"{save_dir} (its partial files were removed); free space there or point --save elsewhere, then "
                f"resume with --load (last saved: {self._last_saved_text()})"
            ) from exc

    def _last_saved_text(self) -> str:
        return f"iteration {self.last_saved}" if self.last_saved >= 0 else "none"

    def _write_mcore_weights(self, iteration_dir: Path, iteration: int) -> None:
        """`--ckpt-format torch`: the weights, in the compute dtype, as Megatron mcore rank files of this run's
        TP/PP/EP layout in the same iteration directory (read back from the checkpoint, on rank 0 only); a MoE
        model's experts in the grouped-GEMM layout when the run was given `--moe-grouped-gemm`, as Megatron
        would save them."""
        r, par = self.resolved, self.config.parallel
        stage_layers = r.pipeline.stage_layers if r.pipeline is not None else [r.model_config.num_hidden_layers]
        layout = McoreLayout.build(r.model_config, par.tensor_model_parallel_size, len(stage_layers), stage_layers,
                                   ep=par.expert_model_parallel_size,
                                   grouped="--moe-grouped-gemm" in self.config.ignored)
        saved = load_model_tensors(iteration_dir, verify=False)  # just written; its manifest comes after this
        tensors = ((name, t.to(self.compute_dtype)) for name, t in saved.items())
        add_mcore_rank_files(iteration_dir, tensors, r.model_config, layout, iteration,
                             pp_ranks=par.pipeline_model_parallel_size)

    # ---- the loop ------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train until --train-iters (or a stop signal); save at --save-interval and at the end."""
        config, env, r = self.config, self.env, self.resolved
        if env.rank == 0:
            print("\n".join(startup_summary(config, env, self.compute_dtype)), flush=True)
        ck, log = config.checkpoint, config.logging
        stop, profiler = StopSignal(), StepProfiler(config, env)
        watchdog = HangWatchdog(config.training.hang_timeout_minutes, env.rank)
        watchdog.start()
        try:
            batches = self._micro_batches(self.train_data, self.state.consumed_samples, cyclic=False)
            run_start = interval_start = time.perf_counter()
            start_iteration = self.state.iteration
            save_due = False  # a --save-interval save postponed past non-finite iterations
            while self.state.iteration < r.train_iters:
                watchdog.beat()
                profiler.before_step(self.state.iteration)
                step_batches = [next(batches) for _ in range(r.num_microbatches)]
                self.pending.append(self.train_step(step_batches))
                if self.state.iteration % log.log_interval == 0:
                    self._flush()
                    now = time.perf_counter()
                    self._log_line(now - interval_start)
                    interval_start = now
                interval_start += profiler.after_step(self.state.iteration)
                interval_start += self._periodic_eval()
                if ck.save and ck.save_interval and self.state.iteration % ck.save_interval == 0:
                    save_due = True
                if save_due:
                    save_start = time.perf_counter()
                    save_due = not self.save()
                    interval_start += time.perf_counter() - save_start
                if env.host_any(stop.received is not None):
                    self.result.stopped_by_signal = True
                    break
                self.result.exit_flag = self._exit_flag(time.perf_counter() - run_start)
                if self.result.exit_flag is not None:
                    break
            self._flush()
            watchdog.beat()
            seconds = time.perf_counter() - run_start
            if ck.save and self.last_saved != self.state.iteration and not save_due:  # due: refused just now
                self.save()
            if not self.result.stopped_by_signal and self.result.exit_flag is None:
                self._final_evaluations()
            self.wait_for_save()
            self._finish(self.state.iteration - start_iteration, seconds)
        finally:
            watchdog.stop()
            profiler.close(self.state.iteration)
            stop.restore()
            self.metrics.close()
        return self.result

    def _exit_flag(self, seconds: float) -> str | None:
        """The flag that ends training now (Megatron's --exit-interval / --exit-duration-in-mins), or None."""
        tr = self.config.training
        if tr.exit_interval is not None and self.state.iteration % tr.exit_interval == 0:
            return f"--exit-interval {tr.exit_interval}"
        duration = tr.exit_duration_in_mins
        if duration is not None and self.env.host_any(seconds / 60.0 > duration):
            return f"--exit-duration-in-mins {duration:g}"
        return None

    def _final_evaluations(self) -> None:
        """Megatron evaluates the validation and test splits once more after training."""
        log = self.config.logging
        if log.eval_iters == 0:
            return
        if self.valid_data is not None and (
            not self.result.validation or self.result.validation[-1][0] != self.state.iteration
        ):
            loss = self.evaluate(self.valid_data, self.state.consumed_valid_samples % len(self.valid_data),
                                 f"iteration {self.state.iteration} on validation set")
            self.result.validation.append((self.state.iteration, loss))
            self.metrics.validation(self.state.iteration, loss)
        if self.test_data is not None:
            self.evaluate(self.test_data, 0, f"iteration {self.state.iteration} on test set")

    def _finish(self, iterations: int, seconds: float) -> None:
        result = self.result
        result.final_iteration, result.consumed_samples = self.state.iteration, self.state.consumed_samples
        if iterations:
            tokens, tflops, mfu = throughput(self.config, iterations, seconds, self.env.world_size, self.peak_tflops)
            result.tokens_per_sec_per_device, result.tflops_per_device, result.mfu = tokens, tflops, mfu
        if self.env.is_last_rank:
            how = "stopped by signal" if result.stopped_by_signal else "finished"
            rate = f"; {tokens:.1f} tokens/s per device, {tflops:.2f} TFLOP/s per device" if iterations else ""
            mfu_text = f", MFU {100 * mfu:.1f}%" if iterations and mfu is not None else ""
            print(
                f"training {how} at iteration {self.state.iteration} ({iterations} this run){rate}{mfu_text}",
                flush=True,
            )


def _entries(directory: Path) -> set[Path]:
    """What `directory` holds (nothing when it does not exist)."""
    return set(directory.iterdir()) if directory.is_dir() else set()


def _out_of_space(exc: BaseException, directory: Path) -> bool:
    """Whether a failed save ran out of disk: ENOSPC in the error, its causes, a rank's failure or report of it, or
    (torch's zip writer drops the errno) under LOW_SPACE_BYTES left in `directory`."""
    pending, seen = [exc], set()
    while pending:
        error = pending.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or os.strerror(errno.ENOSPC) in str(error):
            return True
        pending += [e for e in (error.__cause__, error.__context__) if e is not None]
        if isinstance(error, CheckpointException):
            pending += [failure for failure, _ in error.failures.values()]
    try:
        return shutil.disk_usage(directory).free < LOW_SPACE_BYTES
    except OSError:
        return False


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor (loss under loss_parallel) as a plain tensor."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def run_training(config: TrainConfig) -> TrainResult:
    """Train with `config` in this process (one of the torchrun ranks, or alone).

    Validates the config for this world size before any process group starts, locks the run's directories
    (rank 0; `run_lock.RunDirectoryInUse` when another run holds one), joins or creates the process group,
    trains, and leaves the group as it found it (created here -> destroyed here).
    """
    world = dist.get_world_size() if dist.is_initialized() else None
    if config.resolved is None or (world is not None and config.resolved.world_size != world):
        preflight(config, world)
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    # rank 0 locks the run's directories before any process group starts or any file is written
    with run_lock.hold(run_lock.run_directories(config) if rank == 0 else []):
        par = config.parallel
        env = init_parallel(par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
                            timeout_minutes=par.distributed_timeout_minutes, cp=par.context_parallel_size,
                            ep=par.expert_model_parallel_size)
        try:
            result = Trainer(config, env).run()
        except Exception as exc:
            if env.distributed and is_peer_failure(exc):  # name the dead ranks: the error names only an address
                print(f"qwen3-pretrain train: error: {describe_failure(exc, missing_ranks())}", file=sys.stderr,
                      flush=True)
            raise
        sys.stdout.flush()
        shutdown_parallel(env)
    return result
