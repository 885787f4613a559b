"""Native checkpoints: torch.distributed.checkpoint (DCP) directories that any parallel layout can load.

Layout (Megatron-like):

    <save_dir>/latest_checkpointed_iteration.txt     the last complete iteration, e.g. "2000"
    <save_dir>/iter_0002000/.metadata, *.distcp      model + optimizer, sharded, layout independent (DCP)
    <save_dir>/iter_0002000/train_state.pt           iteration, world size, train state, LR scheduler
    <save_dir>/iter_0002000/config.yaml              the full run configuration
    <save_dir>/iter_0002000/rng/rank_00000.pt        RNG states of each rank
    <save_dir>/iter_0002000/manifest.json            size and CRC-32 of every other file, written last

Model and optimizer go through `torch.distributed.checkpoint.state_dict.get_state_dict`, so tensors
are stored under their unwrapped FQNs with their global shapes: a checkpoint written by FSDP2, TP,
PP or a single process loads into any other layout (DCP reshards on load).

A save is atomic: everything is written into `<save_dir>/.iter_N.<token>.incomplete`, renamed to `iter_N`,
and only then is the `latest` file replaced (write to a temporary name + rename). A save killed at
any point leaves the previous checkpoint complete and `latest` pointing at it. Re-saving an existing
iteration moves the old directory aside first; a load falls back to it if a kill lands in between.
`keep_last` prunes only after `latest` names the new iteration (never the resume point it is told to protect).
With an `AsyncSaver` the caller waits only for a host copy of the state; the same steps run in its thread.

Loading checks every file against the manifest first (`verify=False` skips it; saves older than the
manifest load with a warning), and nothing read from a checkpoint can run code: torch files are read
with `weights_only=True` (`_load_torch_file`) and DCP's `.metadata`, which DCP itself unpickles without
restriction, with an allowlist of the metadata classes (`read_dcp_metadata`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import io
import json
import os
import pathlib
import pickle
import random
import re
import shutil
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch import nn
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    _MEM_FORMAT_ENCODING,
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from qwen3_pretrain.distributed.device import device_module, device_type

LATEST_FILE = "latest_checkpointed_iteration.txt"
TRAIN_STATE_FILE = "train_state.pt"
CONFIG_FILE = "config.yaml"
RNG_DIR = "rng"
DCP_METADATA_FILE = ".metadata"
MANIFEST_FILE = "manifest.json"
FORMAT_NAME = "qwen3-pretrain-native"
FORMAT_VERSION = 1
MANIFEST_FORMAT = "qwen3-pretrain-manifest"
CHECKSUM = "crc32"  # zlib's CRC-32: ~4x blake2b's speed here (BENCHMARKS.md); it guards against damage, not tampering
MODEL_KEY = "model"
OPTIMIZER_KEY = "optimizer"

ITER_DIR_PATTERN = re.compile(r"^iter_(\d{7,})$")
_CHUNK_BYTES = 16 << 20  # read size of checksums
_T = TypeVar("_T")



class Stateful(Protocol):
    """What a checkpoint saves and restores besides tensors (the LR schedule): a plain state dict."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the model; the message names the path."""


# ---- names -------------------------------------------------------------------------------------


def iteration_dir_name(iteration: int) -> str:
    """Megatron's directory name for an iteration: `iter_0000100`."""
    return f"iter_{iteration:07d}"


def _staging_dir(final: Path, group: dist.ProcessGroup | None = None) -> Path:
    """A new `.iter_N.<token>.incomplete` per save, the same on every rank (rank 0's token, broadcast: collective),
    so nothing an earlier save left behind, or a straggler of it still writes, mixes into this save."""
    token = [os.urandom(6).hex()]
    if _distributed():
        dist.broadcast_object_list(token, src=0, group=group)
    return final.with_name(f".{final.name}.{token[0]}.incomplete")


def _replaced_dir(final: Path) -> Path:
    return final.with_name(f".{final.name}.replaced")


def _pruned_dir(final: Path) -> Path:
    return final.with_name(f".{final.name}.pruned")


def _rng_file(checkpoint: Path, rank: int) -> Path:
    return checkpoint / RNG_DIR / f"rank_{rank:05d}.pt"


def is_native_checkpoint_dir(path: Path) -> bool:
    """True for a complete native iteration directory (DCP metadata + our train state)."""
    return (path / DCP_METADATA_FILE).is_file() and (path / TRAIN_STATE_FILE).is_file()


# ---- process group helpers (everything also works without a process group) ---------------------


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


@contextlib.contextmanager
def _single_process_is_intended() -> Iterator[None]:
    """Silence DCP's warning that it runs without a process group: that is a supported use here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*in a single process")
        yield


def _print_rank0(message: str) -> None:
    if _rank() == 0:
        print(message, flush=True)


def _on_rank0(action: Callable[[], None], group: dist.ProcessGroup | None = None) -> None:
    """Run `action` on rank 0 only; every rank raises if it failed (and waits for it either way)."""
    error: str | None = None
    if _rank() == 0:
        try:
            action()
        except Exception as exc:
            if not _distributed():
                raise
            error = f"{type(exc).__name__}: {exc}"
    if _distributed():
        box = [error]
        dist.broadcast_object_list(box, src=0, group=group)
        if box[0] is not None:
            raise CheckpointError(f"rank 0 failed while saving a checkpoint: {box[0]}")


def _on_all_ranks(action: Callable[[], _T], what: str, group: dist.ProcessGroup | None = None) -> list[_T]:
    """`action()` on every rank, the results gathered in rank order on all; every rank raises if one failed."""
    if not _distributed():
        return [action()]
    try:
        mine: tuple[_T | None, str | None] = (action(), None)
    except Exception as exc:
        mine = (None, f"{type(exc).__name__}: {exc}")
    gathered: list[Any] = [None] * _world_size()
    dist.all_gather_object(gathered, mine, group=group)
    failed = [f"rank {rank}: {error}" for rank, (_, error) in enumerate(gathered) if error is not None]
    if failed:
        raise CheckpointError(f"{what} failed on " + "; ".join(failed))
    return [result for result, _ in gathered]


# ---- small durable file writes -----------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, write: Callable[[Any], None]) -> None:
    """Create `path` with `write(file)`, flushed to disk (no rename: callers write inside staging)."""
    with open(path, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())


def _write_latest(save_dir: Path, iteration: int) -> None:
    """Atomically point `latest_checkpointed_iteration.txt` at `iteration`."""
    tmp = save_dir / f"{LATEST_FILE}.tmp"
    _write_durably(tmp, lambda f: f.write(f"{iteration}\n".encode()))
    os.replace(tmp, save_dir / LATEST_FILE)
    _fsync_dir(save_dir)


def replace_directory(staging: Path, final: Path) -> None:
    """Rename a finished staging directory to `final`; an existing `final` is moved aside, then deleted.

    `final` is either the old or the new complete directory at every instant, except between the
    two renames, when the old one sits complete at `.<name>.replaced` next to it.
    """
    aside = _replaced_dir(final)
    if final.exists():
        if aside.exists():
            shutil.rmtree(aside)  # left by a kill after the previous commit: `final` is complete
        os.replace(final, aside)
    os.replace(staging, final)
    _fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


# ---- config and RNG --------------------------------------------------------------------------


def _plain(value: Any, where: str) -> Any:
    """`value` as YAML-safe builtins (dicts, lists, str, numbers, bool, None); TypeError names the key."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, enum.Enum):
        return _plain(value.value, where)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint config value {where} = {value!r} ({type(value).__name__}) cannot be saved as YAML")


def _config_yaml(config: Mapping[str, Any]) -> str:
    return yaml.safe_dump(_plain(config, "config"), sort_keys=False)


def _safe_pickle(state: dict[str, Any]) -> bytes:
    """`torch.save` bytes of `state`, checked to load with weights_only=True (else TypeError, before any write)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:
        _load_torch_file(io.BytesIO(buffer.getvalue()))
    except Exception as exc:
        raise TypeError(
            f"the train state or LR scheduler state holds a type that cannot be loaded safely ({exc}); "
            "store plain Python numbers, strings, lists, dicts or tensors"
        ) from exc
    return buffer.getvalue()


def _capture_rng() -> dict[str, Any]:
    """This process's RNG states as types `torch.load(weights_only=True)` accepts."""
    numpy_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "device_type": device_type(),
        "device": None,
    }
    if state["device_type"] != "cpu":
        state["device"] = device_module().get_rng_state()
    return state


def _restore_rng(state: dict[str, Any], source: Path) -> None:
    random.setstate(state["python"])
    saved_numpy = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": saved_numpy["bit_generator"],
            "state": {"key": saved_numpy["key"].numpy().astype(np.uint32), "pos": saved_numpy["pos"]},
            "has_gauss": saved_numpy["has_gauss"],
            "gauss": saved_numpy["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if state["device"] is None:
        return
    if state["device_type"] == device_type():
        device_module().set_rng_state(state["device"])
    elif _rank() == 0:
        warnings.warn(
            f"{source}: {state['device_type']} RNG state not restored on a {device_type()} device",
            stacklevel=3,
        )


# ---- reading safely: nothing in a checkpoint can run code --------------------------------------


def _load_torch_file(source: Path | io.BytesIO) -> Any:
    """The one way this module unpickles torch data (train state, RNG states, DCP's non-tensor entries):
    `weights_only=True`, so tensors and plain Python values only (DCP reads its tensors the same way)."""
    return torch.load(source, map_location="cpu", weights_only=True)


# Everything a DCP `.metadata` pickle refers to (found by unpickling real saves of every layout): DCP's
# metadata dataclasses, torch.Size, dtypes, layouts, the Path of the save (PosixPath's module moved in 3.13).
_DCP_METADATA_GLOBALS: dict[str, Any] = {
    **{
        f"{obj.__module__}.{obj.__qualname__}": obj
        for obj in (
            Metadata, StorageMeta, MetadataIndex, TensorStorageMetadata, BytesStorageMetadata,
            ChunkStorageMetadata, TensorProperties, _MEM_FORMAT_ENCODING, _StorageInfo, torch.Size,
            torch.serialization._get_layout,
        )
    },
    **{f"torch.{name}": value for name, value in vars(torch).items() if isinstance(value, torch.dtype)},
    "pathlib.PosixPath": pathlib.PosixPath,
    "pathlib._local.PosixPath": pathlib.PosixPath,
}


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle names something outside the allowlist."""


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata, resolving only the names in `_DCP_METADATA_GLOBALS` (no persistent ids)."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _DCP_METADATA_GLOBALS[f"{module}.{name}"]
        except KeyError:
            raise _RefusedGlobal(f"{module}.{name}") from None


def _inside(name: str) -> bool:
    """True for a relative path that stays inside its directory (no absolute path, no `..`)."""
    path = PurePosixPath(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts


def read_dcp_metadata(checkpoint: Path) -> Metadata:
    """`checkpoint`'s DCP metadata, unpickled with an allowlist of the classes DCP stores there.

    DCP's own reader unpickles `.metadata` without restriction, so a crafted file would run code when
    loaded; this raises CheckpointError naming the file and what it refers to instead.
    """
    path = checkpoint / DCP_METADATA_FILE
    try:
        with open(path, "rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
    except _RefusedGlobal as exc:
        raise CheckpointError(
            f"{path} was refused: its pickle refers to {exc}, which DCP metadata never holds, so loading it "
            "could run arbitrary code (the file was crafted or is damaged); load a checkpoint you trust"
        ) from None
    except Exception as exc:  # a damaged pickle raises anything from EOFError to TypeError
        raise CheckpointError(f"{path} is unreadable ({type(exc).__name__}: {exc}); load another iteration") from exc
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not DCP metadata; load another iteration")
    for info in metadata.storage_data.values():
        if not isinstance(info, _StorageInfo) or not isinstance(info.relative_path, str) or not _inside(
            info.relative_path
        ):
            raise CheckpointError(f"{path} names a data file outside its checkpoint ({info!r}); refusing to load it")
    return metadata


class _CheckedReader(dcp.FileSystemReader):
    """DCP's file reader, handing DCP the metadata `read_dcp_metadata` read (read once, on construction)."""

    def __init__(self, checkpoint: Path) -> None:
        super().__init__(checkpoint)
        self._metadata = read_dcp_metadata(checkpoint)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        self._metadata.storage_meta = self._metadata.storage_meta or StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


# ---- manifest: the size and checksum of every file, checked before loading ----------------------


def file_checksum(path: Path) -> str:
    """The CRC-32 of a file's bytes, as 8 hex digits."""
    crc = 0
    with open(path, "rb", buffering=0) as handle:
        buffer = bytearray(max(1, min(_CHUNK_BYTES, os.fstat(handle.fileno()).st_size)))
        view = memoryview(buffer)
        while count := handle.readinto(buffer):
            crc = zlib.crc32(view[:count], crc)
    return f"{crc:08x}"


def _manifest_entry(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, CHECKSUM: file_checksum(path)}


def _own_file_entries(staging: Path) -> dict[str, dict[str, Any]]:
    """Manifest entries of the files this rank wrote (its DCP shards `__{rank}_*`, its RNG state), read back
    while they are likely still in its page cache; the other files are checksummed by rank 0."""
    rank = _rank()
    own = [*sorted(staging.glob(f"__{rank}_*.distcp")), _rng_file(staging, rank)]
    return {path.relative_to(staging).as_posix(): _manifest_entry(path) for path in own}


def _write_manifest(directory: Path, known: Mapping[str, dict[str, Any]]) -> None:
    """Write `directory/manifest.json`: the entries in `known` plus those of the other files there."""
    names = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()} - {MANIFEST_FILE}
    files = {name: known.get(name) or _manifest_entry(directory / name) for name in sorted(names | set(known))}
    manifest = {"format": MANIFEST_FORMAT, "version": 1, "checksum": CHECKSUM, "files": files}
    _write_durably(directory / MANIFEST_FILE, lambda f: f.write(json.dumps(manifest, indent=1).encode()))


def _is_entry(entry: Any) -> bool:
    return isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get(CHECKSUM), str)


def read_manifest(checkpoint: Path) -> dict[str, dict[str, Any]] | None:
    """The files `checkpoint`'s manifest lists (name -> size and checksum); None for a save without one."""
    path = checkpoint / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is damaged ({exc}); load another iteration") from exc
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (
        not isinstance(files, dict)
        or manifest.get("format") != MANIFEST_FORMAT
        or manifest.get("checksum") != CHECKSUM
        or not all(_inside(name) and _is_entry(entry) for name, entry in files.items())
    ):
        raise CheckpointError(
            f"{path} is not a {MANIFEST_FORMAT} with {CHECKSUM} checksums; it is damaged or from a newer "
            "qwen3-pretrain"
        )
    return files


def damaged_files(checkpoint: Path, files: Mapping[str, dict[str, Any]], names: Iterable[str]) -> list[str]:
    """One line per file of `names` that is missing or differs from its manifest entry in `files`."""
    problems = []
    for name in names:
        path, expected = checkpoint / name, files[name]
        try:
            size = path.stat().st_size
            if size != expected["size"]:
                problems.append(f"{path}: {size} bytes, the manifest says {expected['size']} (truncated or rewritten)")
            elif (checksum := file_checksum(path)) != expected[CHECKSUM]:
                problems.append(
                    f"{path}: {CHECKSUM} {checksum}, the manifest says {expected[CHECKSUM]} (its bytes changed)"
                )
        except OSError as exc:
            problems.append(f"{path}: {exc.strerror or exc}")
    return problems


def verify_checkpoint(checkpoint: Path, collective: bool = False) -> bool:
    """Check every file of the iteration directory `checkpoint` against its manifest; False (and a warning)
    when it has none. CheckpointError names each damaged file. `collective`: call on every rank, which
    share the reading."""
    files = read_manifest(checkpoint)
    if files is None:
        if _rank() == 0 or not collective:
            warnings.warn(
                f"{checkpoint} has no {MANIFEST_FILE} (saved before qwen3-pretrain wrote one): "
                "its files are loaded without being verified",
                stacklevel=3,
            )
        return False
    names = sorted(files)
    if collective:
        share = names[_rank() :: _world_size()]
        shares = _on_all_ranks(lambda: damaged_files(checkpoint, files, share), "verifying a checkpoint")
        problems = [problem for part in shares for problem in part]
    else:
        problems = damaged_files(checkpoint, files, names)
    if problems:
        raise CheckpointError(
            f"{checkpoint} is damaged: {len(problems)} of its files differ from {MANIFEST_FILE}:\n  "
            + "\n  ".join(problems)
            + "\nload another iteration (or skip this check: train --no-verify-checkpoint)"
        )
    return True


# ---- save ------------------------------------------------------------------------------------


def _prepare_staging(save_dir: Path, staging: Path) -> None:
    """Create an empty staging directory after tidying what killed saves left behind.

    Stale staging directories and the remains of interrupted prunes are deleted; a directory moved aside by an
    interrupted re-save is deleted when its replacement is in place, and put back otherwise.
    """
    save_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*save_dir.glob(".iter_*.incomplete"), *save_dir.glob(".iter_*.pruned")]:
        shutil.rmtree(stale)
    for aside in save_dir.glob(".iter_*.replaced"):
        final = save_dir / aside.name[1 : -len(".replaced")]
        if final.exists():
            shutil.rmtree(aside)
        else:
            os.replace(aside, final)
    (staging / RNG_DIR).mkdir(parents=True)


def _prune(save_dir: Path, iteration: int, keep_last: int, protected: Path | None = None) -> None:
    """Delete checkpoints older than `iteration` so that `keep_last` remain, never `protected` (it does not count).

    Runs after `latest` names `iteration`, and newer checkpoints are left alone, so `latest` never names a deleted
    one. Each goes by a rename to `.iter_N.pruned` first: a kill leaves whole `iter_N` directories only (the
    next save deletes the remains).
    """
    keep = None if protected is None else protected.resolve()
    older = sorted(
        int(match.group(1))
        for path in save_dir.iterdir()
        if (match := ITER_DIR_PATTERN.match(path.name))
        and int(match.group(1)) < iteration
        and path.resolve() != keep
    )
    for old in older[: max(0, len(older) - (keep_last - 1))]:
        doomed = _pruned_dir(save_dir / iteration_dir_name(old))
        os.replace(save_dir / iteration_dir_name(old), doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def _host_copy(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of a DCP state dict in fresh CPU memory (DTensors stay DTensors), for a save in the background."""
    copy = _create_cpu_state_dict(state)
    return _copy_state_dict(state, copy)


@dataclasses.dataclass
class _SaveJob:
    """Everything one save writes, captured when it starts: what runs later (`write`) reads nothing live."""

    save_dir: Path
    iteration: int
    state: dict[str, Any]
    meta_bytes: bytes
    config_text: str
    rng_state: dict[str, Any]
    keep_last: int | None
    protected: Path | None
    also_write: Callable[[Path], None] | None

    @property
    def final(self) -> Path:
        return self.save_dir / iteration_dir_name(self.iteration)

    def write(self, group: dist.ProcessGroup | None = None) -> Path:
        """Write the files, the manifest and commit; collective over `group` (None: the default group)."""
        start = time.perf_counter()
        save_dir, final = self.save_dir, self.final
        staging = _staging_dir(final, group)
        _on_rank0(lambda: _prepare_staging(save_dir, staging), group)
        _write_durably(_rng_file(staging, _rank()), lambda f: torch.save(self.rng_state, f))
        with _single_process_is_intended():
            dcp.save(self.state, checkpoint_id=staging, process_group=group)
        checksums = _on_all_ranks(lambda: _own_file_entries(staging), "checksumming a checkpoint", group)

        def commit() -> None:
            _write_durably(staging / TRAIN_STATE_FILE, lambda f: f.write(self.meta_bytes))
            _write_durably(staging / CONFIG_FILE, lambda f: f.write(self.config_text.encode()))
            if self.also_write is not None:
                self.also_write(staging)
            _write_manifest(staging, {name: entry for entries in checksums for name, entry in entries.items()})
            replace_directory(staging, final)
            _write_latest(save_dir, self.iteration)
            if self.keep_last is not None:
                _prune(save_dir, self.iteration, self.keep_last, self.protected)

        _on_rank0(commit, group)
        seconds = time.perf_counter() - start
        _print_rank0(
            f"  successfully saved checkpoint from iteration {self.iteration:7d} to {save_dir} ({seconds:.2f} s)"
        )
        return final


class AsyncSaver:
    """Writes checkpoints in a background thread, at most one at a time (`save_checkpoint(background=...)`).

    The caller blocks only to copy the state to host memory; the files, the manifest and the commit follow in
    the thread, whose collectives use a gloo group of their own. `wait()` blocks until the save in flight is
    committed (or raises its error); call it on every rank before the process ends.
    """

    def __init__(self) -> None:
        self._group: dist.ProcessGroup | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, job: _SaveJob) -> None:
        """Wait for the previous save, then start writing `job`; collective."""
        self.wait()
        if _distributed() and self._group is None:
            self._group = dist.new_group(backend="gloo")

        def run() -> None:
            try:
                job.write(self._group)
            except BaseException as exc:  # DCP's CheckpointException is a BaseException
                self._error = exc

        self._thread = threading.Thread(target=run, name=f"checkpoint-{job.iteration}", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Block until the save in flight (if any) is committed; re-raise its error here."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error


def save_checkpoint(
    save_dir: str | os.PathLike[str],
    iteration: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    lr_scheduler: Stateful | None,
    train_state: dict[str, Any],
    config: Mapping[str, Any],
    keep_last: int | None = None,
    also_write: Callable[[Path], None] | None = None,
    protected: Path | None = None,
    background: AsyncSaver | None = None,
) -> Path:
    """Save model, optimizer, LR scheduler, train state, config and RNG states of `iteration`; collective.

    Call on every rank (or in a single process without a process group). Returns the final
    `iter_N` directory. `keep_last` deletes older checkpoints beyond the newest `keep_last`, never the
    iteration directory `protected` (a run's resume point).
    `also_write(directory)` runs on rank 0 on the complete checkpoint before it is committed (other
    formats of the same weights, written into the same directory, appear atomically with it).
    The manifest comes last: each rank checksums the files it wrote, rank 0 the rest.
    An optimizer that has not stepped yet is recorded as empty (DCP would otherwise initialise
    its state with a zero step, which changes the live optimizer).
    With `background`, this returns once the state is copied to host memory and the rest runs in its thread
    (the directory exists when `background.wait()` returns).
    """
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise ValueError(f"iteration must be an integer >= 0, got {iteration!r}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    save_dir = Path(save_dir)
    config_text = _config_yaml(config)  # fails before any writing if the config cannot be stored
    _print_rank0(f"saving checkpoint at iteration {iteration:7d} to {save_dir}")

    optimizer_status = "absent" if optimizer is None else ("saved" if optimizer.state else "empty")
    if optimizer is not None and optimizer_status == "saved":
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {MODEL_KEY: model_state, OPTIMIZER_KEY: optimizer_state}
    else:
        state = {MODEL_KEY: get_model_state_dict(model)}
    meta_bytes = _safe_pickle({
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "iteration": iteration,
        "world_size": _world_size(),
        "optimizer": optimizer_status,
        "train_state": dict(train_state),
        "lr_scheduler": None if lr_scheduler is None else lr_scheduler.state_dict(),
    })
    if background is not None:
        background.wait()  # the previous save's host copy is free again before this one is made
        state = _host_copy(state)
    job = _SaveJob(save_dir, iteration, state, meta_bytes, config_text, _capture_rng(), keep_last, protected,
                   also_write)
    if background is None:
        return job.write()
    background.submit(job)
    return job.final


# ---- load ------------------------------------------------------------------------------------


def _read_latest(load_dir: Path) -> int:
    latest = load_dir / LATEST_FILE
    if not latest.is_file():
        raise CheckpointError(
            f"{load_dir} has no {LATEST_FILE}, so it holds no complete checkpoint (was the first save "
            f"interrupted?); pass a --save directory of a finished save or one iter_NNNNNNN directory"
        )
    text = latest.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{latest} should hold an iteration number but holds {text[:40]!r}; fix or delete it")
    return int(text)


def resolve_checkpoint_dir(load_dir: str | os.PathLike[str], iteration: int | None = None) -> Path:
    """The complete `iter_N` directory to load: `latest`'s, `iteration`'s, or `load_dir` itself."""
    load_dir = Path(load_dir)
    if not load_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {load_dir} does not exist; check --load")
    if is_native_checkpoint_dir(load_dir) and iteration is None:
        return load_dir
    if iteration is None:
        iteration = _read_latest(load_dir)
        source = f"{load_dir / LATEST_FILE} names iteration {iteration}, but"
    else:
        source = f"iteration {iteration} was requested, but"
    final = load_dir / iteration_dir_name(iteration)
    for candidate in (final, _replaced_dir(final)):
        if is_native_checkpoint_dir(candidate):
            return candidate
    state = "is incomplete" if final.is_dir() else "does not exist"
    present = sorted(p.name for p in load_dir.iterdir() if ITER_DIR_PATTERN.match(p.name))
    raise CheckpointError(
        f"{source} {final} {state} (native checkpoints there: {present or 'none'}); "
        "pick an existing iteration or fix the latest file"
    )


def _read_meta(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / TRAIN_STATE_FILE
    try:
        meta = _load_torch_file(path)
    except Exception as exc:
        raise CheckpointError(f"{path} is corrupt ({exc}); load an earlier iteration") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not a {FORMAT_NAME} train state; load an earlier iteration")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {meta['version']}; upgrade qwen3-pretrain to load it")
    return meta


class _SafeLoadPlanner(dcp.DefaultLoadPlanner):
    """DCP's default planner, but non-tensor entries are unpickled with weights_only=True."""

    def load_bytes(self, read_item: Any, value: Any) -> None:
        loaded = _load_torch_file(value)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def _dcp_load(state: dict[str, Any], checkpoint: Path, what: str, no_dist: bool = False) -> None:
    reader = _CheckedReader(checkpoint)
    try:
        with _single_process_is_intended():
            dcp.load(state, storage_reader=reader, planner=_SafeLoadPlanner(), no_dist=no_dist)
    except (Exception, CheckpointException) as exc:  # DCP's CheckpointException is a BaseException
        raise CheckpointError(
            f"cannot load the {what} from {checkpoint}: {exc}\n(the checkpoint was written for a different "
            "model shape or optimizer, or its files are damaged; check the model flags or load another iteration)"
        ) from exc


def load_checkpoint(
    load_dir: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler: Stateful | None = None,
    load_rng: bool = True,
    iteration: int | None = None,
    verify: bool = True,
) -> dict[str, Any]:
    """Load a native checkpoint into `model` (and `optimizer`, `lr_scheduler`, RNGs); collective.

    `load_dir` is a --save directory (its `latest`, or `iteration`) or one `iter_N` directory. Any
    parallel layout loads a checkpoint of any other. With `optimizer=None` only the weights are
    loaded (--finetune, --no-load-optim). RNG states are restored only when the world size equals
    the saving one (a warning otherwise). `verify` checks the files against the manifest first.
    Returns the saved train state, with "iteration" set.
    """
    checkpoint = resolve_checkpoint_dir(load_dir, iteration)
    if verify:
        verify_checkpoint(checkpoint, collective=True)
    meta = _read_meta(checkpoint)
    _print_rank0(f" loading checkpoint from {load_dir} at iteration {meta['iteration']}")
    if optimizer is not None and meta["optimizer"] == "absent":
        raise CheckpointError(
            f"{checkpoint} holds no optimizer state; load it with --no-load-optim or --finetune"
        )
    if optimizer is not None and meta["optimizer"] == "saved":
        model_state, optimizer_state = get_state_dict(model, optimizer)
        _dcp_load({MODEL_KEY: model_state, OPTIMIZER_KEY: optimizer_state}, checkpoint, "model and optimizer")
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
    else:  # no optimizer wanted, or it had not stepped when saved: a fresh optimizer equals it
        model_state = get_model_state_dict(model)
        _dcp_load({MODEL_KEY: model_state}, checkpoint, "model")
        set_model_state_dict(model, model_state)
    if lr_scheduler is not None:
        if meta["lr_scheduler"] is None:
            raise CheckpointError(f"{checkpoint} holds no LR scheduler state; load it with --no-load-optim")
        lr_scheduler.load_state_dict(meta["lr_scheduler"])
    if load_rng:
        _load_rng(checkpoint, meta["world_size"])
    _print_rank0(f"  successfully loaded checkpoint from {load_dir} at iteration {meta['iteration']}")
    return {**meta["train_state"], "iteration": meta["iteration"]}


def _load_rng(checkpoint: Path, saved_world_size: int) -> None:
    if saved_world_size != _world_size():
        if _rank() == 0:
            warnings.warn(
                f"{checkpoint} was saved by {saved_world_size} processes and is loaded by {_world_size()}: "
                "RNG states are not restored, so random streams differ from the original run",
                stacklevel=3,
            )
        return
    path = _rng_file(checkpoint, _rank())
    try:
        state = _load_torch_file(path)
    except Exception as exc:
        raise CheckpointError(f"cannot read RNG state {path} ({exc}); load with --no-load-rng") from exc
    _restore_rng(state, path)


def load_model_tensors(
    load_dir: str | os.PathLike[str], iteration: int | None = None, verify: bool = True
) -> dict[str, torch.Tensor]:
    """The model's full tensors (name -> CPU tensor, saved dtype), read by this process alone.

    Needs no model object: the names, shapes and dtypes come from the DCP metadata, so this works
    for a checkpoint of any layout, also inside a job with a process group (no collectives).
    `verify` checks the files against the manifest first.
    """
    checkpoint = resolve_checkpoint_dir(load_dir, iteration)
    if verify:
        verify_checkpoint(checkpoint)
    metadata = read_dcp_metadata(checkpoint)
    prefix = f"{MODEL_KEY}."
    tensors = {
        fqn[len(prefix) :]: torch.empty(entry.size, dtype=entry.properties.dtype)
        for fqn, entry in metadata.state_dict_metadata.items()
        if fqn.startswith(prefix) and isinstance(entry, TensorStorageMetadata)
    }
    if not tensors:
        raise CheckpointError(f"{checkpoint} holds no model tensors; it is not a complete {FORMAT_NAME} checkpoint")
    _dcp_load({MODEL_KEY: tensors}, checkpoint, "model", no_dist=True)
    return tensors


def load_model_config(load_dir: str | os.PathLike[str], iteration: int | None = None) -> dict[str, Any]:
    """The full run configuration saved with a native checkpoint (its `config.yaml`)."""
    path = resolve_checkpoint_dir(load_dir, iteration) / CONFIG_FILE
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise CheckpointError(f"cannot read the saved configuration {path} ({exc})") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} does not hold a configuration mapping; load an earlier iteration")
    return config
