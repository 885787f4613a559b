"""The rules a parallel layout must follow, as pure functions of sizes: one set, used by `train`'s config
checks, the pipeline splitter, tensor parallelism and the planner.

Every rule raises `ConfigError` (a ValueError) naming the flag to change.
"""

from __future__ import annotations

from dataclasses import dataclass

from qwen3_pretrain.config.model import ConfigError, Qwen3Config

PIPELINE_SCHEDULES = ("1f1b", "gpipe")


def flag_name(field: str) -> str:
    """A config field's flag: `seq_length` -> `--seq-length`."""
    return "--" + field.replace("_", "-")


TP_FLAG = flag_name("tensor_model_parallel_size")
PP_FLAG = flag_name("pipeline_model_parallel_size")
NUM_LAYER_LIST_FLAG = flag_name("num_layer_list")
VIRTUAL_FLAG = flag_name("num_layers_per_virtual_pipeline_stage")
SEQUENCE_PARALLEL_FLAG = flag_name("sequence_parallel")
RECOMPUTE_GRANULARITY_FLAG = flag_name("recompute_granularity")
RECOMPUTE_METHOD_FLAG = flag_name("recompute_method")
RECOMPUTE_NUM_LAYERS_FLAG = flag_name("recompute_num_layers")
RECOMPUTE_METHODS = ("uniform", "block")
CP_FLAG = flag_name("context_parallel_size")
CP_ALGO_FLAG = flag_name("context_parallel_algo")
RING_CP_ALGO, ULYSSES_CP_ALGO = "megatron_cp_algo", "ulysses_cp_algo"
CP_ALGOS_IMPLEMENTED = (RING_CP_ALGO, ULYSSES_CP_ALGO)


@dataclass(frozen=True)
class PipelineLayout:
    """How the layers are split into pipeline stages and which schedule runs them."""

    stage_layers: list[int]  # decoder layers of every stage, in stage order
    virtual_stages: int  # stages per rank (> 1: interleaved 1F1B)
    schedule: str  # "1f1b" | "gpipe" | "interleaved_1f1b"


def check_tensor_parallel(
    config: Qwen3Config, tp_size: int, sequence_parallel: bool = False, seq_length: int | None = None
) -> None:
    """The model (and, with sequence parallel, the sequence) must split `tp_size` ways."""
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise ConfigError(f"{TP_FLAG} must be a positive integer, got {tp_size!r}")
    checks = (
        ("num_attention_heads", config.num_attention_heads, "--num-attention-heads"),
        ("num_key_value_heads", config.num_key_value_heads, "num query groups, --num-query-groups"),
        ("vocab_size", config.vocab_size, "--padded-vocab-size"),
    )
    for name, value, flag in checks:
        if value % tp_size:
            raise ConfigError(
                f"{TP_FLAG} {tp_size} does not divide the model's {name} ({value}); "
                f"choose a tensor-parallel size that divides {name} ({flag})"
            )
    if sequence_parallel and seq_length is not None and seq_length % tp_size:
        raise ConfigError(
            f"{SEQUENCE_PARALLEL_FLAG} needs --seq-length ({seq_length}) divisible by {TP_FLAG} {tp_size}; "
            f"change one of them or drop {SEQUENCE_PARALLEL_FLAG}"
        )


def context_parallel_chunks(cp_size: int, algo: str) -> int:
    """Equal chunks the sequence is cut into for `cp_size` ranks: 2C for the ring's load balance, else C."""
    return 2 * cp_size if algo == RING_CP_ALGO else cp_size


def check_context_parallel(
    cp_size: int, algo: str, seq_length: int, tp_size: int = 1, sequence_parallel: bool = False,
    config: Qwen3Config | None = None,
) -> None:
    """The sequence (and, for Ulysses, the TP-local attention heads) must split `cp_size` ways."""
    if cp_size == 1:
        return
    if algo not in CP_ALGOS_IMPLEMENTED:
        raise ConfigError(
            f"{CP_ALGO_FLAG} {algo}: MindSpeed's hybrid / adaptive / KV-all-gather variants are not implemented; "
            f"use {RING_CP_ALGO} (ring attention) or {ULYSSES_CP_ALGO} (all-to-all)"
        )
    chunks = context_parallel_chunks(cp_size, algo)
    if seq_length % chunks:
        raise ConfigError(
            f"{CP_FLAG} {cp_size} with {algo} cuts --seq-length into {chunks} equal chunks, but {seq_length} is not "
            f"divisible by {chunks}; change --seq-length or {CP_FLAG}"
        )
    if sequence_parallel and (seq_length // cp_size) % tp_size:
        raise ConfigError(
            f"{SEQUENCE_PARALLEL_FLAG} shards each CP rank's {seq_length // cp_size} tokens over {TP_FLAG} "
            f"{tp_size}, which does not divide them; change --seq-length, {CP_FLAG} or {TP_FLAG}"
        )
    if config is not None and algo == ULYSSES_CP_ALGO and (config.num_attention_heads // tp_size) % cp_size:
        raise ConfigError(
            f"{ULYSSES_CP_ALGO} gives each of the {CP_FLAG} {cp_size} ranks a 1/{cp_size} share of the "
            f"{config.num_attention_heads // tp_size} attention heads per TP rank, which does not split; use "
            f"{RING_CP_ALGO} or a {CP_FLAG} that divides them"
        )


def sequence_parallel_ignored(sequence_parallel: bool, tp_size: int) -> bool:
    """Megatron turns --sequence-parallel off at TP 1 (there is nothing to shard over)."""
    return sequence_parallel and tp_size == 1


def recompute_ignored(granularity: str | None, method: str | None, num_layers: int | None) -> bool:
    """Megatron ignores --recompute-method and --recompute-num-layers without --recompute-granularity."""
    return granularity is None and (method is not None or num_layers is not None)


def check_recompute(granularity: str | None, method: str | None, num_layers: int | None) -> None:
    """Megatron's rules for the recompute flags: a method (with N >= 1 layers) applies to full granularity only."""
    if granularity is None or (method is None and num_layers is None):
        return
    if granularity == "selective":
        raise ConfigError(
            f"{RECOMPUTE_METHOD_FLAG} and {RECOMPUTE_NUM_LAYERS_FLAG} do not apply to {RECOMPUTE_GRANULARITY_FLAG} "
            f"selective, which recomputes part of every block; drop them or use {RECOMPUTE_GRANULARITY_FLAG} full"
        )
    if method is None:
        raise ConfigError(f"{RECOMPUTE_NUM_LAYERS_FLAG} needs {RECOMPUTE_METHOD_FLAG} uniform or block")
    if method not in RECOMPUTE_METHODS:
        raise ConfigError(f"{RECOMPUTE_METHOD_FLAG} {method!r}: use one of {', '.join(RECOMPUTE_METHODS)}")
    if num_layers is None or num_layers < 1:
        raise ConfigError(
            f"{RECOMPUTE_METHOD_FLAG} {method} needs {RECOMPUTE_NUM_LAYERS_FLAG} N >= 1 (uniform: layers per "
            f"checkpointed group; block: layers recomputed in each pipeline stage), got {num_layers}"
        )


def recompute_groups(num_layers: int, method: str | None, group_layers: int | None) -> list[range]:
    """The layers full recompute checkpoints among a pipeline stage's `num_layers`, as consecutive groups that
    are each checkpointed as one unit keeping only its input (Megatron's `--recompute-method`).

    No method: every layer on its own. uniform N: all layers in groups of N, the last group shorter when N
    does not divide them. block N: each of the first N layers on its own; the others keep their activations.
    An N above `num_layers` covers them all.
    """
    check_recompute("full", method, group_layers)
    if method is None or group_layers is None:
        return [range(i, i + 1) for i in range(num_layers)]
    if method == "uniform":
        return [range(start, min(start + group_layers, num_layers)) for start in range(0, num_layers, group_layers)]
    return [range(i, i + 1) for i in range(min(group_layers, num_layers))]


def check_batch_split(global_batch_size: int, micro_batch_size: int, dp_size: int) -> int:
    """The number of micro batches per step; the global batch must split into micro batches x DP."""
    if global_batch_size % (micro_batch_size * dp_size):
        raise ConfigError(
            f"--global-batch-size {global_batch_size} is not divisible by --micro-batch-size {micro_batch_size} x "
            f"data-parallel size {dp_size} (= {micro_batch_size * dp_size}); change one of them"
        )
    return global_batch_size // (micro_batch_size * dp_size)


def virtual_pipeline_stages(num_layers: int, pp_size: int, num_layers_per_virtual_stage: int) -> int:
    """Stages per rank for `--num-layers-per-virtual-pipeline-stage` (Megatron's interleaving flag)."""
    if pp_size < 1 or num_layers_per_virtual_stage < 1 or num_layers % (pp_size * num_layers_per_virtual_stage):
        raise ConfigError(
            f"{VIRTUAL_FLAG} {num_layers_per_virtual_stage} x {PP_FLAG} {pp_size} must divide the model's "
            f"{num_layers} layers; pick sizes whose product divides it"
        )
    return num_layers // (pp_size * num_layers_per_virtual_stage)


def stage_layer_counts(
    num_layers: int, pp_size: int, virtual_stages: int = 1, num_layer_list: list[int] | None = None
) -> list[int]:
    """Number of decoder layers of every pipeline stage, in stage order (stage s runs on pp rank s % pp_size)."""
    if pp_size < 1:
        raise ConfigError(f"{PP_FLAG} must be >= 1, got {pp_size}")
    if virtual_stages < 1:
        raise ConfigError(f"virtual pipeline stages per rank must be >= 1, got {virtual_stages}")
    if virtual_stages > 1 and pp_size < 2:
        raise ConfigError(f"{VIRTUAL_FLAG} (interleaved pipeline) needs {PP_FLAG} >= 2, got {pp_size}")
    num_stages = pp_size * virtual_stages
    if num_layer_list is not None:
        if len(num_layer_list) != num_stages or sum(num_layer_list) != num_layers or min(num_layer_list) < 1:
            raise ConfigError(
                f"{NUM_LAYER_LIST_FLAG} {','.join(map(str, num_layer_list))} must give {num_stages} positive layer "
                f"counts (one per pipeline stage) summing to the model's {num_layers} layers"
            )
        return list(num_layer_list)
    if num_layers % num_stages:
        raise ConfigError(
            f"the model's {num_layers} layers do not split evenly into {num_stages} pipeline stages "
            f"({PP_FLAG} {pp_size} x {virtual_stages} virtual stages); change {PP_FLAG} or pass {NUM_LAYER_LIST_FLAG}"
        )
    return [num_layers // num_stages] * num_stages


def parse_layer_list(text: str | None) -> list[int] | None:
    """`--num-layer-list 7,7,7,7` -> [7, 7, 7, 7]."""
    if text is None:
        return None
    try:
        return [int(n) for n in text.split(",")]
    except ValueError:
        raise ConfigError(f"{NUM_LAYER_LIST_FLAG} {text!r} must be comma-separated integers, e.g. 7,7,7,7") from None


def pipeline_layout(
    num_layers: int,
    pp_size: int,
    num_microbatches: int,
    schedule: str = "1f1b",
    num_layer_list: list[int] | None = None,
    num_layers_per_virtual_stage: int | None = None,
) -> PipelineLayout:
    """The stage split and schedule for `pp_size` > 1 pipeline ranks and `num_microbatches` per step."""
    virtual = 1
    if num_layers_per_virtual_stage is not None:
        virtual = virtual_pipeline_stages(num_layers, pp_size, num_layers_per_virtual_stage)
    stage_layers = stage_layer_counts(num_layers, pp_size, virtual, num_layer_list)
    if virtual > 1 and schedule != "1f1b":
        raise ConfigError(
            f"--pipeline-schedule {schedule} cannot run virtual stages ({VIRTUAL_FLAG} runs interleaved 1F1B); "
            "drop one of them"
        )
    schedule = "interleaved_1f1b" if virtual > 1 else schedule
    needs_multiple = schedule == "interleaved_1f1b"
    if (schedule == "1f1b" and num_microbatches < pp_size) or (needs_multiple and num_microbatches % pp_size):
        rule = "a multiple of" if needs_multiple else "at least"
        raise ConfigError(
            f"the {schedule} pipeline schedule needs the number of micro batches per step ({num_microbatches} = "
            f"global batch / (micro batch x data-parallel size)) to be {rule} {PP_FLAG} {pp_size}; "
            "raise --global-batch-size or lower --micro-batch-size"
        )
    return PipelineLayout(stage_layers, virtual, schedule)
