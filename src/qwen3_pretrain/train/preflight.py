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

from qwen3_pretrain.checkpoint.loader import CheckpointSource, detect_format, open_checkpoint
from qwen3_pretrain.checkpoint.native import LATEST_FILE, CheckpointError, is_native_checkpoint_dir
from qwen3_pretrain.config import ConfigError, Qwen3Config, Resolved, TrainConfig, get_preset, parse_train_args
from qwen3_pretrain.data.gpt_dataset import DataConfigError, parse_data_path, parse_split
from qwen3_pretrain.data.indexed import IndexedDataset, IndexedDatasetError, bin_path, idx_path, strip_suffix
from qwen3_pretrain.distributed import device
from qwen3_pretrain.distributed.planner import GIB, Layout, MemoryEstimate, estimate_memory, parse_size
from qwen3_pretrain.model import kernels
from qwen3_pretrain.model.qwen3 import DEFAULT_LOSS_CHUNK_TOKENS
from qwen3_pretrain.tokenizer import TokenizerError, load_tokenizer
from qwen3_pretrain.train.run_lock import LOCK_FILE


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
    _check_fp8(config)
    _check_wandb(config)
    datasets = _check_data_files(config)
    source = _load_source(config)
    load_format = source.format if source is not None else None
    checkpoint_model = _checkpoint_model_config(config, source)
    resolved = config.resolve(world_size, _base_model_config(config, checkpoint_model),
                              _tokenizer_vocab_size(config), load_format, checkpoint_model)
    _check_token_ids(config, datasets, resolved.model_config.vocab_size)
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


def _check_fp8(config: TrainConfig) -> None:
    """--fp8-format needs the optional torchao package."""
    if config.precision.fp8_format is not None and importlib.util.find_spec("torchao") is None:
        raise ConfigError(
            "--fp8-format needs torchao (its torchao.float8 training), which is not installed: pip install torchao "
            "(or pip install qwen3-pretrain[fp8]), or drop --fp8-format"
        )


def _check_data_files(config: TrainConfig) -> list[tuple[str, IndexedDataset]]:
    """Every dataset prefix of --data-path / --train-data-path / ... has an intact .bin/.idx pair with tokens;
    returns each dataset with its flag."""
    data = config.data
    sources = {"--data-path": data.data_path, "--train-data-path": data.train_data_path,
               "--valid-data-path": data.valid_data_path, "--test-data-path": data.test_data_path}
    datasets: list[tuple[str, IndexedDataset]] = []
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
                try:
                    dataset = IndexedDataset(prefix)
                except IndexedDatasetError as exc:
                    raise ConfigError(f"{flag} {prefix}: {exc}") from exc
                if dataset.num_tokens == 0:
                    raise ConfigError(
                        f"{flag} {prefix}: the dataset is empty ({len(dataset)} documents, 0 tokens); preprocess "
                        f"input that holds text, or drop it from {flag}"
                    )
                datasets.append((flag, dataset))
    except DataConfigError as exc:
        raise ConfigError(str(exc)) from exc
    return datasets


def _check_token_ids(config: TrainConfig, datasets: list[tuple[str, IndexedDataset]], vocab_size: int) -> None:
    """Every token id of the datasets is a row of the model's embedding (others crash the run when first read);
    the id range of each .bin is scanned once and cached (`IndexedDataset.token_id_range`)."""
    for flag, dataset in datasets:
        try:
            low, high = dataset.token_id_range(config.data.data_cache_path)
        except IndexedDatasetError as exc:
            raise ConfigError(f"{flag} {dataset.prefix}: {exc}") from exc
        if low < 0 or high >= vocab_size:
            raise ConfigError(
                f"{flag} {dataset.prefix}: {dataset.bin_file} holds token id {high if high >= vocab_size else low} "
                f"but the model's vocabulary is {vocab_size} (ids 0..{vocab_size - 1}); tokenize with the model's "
                "tokenizer, or give the model a larger vocabulary (--padded-vocab-size)"
            )


def _load_source(config: TrainConfig) -> CheckpointSource | None:
    """The `--load` checkpoint, opened once; None without one, or for Megatron's `--load DIR --save DIR` while DIR
    holds no complete checkpoint (no `latest_checkpointed_iteration.txt`, which a save writes last): a fresh start."""
    ck = config.checkpoint
    if ck.load is None:
        return None
    load = Path(ck.load)
    fmt = detect_format(load)
    uncommitted = fmt == "native" and not (load / LATEST_FILE).is_file() and not is_native_checkpoint_dir(load)
    if (fmt is None or uncommitted) and ck.save and load.resolve() == Path(ck.save).resolve():
        if ck.exit_on_missing_checkpoint:
            raise ConfigError(
                f"--load {load} holds no checkpoint yet and --exit-on-missing-checkpoint is set ({_contents(load)})"
            )
        return None  # a run that saves where it loads from and has not completed a save: start from scratch
    try:
        source = open_checkpoint(load, fmt)
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from exc
    if ck.enable_hf2mg_convert and source.format != "hf":
        raise ConfigError(
            f"--enable-hf2mg-convert: --load {load} is a {source.format} checkpoint, not an HF model directory "
            "(config.json + *.safetensors); drop --enable-hf2mg-convert to load it as it is"
        )
    return source


def fresh_start_message(load: Path) -> str:
    """What rank 0 prints when `--load` = `--save` holds no complete checkpoint yet."""
    return f"--load {load} holds no checkpoint yet ({_contents(load)}): starting from scratch; this run saves there"


def _contents(directory: Path) -> str:
    """What a --load directory without a checkpoint holds, in a few words (this run's lock file left out)."""
    if not directory.is_dir():
        return "it does not exist"
    names = sorted(p.name for p in directory.iterdir() if p.name != LOCK_FILE)
    if not names:
        return "it is empty"
    return "it holds only " + ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _checkpoint_model_config(config: TrainConfig, source: CheckpointSource | None) -> Qwen3Config | None:
    """The model shape the `--load` checkpoint records; None without one, or when `--model` gives the shape and
    the checkpoint records none (an mcore file without `args`: its tensors are checked as they load)."""
    if source is None:
        return None
    try:
        return source.model_config()
    except (ValueError, OSError) as exc:  # checkpoint errors are ValueErrors
        if config.model.model is not None:
            return None
        raise ConfigError(f"cannot read the model shape of --load {source.path}: {exc}") from exc


def _base_model_config(config: TrainConfig, checkpoint_model: Qwen3Config | None) -> Qwen3Config | None:
    """The shape to start from: the `--model` preset or HF directory, the `--load` checkpoint's, or None."""
    preset = config.model.model
    if preset is None:
        return checkpoint_model
    try:
        if (Path(preset) / "config.json").is_file():
            return Qwen3Config.from_pretrained(preset)
        return get_preset(preset)
    except (ValueError, OSError) as exc:  # ConfigError is a ValueError
        raise ConfigError(f"cannot read the model shape: {exc}") from exc


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
        cp=par.context_parallel_size, cp_algo=par.context_parallel_algo, ep=par.expert_model_parallel_size,
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
        f"{budget / GIB:.0f}GB` for layouts that fit (more tensor/pipeline/context parallelism, "
        "--recompute-granularity full, a smaller --micro-batch-size), or pass --skip-memory-check to try anyway"
    )
