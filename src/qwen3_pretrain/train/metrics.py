"""Megatron's iteration and validation log lines, throughput figures, the start-up summary, and the
same numbers as `<run dir>/metrics.jsonl`, TensorBoard scalars and Weights & Biases (written by the last rank)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from qwen3_pretrain.config import Qwen3Config, Qwen3MoeConfig, TrainConfig, schedule_steps
from qwen3_pretrain.distributed.float8 import fp8_emulated
from qwen3_pretrain.distributed.mesh import ParallelEnv
from qwen3_pretrain.distributed.planner import DEVICE_SPECS, GIB
from qwen3_pretrain.model import kernels
from qwen3_pretrain.train.moe_stats import RouterSummary
from qwen3_pretrain.train.preflight import memory_estimate

METRICS_FILE = "metrics.jsonl"


@dataclass
class IterationLog:
    """The values of one iteration log line (averages over the log interval where Megatron averages)."""

    iteration: int
    train_iters: int
    consumed_samples: int
    elapsed_ms_per_iteration: float
    lr: float
    global_batch_size: int
    lm_loss: float  # mean over the interval's applied (not skipped) iterations
    loss_scale: float
    grad_norm: float  # of the last iteration
    skipped_iterations: int  # in this interval
    nan_iterations: int  # in this interval
    tokens_per_sec_per_device: float
    tflops_per_device: float
    mfu: float | None  # fraction of the device's dense peak; None when the peak is unknown
    mem_peak_bytes: int  # measured peak memory per device so far, max over ranks (CPU: peak resident set)
    mem_estimate_bytes: int  # the planner's estimate per device (`preflight.memory_estimate`)
    load_balancing: tuple[str, float] | None = None  # MoE: (Megatron's name, mean over the applied iterations)

    def to_record(self) -> dict[str, Any]:
        """The JSONL record: the line's numbers at full precision (non-finite values as null)."""
        skip = ("train_iters", "load_balancing")
        record = {k: _finite_or_none(v) for k, v in vars(self).items() if k not in skip}
        if self.mfu is None:
            record.pop("mfu")
        if self.load_balancing is not None:
            record[self.load_balancing[0]] = _finite_or_none(self.load_balancing[1])
        return record


def format_iteration_line(log: IterationLog, now: datetime | None = None) -> str:
    """Megatron's training log line, fields and widths as in Megatron (a MoE model's load-balancing loss after the
    LM loss, as Megatron's MoE tracker), throughput fields appended."""
    stamp = (now or datetime.now()).strftime("%Y-%m-%d %H:%M:%S")
    balancing = "" if log.load_balancing is None else f" {log.load_balancing[0]}: {log.load_balancing[1]:.6E} |"
    line = (
        f" [{stamp}] iteration {log.iteration:8d}/{log.train_iters:8d} |"
        f" consumed samples: {log.consumed_samples:12d} |"
        f" elapsed time per iteration (ms): {log.elapsed_ms_per_iteration:.1f} |"
        f" learning rate: {log.lr:.6E} |"
        f" global batch size: {log.global_batch_size:5d} |"
        f" lm loss: {log.lm_loss:.6E} |{balancing}"  # Megatron prints its MoE losses after the LM loss
        f" loss scale: {log.loss_scale:.1f} |"
        f" grad norm: {log.grad_norm:.3f} |"
        f" number of skipped iterations: {log.skipped_iterations:3d} |"
        f" number of nan iterations: {log.nan_iterations:3d} |"
        f" tokens per second per device: {log.tokens_per_sec_per_device:.1f} |"
        f" TFLOP/s per device: {log.tflops_per_device:.2f} |"
    )
    if log.mfu is not None:
        line += f" MFU: {100 * log.mfu:.1f}% |"
    return line + f" mem peak/est (GiB): {log.mem_peak_bytes / GIB:.2f}/{log.mem_estimate_bytes / GIB:.2f} |"


def format_validation_lines(label: str, loss: float) -> list[str]:
    """Megatron's validation block: a dashed rule, ` validation loss at {label} | lm loss value: ... |
    lm loss PPL: ... | `, a dashed rule."""
    text = f" validation loss at {label} | lm loss value: {loss:.6E} | lm loss PPL: {perplexity(loss):.6E} | "
    rule = "-" * (len(text) + 1)
    return [rule, text, rule]


def perplexity(loss: float) -> float:
    """exp(loss) capped at exp(20), as Megatron reports it."""
    return math.exp(min(20.0, loss)) if math.isfinite(loss) else float("nan")


def device_peak_tflops(device: torch.device, compute_dtype: torch.dtype) -> float | None:
    """Dense bf16/fp16 peak TFLOP/s of the device when known (None on CPU, in fp32, or unknown)."""
    if device.type == "cpu" or compute_dtype == torch.float32:
        return None
    try:
        name = getattr(torch, device.type).get_device_name(device)
    except (AttributeError, RuntimeError):
        return None
    compact = "".join(name.lower().split()).replace("-", "")
    matches = [key for key in DEVICE_SPECS if key in compact]
    return DEVICE_SPECS[max(matches, key=len)][0] if matches else None


def throughput(
    config: TrainConfig, iterations: int, seconds: float, world_size: int, peak_tflops: float | None
) -> tuple[float, float, float | None]:
    """(tokens/s per device, model TFLOP/s per device, MFU or None) of `iterations` in `seconds`."""
    resolved = config.require_resolved()
    seq = resolved.seq_length
    tokens = resolved.global_batch_size * seq * iterations / max(seconds, 1e-9) / world_size
    tflops = tokens * resolved.model_config.flops_per_token(seq) / 1e12
    return tokens, tflops, (tflops / peak_tflops if peak_tflops else None)


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsWriter:
    """Appends records to `<run dir>/metrics.jsonl` and scalars to TensorBoard and W&B; inactive off the last rank.

    Each iteration's own scalars (`step`) go out every --tensorboard-log-interval iterations, as Megatron writes
    them; the log line's figures over its interval (`iteration`: time, throughput, memory) with every log line.
    W&B gets the TensorBoard scalars by iteration (not the "vs samples" ones) plus Megatron's "samples vs steps".
    """

    def __init__(self, config: TrainConfig, active: bool) -> None:
        log = config.logging
        self.interval, self.log_memory = log.tensorboard_log_interval, log.log_memory_to_tensorboard
        self.jsonl = None
        self.tensorboard = None
        self.wandb: Any = None
        if not active:
            return
        run_dir = log.run_dir or config.checkpoint.save
        if run_dir is not None:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            self.jsonl = open(os.path.join(run_dir, METRICS_FILE), "a", encoding="utf-8")  # noqa: SIM115
        if log.tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=log.tensorboard_dir, max_queue=1000)
        if log.wandb_project is not None:
            self.wandb = _start_wandb(config, run_dir)

    def step(
        self, iteration: int, consumed_samples: int, lr: float, lm_loss: float, grad_norm: float, loss_scale: float,
        batch_size: int,
    ) -> None:
        """One iteration's values, written when `iteration` is a multiple of --tensorboard-log-interval."""
        if iteration % self.interval:
            return
        self._scalars({"learning-rate": lr, "batch-size": batch_size, "lm loss": lm_loss, "loss-scale": loss_scale,
                       "grad-norm": grad_norm}, iteration)
        if self.tensorboard is not None:
            self.tensorboard.add_scalar("lm loss vs samples", lm_loss, consumed_samples)
        if self.wandb is not None:
            self.wandb.log({"samples vs steps": consumed_samples}, step=iteration)

    def router(self, iteration: int, summary: RouterSummary) -> None:
        """MoE: one iteration's load-balancing loss and per-layer tokens per expert (max, mean), every
        --tensorboard-log-interval iterations: a busiest expert far above the mean shows routing collapse."""
        if iteration % self.interval:
            return
        self._write({"iteration": iteration, "load_balancing_loss": _finite_or_none(summary.loss),
                     "moe_layers": summary.layers, "tokens_per_expert_max": summary.tokens_max,
                     "tokens_per_expert_mean": summary.tokens_mean})
        scalars = {"moe/load_balancing_loss": summary.loss}
        for layer, top, mean in zip(summary.layers, summary.tokens_max, summary.tokens_mean, strict=True):
            scalars[f"moe/tokens_per_expert_max_layer_{layer}"] = top
            scalars[f"moe/tokens_per_expert_mean_layer_{layer}"] = mean
        self._scalars(scalars, iteration)

    def iteration(self, log: IterationLog) -> None:
        """The log line's record, and its interval figures as scalars."""
        self._write(log.to_record())
        scalars: dict[str, float] = {
            "iteration-time": log.elapsed_ms_per_iteration / 1e3,
            "tokens-per-sec-per-device": log.tokens_per_sec_per_device, "tflops-per-device": log.tflops_per_device,
        }
        if log.mfu is not None:
            scalars["mfu"] = log.mfu
        if self.log_memory:
            scalars["mem-max-allocated-bytes"] = log.mem_peak_bytes
            scalars["mem-estimate-bytes"] = log.mem_estimate_bytes
        self._scalars(scalars, log.iteration)

    def validation(self, iteration: int, loss: float) -> None:
        self._write(
            {"iteration": iteration, "val_loss": _finite_or_none(loss), "val_ppl": _finite_or_none(perplexity(loss))}
        )
        self._scalars({"lm loss validation": loss, "lm loss validation ppl": perplexity(loss)}, iteration)

    def _scalars(self, scalars: dict[str, float], step: int) -> None:
        if self.tensorboard is not None:
            for tag, value in scalars.items():
                self.tensorboard.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def _write(self, record: dict[str, Any]) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(config: TrainConfig, run_dir: str | None) -> Any:
    """A W&B run under --wandb-save-dir (default `<run dir>/wandb`), offline unless $WANDB_MODE says otherwise."""
    import wandb

    log = config.logging
    save_dir = log.wandb_save_dir or (os.path.join(run_dir, "wandb") if run_dir is not None else None)
    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=log.wandb_project, name=log.wandb_exp_name, entity=log.wandb_entity, dir=save_dir,
        config=config.to_flat(), mode=None if "WANDB_MODE" in os.environ else "offline",
    )


def startup_summary(config: TrainConfig, env: ParallelEnv, compute_dtype: torch.dtype) -> list[str]:
    """Lines describing the model, layout, batch arithmetic, tokens per iteration and memory per device."""
    r = config.require_resolved()
    cfg = r.model_config
    seq, mbs = r.seq_length, config.training.micro_batch_size
    par = config.parallel
    tokens_per_iter = r.global_batch_size * seq
    dp_mode = "FSDP2 sharded" if not par.no_shard else "replicated (DDP-style)"
    if env.world_size == 1:
        dp_mode = "single process"
    recompute = par.recompute_granularity or "none"
    if recompute == "full" and par.recompute_method is not None:
        recompute += f" ({par.recompute_method} {par.recompute_num_layers})"
    precision = config.precision.name
    if kernels.bf16_via_float32(env.device, compute_dtype):
        precision += " (this CPU has no fast bf16 matmul: float32 matmuls of bf16-rounded operands)"
    if config.precision.fp8 is not None:
        emulated = ", emulated: this device has no FP8 matmuls" if fp8_emulated(env.device) else ""
        precision += f" + FP8 block linears ({', '.join(config.precision.fp8)}{emulated})"
    steps = schedule_steps(config, r.train_iters, r.global_batch_size)
    memory = memory_estimate(config).as_gib()
    parts = ", ".join(f"{k} {v:.2f}" for k, v in memory.items() if k != "total")
    opt = config.optimizer
    lines = [
        f"model: {cfg.ARCHITECTURE.removesuffix('ForCausalLM')} with {cfg.num_parameters():,} parameters"
        f"{_moe_summary(cfg)} ({cfg.num_hidden_layers} layers, hidden "
        f"{cfg.hidden_size}, {cfg.num_attention_heads} heads / {cfg.num_key_value_heads} kv heads x {cfg.head_dim}, "
        f"ffn {cfg.intermediate_size}, vocab {cfg.vocab_size}, {'tied' if cfg.tie_word_embeddings else 'untied'} "
        f"embeddings); {cfg.flops_per_token(seq) / 1e9:.2f} GFLOP per token",
        f"layout: {env.world_size} process(es) on {env.device.type} = TP {env.tp} x PP {env.pp} x DP {env.dp}"
        f"{f' (EP {env.ep}: experts split over {env.ep} of the DP ranks)' if env.ep > 1 else ''}"
        f"{f' x CP {env.cp} ({par.context_parallel_algo})' if env.cp > 1 else ''}, {dp_mode}, "
        f"recompute {recompute}, compile {'on' if par.compile else 'off'}, "
        f"attention {par.attention_backend}, "
        f"{precision} compute with fp32 master weights and optimizer state",
        f"batch: global {r.global_batch_size} = micro {mbs} x DP {env.dp} x {r.num_microbatches} accumulation "
        f"step(s); {tokens_per_iter:,} tokens per iteration (seq {seq}); {r.train_iters} iterations = "
        f"{tokens_per_iter * r.train_iters:,} tokens",
        f"optimizer: AdamW lr {opt.lr:g} -> {opt.min_lr:g} ({opt.lr_decay_style}), warmup {steps.warmup:g} samples, "
        f"decay over {steps.decay} samples, weight decay {opt.weight_decay:g}, clip {opt.clip_grad:g}, "
        f"betas ({opt.adam_beta1:g}, {opt.adam_beta2:g})",
        f"memory estimate per device: {memory['total']:.2f} GiB ({parts})",
    ]
    if r.pipeline is not None:
        stages = ", ".join(map(str, r.pipeline.stage_layers))
        lines.append(f"pipeline: {r.pipeline.schedule} schedule, {r.pipeline.virtual_stages} stage(s) per rank, "
                     f"decoder layers per stage {stages}")
    if "--calculate-per-token-loss" not in config.ignored:
        lines.append(
            "loss: the mean over every loss token of the global batch, as Megatron's --calculate-per-token-loss; "
            "Megatron without it averages each micro batch's token mean, which differs when micro batches hold "
            "different numbers of loss tokens (--eod-mask-loss)"
        )
    ignored = config.ignored + r.notes
    if ignored:
        lines.append(f"accepted without effect here (see docs/flags.md): {' '.join(ignored)}")
    return lines


def _moe_summary(cfg: Qwen3Config) -> str:
    """A Qwen3-MoE model's active parameters and routing, for the startup summary ("" for a dense model)."""
    if not isinstance(cfg, Qwen3MoeConfig):
        return ""
    moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    balancing = cfg.moe_router_load_balancing_type
    return (f", {cfg.num_parameters(active=True):,} active per token; {moe} MoE layers of {cfg.num_experts} experts "
            f"x {cfg.moe_intermediate_size}, top-{cfg.num_experts_per_tok}"
            f"{' renormalised' if cfg.norm_topk_prob else ''}, load balancing {balancing}"
            f"{f' x {cfg.router_aux_loss_coef:g}' if balancing != 'none' else ''}")
