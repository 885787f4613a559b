"""Everything `train` checks before any process group starts that needs files, devices or the tokenizer:
the data files, the `--load` checkpoint (its format, detected once here, and its model shape), the
tokenizer's size, and whether the layout fits a device's memory. Each failure is a `ConfigError` naming
the flag to change. The pure checks live with the config (`TrainConfig.check` / `resolve`).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from qwen3_pretrain.checkpoint.loader import detect_format, open_checkpoint
from qwen3_pretrain.checkpoint.native import CheckpointError
from qwen3_pretrain.config import ConfigError, Qwen3Config, Resolved, TrainConfig, get_preset, parse_train_args
from qwen3_pretrain.data.gpt_dataset import DataConfigError, parse_data_path, parse_split
from qwen3_pretrain.data.indexed import bin_path, idx_path, strip_suffix
from qwen3_pretrain.distributed import device
from qwen3_pretrain.distributed.planner import GIB, Layout, MemoryEstimate, estimate_memory, parse_size
from qwen3_pretrain.model import kernels
from qwen3_pretrain.model.qwen3 import DEFAULT_LOSS_CHUNK_TOKENS
from qwen3_pretrain.tokenizer import TokenizerError, load_tokenizer


def prepare(argv: list[str], world_size: int | None = None) -> TrainConfig:
    """Flags -> a TrainConfig checked and resolved for `world_size` processes (default $WORLD_SIZE or 1)."""
    config = parse_train_args(argv, world_size)
    preflight(config, world_size)
    return config


def preflight(config: TrainConfig, world_size: int | None = None, local_world_size: int | None = None) -> Resolved:
    """Check `config` against the files and devices it names and set (and return) `config.resolved`.

    `local_world_size`: the processes sharing this machine (default $LOCAL_WORLD_SIZE, else the world size).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    config.check(world_size)  # the flag errors first, before anything is read
    _check_wandb(config)
    _check_data_files(config)
    load_format = _load_format(config)
    resolved = config.resolve(world_size, _base_model_config(config, load_format), _tokenizer_vocab_size(config),
                              load_format)
    backend = config.parallel.attention_backend
    if backend != "auto" and device.device_type() == "npu":
        resolved.notes.append(f"--attention-backend {backend} (Ascend NPUs use npu_fusion_attention)")
    config.resolved = resolved
    _check_memory_fits(config, local_world_size)
    return resolved


def _check_wandb(config: TrainConfig) -> None:
    """--wandb-project needs the optional `wandb` package."""
    if config.logging.wandb_project is not None and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            "--wandb-project needs the wandb package, which is not installed: pip install qwen3-pretrain[wandb] "
            "(or drop --wandb-project)"
        )


def _check_data_files(config: TrainConfig) -> None:
    """Every dataset prefix of --data-path / --train-data-path / ... has its .bin and .idx."""
    data = config.data
    sources = {"--data-path": data.data_path, "--train-data-path": data.train_data_path,
               "--valid-data-path": data.valid_data_path, "--test-data-path": data.test_data_path}
    try:
        parse_split(data.split)
        for flag, paths in sources.items():
            prefixes, _ = parse_data_path(paths) if paths else ([], None)
            for prefix in map(strip_suffix, prefixes):
                missing = [p for p in (bin_path(prefix), idx_path(prefix)) if not os.path.isfile(p)]
                if missing:
                    raise ConfigError(
                        f"{flag} {prefix}: {', '.join(missing)} not found; pass the prefix that "
                        "`qwen3-pretrain preprocess` wrote (e.g. data/corpus_text_document)"
                    )
    except DataConfigError as exc:
        raise ConfigError(str(exc)) from exc


def _load_format(config: TrainConfig) -> str | None:
    """The format of `--load` (None without one, or for Megatron's `--load DIR --save DIR` before the first save)."""
    ck = config.checkpoint
    if ck.load is None:
        return None
    load = Path(ck.load)
    fmt = detect_format(load)
    fresh = not load.exists() or (load.is_dir() and not any(load.iterdir()))
    if fmt is None and ck.save and fresh and load.resolve() == Path(ck.save).resolve():
        if ck.exit_on_missing_checkpoint:
            raise ConfigError(f"--load {load} holds no checkpoint yet and --exit-on-missing-checkpoint is set")
        return None  # a new run that will save where it loads from: start from scratch
    try:
        fmt = open_checkpoint(load, fmt).format
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from exc
    if ck.enable_hf2mg_convert and fmt != "hf":
        raise ConfigError(
            f"--enable-hf2mg-convert: --load {load} is a {fmt} checkpoint, not an HF model directory "
            "(config.json + *.safetensors); drop --enable-hf2mg-convert to load it as it is"
        )
    return fmt


def _base_model_config(config: TrainConfig, load_format: str | None) -> Qwen3Config | None:
    """The shape to start from: the `--model` preset or HF directory, the `--load` checkpoint's, or None."""
    preset, load = config.model.model, config.checkpoint.load
    try:
        if preset is not None:
            if (Path(preset) / "config.json").is_file():
                return Qwen3Config.from_pretrained(preset)
            return get_preset(preset)
        if load is not None and load_format is not None:
            return open_checkpoint(load, load_format).model_config()
    except (ValueError, OSError) as exc:  # ConfigError and checkpoint errors are ValueErrors
        raise ConfigError(f"cannot read the model shape: {exc}") from exc
    return None


def _tokenizer_vocab_size(config: TrainConfig) -> int | None:
    path = config.data.tokenizer_name_or_path
    if path is None:
        return None
    try:
        return len(load_tokenizer(path))
    except TokenizerError as exc:
        raise ConfigError(f"--tokenizer-name-or-path: {exc}") from exc


def compute_dtype(config: TrainConfig) -> torch.dtype:
    """The torch dtype of `--bf16` / `--fp16` / neither."""
    return getattr(torch, config.precision.dtype_name)


def memory_estimate(config: TrainConfig) -> MemoryEstimate:
    """The planner's memory estimate per device for this (resolved) run's layout."""
    r, par = config.require_resolved(), config.parallel
    layout = Layout(
        tp=par.tensor_model_parallel_size, pp=par.pipeline_model_parallel_size, dp=r.dp_size,
        micro_batch_size=config.training.micro_batch_size, recompute=par.recompute_granularity or "none",
        sequence_parallel=r.sequence_parallel, shard=not par.no_shard,
        recompute_method=par.recompute_method, recompute_num_layers=par.recompute_num_layers,
    )
    dtype = compute_dtype(config)
    return estimate_memory(
        r.model_config, layout, r.seq_length, compute_dtype_bytes=dtype.itemsize,
        loss_chunk_tokens=DEFAULT_LOSS_CHUNK_TOKENS,
        bf16_float32_matmuls=kernels.bf16_via_float32(device.local_device(), dtype),
    )


def _check_memory_fits(config: TrainConfig, local_world_size: int | None) -> None:
    """Refuse a layout whose memory estimate exceeds the device memory (--skip-memory-check to try anyway)."""
    par, r = config.parallel, config.require_resolved()
    if par.skip_memory_check:
        return
    try:
        local = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", r.world_size))
        budget = parse_size(par.device_memory) if par.device_memory is not None else device.device_memory_bytes(local)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    estimate = memory_estimate(config)
    if estimate.total <= budget:
        return
    parts = ", ".join(f"{k} {v:.2f}" for k, v in estimate.as_gib().items() if k != "total")
    raise ConfigError(
        f"this layout needs about {estimate.total / GIB:.2f} GiB per device ({parts} GiB) but a device has "
        f"{budget / GIB:.2f} GiB. Run `qwen3-pretrain plan --model {config.model.model or '<preset>'} --seq-length "
        f"{config.data.seq_length} --global-batch-size {r.global_batch_size} --devices {r.world_size} --device-memory "
        f"{budget / GIB:.0f}GB` for layouts that fit (more tensor/pipeline parallelism, "
        "--recompute-granularity full, a smaller --micro-batch-size), or pass --skip-memory-check to try anyway"
    )
