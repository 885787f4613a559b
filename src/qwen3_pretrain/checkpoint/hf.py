"""HF safetensors checkpoints: stream tensors in, write (sharded) safetensors out.

Reading handles a single `model.safetensors` or a sharded set described by
`model.safetensors.index.json`, one tensor at a time. Writing holds at most one shard in memory,
builds every file under a temporary directory inside the target and moves the files in place with
the file that makes the checkpoint look complete (`model.safetensors` or the index) moved last.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

if TYPE_CHECKING:
    from qwen3_pretrain.model.config import Qwen3Config

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


class HFCheckpointError(ValueError):
    """An HF checkpoint directory is missing, incomplete or corrupt; the message names the file."""


def shard_name(index: int, count: int) -> str:
    """HF's name for shard `index` (1-based) of `count`."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def _shard_plan(directory: Path) -> list[tuple[Path, list[str] | None]]:
    """(file, keys to read or None for all) in reading order; raises HFCheckpointError when absent."""
    if not directory.is_dir():
        raise HFCheckpointError(
            f"HF checkpoint directory {directory} does not exist; pass a directory with {SINGLE_FILE} or {INDEX_FILE}"
        )
    single = directory / SINGLE_FILE
    if single.is_file():
        return [(single, None)]
    index_path = directory / INDEX_FILE
    if not index_path.is_file():
        found = sorted(p.name for p in directory.iterdir())[:10]
        raise HFCheckpointError(
            f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE} (found: {found}); "
            "only safetensors checkpoints are supported, re-save the model with safetensors"
        )
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise HFCheckpointError(f"{index_path} is corrupt ({exc}); re-download or re-save the checkpoint") from exc
    by_file: dict[str, list[str]] = {}
    for key, file_name in weight_map.items():
        by_file.setdefault(file_name, []).append(key)
    plan = []
    for file_name in sorted(by_file):
        path = directory / file_name
        if not path.is_file():
            raise HFCheckpointError(f"shard {path} listed in {index_path} is missing; re-download the checkpoint")
        plan.append((path, by_file[file_name]))
    return plan


def iter_hf_tensors(
    directory: str | os.PathLike[str], dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, CPU tensor) pairs one at a time; floating tensors are cast to `dtype` if given."""
    for path, keys in _shard_plan(Path(directory)):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                present = set(handle.keys())
                wanted = sorted(present) if keys is None else keys
                missing = [k for k in wanted if k not in present]
                if missing:
                    raise HFCheckpointError(
                        f"{path} lacks tensors its index lists: {missing[:5]}; re-download the checkpoint"
                    )
                for key in wanted:
                    tensor = handle.get_tensor(key)
                    if dtype is not None and tensor.is_floating_point():
                        tensor = tensor.to(dtype)
                    yield key, tensor
        except SafetensorError as exc:
            raise HFCheckpointError(
                f"{path} is not a valid safetensors file ({exc}); re-download or re-save it"
            ) from exc


def load_hf_state_dict(
    directory: str | os.PathLike[str], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory as one dict."""
    return dict(iter_hf_tensors(directory, dtype))


def _plain_cpu(tensor: torch.Tensor, seen_storages: set[int]) -> torch.Tensor:
    """A contiguous CPU tensor that owns its storage alone within the shard (safetensors requires it)."""
    tensor = tensor.detach().to("cpu").contiguous()
    storage = tensor.untyped_storage()
    if storage.data_ptr() in seen_storages or storage.nbytes() != tensor.nbytes:
        tensor = tensor.clone()
    seen_storages.add(tensor.untyped_storage().data_ptr())
    return tensor


def _write_shards(
    items: Iterable[tuple[str, torch.Tensor]], staging: Path, max_shard_bytes: int
) -> tuple[list[Path], dict[str, int], int]:
    """Write shards as `staging/part-i`; return (files, key -> shard number, total bytes)."""
    files: list[Path] = []
    key_to_shard: dict[str, int] = {}
    shard: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    shard_bytes = total = 0

    def flush() -> None:
        nonlocal shard, seen, shard_bytes
        path = staging / f"part-{len(files)}"
        save_file(shard, str(path), metadata={"format": "pt"})
        files.append(path)
        shard, seen, shard_bytes = {}, set(), 0

    for key, tensor in items:
        if key in key_to_shard:
            raise ValueError(f"tensor name {key!r} appears twice in the state to save")
        if shard and shard_bytes + tensor.nbytes > max_shard_bytes:
            flush()
        shard[key] = _plain_cpu(tensor, seen)
        shard_bytes += tensor.nbytes
        total += tensor.nbytes
        key_to_shard[key] = len(files)
    if shard or not files:
        flush()
    return files, key_to_shard, total


def save_hf_state_dict(
    state: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    directory: str | os.PathLike[str],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    config: Qwen3Config | None = None,
) -> None:
    """Write `state` as HF safetensors (sharded with an index when over `max_shard_bytes`) + config.json.

    Streams: at most one shard is held in memory, so `state` may be a generator. Every tensor given is
    written (the caller decides whether to include a tied `lm_head.weight`). Previous `model*.safetensors`
    files and index in `directory` are replaced; other files (tokenizer, ...) are kept.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    items = state.items() if isinstance(state, Mapping) else state
    staging = Path(tempfile.mkdtemp(prefix=".incomplete-save-", dir=directory))
    try:
        parts, key_to_shard, total = _write_shards(items, staging, max_shard_bytes)
        count = len(parts)
        names = [SINGLE_FILE] if count == 1 else [shard_name(i + 1, count) for i in range(count)]
        if count > 1:
            index = {
                "metadata": {"total_size": total},
                "weight_map": {key: names[i] for key, i in sorted(key_to_shard.items())},
            }
            (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        for old in [*directory.glob("model*.safetensors"), directory / INDEX_FILE]:
            old.unlink(missing_ok=True)  # the directory now looks incomplete until the last rename
        if config is not None:
            config.save_pretrained(directory)
        for part, name in zip(parts, names):
            os.replace(part, directory / name)
        if count > 1:
            os.replace(staging / INDEX_FILE, directory / INDEX_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
