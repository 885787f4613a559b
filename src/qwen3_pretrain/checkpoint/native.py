"""Native checkpoints: torch.distributed.checkpoint (DCP) directories that any parallel layout can load.

Layout (Megatron-like):

    <save_dir>/latest_checkpointed_iteration.txt     the last complete iteration, e.g. "2000"
    <save_dir>/iter_0002000/.metadata, *.distcp      model + optimizer, sharded, layout independent (DCP)
    <save_dir>/iter_0002000/train_state.pt           iteration, world size, train state, LR scheduler
    <save_dir>/iter_0002000/config.yaml              the full run configuration
    <save_dir>/iter_0002000/rng/rank_00000.pt        RNG states of each rank

Model and optimizer go through `torch.distributed.checkpoint.state_dict.get_state_dict`, so tensors
are stored under their unwrapped FQNs with their global shapes: a checkpoint written by FSDP2, TP,
PP or a single process loads into any other layout (DCP reshards on load).

A save is atomic: everything is written into `<save_dir>/.iter_N.incomplete`, renamed to `iter_N`,
and only then is the `latest` file replaced (write to a temporary name + rename). A save killed at
any point leaves the previous checkpoint complete and `latest` pointing at it. Re-saving an existing
iteration moves the old directory aside first; a load falls back to it if a kill lands in between.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import io
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
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
FORMAT_NAME = "qwen3-pretrain-native"
FORMAT_VERSION = 1
MODEL_KEY = "model"
OPTIMIZER_KEY = "optimizer"

ITER_DIR_PATTERN = re.compile(r"^iter_(\d{7,})$")



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


def _staging_dir(final: Path) -> Path:
    return final.with_name(f".{final.name}.incomplete")


def _replaced_dir(final: Path) -> Path:
    return final.with_name(f".{final.name}.replaced")


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


def _on_rank0(action: Callable[[], None]) -> None:
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
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise CheckpointError(f"rank 0 failed while saving a checkpoint: {box[0]}")


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
        torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
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


# ---- save ------------------------------------------------------------------------------------


def _prepare_staging(save_dir: Path, staging: Path) -> None:
    """Create an empty staging directory after tidying what killed saves left behind.

    Stale staging directories are deleted; a directory moved aside by an interrupted re-save is
    deleted when its replacement is in place, and put back otherwise.
    """
    save_dir.mkdir(parents=True, exist_ok=True)
    for stale in save_dir.glob(".iter_*.incomplete"):
        shutil.rmtree(stale)
    for aside in save_dir.glob(".iter_*.replaced"):
        final = save_dir / aside.name[1 : -len(".replaced")]
        if final.exists():
            shutil.rmtree(aside)
        else:
            os.replace(aside, final)
    (staging / RNG_DIR).mkdir(parents=True)


def _prune(save_dir: Path, iteration: int, keep_last: int) -> None:
    """Delete checkpoints older than `iteration` so that `keep_last` remain (newer ones are left alone)."""
    older = sorted(
        int(match.group(1))
        for path in save_dir.iterdir()
        if (match := ITER_DIR_PATTERN.match(path.name)) and int(match.group(1)) < iteration
    )
    for old in older[: max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(save_dir / iteration_dir_name(old), ignore_errors=True)


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
) -> Path:
    """Save model, optimizer, LR scheduler, train state, config and RNG states of `iteration`; collective.

    Call on every rank (or in a single process without a process group). Returns the final
    `iter_N` directory. `keep_last` deletes older checkpoints beyond the newest `keep_last`.
    `also_write(directory)` runs on rank 0 on the complete checkpoint before it is committed (other
    formats of the same weights, written into the same directory, appear atomically with it).
    An optimizer that has not stepped yet is recorded as empty (DCP would otherwise initialise
    its state with a zero step, which changes the live optimizer).
    """
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise ValueError(f"iteration must be an integer >= 0, got {iteration!r}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    start = time.perf_counter()
    save_dir = Path(save_dir)
    final = save_dir / iteration_dir_name(iteration)
    staging = _staging_dir(final)
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

    _on_rank0(lambda: _prepare_staging(save_dir, staging))
    rng_state = _capture_rng()
    _write_durably(_rng_file(staging, _rank()), lambda f: torch.save(rng_state, f))
    with _single_process_is_intended():
        dcp.save(state, checkpoint_id=staging)

    def commit() -> None:
        _write_durably(staging / TRAIN_STATE_FILE, lambda f: f.write(meta_bytes))
        _write_durably(staging / CONFIG_FILE, lambda f: f.write(config_text.encode()))
        if also_write is not None:
            also_write(staging)
        replace_directory(staging, final)
        _write_latest(save_dir, iteration)
        if keep_last is not None:
            _prune(save_dir, iteration, keep_last)

    _on_rank0(commit)
    seconds = time.perf_counter() - start
    _print_rank0(f"  successfully saved checkpoint from iteration {iteration:7d} to {save_dir} ({seconds:.2f} s)")
    return final


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
        meta = torch.load(path, weights_only=True)
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
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def _dcp_load(state: dict[str, Any], checkpoint: Path, what: str, no_dist: bool = False) -> None:
    try:
        with _single_process_is_intended():
            dcp.load(state, checkpoint_id=checkpoint, planner=_SafeLoadPlanner(), no_dist=no_dist)
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
) -> dict[str, Any]:
    """Load a native checkpoint into `model` (and `optimizer`, `lr_scheduler`, RNGs); collective.

    `load_dir` is a --save directory (its `latest`, or `iteration`) or one `iter_N` directory. Any
    parallel layout loads a checkpoint of any other. With `optimizer=None` only the weights are
    loaded (--finetune, --no-load-optim). RNG states are restored only when the world size equals
    the saving one (a warning otherwise). Returns the saved train state, with "iteration" set.
    """
    checkpoint = resolve_checkpoint_dir(load_dir, iteration)
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
        state = torch.load(path, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read RNG state {path} ({exc}); load with --no-load-rng") from exc
    _restore_rng(state, path)


def load_model_tensors(load_dir: str | os.PathLike[str], iteration: int | None = None) -> dict[str, torch.Tensor]:
    """The model's full tensors (name -> CPU tensor, saved dtype), read by this process alone.

    Needs no model object: the names, shapes and dtypes come from the DCP metadata, so this works
    for a checkpoint of any layout, also inside a job with a process group (no collectives).
    """
    checkpoint = resolve_checkpoint_dir(load_dir, iteration)
    try:
        metadata = dcp.FileSystemReader(checkpoint).read_metadata()
    except Exception as exc:
        raise CheckpointError(
            f"{checkpoint / DCP_METADATA_FILE} is unreadable ({exc}); load another iteration"
        ) from exc
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
