"""Megatron-LM / MindSpeed mcore checkpoints (legacy `torch` format) for Qwen3 and Qwen3-MoE.

On disk (see DESIGN.md, "Megatron / MindSpeed mcore checkpoint"):

    <dir>/latest_checkpointed_iteration.txt          "1" (or "release")
    <dir>/iter_0000001/mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]/model_optim_rng.pt

(`_{pp:03d}` when PP > 1, `_{ep:03d}` when EP > 1, as Megatron's `get_checkpoint_name`.) Each .pt holds
{"args": Namespace, "checkpoint_version": 3.0, "iteration": N, "model": state dict} (or "model0", "model1",
... with a virtual pipeline), with layer numbers restarting at 0 on every pipeline stage. The HF <-> mcore
mapping, the rank layout and the Megatron args are `checkpoint.mcore_format`; this module reads and writes
the files.

MoE layers (megatron-core's layout): the router `mlp.router.weight` [E, H] is whole on every TP rank; the
experts are split over EP ranks (rank e holds experts [e E/EP, (e+1) E/EP) under local indices 0..E/EP-1),
every EP rank's file also holding all the non-expert tensors. Two expert layouts: sequential
(`mlp.experts.local_experts.{j}.linear_fc1.weight` [2F/TP, H] = cat(gate, up), `.linear_fc2.weight`
[H, F/TP]) and the legacy grouped GEMM (`--moe-grouped-gemm`: `mlp.experts.weight1` [H, E/EP 2F/TP], whose
memory is [E/EP, H, 2F/TP] (each expert's fc1 transposed), `mlp.experts.weight2` [E/EP F/TP, H], memory
[E/EP, F/TP, H]). Dense layers of a MoE model keep `mlp.linear_fc1/fc2`.

Both directions stream: HF -> mcore holds at most one pipeline stage's shards (written as soon as the
stage is complete); mcore -> HF holds one stage's shards (copied out of `torch.load(mmap=True)` one
file at a time) and frees each as soon as it is merged, so no conversion holds two copies of the
model. Every .pt is read with `weights_only=True` and an allowlist of the classes Megatron stores
(`load_pt`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import itertools
import os
import pathlib
import pickle
import re
import shutil
import signal
import tempfile
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch

from qwen3_pretrain.checkpoint.hf import unstack_experts
from qwen3_pretrain.checkpoint.mcore_format import (
    ATTENTION_PARAMS,
    CHECKPOINT_VERSION,
    CONVERTED_ITERATION,
    EMBEDDING,
    FINAL_NORM,
    GROUPED_EXPERT_PARAMS,
    HF_CONFIG_SUBDIR,
    HF_IGNORED,
    LAYER_PARAMS,
    MCORE_LAYER_KEY,
    MODEL_FILE,
    OUTPUT_LAYER,
    ROUTER,
    SEQUENTIAL_EXPERT_PARAMS,
    TRACKER_FILE,
    McoreCheckpointError,
    McoreLayout,
    ParamSpec,
    as_moe,
    config_from_args,
    megatron_args,
    merge_param,
    rank_dir_name,
    split_param,
)
from qwen3_pretrain.config.model import Qwen3Config

ProgressFn = Callable[[str, int, int], None]  # (what, done, total)


# ---- safe loading --------------------------------------------------------------------------------


class MegatronValue:
    """Stand-in for a Megatron class stored in a checkpoint (enum member or config dataclass).

    Megatron pickles e.g. `args.attention_backend = AttnBackend.auto` and an `OptimizerConfig`; these
    stand-ins let `weights_only=True` load such files without importing megatron. Enum members keep
    their value in `.value`, dataclasses their fields as attributes.
    """

    qualified_name: ClassVar[str] = ""

    def __init__(self, *args: Any) -> None:
        if args:
            self.value = args[0] if len(args) == 1 else args

    def __repr__(self) -> str:
        return f"<{self.qualified_name} {self.__dict__}>"


_MEGATRON_CLASSES = (
    "megatron.core.enums.ModelType",
    "megatron.core.enums.Fp8Recipe",
    "megatron.core.enums.Fp4Recipe",
    "megatron.core.transformer.enums.ModelType",
    "megatron.core.transformer.enums.AttnBackend",
    "megatron.core.transformer.enums.AttnMaskType",
    "megatron.core.transformer.enums.CudaGraphScope",
    "megatron.core.optimizer.optimizer_config.OptimizerConfig",
    "megatron.core.rerun_state_machine.RerunDiagnostic",
    "megatron.core.rerun_state_machine.RerunMode",
    "megatron.core.rerun_state_machine.RerunState",
)


def _megatron_stand_in(qualified_name: str) -> type[MegatronValue]:
    name = qualified_name.rsplit(".", 1)[1]
    return type(name, (MegatronValue,), {"qualified_name": qualified_name})


# numpy 2 moved numpy.core to numpy._core (the old name warns); imported by name, as numpy 1 has only numpy.core.
_NUMPY_MULTIARRAY = importlib.import_module(
    "numpy._core.multiarray" if hasattr(np, "_core") else "numpy.core.multiarray"
)
_NUMPY_RECONSTRUCT = _NUMPY_MULTIARRAY._reconstruct

# The classes Megatron/MindSpeed put in model_optim_rng.pt besides tensors: args (Namespace), numpy
# RNG state, paths, signals, Megatron enums/configs. torch dtypes, OrderedDict etc. are allowed by torch.
SAFE_GLOBALS: list[Any] = [
    argparse.Namespace,
    types.SimpleNamespace,
    pathlib.PosixPath,
    pathlib.PurePosixPath,
    signal.Signals,
    io.BytesIO,
    np.ndarray,
    np.dtype,
    np.dtypes.UInt32DType,
    (_NUMPY_RECONSTRUCT, "numpy.core.multiarray._reconstruct"),
    (_NUMPY_RECONSTRUCT, "numpy._core.multiarray._reconstruct"),
    *((_megatron_stand_in(name), name) for name in _MEGATRON_CLASSES),
]


def _allowed_names() -> list[str]:
    return sorted(g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS)


def load_pt(path: str | os.PathLike[str]) -> dict[str, Any]:
    """`torch.load(weights_only=True)` of a Megatron .pt with the allowlist; tensors are memory-mapped.

    Raises McoreCheckpointError naming the file and the refused class when the file needs anything
    outside `SAFE_GLOBALS`.
    """
    path = Path(path)
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        try:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
        except pickle.UnpicklingError as exc:
            match = re.search(r"GLOBAL (\S+)|got (<class '[^']+'>)|function (\S+)", str(exc))
            what = next((g for g in match.groups() if g), "?") if match else str(exc).splitlines()[0]
            raise McoreCheckpointError(
                f"{path} needs {what}, which is not on the list of classes Megatron checkpoints may hold "
                f"({', '.join(_allowed_names())}); loading it would run arbitrary code. Re-save the file "
                "without that object (e.g. keep only 'model', 'args', 'iteration', 'checkpoint_version')"
            ) from exc
        except (OSError, EOFError, RuntimeError) as exc:
            raise McoreCheckpointError(
                f"{path} cannot be read as a torch checkpoint ({exc}); re-copy the file"
            ) from exc
    if not isinstance(obj, dict):
        raise McoreCheckpointError(f"{path} holds a {type(obj).__name__}, not a Megatron checkpoint dict")
    return obj


# ---- atomic output -----------------------------------------------------------------------------------


def check_output_dir(target: Path, flag: str = "--save-dir") -> None:
    """Refuse a target that exists and is not an empty directory (nothing is ever overwritten)."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise McoreCheckpointError(
            f"{flag} {target} already exists and is not empty; choose a new directory or remove it"
        )


@contextlib.contextmanager
def staged_output_dir(target: str | os.PathLike[str], flag: str = "--save-dir") -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes `target` only if the block succeeds."""
    target = Path(target)
    check_output_dir(target, flag)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.incomplete-", dir=target.parent))
    try:
        yield staging
        check_output_dir(target, flag)
        if target.exists():
            target.rmdir()
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---- HF -> mcore -------------------------------------------------------------------------------------


def add_mcore_rank_files(
    iteration_dir: Path, tensors: Iterable[tuple[str, torch.Tensor]], config: Qwen3Config, layout: McoreLayout,
    iteration: int, pp_ranks: int | None = None,
) -> None:
    """Write the model's tensors (HF names; a MoE model's experts per expert or stacked, as its parameters are) as
    the `mp_rank_*/model_optim_rng.pt` files of `iteration_dir` (an existing directory, e.g. a native checkpoint's
    `iter_N` before it is committed), so that Megatron/MindSpeed load the same directory as an mcore
    (`--ckpt-format torch`) checkpoint of `layout`.

    With `pp_ranks` below the layout's stage count (a virtual pipeline), pipeline rank r's file holds stage
    r + v * pp_ranks as "model{v}", as Megatron's interleaved schedule saves it.
    """
    scratch = iteration_dir / ".mcore"
    write_mcore_checkpoint(unstack_experts(tensors), config, scratch, layout, iteration)
    written = scratch / f"iter_{iteration:07d}"
    ranks = layout.pp if pp_ranks is None else pp_ranks
    if ranks == layout.pp:
        for rank_dir in sorted(written.iterdir()):
            os.replace(rank_dir, iteration_dir / rank_dir.name)
    else:
        virtual = layout.pp // ranks
        for tp_rank, pp_rank, ep_rank in itertools.product(range(layout.tp), range(ranks), range(layout.ep)):
            stages = [pp_rank + v * ranks for v in range(virtual)]
            chunks = [load_pt(written / rank_dir_name(tp_rank, p, layout.pp, ep_rank, layout.ep) / MODEL_FILE)
                      for p in stages]
            merged = {k: v for k, v in chunks[0].items() if k != "model"}
            merged.update({f"model{v}": chunk["model"] for v, chunk in enumerate(chunks)})
            merged["args"] = argparse.Namespace(**{
                **vars(chunks[0]["args"]), "pipeline_model_parallel_size": ranks, "num_layer_list": None,
                "num_layers_per_virtual_pipeline_stage": layout.stage_layers[0],
            })
            rank_dir = iteration_dir / rank_dir_name(tp_rank, pp_rank, ranks, ep_rank, layout.ep)
            rank_dir.mkdir()
            torch.save(merged, rank_dir / MODEL_FILE)
    shutil.rmtree(scratch)


class _Entry(NamedTuple):
    """One tensor of one stage's files: its mcore key, how it is built, from which HF tensors, and the EP rank
    whose files hold it (None: every EP rank's, as all non-expert tensors)."""

    stage: int
    key: str
    spec: ParamSpec
    hf_names: tuple[str, ...]
    ep_rank: int | None = None

    @property
    def slot(self) -> tuple[int | None, str]:
        """Unique within a stage (EP ranks reuse the local expert keys)."""
        return self.ep_rank, self.key


def _hf_layer_key(layer: int, suffix: str) -> str:
    return f"model.layers.{layer}.{suffix}"


def _entry(stage: int, key: str, spec: ParamSpec, layer: int | None = None) -> _Entry:
    """The entry of a non-expert tensor (under `decoder.layers.{local}.` and `model.layers.{layer}.` if a layer's)."""
    names = tuple(n if layer is None else _hf_layer_key(layer, n) for n, _ in spec.hf)
    return _Entry(stage, key, spec, names)


def _layer_entries(config: Qwen3Config, stage: int, local: int, layer: int, ep: int, grouped: bool) -> list[_Entry]:
    """Every tensor of one decoder layer (`layer` globally, `local` in its stage), in Megatron's order."""
    prefix = f"decoder.layers.{local}."
    if not config.is_moe_layer(layer):
        return [_entry(stage, prefix + spec.mcore, spec, layer) for spec in LAYER_PARAMS]
    entries = [_entry(stage, prefix + spec.mcore, spec, layer) for spec in (*ATTENTION_PARAMS, ROUTER)]
    per_rank = as_moe(config).num_experts // ep
    for rank in range(ep):
        experts = range(rank * per_rank, (rank + 1) * per_rank)
        for spec in GROUPED_EXPERT_PARAMS if grouped else ():
            names = tuple(_hf_layer_key(layer, n.format(expert=i)) for i in experts for n, _ in spec.hf)
            entries.append(_Entry(stage, prefix + spec.mcore, spec, names, rank))
        for local_expert, expert in enumerate(() if grouped else experts):
            for spec in SEQUENTIAL_EXPERT_PARAMS:
                names = tuple(_hf_layer_key(layer, n.format(expert=expert)) for n, _ in spec.hf)
                entries.append(_Entry(stage, prefix + spec.mcore.format(local=local_expert), spec, names, rank))
    return entries


def _chunk_entries(
    config: Qwen3Config, stage: int, layers: range, last: bool, ep: int = 1, grouped: bool = False,
    tied_copy: bool = False,
) -> list[_Entry]:
    """Every tensor of one model chunk (stage `stage` holding `layers`; the embedding when stage 0, the final
    norm and output layer when `last`), in Megatron's order. `tied_copy`: a tied model's last stage keeps a copy
    of the embedding as its output layer (Megatron does when PP > 1)."""
    entries = [_entry(stage, EMBEDDING.mcore, EMBEDDING)] if stage == 0 else []
    for local, layer in enumerate(layers):
        entries += _layer_entries(config, stage, local, layer, ep, grouped)
    if last:
        entries.append(_entry(stage, FINAL_NORM.mcore, FINAL_NORM))
        if not config.tie_word_embeddings:
            entries.append(_entry(stage, OUTPUT_LAYER.mcore, OUTPUT_LAYER))
        elif tied_copy:
            entries.append(_entry(stage, OUTPUT_LAYER.mcore, EMBEDDING))
    return entries


def _stage_entries(config: Qwen3Config, layout: McoreLayout) -> list[list[_Entry]]:
    """Every tensor of every stage, in Megatron's order."""
    return [
        _chunk_entries(config, stage, layout.stage_range(stage), stage == layout.pp - 1, layout.ep, layout.grouped,
                       tied_copy=layout.pp > 1)
        for stage in range(layout.pp)
    ]


def hf_tensor_shapes(config: Qwen3Config) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name the config implies (no lm_head.weight when tied) -> its shape, in HF order."""
    entries = _chunk_entries(config, 0, range(config.num_hidden_layers), last=True)  # one expert per entry
    return {name: shape(config) for e in entries for name, (_, shape) in zip(e.hf_names, e.spec.hf, strict=True)}


def write_mcore_checkpoint(
    tensors: Iterable[tuple[str, torch.Tensor]],
    config: Qwen3Config,
    save_dir: str | os.PathLike[str],
    layout: McoreLayout,
    iteration: int = CONVERTED_ITERATION,
    hf_files: Sequence[Path] = (),
    progress: ProgressFn | None = None,
    write_config: bool = False,
) -> Path:
    """Write HF-named tensors (any order, e.g. streamed) as an mcore checkpoint in `layout`.

    A stage's TP files are written as soon as all its tensors have arrived, then its shards are
    freed; an HF tensor is dropped as soon as the shards it feeds are made. Tensors given in stage
    order (`hf_tensor_shapes` order) therefore hold at most one stage's shards plus one tensor.
    Output appears at `save_dir` only when complete. `hf_files` (config.json, tokenizer files) are
    copied to `<save_dir>/hf_config/` for the way back; `write_config` also writes `config` there as
    config.json (for sources that have no config.json file). Returns `save_dir`.
    """
    save_dir = Path(save_dir)
    shapes = hf_tensor_shapes(config)
    stages = _stage_entries(config, layout)
    remaining = [len(entries) for entries in stages]
    shards: list[dict[tuple[int | None, str], list[torch.Tensor]]] = [{} for _ in stages]
    consumers: dict[str, list[_Entry]] = {}
    for entry in (e for entries in stages for e in entries):
        for name in entry.hf_names:
            consumers.setdefault(name, []).append(entry)
    pending: dict[str, torch.Tensor] = {}  # HF tensors waiting for the other parts of their parameter
    received: set[str] = set()
    dtype: torch.dtype | None = None
    with staged_output_dir(save_dir) as staging:
        iter_dir = staging / f"iter_{iteration:07d}"
        for name, tensor in tensors:
            if HF_IGNORED.match(name) or (name == OUTPUT_LAYER.hf[0][0] and config.tie_word_embeddings):
                continue
            _check_hf_tensor(name, tensor, shapes, received)
            received.add(name)
            dtype = tensor.dtype if dtype is None else dtype
            pending[name] = tensor
            for entry in consumers[name]:
                if all(n in pending for n in entry.hf_names):
                    shards[entry.stage][entry.slot] = split_param(
                        entry.spec, [pending[n] for n in entry.hf_names], config, layout.tp
                    )
                    remaining[entry.stage] -= 1
                    if not remaining[entry.stage]:
                        stage = entry.stage
                        _write_stage(iter_dir, stages[stage], shards[stage], config, layout, dtype, iteration)
            pending = {n: t for n, t in pending.items() if any(e.slot not in shards[e.stage] for e in consumers[n])}
            if progress:
                progress("tensors", len(received), len(shapes))
        absent = sorted(set(shapes) - received)
        if absent:
            raise McoreCheckpointError(
                f"the HF checkpoint lacks {len(absent)} tensors the config implies, e.g. {absent[:3]}; "
                "re-download it or fix config.json"
            )
        (staging / TRACKER_FILE).write_text(str(iteration))
        if hf_files or write_config:
            (staging / HF_CONFIG_SUBDIR).mkdir()
            for file in hf_files:
                shutil.copy2(file, staging / HF_CONFIG_SUBDIR / file.name)
        if write_config:
            written = dataclasses.replace(config, torch_dtype=str(dtype).removeprefix("torch."))
            written.save_pretrained(staging / HF_CONFIG_SUBDIR)
    return save_dir


def _check_hf_tensor(name: str, tensor: torch.Tensor, shapes: dict[str, tuple[int, ...]], received: set[str]) -> None:
    if name not in shapes:
        raise McoreCheckpointError(
            f"unexpected tensor {name!r} in the HF checkpoint: not part of the Qwen3 model this config.json "
            "describes (check --load-dir and --model-type-hf)"
        )
    if tuple(tensor.shape) != shapes[name]:
        raise McoreCheckpointError(
            f"HF tensor {name!r} has shape {tuple(tensor.shape)} but config.json implies {shapes[name]}; "
            "the weights and config.json do not belong together"
        )
    if name in received:
        raise McoreCheckpointError(f"HF tensor {name!r} appears twice in the checkpoint")


def _write_stage(
    iter_dir: Path, entries: list[_Entry], shards: dict[tuple[int | None, str], list[torch.Tensor]],
    config: Qwen3Config, layout: McoreLayout, dtype: torch.dtype, iteration: int,
) -> None:
    """torch.save the TP x EP files of one complete stage, then free its shards (the dict is emptied)."""
    args = megatron_args(config, layout, dtype)
    stage = entries[0].stage
    for tp_rank, ep_rank in itertools.product(range(layout.tp), range(layout.ep)):
        model = {e.key: shards[e.slot][tp_rank] for e in entries if e.ep_rank in (None, ep_rank)}
        rank_dir = iter_dir / rank_dir_name(tp_rank, stage, layout.pp, ep_rank, layout.ep)
        rank_dir.mkdir(parents=True)
        checkpoint = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration, "model": model}
        torch.save(checkpoint, rank_dir / MODEL_FILE)
    for key in shards:
        shards[key] = []  # keep the keys (they mark the entries done), drop the tensors


# ---- reading mcore -------------------------------------------------------------------------------------

_RANK_DIR = re.compile(r"mp_rank_(\d{2})((?:_\d{3}){0,2})$")  # TP rank, then PP and/or EP ranks
_EXPERT_KEY = ".mlp.experts."  # in every expert tensor's mcore key (and no other's)


@dataclass(frozen=True)
class McoreCheckpoint:
    """A located, validated mcore checkpoint."""

    iter_dir: Path
    iteration: int
    tp: int
    pp: int
    args: argparse.Namespace | None
    model_keys: tuple[str, ...]  # "model", or "model0", "model1", ... with a virtual pipeline
    dtype: torch.dtype  # of the stored weights
    ep: int = 1
    grouped: bool = False  # experts in the legacy grouped-GEMM layout (mlp.experts.weight1/weight2)

    def file(self, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> Path:
        return self.iter_dir / rank_dir_name(tp_rank, pp_rank, self.pp, ep_rank, self.ep) / MODEL_FILE


def _iteration_dir(root: Path) -> tuple[Path, int]:
    """The iteration directory named by the tracker file (or `root` itself when it is one)."""
    if not root.is_dir():
        raise McoreCheckpointError(f"mcore checkpoint directory {root} does not exist; check --load-dir")
    if any(_RANK_DIR.match(p.name) for p in root.iterdir()):
        match = re.fullmatch(r"iter_(\d+)", root.name)
        return root, int(match.group(1)) if match else 0
    tracker = root / TRACKER_FILE
    if not tracker.is_file():
        raise McoreCheckpointError(
            f"{root} is not an mcore checkpoint: no {TRACKER_FILE} and no mp_rank_* directories; "
            "point --load-dir at the directory Megatron saved to (the one holding the tracker file)"
        )
    text = tracker.read_text().strip()
    if text == "release":
        return root / "release", 0
    if not text.isdigit():
        raise McoreCheckpointError(f"{tracker} holds {text!r}, not an iteration number or 'release'")
    iter_dir = root / f"iter_{int(text):07d}"
    if not iter_dir.is_dir():
        raise McoreCheckpointError(f"{tracker} names iteration {text} but {iter_dir} does not exist")
    return iter_dir, int(text)


def _rank_grid(iter_dir: Path) -> tuple[int, tuple[int, ...]]:
    """(TP, the extents of the _NNN suffixes) from the mp_rank_* directory names: () without PP and EP,
    (PP,) or (EP,) with one of them, (PP, EP) with both."""
    ranks: set[tuple[int, tuple[int, ...]]] = set()
    for entry in iter_dir.iterdir():
        match = _RANK_DIR.match(entry.name)
        if match:
            ranks.add((int(match.group(1)), tuple(int(n) for n in match.group(2).split("_")[1:])))
    if not ranks:
        raise McoreCheckpointError(f"{iter_dir} has no mp_rank_* directories; the checkpoint is incomplete")
    if len({len(suffixes) for _, suffixes in ranks}) > 1:
        raise McoreCheckpointError(
            f"{iter_dir} mixes mp_rank_* directories with different numbers of _NNN parts; remove the stale ones"
        )
    extents = tuple(max(column) + 1 for column in zip(*(suffixes for _, suffixes in ranks), strict=True))
    return max(t for t, _ in ranks) + 1, extents


def _pp_ep(extents: tuple[int, ...], args: argparse.Namespace | None) -> tuple[int, int]:
    """(PP, EP) of the rank grid. One suffix is the PP rank, unless args say EP > 1 and PP = 1 (Megatron then
    names the directories mp_rank_TT_EEE)."""
    args_pp = getattr(args, "pipeline_model_parallel_size", 1) or 1
    args_ep = getattr(args, "expert_model_parallel_size", 1) or 1
    if len(extents) == 2:
        return max(extents[0], args_pp), max(extents[1], args_ep)
    if len(extents) == 1 and args_ep > 1 and args_pp == 1:
        return 1, max(extents[0], args_ep)
    return max(extents[0] if extents else 1, args_pp), 1


def _model_keys(path: Path, loaded: dict[str, Any]) -> tuple[str, ...]:
    if "model" in loaded:
        return ("model",)
    keys = sorted((k for k in loaded if re.fullmatch(r"model\d+", k)), key=lambda k: int(k[5:]))
    if not keys:
        raise McoreCheckpointError(f"{path} has no 'model' entry (its keys: {sorted(loaded)[:8]})")
    return tuple(keys)


def open_mcore_checkpoint(path: str | os.PathLike[str]) -> McoreCheckpoint:
    """Locate an mcore checkpoint and check that every TP x PP x EP rank file is present (reads rank 0's file)."""
    iter_dir, iteration = _iteration_dir(Path(path))
    if (iter_dir / "metadata.json").is_file() or (iter_dir / "common.pt").is_file():
        raise McoreCheckpointError(
            f"{iter_dir} is a Megatron distributed (torch_dist) checkpoint; convert it to the legacy format "
            "first (Megatron: --ckpt-format torch_dist --ckpt-convert-format torch --ckpt-convert-save DIR)"
        )
    tp, extents = _rank_grid(iter_dir)
    first_file = iter_dir / ("mp_rank_00" + "_000" * len(extents)) / MODEL_FILE
    if not first_file.is_file():
        raise McoreCheckpointError(f"{first_file} is missing; copy every rank directory of the checkpoint")
    first = load_pt(first_file)
    version = first.get("checkpoint_version", CHECKPOINT_VERSION)
    if not isinstance(version, (int, float)) or version < CHECKPOINT_VERSION:
        raise McoreCheckpointError(
            f"{first_file} has checkpoint_version {version!r}; only Megatron-core checkpoints (3.0) are supported"
        )
    args = first.get("args")
    if args is not None and not isinstance(args, argparse.Namespace):
        raise McoreCheckpointError(f"{first_file}: 'args' is a {type(args).__name__}, not an argparse.Namespace")
    model_keys = _model_keys(first_file, first)
    embedding = first[model_keys[0]].get(EMBEDDING.mcore) if isinstance(first[model_keys[0]], dict) else None
    if not isinstance(embedding, torch.Tensor):
        raise McoreCheckpointError(f"{first_file} has no {EMBEDDING.mcore}; it is not a first pipeline stage")
    pp, ep = _pp_ep(extents, args)
    checkpoint = McoreCheckpoint(
        iter_dir,
        int(first.get("iteration", iteration)),
        max(tp, getattr(args, "tensor_model_parallel_size", 1) or 1),
        pp,
        args,
        model_keys,
        embedding.dtype,
        ep,
        any(k.endswith(_EXPERT_KEY + "weight1") for k in first[model_keys[0]]),
    )
    for ranks in itertools.product(range(checkpoint.tp), range(checkpoint.pp), range(checkpoint.ep)):
        if not checkpoint.file(*ranks).is_file():
            raise McoreCheckpointError(
                f"{checkpoint.file(*ranks)} is missing (the checkpoint has TP={checkpoint.tp}, PP={checkpoint.pp}, "
                f"EP={checkpoint.ep}); copy every rank directory of the checkpoint"
            )
    return checkpoint


def is_mcore_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True when `path` looks like an mcore (legacy torch format) checkpoint; reads no tensors."""
    try:
        iter_dir, _ = _iteration_dir(Path(path))
    except McoreCheckpointError:
        return False
    return any(_RANK_DIR.match(p.parent.name) for p in iter_dir.glob(f"mp_rank_*/{MODEL_FILE}"))


def _chunk_state(
    checkpoint: McoreCheckpoint, ranks: tuple[int, int, int], model_key: str
) -> tuple[Path, dict[str, Any]]:
    """One (TP, PP, EP) rank's model chunk, copied out of the file's memory map so the mapping (and the optimizer
    state of training checkpoints, never touched) is released before the next file is read. EP ranks > 0 keep
    only their experts (the other tensors repeat EP rank 0's)."""
    path = checkpoint.file(*ranks)
    state = load_pt(path).get(model_key)
    if not isinstance(state, dict):
        raise McoreCheckpointError(
            f"{path} has no {model_key!r} state dict; every rank must hold the same model chunks"
        )
    experts_only = ranks[2] > 0
    return path, {
        k: v.clone() if isinstance(v, torch.Tensor) else v
        for k, v in state.items()
        if not k.endswith("_extra_state") and (_EXPERT_KEY in k or not experts_only)
    }


def _chunk_layers(path: Path, state: dict[str, Any]) -> int:
    """Number of layers in one chunk's state dict (local numbering must be 0..n-1)."""
    local = {int(m.group(1)) for m in map(MCORE_LAYER_KEY.match, state) if m}
    if local != set(range(len(local))):
        raise McoreCheckpointError(f"{path}: layer numbers {sorted(local)} are not 0..n-1 (local numbering per stage)")
    return len(local)


def _validate_keys(path: Path, state: dict[str, Any], expected: list[str]) -> None:
    unexpected = sorted(set(state) - set(expected))
    missing = [k for k in expected if k not in state]
    if unexpected:
        raise McoreCheckpointError(
            f"{path}: unexpected tensors {unexpected[:4]}; this converter handles Qwen3 and Qwen3-MoE "
            "(RMSNorm, q/k layernorm, SwiGLU, no biases) with the config given or in args"
        )
    if missing:
        raise McoreCheckpointError(f"{path}: missing tensors {missing[:4]}; the checkpoint is incomplete or not Qwen3")


def _iter_merged(
    checkpoint: McoreCheckpoint, config: Qwen3Config, progress: ProgressFn | None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream full HF tensors, one model chunk (all its TP x EP files) at a time; shards are freed once merged."""
    chunks = [(p, key) for key in checkpoint.model_keys for p in range(checkpoint.pp)]
    hf_shapes = hf_tensor_shapes(config)
    offset = done = 0
    for index, (pp_rank, model_key) in enumerate(chunks):
        loaded = {
            (t, e): _chunk_state(checkpoint, (t, pp_rank, e), model_key)
            for t, e in itertools.product(range(checkpoint.tp), range(checkpoint.ep))
        }
        path, state = loaded[0, 0]
        layers = _chunk_layers(path, state)
        last = index == len(chunks) - 1
        entries = _chunk_entries(
            config, index, range(offset, offset + layers), last, checkpoint.ep, checkpoint.grouped
        )
        optional = {OUTPUT_LAYER.mcore} if config.tie_word_embeddings and last else set()
        for (_, ep_rank), (rank_path, rank_state) in loaded.items():
            held = (ep_rank,) if ep_rank else (None, 0)
            expected = [e.key for e in entries if e.ep_rank in held]
            _validate_keys(rank_path, {k: v for k, v in rank_state.items() if k not in optional}, expected)
        for entry in entries:
            shards = [loaded[t, entry.ep_rank or 0][1].pop(entry.key) for t in range(checkpoint.tp)]
            merged = merge_param(entry.spec, shards, config, len(entry.hf_names))
            for name, tensor in zip(entry.hf_names, merged, strict=True):
                if tuple(tensor.shape) != hf_shapes.get(name):
                    raise McoreCheckpointError(
                        f"{path}: {entry.key} merges to {name} of shape {tuple(tensor.shape)}, but the config implies "
                        f"{hf_shapes.get(name, 'no such tensor')}; the config (args or --hf-cfg-dir) does not match "
                        f"the weights"
                    )
                yield name, tensor
                done += 1
                if progress:
                    progress("tensors", done, len(hf_shapes))
        offset += layers
        del loaded, state
    if offset != config.num_hidden_layers:
        raise McoreCheckpointError(
            f"{checkpoint.iter_dir} holds {offset} layers but the config says {config.num_hidden_layers}"
        )


def iter_mcore_as_hf(
    path: str | os.PathLike[str], config: Qwen3Config | None = None, progress: ProgressFn | None = None
) -> tuple[Qwen3Config, int, Iterator[tuple[str, torch.Tensor]]]:
    """(config, iteration, stream of full HF-named tensors) of an mcore checkpoint in any TP/PP layout.

    The config comes from the checkpoint's args unless given (e.g. from an HF config.json); it is
    checked against every tensor's shape while streaming. Tied models yield no `lm_head.weight`.
    """
    checkpoint = open_mcore_checkpoint(path)
    dtype = checkpoint.dtype
    if config is None:
        if checkpoint.args is None:
            raise McoreCheckpointError(
                f"{checkpoint.file(0, 0)} has no 'args'; pass --hf-cfg-dir with the model's config.json"
            )
        config = config_from_args(checkpoint.args, dtype, checkpoint.file(0, 0))
    else:
        config = dataclasses.replace(config, torch_dtype=str(dtype).removeprefix("torch."))
    return config, checkpoint.iteration, _iter_merged(checkpoint, config, progress)
