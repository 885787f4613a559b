"""HF safetensors checkpoints: stream tensors in, write (sharded) safetensors out.

Reading handles a single `model.safetensors` or a sharded set described by
`model.safetensors.index.json`, one tensor at a time: the headers are parsed and checked here, and
each tensor's bytes are read with plain file reads into a fresh tensor (no memory map; the pages read
are dropped from the page cache), so reading holds only the tensor being yielded.

Writing holds at most one shard in memory, builds every file under a temporary directory inside the
target and moves the files in place with the file that makes the checkpoint look complete
(`model.safetensors` or the index) moved last.

`load_pretrained` and `save_pretrained` do both for a whole `Qwen3ForCausalLM` and its config.json, dense or
Qwen3-MoE (config.json's model_type picks). The stacked experts of a MoE layer ([E, 2 ffn, hidden] and
[E, hidden, ffn] in memory) are read and written under HF's per-expert names
(`model.layers.L.mlp.experts.{i}.gate_proj/up_proj/down_proj.weight`, router `model.layers.L.mlp.gate.weight`)
through `Qwen3ForCausalLM.hf_state_dict`, whose per-expert entries are views of the stacked parameters: loading
copies each tensor into its slice as it streams by, saving writes one expert's matrix at a time. For streams of
named tensors, `stack_experts` turns the per-expert names into the stacked parameters (one layer held at a
time) and `unstack_experts` does the reverse.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import save_file

from qwen3_pretrain.config.model import Qwen3Config, Qwen3MoeConfig
from qwen3_pretrain.model.kernels import DEFAULT_KERNELS, KernelOptions
from qwen3_pretrain.model.qwen3 import EMBED_KEY, LM_HEAD_KEY, Qwen3ForCausalLM, copy_named_tensors

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16,
    "U8": torch.uint8, "BOOL": torch.bool,
}


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
    plan: list[tuple[Path, list[str] | None]] = []
    for file_name in sorted(by_file):
        path = directory / file_name
        if not path.is_file():
            raise HFCheckpointError(f"shard {path} listed in {index_path} is missing; re-download the checkpoint")
        plan.append((path, by_file[file_name]))
    return plan


class TensorLocation(NamedTuple):
    """Where one tensor's bytes lie in a safetensors file."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # from the start of the file
    nbytes: int


def _corrupt(path: Path, reason: str) -> HFCheckpointError:
    return HFCheckpointError(f"{path} is not a valid safetensors file ({reason}); re-download or re-save it")


def _read_header(path: Path) -> dict[str, TensorLocation]:
    """Every tensor of one safetensors file from its header (8-byte little-endian length, then JSON)."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, f"{size} bytes is too short for the 8-byte header length")
            (header_bytes,) = struct.unpack("<Q", prefix)
            if header_bytes > min(MAX_HEADER_BYTES, size - 8):
                raise _corrupt(path, f"header length {header_bytes} exceeds the file size {size} or {MAX_HEADER_BYTES}")
            header = json.loads(handle.read(header_bytes))
    except OSError as exc:
        raise HFCheckpointError(f"cannot read {path} ({exc})") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(path, f"its header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    data_start = 8 + header_bytes
    return {
        name: _tensor_location(path, name, entry, data_start, size)
        for name, entry in header.items()
        if name != "__metadata__"
    }


def _tensor_location(path: Path, name: str, entry: Any, data_start: int, file_size: int) -> TensorLocation:
    """Check one header entry ({"dtype", "shape", "data_offsets"}) against the file and locate its bytes."""
    try:
        dtype_name, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
    except (KeyError, TypeError, ValueError) as exc:
        raise _corrupt(path, f"header entry {name!r} lacks a dtype, shape or [begin, end] data_offsets") from exc
    if not isinstance(dtype_name, str) or dtype_name not in SAFETENSORS_DTYPES:
        raise _corrupt(path, f"tensor {name!r} has dtype {dtype_name!r}, not one of {sorted(SAFETENSORS_DTYPES)}")
    if not all(type(v) is int and v >= 0 for v in (*shape, begin, end)) or begin > end:
        raise _corrupt(path, f"tensor {name!r} has shape {list(shape)} and data_offsets {[begin, end]}")
    dtype = SAFETENSORS_DTYPES[dtype_name]
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes:
        raise _corrupt(
            path,
            f"tensor {name!r} ({dtype_name} {list(shape)}) needs {nbytes} bytes, "
            f"its data_offsets span {end - begin}",
        )
    if data_start + end > file_size:
        raise _corrupt(path, f"tensor {name!r} ends at byte {data_start + end} of a {file_size}-byte file (truncated)")
    return TensorLocation(path, dtype, shape, data_start + begin, nbytes)


def hf_tensor_locations(directory: str | os.PathLike[str]) -> dict[str, TensorLocation]:
    """Every tensor of an HF checkpoint directory -> where it lies, from the headers; reads no tensor data.

    Raises HFCheckpointError naming the file when a file is missing, corrupt or lacks a tensor its
    index lists.
    """
    locations: dict[str, TensorLocation] = {}
    for path, keys in _shard_plan(Path(directory)):
        in_file = _read_header(path)
        missing = [k for k in keys or () if k not in in_file]
        if missing:
            raise HFCheckpointError(f"{path} lacks tensors its index lists: {missing[:5]}; re-download the checkpoint")
        locations.update((k, in_file[k]) for k in (in_file if keys is None else keys))
    return locations


def read_tensor(handle: io.RawIOBase, location: TensorLocation) -> torch.Tensor:
    """The tensor at `location` of the open file `handle`, read into fresh memory; its pages leave the page cache."""
    data = torch.empty(location.nbytes, dtype=torch.uint8)
    buffer = memoryview(data.numpy())  # type: ignore[arg-type]  # numpy arrays are buffers; numpy's stubs lack it
    handle.seek(location.offset)
    done = 0
    while done < location.nbytes:
        count = handle.readinto(buffer[done:])
        if not count:
            where = location.offset + done
            raise _corrupt(location.path, f"it ends inside a tensor at byte {where} (truncated while reading)")
        done += count
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(handle.fileno(), location.offset, location.nbytes, os.POSIX_FADV_DONTNEED)
    return data.view(location.dtype).view(location.shape)  # [nbytes] -> [numel] -> shape


def iter_hf_tensors(
    directory: str | os.PathLike[str], dtype: torch.dtype | None = None, order: Sequence[str] = ()
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, CPU tensor) pairs one at a time; floating tensors are cast to `dtype` if given.

    Names listed in `order` come first, in that order (e.g. a model's layer order, so consumers can
    finish one part before the next starts); the rest follow in file and offset order. Every header
    is checked before the first tensor is yielded.
    """
    locations = hf_tensor_locations(directory)
    rank = {name: i for i, name in enumerate(order)}
    names = sorted(locations, key=lambda n: (rank.get(n, len(rank)), str(locations[n].path), locations[n].offset))
    for path, group in itertools.groupby(names, key=lambda n: locations[n].path):
        with contextlib.ExitStack() as stack:
            try:
                handle = stack.enter_context(open(path, "rb", buffering=0))
            except OSError as exc:
                raise HFCheckpointError(f"cannot read {path} ({exc})") from exc
            for name in group:
                tensor = read_tensor(handle, locations[name])
                yield name, tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


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
        for part, name in zip(parts, names, strict=True):
            os.replace(part, directory / name)
        if count > 1:
            os.replace(staging / INDEX_FILE, directory / INDEX_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---- MoE experts: HF's per-expert tensors <-> the model's stacked parameters ------------------------------

_EXPERT_NAME = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_STACKED_NAME = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def stack_experts(
    tensors: Iterable[tuple[str, torch.Tensor]], config: Qwen3Config
) -> Iterator[tuple[str, torch.Tensor]]:
    """HF's per-expert tensors -> the stacked parameters `...mlp.experts.gate_up_proj` [E, 2F, H] (per expert
    cat(gate, up)) and `.down_proj` [E, H, F]; other tensors pass through.

    Each stacked tensor is filled in place as its experts stream by and yielded once complete, so a stream in
    layer order holds one layer's experts. A tensor that does not fit (expert index, shape) passes through
    unchanged, for the consumer to report; an incomplete one is never yielded (the consumer reports it missing).
    """
    experts = config.num_experts if isinstance(config, Qwen3MoeConfig) else 0
    filling: dict[str, tuple[torch.Tensor, set[tuple[int, str]]]] = {}
    for name, tensor in tensors:
        match = _EXPERT_NAME.match(name)
        if match is None or int(match.group(2)) >= experts or tensor.dim() != 2:
            yield name, tensor
            continue
        prefix, index, kind = match.group(1), int(match.group(2)), match.group(3)
        down = kind == "down_proj"
        stacked_name = f"{prefix}.{'down_proj' if down else 'gate_up_proj'}"
        if stacked_name not in filling:
            rows, cols = tensor.shape
            filling[stacked_name] = (tensor.new_empty(experts, rows if down else 2 * rows, cols), set())
        stacked, seen = filling[stacked_name]
        slot = stacked[index] if down else stacked[index].chunk(2)[kind == "up_proj"]  # [H, F] or [F, H]
        if slot.shape != tensor.shape or (index, kind) in seen:
            yield name, tensor
            continue
        slot.copy_(tensor)
        seen.add((index, kind))
        if len(seen) == experts * (1 if down else 2):
            yield stacked_name, filling.pop(stacked_name)[0]


def unstack_experts(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The stacked expert parameters -> HF's per-expert tensors (views, gate and up of each expert before the
    down projections); other tensors pass through."""
    for name, tensor in tensors:
        match = _STACKED_NAME.match(name)
        if match is None:
            yield name, tensor
            continue
        prefix, kind = match.groups()
        for index, expert in enumerate(tensor):
            if kind == "down_proj":
                yield f"{prefix}.{index}.down_proj.weight", expert  # [H, F]
            else:
                gate, up = expert.chunk(2)  # [2F, H] -> [F, H] each
                yield f"{prefix}.{index}.gate_proj.weight", gate
                yield f"{prefix}.{index}.up_proj.weight", up


# ---- a whole Qwen3ForCausalLM ---------------------------------------------------------------------


def load_pretrained(
    directory: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    kernels: KernelOptions = DEFAULT_KERNELS,
) -> Qwen3ForCausalLM:
    """Load an HF Qwen3 or Qwen3-MoE directory (config.json + single or sharded safetensors) running `kernels`.

    dtype None means the config's `torch_dtype`. Builds on meta and copies one tensor at a time.
    Keys must match exactly (HFCheckpointError lists missing/unexpected ones), except that a tied
    model accepts an `lm_head.weight` equal to the embedding (some exporters write the copy);
    one that differs is refused, since the config's `tie_word_embeddings` would then be wrong.
    """
    directory = Path(directory)
    config = Qwen3Config.from_pretrained(directory)
    dtype = getattr(torch, config.torch_dtype) if dtype is None else dtype
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config, kernels)
    model.to(dtype).to_empty(device=device)
    model.tie_weights()
    model.model.rotary_emb.reset_parameters()
    targets = model.hf_state_dict()
    source = f"{directory} (a Qwen3 model built from its config.json)"
    tied_head = copy_named_tensors(targets, iter_hf_tensors(directory, dtype), source, HFCheckpointError)
    if tied_head is not None and not torch.equal(tied_head.to(targets[EMBED_KEY]), targets[EMBED_KEY]):
        raise HFCheckpointError(
            f"{directory}: config.json ties word embeddings but {LM_HEAD_KEY} differs from {EMBED_KEY}; "
            "set tie_word_embeddings to false in config.json if the head is meant to be separate"
        )
    return model


def save_pretrained(
    model: Qwen3ForCausalLM,
    directory: str | os.PathLike[str],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: torch.dtype | None = None,
) -> None:
    """Write config.json + safetensors (sharded above `max_shard_bytes`) of `model` that HF transformers loads.

    dtype None keeps the parameters' dtype; config.json records the dtype written. A tied model
    writes no `lm_head.weight`.
    """
    state = model.hf_state_dict()
    dtype = next(iter(state.values())).dtype if dtype is None else dtype
    config = dataclasses.replace(model.config, torch_dtype=str(dtype).removeprefix("torch."))
    items = ((name, tensor.to(dtype) if tensor.is_floating_point() else tensor) for name, tensor in state.items())
    save_hf_state_dict(items, directory, max_shard_bytes=max_shard_bytes, config=config)
