"""The training run's settings as data: the schema (`TrainConfig`, one dataclass section per flag group),
the table of Megatron/MindSpeed flags that do not apply here, and the pure checks of a run.

Every setting is a dataclass field whose flag is its name with dashes (`seq_length` <-> `--seq-length`),
grouped in sections (model, data, training, optimizer, precision, parallel, checkpoint, logging); the
field defaults are Megatron's, except the model shape defaults, which are Qwen3's. Megatron flags that
do not apply to this implementation are accepted and listed in `TrainConfig.ignored`.
`TrainConfig.check(world_size)` runs every check that needs neither files nor devices and raises
`ConfigError` naming the flag to change; `TrainConfig.resolve(...)` then derives the run's `Resolved`
values from what `qwen3_pretrain.train.preflight` read from disk (checkpoint, tokenizer).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Union

from qwen3_pretrain.config.flag_table import accepted_table_flags
from qwen3_pretrain.config.fp8 import DEFAULT_FP8_RECIPE, FP8_FORMATS, check_fp8
from qwen3_pretrain.config.layout import (
    PIPELINE_SCHEDULES,
    RECOMPUTE_GRANULARITY_FLAG,
    RECOMPUTE_METHODS,
    PipelineLayout,
    check_batch_split,
    check_context_parallel,
    check_recompute,
    check_tensor_parallel,
    flag_name,
    parse_layer_list,
    pipeline_layout,
    recompute_ignored,
    sequence_parallel_ignored,
)
from qwen3_pretrain.config.model import ConfigError, Qwen3Config, Qwen3MoeConfig
from qwen3_pretrain.config.moe import (
    BALANCING_TYPES,
    MEGATRON_AUX_LOSS_COEFF,
    MEGATRON_TOPK,
    MOE_DISPATCHERS,
    balancing_mode,
    check_expert_parallel,
    check_moe_context_parallel,
    dense_layers,
)

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")
RECOMPUTE_GRANULARITIES = ("full", "selective")
ATTENTION_BACKENDS = ("auto", "flash", "fused", "efficient", "unfused")  # model.kernels.ATTENTION_BACKENDS
CONFIG_FLAG = "--config"
CKPT_FORMATS = ("native", "torch")
CP_ALGOS = ("megatron_cp_algo", "ulysses_cp_algo", "hybrid_cp_algo", "hybrid_adaptive_cp_algo", "kvallgather_cp_algo")
HF_MODEL_TYPES = ("qwen3", "qwen3-moe")
PRECISION_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # precision -> torch dtype name


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A config field with its help text (and allowed values) for the flag."""
    return field(default=default, metadata={"help": help, "choices": choices})


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
class MoEArgs:
    """Mixture of experts (Qwen3-MoE): given flags override a Qwen3-MoE --model / --load; see config.moe."""

    num_experts: int | None = _opt(None, "experts per MoE layer (default: the model's; 0 = dense)")
    moe_router_topk: int | None = _opt(None, "experts per token (default: the model's, else Megatron's 2)")
    moe_ffn_hidden_size: int | None = _opt(None, "expert MLP intermediate size (default: the model's, else "
                                                 "--ffn-hidden-size)")
    moe_aux_loss_coeff: float | None = _opt(None, "load-balancing loss coefficient (default: the model's "
                                                  "router_aux_loss_coef, else Megatron's 0)")
    moe_router_load_balancing_type: str = _opt(
        "aux_loss", "load-balancing loss over the micro batch (aux_loss), per sequence (seq_aux_loss), over the "
        "global batch's expert loads (global_aux_loss), none; softmax_topk (MindSpeed) = none", BALANCING_TYPES,
    )
    norm_topk_prob: bool | None = _opt(None, "renormalise the top-k router probabilities (HF norm_topk_prob)")
    moe_router_pre_softmax: bool | None = _opt(
        None, "softmax over all experts before top-k, not renormalised (HF norm_topk_prob False unless "
        "--norm-topk-prob)"
    )
    moe_layer_freq: str | None = _opt(None, "MoE layer pattern: N (layers i with i mod N = 0; -1 = all) or a 0/1 list "
                                            "expression")
    first_k_dense_replace: int | None = _opt(None, "the first K layers keep a dense MLP (MindSpeed)")
    moe_token_dispatcher_type: str = _opt(
        "allgather", "token exchange: every type runs the same dropless all-to-all over the EP ranks here "
        "(alltoall_seq and allgather are mapped to it; results are identical)", MOE_DISPATCHERS,
    )


@dataclass
class DataArgs:
    """Training data and tokenizer."""

    data_path: list[str] | None = field(
        default=None,
        metadata={"help": "dataset prefixes, or WEIGHT PREFIX pairs (Megatron .bin/.idx)", "choices": None},
    )
    split: str = _opt("969, 30, 1", "train,valid,test proportions of the documents")
    train_data_path: list[str] | None = field(
        default=None, metadata={"help": "training datasets (PREFIX..., or WEIGHT PREFIX pairs) instead of --data-path "
                                        "+ --split", "choices": None},
    )
    valid_data_path: list[str] | None = field(
        default=None, metadata={"help": "validation datasets, with --train-data-path", "choices": None}
    )
    test_data_path: list[str] | None = field(
        default=None, metadata={"help": "test datasets, with --train-data-path", "choices": None}
    )
    mock_data: bool = _opt(False, "random tokens instead of a dataset (benchmarks and smoke runs)")
    seq_length: int | None = _opt(None, "tokens per sample")
    tokenizer_name_or_path: str | None = _opt(None, "HF tokenizer directory (checks the vocabulary fits the model)")
    data_cache_path: str | None = _opt(None, "directory for the cached sample indices")
    num_workers: int = _opt(2, "data loader worker processes")
    eod_mask_loss: bool = _opt(False, "no loss on positions whose input token is end-of-document")
    reset_position_ids: bool = _opt(False, "restart position ids after every end-of-document")
    reset_attention_mask: bool = _opt(False, "attention stays within each document (never past an end-of-document)")
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
    exit_interval: int | None = _opt(None, "save and exit 0 when the iteration is a multiple of this")
    exit_duration_in_mins: float | None = _opt(None, "save and exit 0 once training has run this many minutes")
    hang_timeout_minutes: float | None = _opt(
        None, "when no iteration completes for this many minutes, print every thread's Python stack and exit 124"
    )


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

    @property
    def peak_lr(self) -> float:
        """`--lr`, which `TrainConfig.check` requires."""
        if self.lr is None:
            raise ConfigError("--lr is required (the peak learning rate)")
        return self.lr


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
    fp8_format: str | None = _opt(
        None, "FP8 matmuls in the decoder blocks' linears (torchao float8, needs --bf16): e4m3 = inputs, weights and "
        "gradients in e4m3; hybrid = e4m3 forward, e5m2 gradients", FP8_FORMATS,
    )
    fp8_recipe: str | None = _opt(
        None, "FP8 scaling with --fp8-format: tensorwise (default; one current scale per tensor) or rowwise (ours: "
        "torchao's per-row scales); Megatron's delayed, mxfp8, blockwise and custom are refused"
    )

    @property
    def name(self) -> str:
        """The compute precision: bf16, fp16 or fp32."""
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"

    @property
    def fp8(self) -> tuple[str, str] | None:
        """(--fp8-format, recipe) of an FP8 run (the recipe defaults to tensorwise), else None."""
        return None if self.fp8_format is None else (self.fp8_format, self.fp8_recipe or DEFAULT_FP8_RECIPE)

    @property
    def dtype_name(self) -> str:
        """The compute dtype's torch name (the one precision -> dtype map): bfloat16, float16 or float32."""
        return PRECISION_DTYPES[self.name]


@dataclass
class ParallelArgs:
    """Parallel layout; data parallel size = world size / (TP x PP x CP)."""

    tensor_model_parallel_size: int = _opt(1, "tensor parallel size")
    pipeline_model_parallel_size: int = _opt(1, "pipeline parallel size")
    context_parallel_size: int = _opt(1, "context parallel size: ranks that split each sequence for attention")
    expert_model_parallel_size: int = _opt(
        1, "expert parallel size: data-parallel ranks that split each MoE layer's experts (tokens go by all-to-all)"
    )
    expert_tensor_parallel_size: int | None = _opt(None, "tensor parallel size of the experts: 1 only (whole experts)")
    context_parallel_algo: str = _opt(
        "megatron_cp_algo", "context parallel algorithm (MindSpeed's names): megatron_cp_algo = ring attention over "
        "2C load-balanced chunks, ulysses_cp_algo = all-to-all of heads; the hybrid/adaptive ones are refused",
        CP_ALGOS,
    )
    num_layer_list: str | None = _opt(None, "decoder layers per pipeline stage, comma-separated (default: even)")
    num_layers_per_virtual_pipeline_stage: int | None = _opt(
        None, "layers per virtual pipeline stage: interleaved 1F1B with several stages per rank"
    )
    pipeline_schedule: str = _opt(
        "1f1b", "pipeline schedule (interleaved 1F1B with virtual stages)", PIPELINE_SCHEDULES
    )
    sequence_parallel: bool = _opt(False, "shard norms and the residual stream over TP (needs TP > 1)")
    no_shard: bool = _opt(False, "replicate weights and optimizer state over DP (DDP-style) instead of FSDP")
    recompute_granularity: str | None = _opt(None, "activation recomputation per block", RECOMPUTE_GRANULARITIES)
    recompute_method: str | None = _opt(
        None, "which blocks full recompute checkpoints: uniform = all, in groups of --recompute-num-layers kept as "
        "one unit; block = the first --recompute-num-layers of each pipeline stage (default: every block alone)",
        RECOMPUTE_METHODS,
    )
    recompute_num_layers: int | None = _opt(None, "blocks per uniform group, or recomputed blocks per stage (block)")
    compile: bool = _opt(False, "torch.compile each transformer block")
    attention_backend: str = _opt(
        "auto", "attention kernel tried first: flash, fused (cuDNN), efficient; unfused = math only; auto = torch's "
        "order (CUDA/CPU; Ascend always uses npu_fusion_attention)", ATTENTION_BACKENDS,
    )
    device_memory: str | None = _opt(None, "memory per device for the fit check, e.g. 32GB (default: detected)")
    skip_memory_check: bool = _opt(False, "train even when the memory estimate exceeds the device memory")
    distributed_timeout_minutes: int = _opt(10, "timeout of the process group's collectives, in minutes")


@dataclass
class CheckpointArgs:
    """Saving and loading."""

    save: str | None = _opt(None, "directory for native checkpoints")
    save_interval: int | None = _opt(None, "save every this many iterations (and at the end)")
    load: str | None = _opt(None, "native checkpoint to resume, HF directory or mcore checkpoint for initial weights")
    no_load_optim: bool = _opt(False, "load weights (and position) but not optimizer and LR scheduler state")
    no_load_rng: bool = _opt(False, "do not restore RNG states")
    no_verify_checkpoint: bool = _opt(
        False, "load a native checkpoint without checking its files against its manifest.json checksums"
    )
    finetune: bool = _opt(False, "load weights only and start at iteration 0")
    keep_last_checkpoints: int | None = _opt(
        None, "delete older checkpoints of this run so that this many remain (never the one resumed from)"
    )
    async_save: bool = _opt(
        False, "write checkpoints in the background: training waits only for the copy of the state to host memory"
    )
    exit_on_missing_checkpoint: bool = _opt(False, "fail when --load holds no checkpoint (instead of starting fresh)")
    ckpt_format: str = _opt(
        "native", "native: DCP checkpoints any layout resumes; torch: also the weights as Megatron mcore rank files "
        "(iter_N/mp_rank_*/model_optim_rng.pt) that MindSpeed/Megatron load", CKPT_FORMATS,
    )
    enable_hf2mg_convert: bool = _opt(False, "--load names an HF model directory, loaded into the run's layout")
    model_type_hf: str | None = _opt(None, "the HF model type for --enable-hf2mg-convert (qwen3)")


@dataclass
class LoggingArgs:
    """Log line, evaluation, metrics files (JSONL, TensorBoard, Weights & Biases), the torch profiler."""

    log_interval: int = _opt(100, "print the iteration line every this many iterations")
    eval_interval: int = _opt(1000, "evaluate on the validation split every this many iterations")
    eval_iters: int = _opt(100, "global batches per evaluation")
    tensorboard_dir: str | None = _opt(None, "write TensorBoard scalars here")
    tensorboard_log_interval: int = _opt(
        1, "write the per-iteration scalars (loss, learning rate, grad norm, ...) every this many iterations"
    )
    log_memory_to_tensorboard: bool = _opt(False, "also write the measured peak and estimated memory per device")
    run_dir: str | None = _opt(None, "write metrics.jsonl here (default: the --save directory)")
    wandb_project: str | None = _opt(
        None, "log the TensorBoard scalars to this W&B project (offline unless $WANDB_MODE is set)"
    )
    wandb_exp_name: str | None = _opt(None, "W&B run name")
    wandb_save_dir: str | None = _opt(None, "W&B run files go here (default: <run dir>/wandb)")
    wandb_entity: str | None = _opt(None, "W&B entity (user or team)")
    profile: bool = _opt(False, "torch.profiler trace of iterations [--profile-step-start, --profile-step-end)")
    profile_step_start: int = _opt(10, "profile from this many completed iterations")
    profile_step_end: int = _opt(12, "stop profiling at this many completed iterations")
    profile_ranks: list[int] = field(
        default_factory=lambda: [0], metadata={"help": "global ranks to profile (-1: all ranks)", "choices": None}
    )
    profile_save_path: str | None = _opt(
        None, "directory for the traces (default: <tensorboard dir, else run dir>/profile, else ./profile_dir)"
    )
    profile_with_cpu: bool = _opt(False, "record CPU operators on accelerators too (always on CPU)")
    profile_with_stack: bool = _opt(False, "record the Python stack of each operator")
    profile_with_memory: bool = _opt(False, "record tensor allocations and frees")
    profile_record_shapes: bool = _opt(False, "record operator input shapes")
    pytorch_profiler_collect_shapes: bool = _opt(False, "Megatron's name of --profile-record-shapes")
    pytorch_profiler_collect_callstack: bool = _opt(False, "Megatron's name of --profile-with-stack")


SECTIONS: dict[str, type] = {
    "model": ModelArgs,
    "moe": MoEArgs,
    "data": DataArgs,
    "training": TrainingArgs,
    "optimizer": OptimizerArgs,
    "precision": PrecisionArgs,
    "parallel": ParallelArgs,
    "checkpoint": CheckpointArgs,
    "logging": LoggingArgs,
}

# Section -> the title of the matching Megatron argument group(s) in `train --help`.
SECTION_TITLES: dict[str, str] = {
    "model": "network size", "moe": "moe", "data": "data and dataloader", "training": "training", "optimizer":
    "learning rate, weight decay and optimizer", "precision": "mixed precision", "parallel": "distributed",
    "checkpoint": "checkpointing", "logging": "logging, validation and profiling",
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
# The Qwen3Config fields that set a stored tensor's shape or the tie: a `--load` checkpoint must agree on each.
CHECKPOINT_SHAPE_FIELDS = (
    "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
    "vocab_size", "tie_word_embeddings",
)
_QWEN3_FIELD_FLAGS: dict[str, str] = {
    **{hf: f"--{flag.replace('_', '-')}" for flag, hf in _MODEL_FIELDS.items()},
    "num_key_value_heads": "--num-query-groups",
    "tie_word_embeddings": "--untie-embeddings-and-output-weights",
    "num_experts": "--num-experts",
    "num_experts_per_tok": "--moe-router-topk",
    "moe_intermediate_size": "--moe-ffn-hidden-size",
}
# A MoE checkpoint must also agree on these (the stacked experts' shapes and which layers hold them).
MOE_SHAPE_FIELDS = ("num_experts", "moe_intermediate_size", "moe_layers")


def _field_types() -> dict[str, tuple[str, Any]]:
    """field name -> (section, base type) for every config field; lists keep their item type (`list[int]`)."""
    table: dict[str, tuple[str, Any]] = {}
    for section, cls in SECTIONS.items():
        for name, hint in typing.get_type_hints(cls).items():
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            table[name] = (section, args[0] if typing.get_origin(hint) in (Union, types.UnionType) else hint)
    return table


FIELDS = _field_types()


def known_flags() -> list[str]:
    """Every flag `train` accepts: the schema's and the flag table's accepted ones (not the refused ones)."""
    return [CONFIG_FLAG, *(flag_name(n) for n in FIELDS), *accepted_table_flags()]


def suggest_flag(flag: str) -> str:
    close = difflib.get_close_matches(flag, known_flags(), n=1, cutoff=0.6)
    return f" Did you mean {close[0]}?" if close else ""




@dataclass(frozen=True)
class RunShape:
    """What the pure checks derive for one world size: data-parallel size and the split of a step."""

    world_size: int
    dp_size: int
    num_microbatches: int
    global_batch_size: int
    train_iters: int
    seq_length: int  # --seq-length, which every run must give


@dataclass
class Resolved:
    """Values derived for one world size by `TrainConfig.resolve` (run by `train`'s preflight)."""

    world_size: int
    dp_size: int
    num_microbatches: int
    global_batch_size: int
    train_iters: int
    seq_length: int
    model_config: Qwen3Config
    load_format: str | None  # "native" | "hf" | "mcore" (checkpoint.loader), or None (random init)
    pipeline: PipelineLayout | None  # with --pipeline-model-parallel-size > 1
    sequence_parallel: bool  # --sequence-parallel where it applies (TP > 1)
    tokenizer_vocab_size: int | None
    notes: list[str]  # flags given that have no effect in this run, with the reason


@dataclass
class TrainConfig:
    """The whole training configuration; build with `config.flags.parse_train_args` or `TrainConfig.from_flat`."""

    model: ModelArgs = field(default_factory=ModelArgs)
    moe: MoEArgs = field(default_factory=MoEArgs)
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
    def from_flat(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from {field name (dashes or underscores): value}; ConfigError names unknown keys."""
        config = cls()
        for key, value in values.items():
            name = key.lstrip("-").replace("-", "_")
            if name not in FIELDS:
                raise ConfigError(f"{source}: unknown setting {key!r}.{suggest_flag(flag_name(name))}")
            section, base = FIELDS[name]
            setattr(getattr(config, section), name, _coerce(value, base, f"{source}: {flag_name(name)}"))
        styles = {s.lower(): s for s in LR_DECAY_STYLES}  # Megatron's names, matched case-insensitively
        config.optimizer.lr_decay_style = styles.get(config.optimizer.lr_decay_style.lower(),
                                                     config.optimizer.lr_decay_style)
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
            raise RuntimeError("qwen3_pretrain.train.preflight must run before the config is used")
        return self.resolved

    # ---- pure checks -------------------------------------------------------------------------

    def check(self, world_size: int) -> RunShape:
        """Check every setting that needs no file, device or tokenizer, for `world_size` processes.

        Raises ConfigError naming the flag to change.
        """
        self._check_ranges()
        self._check_checkpoint_flags()  # before the choices: a Megatron --ckpt-format gets its own answer
        self._check_choices()
        par, tr = self.parallel, self.training
        check_recompute(par.recompute_granularity, par.recompute_method, par.recompute_num_layers)
        tp, pp, cp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.context_parallel_size
        if world_size % (tp * pp * cp):
            raise ConfigError(
                f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
                f"--pipeline-model-parallel-size {pp} x --context-parallel-size {cp}; change them or the number of "
                "processes"
            )
        dp = world_size // (tp * pp * cp)
        gbs = tr.global_batch_size if tr.global_batch_size is not None else tr.micro_batch_size * dp
        num_microbatches = check_batch_split(gbs, tr.micro_batch_size, dp)
        train_iters = self._train_iters(gbs)
        self._check_schedule(train_iters, gbs)
        self._check_profile(world_size, train_iters)
        if self.precision.bf16 and self.precision.fp16:
            raise ConfigError("--bf16 and --fp16 are exclusive; pick one")
        check_fp8(self.precision.fp8_format, self.precision.fp8_recipe, self.precision.name, tp)
        self._check_data_sources()
        if self.data.seq_length is None:
            raise ConfigError("--seq-length is required (tokens per sample, e.g. 4096)")
        if cp > 1 and par.compile:
            raise ConfigError(
                "--compile traces each block whole (no graph breaks), which the context-parallel attention's "
                "ring / all-to-all communication does not allow; drop --compile or use --context-parallel-size 1"
            )
        check_context_parallel(cp, par.context_parallel_algo, self.data.seq_length, tp,
                               par.sequence_parallel and tp > 1)
        return RunShape(world_size, dp, num_microbatches, gbs, train_iters, self.data.seq_length)

    def resolve(
        self,
        world_size: int,
        base_model: Qwen3Config | None,
        tokenizer_vocab_size: int | None,
        load_format: str | None,
        checkpoint_model: Qwen3Config | None = None,
    ) -> Resolved:
        """The run's derived values from the flags and what preflight read: the model shape of `--model` or
        the `--load` checkpoint (`base_model`, None for flags only), the tokenizer's size and the format;
        a shape that differs from the `--load` checkpoint's (`checkpoint_model`) is refused."""
        shape = self.check(world_size)
        par = self.parallel
        tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
        notes: list[str] = []
        sp_ignored = sequence_parallel_ignored(par.sequence_parallel, tp)
        if sp_ignored:
            notes.append("--sequence-parallel (tensor-model-parallel-size is 1)")
        if recompute_ignored(par.recompute_granularity, par.recompute_method, par.recompute_num_layers):
            given = [flag_name(n) for n in ("recompute_method", "recompute_num_layers") if self.get(n) is not None]
            notes.append(f"{' '.join(given)} (no {RECOMPUTE_GRANULARITY_FLAG})")
        model_config = self.model_config(base_model, tokenizer_vocab_size)
        if not isinstance(model_config, Qwen3MoeConfig) or model_config.num_experts == 0:
            given = [flag_name(f.name) for f in dataclasses.fields(MoEArgs) if getattr(self.moe, f.name) != f.default]
            if given:
                notes.append(f"{' '.join(given)} (the model has no experts)")
        if checkpoint_model is not None:
            self._check_checkpoint_shape(model_config, checkpoint_model)
        self._check_model_fits(model_config, tokenizer_vocab_size)
        check_expert_parallel(model_config.expert_shape()[0], par.expert_model_parallel_size,
                              shape.dp_size, par.expert_tensor_parallel_size, par.context_parallel_size)
        if isinstance(model_config, Qwen3MoeConfig) and model_config.num_experts > 0:
            check_moe_context_parallel(model_config.moe_router_load_balancing_type, model_config.router_aux_loss_coef,
                                       par.context_parallel_size)
        pipeline = None
        if pp > 1:
            pipeline = pipeline_layout(
                model_config.num_hidden_layers, pp, shape.num_microbatches, par.pipeline_schedule,
                parse_layer_list(par.num_layer_list), par.num_layers_per_virtual_pipeline_stage,
            )
        if self.checkpoint.save_interval is not None and not self.checkpoint.save:
            notes.append("--save-interval (no --save directory)")
        return Resolved(
            **dataclasses.asdict(shape), model_config=model_config, load_format=load_format, pipeline=pipeline,
            sequence_parallel=par.sequence_parallel and not sp_ignored,
            tokenizer_vocab_size=tokenizer_vocab_size, notes=notes,
        )

    def _check_data_sources(self) -> None:
        """Exactly one of --data-path, --train-data-path (+ valid/test) and --mock-data."""
        data = self.data
        given = [name for name, value in (("--data-path", data.data_path), ("--train-data-path", data.train_data_path),
                                          ("--mock-data", data.mock_data)) if value]
        if len(given) > 1:
            raise ConfigError(f"give only one of {' and '.join(given)}")
        if not given:
            raise ConfigError(
                "--data-path is required: the prefix of a tokenized dataset (PREFIX.bin + PREFIX.idx, written by "
                "`qwen3-pretrain preprocess`); or --train-data-path (+ --valid-data-path/--test-data-path), or "
                "--mock-data"
            )
        if (data.valid_data_path or data.test_data_path) and not data.train_data_path:
            raise ConfigError("--valid-data-path and --test-data-path need --train-data-path")

    def _check_checkpoint_flags(self) -> None:
        ck = self.checkpoint
        if ck.ckpt_format in ("torch_dist", "fsdp_dtensor"):
            raise ConfigError(
                f"--ckpt-format {ck.ckpt_format}: Megatron's distributed-checkpoint layout is not written here; drop "
                "the flag for native DCP checkpoints (any layout resumes them), or use --ckpt-format torch to also "
                "write mcore rank files; `qwen3-pretrain convert --load-model-type native --save-model-type mg` "
                "converts a native checkpoint for Megatron/MindSpeed"
            )
        if ck.model_type_hf is not None and ck.model_type_hf not in HF_MODEL_TYPES:
            raise ConfigError(
                f"--model-type-hf {ck.model_type_hf}: qwen3-pretrain trains {', '.join(HF_MODEL_TYPES)} models"
            )
        par = self.parallel
        if ck.ckpt_format == "torch" and par.num_layers_per_virtual_pipeline_stage and par.num_layer_list:
            raise ConfigError(
                "--ckpt-format torch stores virtual pipeline stages of equal size only: drop --num-layer-list or "
                "--num-layers-per-virtual-pipeline-stage"
            )
        if ck.enable_hf2mg_convert and (ck.model_type_hf is None or ck.load is None):
            raise ConfigError("--enable-hf2mg-convert needs --model-type-hf qwen3 and --load HF_MODEL_DIR")

    def _check_ranges(self) -> None:
        positive = (
            "micro_batch_size", "global_batch_size", "train_iters", "train_samples", "seq_length", "log_interval",
            "eval_interval", "save_interval", "tensor_model_parallel_size", "distributed_timeout_minutes",
            "keep_last_checkpoints", "exit_interval", "exit_duration_in_mins", "context_parallel_size",
            "pipeline_model_parallel_size", "recompute_num_layers", "hang_timeout_minutes",
            "expert_model_parallel_size", "moe_router_topk", "moe_ffn_hidden_size",
            "make_vocab_size_divisible_by", "stop_after_nonfinite_iters", "loss_scale_window", "hysteresis",
            "lr_decay_iters", "lr_decay_samples", "lr_wsd_decay_iters", "lr_wsd_decay_samples",
            "loss_scale", "initial_loss_scale", "min_loss_scale", "tensorboard_log_interval",
            "lr", "init_method_std", "rotary_base", "norm_epsilon",
        )
        non_negative = (
            "min_lr", "weight_decay", "clip_grad", "lr_warmup_iters", "lr_warmup_samples", "lr_warmup_init",
            "eval_iters", "num_workers", "adam_eps", "profile_step_start", "num_experts", "moe_aux_loss_coeff",
        )
        for name, (_, base) in FIELDS.items():  # NaN passes every comparison below: refuse it (and inf) first
            value = self.get(name)
            if base is float and value is not None and not math.isfinite(value):
                raise ConfigError(f"{flag_name(name)} must be a finite number, got {value}")
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
        for section, cls in SECTIONS.items():
            for f in dataclasses.fields(cls):
                choices, value = f.metadata["choices"], getattr(getattr(self, section), f.name)
                if choices and value is not None and value not in choices:
                    raise ConfigError(f"{flag_name(f.name)} {value!r}: use one of {', '.join(choices)}")

    def _check_profile(self, world_size: int, train_iters: int) -> None:
        log = self.logging
        if not log.profile:
            return
        start, end = log.profile_step_start, log.profile_step_end
        if end <= start:
            raise ConfigError(f"--profile-step-end {end} must be larger than --profile-step-start {start}")
        if start >= train_iters:
            raise ConfigError(
                f"--profile-step-start {start} is not below the run's {train_iters} iterations: nothing would be "
                "profiled; lower --profile-step-start"
            )
        outside = [r for r in log.profile_ranks if not -1 <= r < world_size]
        if outside or not log.profile_ranks:
            raise ConfigError(
                f"--profile-ranks {' '.join(map(str, log.profile_ranks))}: give ranks 0..{world_size - 1} "
                "(or -1 for all ranks)"
            )

    def _train_iters(self, gbs: int) -> int:
        tr = self.training
        if tr.train_iters is not None and tr.train_samples is None:
            return tr.train_iters
        if tr.train_samples is None or tr.train_iters is not None:
            raise ConfigError("give exactly one of --train-iters and --train-samples")
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

    def model_config(self, base: Qwen3Config | None, tokenizer_vocab: int | None) -> Qwen3Config:
        """The model shape: `base` (a preset's or a checkpoint's) or the shape flags alone, then the flags."""
        m = self.model
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
                multiple = m.make_vocab_size_divisible_by * self.parallel.tensor_model_parallel_size
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
        values["torch_dtype"] = self.precision.dtype_name
        config_class = self._apply_moe_flags(values, base)
        try:
            return config_class(**values)
        except ConfigError as exc:
            flags = [flag for hf, flag in _QWEN3_FIELD_FLAGS.items() if hf in str(exc)]
            hint = f" (set with {', '.join(flags)})" if flags else ""
            raise ConfigError(f"invalid model shape: {exc}{hint}") from exc

    def _apply_moe_flags(self, values: dict[str, Any], base: Qwen3Config | None) -> type[Qwen3Config]:
        """Set the Qwen3-MoE fields of `values` from the MoE flags (see config.moe); the config class to build."""
        moe = self.moe
        if moe.num_experts is not None:
            values["num_experts"] = moe.num_experts
        base_moe = isinstance(base, Qwen3MoeConfig)
        if not base_moe and not values.get("num_experts"):  # as Megatron without --num-experts: MoE flags unused
            return type(base) if base is not None else Qwen3Config
        if not base_moe:  # made MoE by --num-experts: Megatron's defaults
            values.update(num_experts_per_tok=MEGATRON_TOPK, moe_intermediate_size=values["intermediate_size"],
                          router_aux_loss_coef=MEGATRON_AUX_LOSS_COEFF, norm_topk_prob=True)
        for flag, hf_field in (("moe_router_topk", "num_experts_per_tok"), ("moe_ffn_hidden_size",
                               "moe_intermediate_size"), ("moe_aux_loss_coeff", "router_aux_loss_coef")):
            if getattr(moe, flag) is not None:
                values[hf_field] = getattr(moe, flag)
        if moe.norm_topk_prob is not None or moe.moe_router_pre_softmax is not None:
            values["norm_topk_prob"] = bool(moe.norm_topk_prob) or not moe.moe_router_pre_softmax
        if moe.moe_layer_freq is not None or moe.first_k_dense_replace is not None or not base_moe:
            values["decoder_sparse_step"] = 1
            values["mlp_only_layers"] = dense_layers(values["num_hidden_layers"], moe.moe_layer_freq,
                                                     moe.first_k_dense_replace)
        values["moe_router_load_balancing_type"] = balancing_mode(moe.moe_router_load_balancing_type)
        return Qwen3MoeConfig

    def _check_checkpoint_shape(self, cfg: Qwen3Config, saved: Qwen3Config) -> None:
        """Refuse a model whose tensors (or tie) differ from the `--load` checkpoint's, as Megatron's load would
        fail: each differing field with both values and what set the run's value."""
        names = CHECKPOINT_SHAPE_FIELDS + (MOE_SHAPE_FIELDS if isinstance(cfg, Qwen3MoeConfig)
                                           or isinstance(saved, Qwen3MoeConfig) else ())
        differ = [name for name in names if _shape_value(cfg, name) != _shape_value(saved, name)]
        if not differ:
            return
        fields = "; ".join(
            f"{name} {_shape_value(saved, name)} in the checkpoint, {_shape_value(cfg, name)} from "
            f"{self._shape_source(name)}"
            for name in differ
        )
        raise ConfigError(
            f"--load {self.checkpoint.load} holds a different model: {fields}. Drop or fix those flags (the "
            "checkpoint's shape is used when no shape flag is given), or --load a checkpoint of this shape"
        )

    def _shape_source(self, hf_field: str) -> str:
        """The flag(s) that set the run's value of Qwen3Config field `hf_field`."""
        m = self.model
        given = [flag_name(f) for f, hf in _MODEL_FIELDS.items() if hf == hf_field and getattr(m, f) is not None]
        if hf_field == "num_key_value_heads" and m.num_query_groups is not None:
            given.append("--num-query-groups")
        elif hf_field == "num_key_value_heads" and m.num_attention_heads is not None and not m.group_query_attention:
            given.append("--num-attention-heads without --group-query-attention")
        if hf_field == "tie_word_embeddings" and m.untie_embeddings_and_output_weights is not None:
            given.append("--untie-embeddings-and-output-weights")
        if given:
            return " and ".join(given)
        return f"--model {m.model}" if m.model is not None else "the flags"

    def _check_model_fits(self, cfg: Qwen3Config, tokenizer_vocab: int | None) -> None:
        seq = self.data.seq_length
        if seq is not None and seq > cfg.max_position_embeddings:
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
        par = self.parallel
        check_tensor_parallel(cfg, par.tensor_model_parallel_size)
        if seq is not None:
            check_context_parallel(par.context_parallel_size, par.context_parallel_algo, seq,
                                   par.tensor_model_parallel_size, config=cfg)

    # ---- access ------------------------------------------------------------------------------

    def get(self, name: str) -> Any:
        """The value of field `name` (underscored flag name), whatever its section."""
        return getattr(getattr(self, FIELDS[name][0]), name)


def _shape_value(config: Qwen3Config, name: str) -> Any:
    """A checkpoint-shape field of `config`; "moe_layers" = the layers with experts (0 experts for a dense model)."""
    if name == "moe_layers":
        return [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    return getattr(config, name, 0)


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


def _coerce(value: Any, base: Any, where: str) -> Any:
    """A YAML/flag value as the field's type; ConfigError names `where`."""
    if value is None:
        return None
    if typing.get_origin(base) is list:
        items = value if isinstance(value, (list, tuple)) else str(value).split()
        return [_coerce(v, typing.get_args(base)[0], where) for v in items]
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "false"):
                return str(value).lower() == "true"
            raise ValueError
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


__all__ = [
    "ATTENTION_BACKENDS", "CheckpointArgs", "ConfigError", "DataArgs", "LoggingArgs", "MoEArgs", "ModelArgs",
    "OptimizerArgs", "ParallelArgs", "PrecisionArgs", "Resolved", "RunShape", "ScheduleSteps", "TrainConfig",
    "TrainingArgs", "flag_name", "schedule_steps",
]
