"""The one entry point for what `train --load` accepts: `open_checkpoint(path)` detects the format once
(native DCP, HF safetensors, Megatron mcore) and returns a `CheckpointSource` that gives the model shape
and loads itself into a model of any parallel layout.

A native checkpoint `resumes` a run: it also restores the optimizer, the LR schedule, the RNGs and
returns the trainer's saved state. HF and mcore checkpoints give initial weights only; they stream in layer
order, a MoE layer's per-expert tensors stacked into the model's expert parameters one layer at a time.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Collection
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from qwen3_pretrain.checkpoint.export import qwen3_config_from_saved
from qwen3_pretrain.checkpoint.hf import iter_hf_tensors, stack_experts
from qwen3_pretrain.checkpoint.mcore import hf_tensor_shapes, is_mcore_checkpoint, iter_mcore_as_hf
from qwen3_pretrain.checkpoint.native import (
    ITER_DIR_PATTERN,
    CheckpointError,
    Stateful,
    is_native_checkpoint_dir,
    load_checkpoint,
    load_model_config,
    read_dcp_metadata,
    resolve_checkpoint_dir,
)
from qwen3_pretrain.config import Qwen3Config
from qwen3_pretrain.distributed.parallelize import load_full_weights


def detect_format(path: str | os.PathLike[str]) -> str | None:
    """'native' (our DCP iteration directories), 'hf' (config.json + safetensors) or 'mcore' (Megatron
    `iter_N/mp_rank_*/model_optim_rng.pt` with its tracker file), for a save directory or one iteration
    directory; None when `path` is none of these (or does not exist)."""
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return "hf"
    candidates = [path, *(p for p in path.iterdir() if ITER_DIR_PATTERN.match(p.name))]
    if any(is_native_checkpoint_dir(c) for c in candidates):  # first: `--ckpt-format torch` saves hold both
        return "native"
    return "mcore" if is_mcore_checkpoint(path) else None


class CheckpointSource(ABC):
    """A checkpoint to start a run from; `path` is what `--load` named; `verify`: check the files against
    the checkpoint's manifest before loading (native checkpoints have one)."""

    format: ClassVar[str]
    resumes: ClassVar[bool] = False  # restores optimizer, schedule, RNG and the trainer's state too

    def __init__(self, path: Path, verify: bool = True) -> None:
        self.path = path
        self.verify = verify

    @abstractmethod
    def model_config(self) -> Qwen3Config:
        """The model shape recorded in the checkpoint; reads no weights."""

    @abstractmethod
    def load_into(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Stateful | None = None,
        load_rng: bool = False,
        held_elsewhere: Collection[str] = (),
    ) -> dict[str, Any] | None:
        """Load the weights into `model` (parameters under HF names, any layout; names in `held_elsewhere`
        live on other pipeline ranks). A resuming source also loads `optimizer` and `scheduler` when given
        and the RNGs when `load_rng`, and returns the trainer's saved state; others return None."""


class HFSource(CheckpointSource):
    format = "hf"

    def model_config(self) -> Qwen3Config:
        return Qwen3Config.from_pretrained(self.path)

    def load_into(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                  scheduler: Stateful | None = None, load_rng: bool = False,
                  held_elsewhere: Collection[str] = ()) -> None:
        config = self.model_config()
        tensors = iter_hf_tensors(self.path, torch.float32, order=list(hf_tensor_shapes(config)))
        load_full_weights(model, stack_experts(tensors, config), f"--load {self.path}", held_elsewhere)


class McoreSource(CheckpointSource):
    format = "mcore"

    def model_config(self) -> Qwen3Config:
        config, _, _ = iter_mcore_as_hf(self.path)
        return config

    def load_into(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                  scheduler: Stateful | None = None, load_rng: bool = False,
                  held_elsewhere: Collection[str] = ()) -> None:
        config: Qwen3Config = model.config  # type: ignore[assignment]  # Qwen3ForCausalLM or its stages' view
        _, _, tensors = iter_mcore_as_hf(self.path, config=config)
        load_full_weights(model, stack_experts(tensors, config), f"--load {self.path}", held_elsewhere)


class NativeSource(CheckpointSource):
    format = "native"
    resumes = True

    def __init__(self, path: Path, verify: bool = True) -> None:
        super().__init__(path, verify)
        read_dcp_metadata(resolve_checkpoint_dir(path))  # refuses unsafe or damaged metadata before any process starts

    def model_config(self) -> Qwen3Config:
        return qwen3_config_from_saved(load_model_config(self.path), resolve_checkpoint_dir(self.path))

    def load_into(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                  scheduler: Stateful | None = None, load_rng: bool = False,
                  held_elsewhere: Collection[str] = ()) -> dict[str, Any]:
        return load_checkpoint(self.path, model, optimizer=optimizer, lr_scheduler=scheduler, load_rng=load_rng,
                               verify=self.verify)


_SOURCES: dict[str, type[CheckpointSource]] = {s.format: s for s in (NativeSource, HFSource, McoreSource)}


def open_checkpoint(path: str | os.PathLike[str], format: str | None = None, verify: bool = True) -> CheckpointSource:
    """The checkpoint at `path` (a --save directory, one iteration directory, an HF model directory or an
    mcore checkpoint), its format detected unless given. CheckpointError says what was found instead, or
    why a native checkpoint's metadata is refused. `verify`: see CheckpointSource."""
    fmt = detect_format(path) if format is None else format
    if fmt is None:
        what = "does not exist" if not Path(path).exists() else "is none of the known checkpoint formats"
        raise CheckpointError(
            f"--load {path} {what}: pass a native checkpoint directory (a --save directory or one iter_N), "
            "an HF model directory (config.json + *.safetensors) or a Megatron mcore checkpoint"
        )
    return _SOURCES[fmt](Path(path), verify)
