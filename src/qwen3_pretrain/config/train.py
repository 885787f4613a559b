"""One training configuration: a YAML recipe and Megatron/MindSpeed flags -> a validated `TrainConfig`.

Every setting is a dataclass field whose flag is its name with dashes (`seq_length` <-> `--seq-length`),
grouped in sections (model, data, training, optimizer, precision, parallel, checkpoint, logging).
Values come from, in increasing priority: the field defaults (Megatron's, except the model shape
defaults, which are Qwen3's), the `--config` YAML file (a flat mapping of flag names, dashes or
underscores), then the command-line flags. Megatron flags that do not apply to this implementation
are accepted and listed in `TrainConfig.ignored`; unknown flags are errors that suggest the nearest
known flag. `TrainConfig.validate(world_size)` checks everything that can be checked before any
process group starts and raises `ConfigError` naming the flag to change.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import yaml

from qwen3_pretrain.config.model import ConfigError, Qwen3Config, get_preset

if TYPE_CHECKING:
    from qwen3_pretrain.distributed.planner import MemoryEstimate

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")
RECOMPUTE_GRANULARITIES = ("full", "selective")
PIPELINE_SCHEDULES = ("1f1b", "gpipe")
ATTENTION_BACKENDS = ("auto", "flash", "fused", "efficient", "unfused")  # model.kernels.ATTENTION_BACKENDS
CONFIG_FLAG = "--config"


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A config field with its help text (and allowed values) for the flag."""
    return field(default=default, metadata={"help": help, "choices": choices})


def _list_opt(help: str) -> Any:
    return field(default=None, metadata={"help": help, "choices": None})


@dataclass
class ModelArgs:
    """Model shape: a preset, an HF `--load` directory's config.json, and/or Megatron shape flags."""

    model: str | None = _opt(
        None, "preset (qwen3-0.6b ... qwen3-32b, qwen3-demo, qwen3-tiny) or HF directory; shape flags override it"
    )
    num_layers: int | None = _opt(None, "transformer layers")
    hidden_size: int | None = _opt(None, "hidden size")
    ffn_hidden_size: int | None = _opt(None, "MLP intermediate size")
    num_attention_heads: int | None = _opt(None, "attention heads")
    group_query_attention: bool | None = _opt(None, "use --num-query-groups key/value heads")
    num_query_groups: int | None = _opt(None, "key/value heads (GQA groups)")
    kv_channels: int | None = _opt(None, "head dim (default hidden size / heads)")
    padded_vocab_size: int | None = _opt(None, "model vocabulary size (default: the tokenizer's, padded)")
    make_vocab_size_divisible_by: int = _opt(128, "pad a tokenizer-derived vocabulary to a multiple of this x TP")
    max_position_embeddings: int | None = _opt(None, "maximum positions (default: --seq-length)")
    rotary_base: float | None = _opt(None, "RoPE theta (default Qwen3's 1000000)")
    norm_epsilon: float | None = _opt(None, "RMSNorm epsilon (default Qwen3's 1e-6)")
    untie_embeddings_and_output_weights: bool | None = _opt(None, "separate LM head (Qwen3 8B and larger)")
    init_method_std: float | None = _opt(None, "std of the normal weight init (default 0.02)")


@dataclass
class DataArgs:
    """Training data and tokenizer."""

    data_path: list[str] | None = _list_opt("dataset prefixes, or WEIGHT PREFIX pairs (Megatron .bin/.idx)")
    split: str = _opt("969, 30, 1", "train,valid,test proportions of the documents")
    seq_length: int | None = _opt(None, "tokens per sample")
    tokenizer_name_or_path: str | None = _opt(None, "HF tokenizer directory (checks the vocabulary fits the model)")
    data_cache_path: str | None = _opt(None, "directory for the cached sample indices")
    num_workers: int = _opt(2, "data loader worker processes")
    eod_mask_loss: bool = _opt(False, "no loss on positions whose input token is end-of-document")
    reset_position_ids: bool = _opt(False, "restart position ids after every end-of-document")
    eod_token_id: int = _opt(151643, "end-of-document token id (Qwen3 <|endoftext|>)")


@dataclass
class TrainingArgs:
    """Batch sizes, length of the run, seed."""

    micro_batch_size: int = _opt(1, "samples per device per forward/backward")
    global_batch_size: int | None = _opt(None, "samples per optimizer step (default micro batch x DP)")
    train_iters: int | None = _opt(None, "optimizer steps to run")
    train_samples: int | None = _opt(None, "samples to train on (instead of --train-iters)")
    seed: int = _opt(1234, "random seed (weight init, data order)")
    stop_after_nonfinite_iters: int = _opt(10, "stop when this many iterations in a row had non-finite loss/grads")


@dataclass
class OptimizerArgs:
    """AdamW and the learning-rate schedule (Megatron's OptimizerParamScheduler)."""

    optimizer: str = _opt("adam", "optimizer (adam = AdamW with decoupled weight decay)", ("adam",))
    lr: float | None = _opt(None, "peak learning rate")
    min_lr: float = _opt(0.0, "learning rate at the end of the decay")
    lr_decay_style: str = _opt("linear", "decay style", LR_DECAY_STYLES)
    lr_decay_iters: int | None = _opt(None, "iterations to decay over (default --train-iters)")
    lr_decay_samples: int | None = _opt(None, "samples to decay over (default --train-samples)")
    lr_warmup_fraction: float | None = _opt(None, "warmup as a fraction of the decay steps")
    lr_warmup_iters: int = _opt(0, "warmup iterations")
    lr_warmup_samples: int = _opt(0, "warmup samples (with --train-samples)")
    lr_warmup_init: float = _opt(0.0, "learning rate at the start of the warmup")
    lr_wsd_decay_style: str = _opt("exponential", "annealing style of the WSD schedule", WSD_DECAY_STYLES)
    lr_wsd_decay_iters: int | None = _opt(None, "WSD annealing iterations")
    lr_wsd_decay_samples: int | None = _opt(None, "WSD annealing samples")
    weight_decay: float = _opt(0.01, "decoupled weight decay (not applied to norms and biases)")
    clip_grad: float = _opt(1.0, "clip the global gradient norm to this (0 = no clipping)")
    adam_beta1: float = _opt(0.9, "Adam beta1")
    adam_beta2: float = _opt(0.999, "Adam beta2")
    adam_eps: float = _opt(1e-8, "Adam epsilon")


@dataclass
class PrecisionArgs:
    """Compute precision; master weights and optimizer state are always fp32."""

    bf16: bool = _opt(False, "bf16 compute")
    fp16: bool = _opt(False, "fp16 compute with a dynamic loss scaler")
    loss_scale: float | None = _opt(None, "static loss scale for fp16 (default: dynamic)")
    initial_loss_scale: float = _opt(2.0**32, "initial dynamic loss scale")
    min_loss_scale: float = _opt(1.0, "minimum dynamic loss scale")
    loss_scale_window: int = _opt(1000, "overflow-free iterations before the loss scale doubles")
    hysteresis: int = _opt(2, "overflows tolerated before the loss scale halves")


@dataclass
class ParallelArgs:
    """Parallel layout; data parallel size = world size / (TP x PP)."""

    tensor_model_parallel_size: int = _opt(1, "tensor parallel size")
    pipeline_model_parallel_size: int = _opt(1, "pipeline parallel size")
    num_layer_list: str | None = _opt(None, "decoder layers per pipeline stage, comma-separated (default: even)")
    num_layers_per_virtual_pipeline_stage: int | None = _opt(
        None, "layers per virtual pipeline stage: interleaved 1F1B with several stages per rank"
    )
    pipeline_schedule: str = _opt("1f1b", "pipeline schedule (interleaved 1F1B with virtual stages)", PIPELINE_SCHEDULES)
    sequence_parallel: bool = _opt(False, "shard norms and the residual stream over TP (needs TP > 1)")
    no_shard: bool = _opt(False, "replicate weights and optimizer state over DP (DDP-style) instead of FSDP")
    recompute_granularity: str | None = _opt(None, "activation recomputation per block", RECOMPUTE_GRANULARITIES)
    compile: bool = _opt(False, "torch.compile each transformer block")
    attention_backend: str = _opt(
        "auto", "attention kernel tried first: flash, fused (cuDNN), efficient; unfused = math only; auto = torch's "
        "order (CUDA/CPU; Ascend always uses npu_fusion_attention)", ATTENTION_BACKENDS,
    )
    device_memory: str | None = _opt(None, "memory per device for the fit check, e.g. 32GB (default: detected)")
    skip_memory_check: bool = _opt(False, "train even when the memory estimate exceeds the device memory")


@dataclass
class CheckpointArgs:
    """Saving and loading."""

    save: str | None = _opt(None, "directory for native checkpoints")
    save_interval: int | None = _opt(None, "save every this many iterations (and at the end)")
    load: str | None = _opt(None, "native checkpoint to resume, HF directory or mcore checkpoint for initial weights")
    no_load_optim: bool = _opt(False, "load weights (and position) but not optimizer and LR scheduler state")
    no_load_rng: bool = _opt(False, "do not restore RNG states")
    finetune: bool = _opt(False, "load weights only and start at iteration 0")


@dataclass
class LoggingArgs:
    """Log line, evaluation, metrics files."""

    log_interval: int = _opt(100, "print the iteration line every this many iterations")
    eval_interval: int = _opt(1000, "evaluate on the validation split every this many iterations")
    eval_iters: int = _opt(100, "global batches per evaluation")
    tensorboard_dir: str | None = _opt(None, "write TensorBoard scalars here")
    run_dir: str | None = _opt(None, "write metrics.jsonl here (default: the --save directory)")


SECTIONS: dict[str, type] = {
    "model": ModelArgs,
    "data": DataArgs,
    "training": TrainingArgs,
    "optimizer": OptimizerArgs,
    "precision": PrecisionArgs,
    "parallel": ParallelArgs,
    "checkpoint": CheckpointArgs,
    "logging": LoggingArgs,
}

# Megatron/MindSpeed flags that do not apply here: flag -> number of values it takes.
IGNORED_FLAGS: dict[str, int] = {
    **dict.fromkeys(
        (
            "--use-mcore-models", "--use-legacy-models", "--use-flash-attn", "--use-fused-rmsnorm",
            "--use-fused-swiglu", "--use-fused-rotary-pos-emb", "--use-rotary-position-embeddings",
            "--no-masked-softmax-fusion", "--no-gradient-accumulation-fusion", "--no-bias-dropout-fusion",
            "--no-bias-gelu-fusion", "--no-bias-swiglu-fusion", "--no-rope-fusion", "--masked-softmax-fusion",
            "--attention-softmax-in-fp32", "--accumulate-allreduce-grads-in-fp32", "--use-distributed-optimizer",
            "--overlap-grad-reduce", "--overlap-param-gather", "--exit-on-missing-checkpoint",
            "--no-shared-storage", "--use-mc2", "--reuse-fp32-param", "--use-cpu-initialization",
            "--qk-layernorm", "--swiglu", "--disable-bias-linear", "--exit-signal-handler",
            "--no-async-tensor-model-parallel-allreduce", "--use-fused-ring-attention-update",
            "--manual-gc", "--no-create-attention-mask-in-dataloader", "--log-throughput",
            "--log-timers-to-tensorboard", "--log-validation-ppl-to-tensorboard",
        ),
        0,
    ),
    **dict.fromkeys(
        (
            "--distributed-backend", "--tokenizer-type", "--normalization", "--position-embedding-type",
            "--hidden-dropout", "--attention-dropout", "--transformer-impl", "--recompute-method",
            "--recompute-num-layers", "--distributed-timeout-minutes", "--ckpt-format", "--manual-gc-interval",
            "--rotary-percent", "--attention-mask-type", "--log-level",
        ),
        1,
    ),
    "--spec": 2,
}

# Ignored flags whose value must still describe a Qwen3 model: flag -> accepted values.
_FIXED_BY_QWEN3: dict[str, tuple[str, ...]] = {
    "--normalization": ("RMSNorm",),
    "--position-embedding-type": ("rope",),
    "--hidden-dropout": ("0", "0.0"),
    "--attention-dropout": ("0", "0.0"),
    "--rotary-percent": ("1", "1.0"),
    "--tokenizer-type": ("PretrainedFromHF", "HuggingFaceTokenizer"),
}

# Model flags -> Qwen3Config fields (num_query_groups and the tie flag are handled separately).
_MODEL_FIELDS: dict[str, str] = {
    "num_layers": "num_hidden_layers",
    "hidden_size": "hidden_size",
    "ffn_hidden_size": "intermediate_size",
    "num_attention_heads": "num_attention_heads",
    "kv_channels": "head_dim",
    "padded_vocab_size": "vocab_size",
    "max_position_embeddings": "max_position_embeddings",
    "rotary_base": "rope_theta",
    "norm_epsilon": "rms_norm_eps",
    "init_method_std": "initializer_range",
}
_QWEN3_FIELD_FLAGS: dict[str, str] = {
    **{hf: f"--{flag.replace('_', '-')}" for flag, hf in _MODEL_FIELDS.items()},
    "num_key_value_heads": "--num-query-groups",
    "tie_word_embeddings": "--untie-embeddings-and-output-weights",
}


def flag_name(name: str) -> str:
    """`seq_length` -> `--seq-length`."""
    return "--" + name.replace("_", "-")


def _field_types() -> dict[str, tuple[str, type]]:
    """field name -> (section, base type) for every config field."""
    table: dict[str, tuple[str, type]] = {}
    for section, cls in SECTIONS.items():
        for name, hint in typing.get_type_hints(cls).items():
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            base = args[0] if typing.get_origin(hint) in (Union, types.UnionType) else hint
            table[name] = (section, list if typing.get_origin(base) is list else base)
    return table


FIELDS = _field_types()


@dataclass(frozen=True)
class PipelineLayout:
    """How the layers are split into pipeline stages and which schedule runs them."""

    stage_layers: list[int]  # decoder layers of every stage, in stage order
    virtual_stages: int  # stages per rank (> 1: interleaved 1F1B)
    schedule: str  # "1f1b" | "gpipe" | "interleaved_1f1b"


@dataclass
class Resolved:
    """Values derived by `TrainConfig.validate` for one world size."""

    world_size: int
    dp_size: int
    num_microbatches: int
    global_batch_size: int
    train_iters: int
    model_config: Qwen3Config
    load_format: str | None  # "native" | "hf" | "mcore" | None
    pipeline: PipelineLayout | None  # with --pipeline-model-parallel-size > 1
    tokenizer_vocab_size: int | None
    notes: list[str]


@dataclass
class TrainConfig:
    """The whole training configuration; build with `parse_train_args` or `TrainConfig.from_flat`."""

    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    training: TrainingArgs = field(default_factory=TrainingArgs)
    optimizer: OptimizerArgs = field(default_factory=OptimizerArgs)
    precision: PrecisionArgs = field(default_factory=PrecisionArgs)
    parallel: ParallelArgs = field(default_factory=ParallelArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    logging: LoggingArgs = field(default_factory=LoggingArgs)
    ignored: list[str] = field(default_factory=list)  # Megatron flags accepted but not applicable
    resolved: Resolved | None = field(default=None, repr=False)

    # ---- building ----------------------------------------------------------------------------

    @classmethod
    def from_flat(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        """Build from {field name (dashes or underscores): value}; ConfigError names unknown keys."""
        config = cls()
        for key, value in values.items():
            name = key.lstrip("-").replace("-", "_")
            if name not in FIELDS:
                raise ConfigError(f"{source}: unknown setting {key!r}.{_suggest(flag_name(name))}")
            section, base = FIELDS[name]
            setattr(getattr(config, section), name, _coerce(value, base, f"{source}: {flag_name(name)}"))
        return config

    def to_flat(self) -> dict[str, Any]:
        """{flag name with dashes: value} of every field that differs from its default (a recipe)."""
        flat: dict[str, Any] = {}
        for section, cls in SECTIONS.items():
            defaults = cls()
            for f in dataclasses.fields(cls):
                value = getattr(getattr(self, section), f.name)
                if value != getattr(defaults, f.name):
                    flat[f.name.replace("_", "-")] = value
        return flat

    def checkpoint_dict(self) -> dict[str, Any]:
        """What a checkpoint records: the resolved Qwen3Config (`model`) and the run's flags (`flags`)."""
        resolved = self.require_resolved()
        return {"model": dataclasses.asdict(resolved.model_config), "flags": self.to_flat()}

    def require_resolved(self) -> Resolved:
        if self.resolved is None:
            raise RuntimeError("TrainConfig.validate(world_size) must run before the config is used")
        return self.resolved

    # ---- validation --------------------------------------------------------------------------

    def validate(self, world_size: int | None = None) -> Resolved:
        """Check every setting for `world_size` processes (default $WORLD_SIZE or 1); set `resolved`.

        Raises ConfigError naming the flag to change. Runs before any process group exists.
        """
        from qwen3_pretrain.distributed import device  # imports torch: on use

        world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
        notes: list[str] = []
        self._check_ranges()
        self._check_choices()
        par, tr = self.parallel, self.training
        tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
        if world_size % (tp * pp):
            raise ConfigError(
                f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
                f"--pipeline-model-parallel-size {pp}; change them or the number of processes"
            )
        if par.sequence_parallel and tp == 1:
            par.sequence_parallel = False
            notes.append("--sequence-parallel (tensor-model-parallel-size is 1)")
        if par.attention_backend != "auto" and device.device_type() == "npu":
            notes.append(f"--attention-backend {par.attention_backend} (Ascend NPUs use npu_fusion_attention)")
        dp = world_size // (tp * pp)
        gbs = tr.global_batch_size if tr.global_batch_size is not None else tr.micro_batch_size * dp
        if gbs % (tr.micro_batch_size * dp):
            raise ConfigError(
                f"--global-batch-size {gbs} is not divisible by --micro-batch-size {tr.micro_batch_size} x "
                f"data-parallel size {dp} (= {tr.micro_batch_size * dp}); change one of them"
            )
        train_iters = self._train_iters(gbs)
        self._check_schedule(train_iters, gbs)
        self._check_precision()
        self._check_data()
        load_format = self._check_load()
        tokenizer_vocab = self._tokenizer_vocab_size()
        model_config = self._model_config(load_format, tokenizer_vocab, tp)
        self._check_model_fits(model_config, tokenizer_vocab, tp)
        num_microbatches = gbs // (tr.micro_batch_size * dp)
        pipeline = self._pipeline_layout(model_config, num_microbatches) if pp > 1 else None
        if self.checkpoint.save_interval is not None and not self.checkpoint.save:
            notes.append("--save-interval (no --save directory)")
        self.resolved = Resolved(
            world_size=world_size, dp_size=dp, num_microbatches=num_microbatches,
            global_batch_size=gbs, train_iters=train_iters, model_config=model_config,
            load_format=load_format, pipeline=pipeline, tokenizer_vocab_size=tokenizer_vocab, notes=notes,
        )
        self._check_memory_fits()
        return self.resolved

    def memory_estimate(self) -> MemoryEstimate:
        """The planner's memory estimate per device for this (validated) run's layout."""
        import torch

        from qwen3_pretrain.distributed.device import local_device
        from qwen3_pretrain.distributed.planner import Layout, estimate_memory
        from qwen3_pretrain.model import kernels
        from qwen3_pretrain.model.qwen3 import DEFAULT_LOSS_CHUNK_TOKENS

        r, par = self.require_resolved(), self.parallel
        layout = Layout(
            tp=par.tensor_model_parallel_size, pp=par.pipeline_model_parallel_size, dp=r.dp_size,
            micro_batch_size=self.training.micro_batch_size, recompute=par.recompute_granularity or "none",
            sequence_parallel=par.sequence_parallel, shard=not par.no_shard,
        )
        compute_bytes = 2 if self.precision.bf16 or self.precision.fp16 else 4
        return estimate_memory(r.model_config, layout, self.data.seq_length, compute_dtype_bytes=compute_bytes,
                               loss_chunk_tokens=DEFAULT_LOSS_CHUNK_TOKENS,
                               bf16_float32_matmuls=self.precision.bf16
                               and kernels.bf16_via_float32(local_device(), torch.bfloat16))

    def _check_memory_fits(self) -> None:
        """Refuse a layout whose memory estimate exceeds the device memory (--skip-memory-check to try anyway)."""
        from qwen3_pretrain.distributed.device import device_memory_bytes
        from qwen3_pretrain.distributed.planner import GIB, parse_size

        par = self.parallel
        if par.skip_memory_check:
            return
        try:
            local = int(os.environ.get("LOCAL_WORLD_SIZE", self.require_resolved().world_size))
            budget = parse_size(par.device_memory) if par.device_memory is not None else device_memory_bytes(local)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        estimate = self.memory_estimate()
        if estimate.total <= budget:
            return
        parts = ", ".join(f"{k} {v:.2f}" for k, v in estimate.as_gib().items() if k != "total")
        r = self.require_resolved()
        raise ConfigError(
            f"this layout needs about {estimate.total / GIB:.2f} GiB per device ({parts} GiB) but a device has "
            f"{budget / GIB:.2f} GiB. Run `qwen3-pretrain plan --model {self.model.model or '<preset>'} --seq-length {self.data.seq_length} "
            f"--global-batch-size {r.global_batch_size} --devices {r.world_size} --device-memory "
            f"{budget / GIB:.0f}GB` for layouts that fit (more tensor/pipeline parallelism, "
            "--recompute-granularity full, a smaller --micro-batch-size), or pass --skip-memory-check to try anyway"
        )

    def _check_ranges(self) -> None:
        positive = (
            "micro_batch_size", "global_batch_size", "train_iters", "train_samples", "seq_length", "log_interval",
            "eval_interval", "save_interval", "tensor_model_parallel_size", "pipeline_model_parallel_size",
            "make_vocab_size_divisible_by", "stop_after_nonfinite_iters", "loss_scale_window", "hysteresis",
            "lr_decay_iters", "lr_decay_samples", "lr_wsd_decay_iters", "lr_wsd_decay_samples",
            "loss_scale", "initial_loss_scale", "min_loss_scale",
        )
        non_negative = (
            "min_lr", "weight_decay", "clip_grad", "lr_warmup_iters", "lr_warmup_samples", "lr_warmup_init",
            "eval_iters", "num_workers", "adam_eps",
        )
        for name in positive + non_negative:
            value = self.get(name)
            if value is None:
                continue
            if value <= 0 if name in positive else value < 0:
                bound = "> 0" if name in positive else ">= 0"
                raise ConfigError(f"{flag_name(name)} must be {bound}, got {value}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= self.get(name) < 1.0:
                raise ConfigError(f"{flag_name(name)} must be in [0, 1), got {self.get(name)}")

    def _check_choices(self) -> None:
        opt = self.optimizer
        styles = {s.lower(): s for s in LR_DECAY_STYLES}
        if opt.lr_decay_style.lower() not in styles:
            raise ConfigError(f"--lr-decay-style {opt.lr_decay_style!r}: use one of {', '.join(LR_DECAY_STYLES)}")
        opt.lr_decay_style = styles[opt.lr_decay_style.lower()]
        for section, cls in SECTIONS.items():
            for f in dataclasses.fields(cls):
                choices, value = f.metadata["choices"], getattr(getattr(self, section), f.name)
                if choices and value is not None and value not in choices and f.name != "lr_decay_style":
                    raise ConfigError(f"{flag_name(f.name)} {value!r}: use one of {', '.join(choices)}")

    def _train_iters(self, gbs: int) -> int:
        tr = self.training
        if (tr.train_iters is None) == (tr.train_samples is None):
            raise ConfigError("give exactly one of --train-iters and --train-samples")
        if tr.train_iters is not None:
            return tr.train_iters
        if tr.train_samples < gbs:
            raise ConfigError(f"--train-samples {tr.train_samples} is less than one global batch ({gbs})")
        return tr.train_samples // gbs

    def _check_schedule(self, train_iters: int, gbs: int) -> None:
        opt = self.optimizer
        if opt.lr is None or opt.lr <= 0:
            raise ConfigError(f"--lr is required and must be > 0 (got {opt.lr})")
        if opt.min_lr > opt.lr:
            raise ConfigError(f"--min-lr {opt.min_lr} is larger than --lr {opt.lr}")
        if opt.lr_warmup_init > opt.lr:
            raise ConfigError(f"--lr-warmup-init {opt.lr_warmup_init} is larger than --lr {opt.lr}")
        if opt.lr_warmup_fraction is not None and (opt.lr_warmup_iters or opt.lr_warmup_samples):
            raise ConfigError("give only one of --lr-warmup-fraction and --lr-warmup-iters/--lr-warmup-samples")
        if opt.lr_warmup_fraction is not None and not 0.0 <= opt.lr_warmup_fraction < 1.0:
            raise ConfigError(f"--lr-warmup-fraction must be in [0, 1), got {opt.lr_warmup_fraction}")
        by_samples = self.training.train_samples is not None
        for name in (("lr_decay_iters", "lr_warmup_iters", "lr_wsd_decay_iters") if by_samples else
                     ("lr_decay_samples", "lr_warmup_samples", "lr_wsd_decay_samples")):
            if self.get(name):
                other = "--train-samples" if by_samples else "--train-iters"
                raise ConfigError(f"{flag_name(name)} does not apply with {other}; use its "
                                  f"{'samples' if by_samples else 'iters'} counterpart")
        steps = schedule_steps(self, train_iters, gbs)
        if steps.warmup >= steps.decay:
            raise ConfigError(
                f"the LR warmup ({steps.warmup:g} samples) is not shorter than the decay ({steps.decay} samples); "
                "lower --lr-warmup-fraction/--lr-warmup-iters or raise --lr-decay-iters"
            )
        if opt.lr_decay_style == "WSD" and steps.wsd_decay is None:
            raise ConfigError("--lr-decay-style WSD needs --lr-wsd-decay-iters (or --lr-wsd-decay-samples)")

    def _check_precision(self) -> None:
        if self.precision.bf16 and self.precision.fp16:
            raise ConfigError("--bf16 and --fp16 are exclusive; pick one")

    def _check_data(self) -> None:
        from qwen3_pretrain.data.gpt_dataset import DataConfigError, parse_data_path, parse_split
        from qwen3_pretrain.data.indexed import bin_path, idx_path, strip_suffix

        data = self.data
        if not data.data_path:
            raise ConfigError(
                "--data-path is required: the prefix of a tokenized dataset (PREFIX.bin + PREFIX.idx, "
                "written by `qwen3-pretrain preprocess`)"
            )
        if data.seq_length is None:
            raise ConfigError("--seq-length is required (tokens per sample, e.g. 4096)")
        try:
            prefixes, _ = parse_data_path(data.data_path)
            parse_split(data.split)
        except DataConfigError as exc:
            raise ConfigError(str(exc)) from exc
        for prefix in prefixes:
            prefix = strip_suffix(prefix)
            missing = [p for p in (bin_path(prefix), idx_path(prefix)) if not os.path.isfile(p)]
            if missing:
                raise ConfigError(
                    f"--data-path {prefix}: {', '.join(missing)} not found; pass the prefix that "
                    "`qwen3-pretrain preprocess` wrote (e.g. data/corpus_text_document)"
                )

    def _check_load(self) -> str | None:
        ck = self.checkpoint
        if ck.load is None:
            return None
        from qwen3_pretrain.checkpoint.native import detect_checkpoint_format

        fmt = detect_checkpoint_format(ck.load)
        if fmt is not None:
            return fmt
        if ck.save and Path(ck.load).resolve() == Path(ck.save).resolve() and _empty_or_missing(Path(ck.load)):
            return None  # Megatron's `--load DIR --save DIR` on the first run: start from scratch
        what = "does not exist" if not Path(ck.load).exists() else "is none of the known checkpoint formats"
        raise ConfigError(
            f"--load {ck.load} {what}: pass a native checkpoint directory (a --save directory or one iter_N), "
            "an HF model directory (config.json + *.safetensors) or a Megatron mcore checkpoint"
        )

    def _tokenizer_vocab_size(self) -> int | None:
        path = self.data.tokenizer_name_or_path
        if path is None:
            return None
        from qwen3_pretrain.tokenizer import TokenizerError, load_tokenizer

        try:
            return len(load_tokenizer(path))
        except TokenizerError as exc:
            raise ConfigError(f"--tokenizer-name-or-path: {exc}") from exc

    def _base_model_config(self, load_format: str | None) -> Qwen3Config | None:
        """The shape to start from: the preset, the HF/mcore/native checkpoint's config, or None."""
        preset = self.model.model
        if preset is not None:
            if (Path(preset) / "config.json").is_file():
                return Qwen3Config.from_pretrained(preset)
            return get_preset(preset)
        load = self.checkpoint.load
        if load_format == "hf":
            return Qwen3Config.from_pretrained(load)
        if load_format == "mcore":
            from qwen3_pretrain.checkpoint.mcore import iter_mcore_as_hf

            config, _, _ = iter_mcore_as_hf(load)
            return config
        if load_format == "native":
            from qwen3_pretrain.checkpoint.export import qwen3_config_from_saved
            from qwen3_pretrain.checkpoint.native import load_model_config, resolve_checkpoint_dir

            return qwen3_config_from_saved(load_model_config(load), resolve_checkpoint_dir(load))
        return None

    def _model_config(self, load_format: str | None, tokenizer_vocab: int | None, tp: int) -> Qwen3Config:
        m = self.model
        try:
            base = self._base_model_config(load_format)
        except (ValueError, OSError) as exc:  # ConfigError and checkpoint errors are ValueErrors
            raise ConfigError(f"cannot read the model shape: {exc}") from exc
        values: dict[str, Any] = dataclasses.asdict(base) if base is not None else {}
        if base is None:
            missing = [flag_name(n) for n in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads")
                       if getattr(m, n) is None]
            if missing:
                raise ConfigError(
                    f"the model shape is not given: pass --model PRESET, --load an HF directory, or "
                    f"{', '.join(missing)}"
                )
            values["max_position_embeddings"] = self.data.seq_length
            values["tie_word_embeddings"] = True
            if m.padded_vocab_size is None:
                if tokenizer_vocab is None:
                    raise ConfigError("pass --padded-vocab-size or --tokenizer-name-or-path to set the vocabulary size")
                multiple = m.make_vocab_size_divisible_by * tp
                values["vocab_size"] = math.ceil(tokenizer_vocab / multiple) * multiple
        for flag, hf_field in _MODEL_FIELDS.items():
            if getattr(m, flag) is not None:
                values[hf_field] = getattr(m, flag)
        if m.num_attention_heads is not None and m.kv_channels is None and base is None:
            values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]
        if m.num_query_groups is not None:
            values["num_key_value_heads"] = m.num_query_groups
        elif m.group_query_attention and base is None:
            raise ConfigError("--group-query-attention needs --num-query-groups (the number of key/value heads)")
        elif base is None or (m.num_attention_heads is not None and not m.group_query_attention):
            values["num_key_value_heads"] = values["num_attention_heads"]
        if m.untie_embeddings_and_output_weights is not None:
            values["tie_word_embeddings"] = not m.untie_embeddings_and_output_weights
        values["rope_theta"] = float(values.get("rope_theta", Qwen3Config.rope_theta))
        values["torch_dtype"] = "bfloat16" if self.precision.bf16 else "float16" if self.precision.fp16 else "float32"
        try:
            return Qwen3Config(**values)
        except ConfigError as exc:
            flags = [flag for hf, flag in _QWEN3_FIELD_FLAGS.items() if hf in str(exc)]
            hint = f" (set with {', '.join(flags)})" if flags else ""
            raise ConfigError(f"invalid model shape: {exc}{hint}") from exc

    def _check_model_fits(self, cfg: Qwen3Config, tokenizer_vocab: int | None, tp: int) -> None:
        seq = self.data.seq_length
        if seq > cfg.max_position_embeddings:
            raise ConfigError(
                f"--seq-length {seq} exceeds the model's max position embeddings {cfg.max_position_embeddings}; "
                "lower --seq-length or raise --max-position-embeddings"
            )
        if tokenizer_vocab is not None and tokenizer_vocab > cfg.vocab_size:
            raise ConfigError(
                f"the tokenizer in --tokenizer-name-or-path {self.data.tokenizer_name_or_path} has {tokenizer_vocab} "
                f"tokens but the model's vocabulary is {cfg.vocab_size}; raise --padded-vocab-size (or pick the "
                "model's own tokenizer)"
            )
        if tp > 1:
            from qwen3_pretrain.distributed.tensor_parallel import validate_tensor_parallel_size

            try:
                validate_tensor_parallel_size(cfg, tp)
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc

    def _pipeline_layout(self, cfg: Qwen3Config, num_microbatches: int) -> PipelineLayout:
        """The stage split and schedule for --pipeline-model-parallel-size > 1; ConfigError names the flag."""
        from qwen3_pretrain.distributed.pipeline import stage_layer_counts, virtual_pipeline_stages

        par = self.parallel
        pp = par.pipeline_model_parallel_size
        if self.data.reset_position_ids:
            raise ConfigError(
                "--reset-position-ids is not supported with --pipeline-model-parallel-size > 1 (the stages "
                "exchange hidden states only); drop one of them"
            )
        layer_list = None
        if par.num_layer_list is not None:
            try:
                layer_list = [int(n) for n in par.num_layer_list.split(",")]
            except ValueError:
                raise ConfigError(
                    f"--num-layer-list {par.num_layer_list!r} must be comma-separated integers, e.g. 7,7,7,7"
                ) from None
        try:
            virtual = 1
            if par.num_layers_per_virtual_pipeline_stage is not None:
                virtual = virtual_pipeline_stages(cfg.num_hidden_layers, pp, par.num_layers_per_virtual_pipeline_stage)
            stage_layers = stage_layer_counts(cfg.num_hidden_layers, pp, virtual, layer_list)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        if virtual > 1 and par.pipeline_schedule != "1f1b":
            raise ConfigError(
                f"--pipeline-schedule {par.pipeline_schedule} cannot run virtual stages "
                "(--num-layers-per-virtual-pipeline-stage runs interleaved 1F1B); drop one of them"
            )
        schedule = "interleaved_1f1b" if virtual > 1 else par.pipeline_schedule
        needs_multiple = schedule == "interleaved_1f1b"
        if (schedule == "1f1b" and num_microbatches < pp) or (needs_multiple and num_microbatches % pp):
            rule = "a multiple of" if needs_multiple else "at least"
            raise ConfigError(
                f"the {schedule} pipeline schedule needs the number of micro batches per step ({num_microbatches} = "
                f"global batch / (micro batch x data-parallel size)) to be {rule} --pipeline-model-parallel-size {pp}; "
                "raise --global-batch-size or lower --micro-batch-size"
            )
        return PipelineLayout(stage_layers, virtual, schedule)

    # ---- access ------------------------------------------------------------------------------

    def get(self, name: str) -> Any:
        """The value of field `name` (underscored flag name), whatever its section."""
        return getattr(getattr(self, FIELDS[name][0]), name)


@dataclass(frozen=True)
class ScheduleSteps:
    """LR schedule lengths in samples, computed as Megatron's training.py does."""

    warmup: float
    decay: int
    wsd_decay: int | None


def schedule_steps(config: TrainConfig, train_iters: int, gbs: int) -> ScheduleSteps:
    """Warmup/decay/WSD-decay lengths in samples (Megatron counts the schedule in samples)."""
    opt = config.optimizer
    if config.training.train_samples is None:
        decay = (opt.lr_decay_iters if opt.lr_decay_iters is not None else train_iters) * gbs
        wsd = opt.lr_wsd_decay_iters * gbs if opt.lr_wsd_decay_iters is not None else None
        warmup_explicit = opt.lr_warmup_iters * gbs
    else:
        decay = opt.lr_decay_samples if opt.lr_decay_samples is not None else config.training.train_samples
        wsd = opt.lr_wsd_decay_samples
        warmup_explicit = opt.lr_warmup_samples
    warmup = opt.lr_warmup_fraction * decay if opt.lr_warmup_fraction is not None else warmup_explicit
    return ScheduleSteps(warmup=warmup, decay=decay, wsd_decay=wsd)


# ---- parsing -----------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of exiting."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


def build_parser(prog: str = "qwen3-pretrain train") -> argparse.ArgumentParser:
    """The flag parser; only flags given on the command line appear in the namespace."""
    parser = _Parser(
        prog=prog, allow_abbrev=False, argument_default=argparse.SUPPRESS,
        description="Pretrain a Qwen3 model with Megatron/MindSpeed flags (flags override --config).",
    )
    parser.add_argument(CONFIG_FLAG, metavar="YAML", help="recipe: a YAML mapping of flag names to values")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        for f in dataclasses.fields(cls):
            base = FIELDS[f.name][1]
            kwargs: dict[str, Any] = {"dest": f.name, "help": f.metadata["help"]}
            if base is bool:
                kwargs["action"] = "store_true"
            elif base is list:
                kwargs["nargs"] = "+"
            else:
                kwargs["type"] = base
                kwargs["metavar"] = base.__name__.upper()
            group.add_argument(flag_name(f.name), **kwargs)
    return parser


def known_flags() -> list[str]:
    """Every flag `train` accepts, including the ignored Megatron ones."""
    return [CONFIG_FLAG, *(flag_name(n) for n in FIELDS), *IGNORED_FLAGS]


def _suggest(flag: str) -> str:
    close = difflib.get_close_matches(flag, known_flags(), n=1, cutoff=0.6)
    return f" Did you mean {close[0]}?" if close else ""


def _take_ignored(argv: list[str]) -> tuple[list[str], list[str]]:
    """Remove ignored Megatron flags (and their values) from argv; return (rest, ignored flag names)."""
    rest: list[str] = []
    ignored: list[str] = []
    i = 0
    while i < len(argv):
        name, eq, inline = argv[i].partition("=")
        if name not in IGNORED_FLAGS:
            rest.append(argv[i])
            i += 1
            continue
        count = IGNORED_FLAGS[name]
        values = [inline] if eq else argv[i + 1 : i + 1 + count]
        if len(values) != count or any(v.startswith("--") for v in values):
            raise ConfigError(f"{name} expects {count} value(s)")
        _check_fixed(name, values, "command line")
        ignored.append(name)
        i += 1 + (0 if eq else count)
    return rest, ignored


def _check_fixed(flag: str, values: list[Any], source: str) -> None:
    allowed = _FIXED_BY_QWEN3.get(flag)
    if allowed and str(values[0]) not in allowed:
        raise ConfigError(f"{source}: {flag} {values[0]} is not supported: Qwen3 uses {allowed[0]}")


def load_recipe(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[str]]:
    """A YAML recipe -> ({field name: value}, ignored flag names); ConfigError names the file and key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{CONFIG_FLAG} {path}: cannot read the file ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{CONFIG_FLAG} {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}, []
    if not isinstance(data, dict):
        raise ConfigError(f"{CONFIG_FLAG} {path} must hold a mapping of flag names to values")
    values: dict[str, Any] = {}
    ignored: list[str] = []
    for key, value in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        flag = flag_name(name)
        if flag in IGNORED_FLAGS:
            _check_fixed(flag, [value], str(path))
            ignored.append(flag)
            continue
        if name not in FIELDS:
            raise ConfigError(f"{path}: unknown setting {key!r}.{_suggest(flag)}")
        values[name] = value
    return values, ignored


def parse_train_args(argv: list[str], world_size: int | None = None) -> TrainConfig:
    """Flags (and the `--config` recipe they name) -> a validated TrainConfig for `world_size` processes."""
    rest, ignored = _take_ignored(list(argv))
    namespace, unknown = build_parser().parse_known_args(rest)
    for token in unknown:
        if token.startswith("-"):
            raise ConfigError(f"unknown flag {token.partition('=')[0]}.{_suggest(token.partition('=')[0])}")
        raise ConfigError(f"unexpected value {token!r}: it follows no flag that takes a value")
    given = vars(namespace)
    values: dict[str, Any] = {}
    recipe = given.pop("config", None)
    if recipe is not None:
        values, recipe_ignored = load_recipe(recipe)
        ignored = recipe_ignored + ignored
    values.update(given)
    config = TrainConfig.from_flat(values, source=str(recipe) if recipe else "command line")
    config.ignored = list(dict.fromkeys(ignored))
    config.validate(world_size)
    return config


def _coerce(value: Any, base: type, where: str) -> Any:
    """A YAML/flag value as the field's type; ConfigError names `where`."""
    if value is None:
        return None
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "false"):
                return str(value).lower() == "true"
            raise ValueError
        if base is list:
            return [str(v) for v in value] if isinstance(value, (list, tuple)) else str(value).split()
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {base.__name__}, got {value!r}") from None


def _empty_or_missing(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


__all__ = [
    "CheckpointArgs", "ConfigError", "DataArgs", "LoggingArgs", "ModelArgs", "OptimizerArgs", "ParallelArgs",
    "PrecisionArgs", "Resolved", "ScheduleSteps", "TrainConfig", "TrainingArgs", "build_parser", "flag_name",
    "load_recipe", "parse_train_args", "schedule_steps",
]
