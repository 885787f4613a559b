"""Megatron-LM / MindSpeed mcore checkpoints (legacy `torch` format) for dense Qwen3.

On disk (see DESIGN.md, "Megatron / MindSpeed mcore checkpoint"):

    <dir>/latest_checkpointed_iteration.txt          "1" (or "release")
    <dir>/iter_0000001/mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt

Each .pt holds {"args": Namespace, "checkpoint_version": 3.0, "iteration": N, "model": state dict}
(or "model0", "model1", ... with a virtual pipeline), with layer numbers restarting at 0 on every
pipeline stage. The HF <-> mcore mapping is the table `PARAMS`: each entry names the HF tensors, the
mcore tensor they become, how they are packed and which dimension is split across TP ranks.

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

from qwen3_pretrain.config.model import ConfigError, Qwen3Config

TRACKER_FILE = "latest_checkpointed_iteration.txt"
MODEL_FILE = "model_optim_rng.pt"
HF_CONFIG_SUBDIR = "hf_config"  # config.json + tokenizer files kept next to a converted checkpoint
CHECKPOINT_VERSION = 3.0
CONVERTED_ITERATION = 1  # Megatron treats iteration 0 as "no checkpoint"; converters write 1

ProgressFn = Callable[[str, int, int], None]  # (what, done, total)


class McoreCheckpointError(ValueError):
    """An mcore checkpoint is missing, incomplete, unsupported or unsafe; the message names the file."""


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


# ---- the HF <-> mcore table ----------------------------------------------------------------------

ShapeFn = Callable[[Qwen3Config], tuple[int, ...]]


def _hidden(c: Qwen3Config) -> tuple[int, ...]:
    return (c.hidden_size,)


def _head_dim(c: Qwen3Config) -> tuple[int, ...]:
    return (c.head_dim,)


def _vocab_rows(c: Qwen3Config) -> tuple[int, ...]:
    return (c.vocab_size, c.hidden_size)


def _q_rows(c: Qwen3Config) -> tuple[int, ...]:
    return (c.num_attention_heads * c.head_dim, c.hidden_size)


def _kv_rows(c: Qwen3Config) -> tuple[int, ...]:
    return (c.num_key_value_heads * c.head_dim, c.hidden_size)


def _o_cols(c: Qwen3Config) -> tuple[int, ...]:
    return (c.hidden_size, c.num_attention_heads * c.head_dim)


def _ffn_rows(c: Qwen3Config) -> tuple[int, ...]:
    return (c.intermediate_size, c.hidden_size)


def _ffn_cols(c: Qwen3Config) -> tuple[int, ...]:
    return (c.hidden_size, c.intermediate_size)


def _pack_single(parts: Sequence[torch.Tensor], config: Qwen3Config) -> torch.Tensor:
    return parts[0]


def _unpack_single(shard: torch.Tensor, config: Qwen3Config) -> list[torch.Tensor]:
    return [shard]


def _pack_gate_up(parts: Sequence[torch.Tensor], config: Qwen3Config) -> torch.Tensor:
    return torch.cat(list(parts), dim=0)


def _unpack_gate_up(shard: torch.Tensor, config: Qwen3Config) -> list[torch.Tensor]:
    return list(shard.chunk(2, dim=0))


def _pack_qkv(parts: Sequence[torch.Tensor], config: Qwen3Config) -> torch.Tensor:
    """q [g qpg hd, H], k [g hd, H], v [g hd, H] of g query groups -> [g (qpg + 2) hd, H], per group [q | k | v]."""
    q, k, v = parts
    d, hidden = config.head_dim, q.shape[1]
    groups = k.shape[0] // d
    grouped = torch.cat(
        [q.view(groups, -1, hidden), k.view(groups, d, hidden), v.view(groups, d, hidden)], dim=1
    )  # [g, (qpg + 2) hd, H]
    return grouped.reshape(-1, hidden)  # [g (qpg + 2) hd, H]


def _unpack_qkv(shard: torch.Tensor, config: Qwen3Config) -> list[torch.Tensor]:
    d, hidden = config.head_dim, shard.shape[1]
    q_per_group = config.num_attention_heads // config.num_key_value_heads
    grouped = shard.view(-1, (q_per_group + 2) * d, hidden)  # [g, (qpg + 2) hd, H]
    q, k, v = grouped.split([q_per_group * d, d, d], dim=1)
    return [t.reshape(-1, hidden) for t in (q, k, v)]  # [g qpg hd, H], [g hd, H], [g hd, H]


@dataclass(frozen=True)
class Packing:
    """How the TP-local slices of a parameter's HF tensors combine into one mcore tensor, and back."""

    pack: Callable[[Sequence[torch.Tensor], Qwen3Config], torch.Tensor]
    unpack: Callable[[torch.Tensor, Qwen3Config], list[torch.Tensor]]


SINGLE = Packing(_pack_single, _unpack_single)
GATE_UP = Packing(_pack_gate_up, _unpack_gate_up)  # rank r: cat([gate chunk r, up chunk r])
QKV = Packing(_pack_qkv, _unpack_qkv)  # rank r: the query groups it owns, each [its q heads | k | v]


@dataclass(frozen=True)
class ParamSpec:
    """One mcore tensor: its name, the HF tensors it packs (name, shape), the packing and the TP dim.

    Layer entries use suffixes under `decoder.layers.{i}.` / `model.layers.{i}.`; `stage` says where the
    others live ("first": first pipeline stage, "last": last stage). `pads_vocab`: rows are the
    vocabulary, padded to a multiple of TP.
    """

    mcore: str
    hf: tuple[tuple[str, ShapeFn], ...]
    packing: Packing = SINGLE
    tp_dim: int | None = None
    stage: str = "layer"
    pads_vocab: bool = False


PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec(
        "embedding.word_embeddings.weight", (("model.embed_tokens.weight", _vocab_rows),), tp_dim=0, stage="first",
        pads_vocab=True,
    ),
    ParamSpec("input_layernorm.weight", (("input_layernorm.weight", _hidden),)),
    ParamSpec(
        "self_attention.linear_qkv.weight",
        (
            ("self_attn.q_proj.weight", _q_rows),
            ("self_attn.k_proj.weight", _kv_rows),
            ("self_attn.v_proj.weight", _kv_rows),
        ),
        QKV,
        tp_dim=0,
    ),
    ParamSpec("self_attention.q_layernorm.weight", (("self_attn.q_norm.weight", _head_dim),)),
    ParamSpec("self_attention.k_layernorm.weight", (("self_attn.k_norm.weight", _head_dim),)),
    ParamSpec("self_attention.linear_proj.weight", (("self_attn.o_proj.weight", _o_cols),), tp_dim=1),
    ParamSpec("pre_mlp_layernorm.weight", (("post_attention_layernorm.weight", _hidden),)),
    ParamSpec(
        "mlp.linear_fc1.weight",
        (("mlp.gate_proj.weight", _ffn_rows), ("mlp.up_proj.weight", _ffn_rows)),
        GATE_UP,
        tp_dim=0,
    ),
    ParamSpec("mlp.linear_fc2.weight", (("mlp.down_proj.weight", _ffn_cols),), tp_dim=1),
    ParamSpec("decoder.final_layernorm.weight", (("model.norm.weight", _hidden),), stage="last"),
    ParamSpec("output_layer.weight", (("lm_head.weight", _vocab_rows),), tp_dim=0, stage="last", pads_vocab=True),
)
LAYER_PARAMS = tuple(p for p in PARAMS if p.stage == "layer")
EMBEDDING, FINAL_NORM, OUTPUT_LAYER = (p for p in PARAMS if p.stage != "layer")
_HF_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")  # buffers in old HF files
_MCORE_LAYER_KEY = re.compile(r"decoder\.layers\.(\d+)\.(.+)$")


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Rows of the embedding / output layer: the vocabulary rounded up to a multiple of TP."""
    return -(-vocab_size // tp) * tp


def split_param(spec: ParamSpec, parts: Sequence[torch.Tensor], config: Qwen3Config, tp: int) -> list[torch.Tensor]:
    """HF tensors of one parameter -> its TP shards (each a fresh tensor owning its storage)."""
    if spec.pads_vocab:
        (full,) = parts
        extra = padded_vocab_size(config.vocab_size, tp) - full.shape[0]
        parts = [torch.cat([full, full[-1:].expand(extra, -1)]) if extra else full]  # Megatron pads with the last row
    if spec.tp_dim is None:
        return [_owning(spec.packing.pack(parts, config))] * tp
    per_rank = zip(*(part.chunk(tp, dim=spec.tp_dim) for part in parts), strict=True)
    return [_owning(spec.packing.pack(chunks, config)) for chunks in per_rank]


def _owning(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` as a contiguous tensor that is its whole storage (torch.save writes a view's entire storage)."""
    if not tensor.is_contiguous():
        return tensor.contiguous()
    return tensor if tensor.untyped_storage().nbytes() == tensor.nbytes else tensor.clone()


def merge_param(spec: ParamSpec, shards: Sequence[torch.Tensor], config: Qwen3Config) -> list[torch.Tensor]:
    """TP shards of one parameter -> its full HF tensors (vocab padding removed)."""
    if spec.tp_dim is None:
        return spec.packing.unpack(shards[0], config)
    per_rank = [spec.packing.unpack(shard, config) for shard in shards]
    parts = [torch.cat(list(chunks), dim=spec.tp_dim) for chunks in zip(*per_rank, strict=True)]
    return [part[: config.vocab_size] for part in parts] if spec.pads_vocab else parts


# ---- layout ----------------------------------------------------------------------------------------


def rank_dir_name(tp_rank: int, pp_rank: int, pp: int) -> str:
    """Megatron's directory of one model-parallel rank: mp_rank_TT, or mp_rank_TT_PPP when PP > 1."""
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


@dataclass(frozen=True)
class McoreLayout:
    """TP size and the layer count of every pipeline stage."""

    tp: int
    stage_layers: tuple[int, ...]

    @property
    def pp(self) -> int:
        return len(self.stage_layers)

    def stage_range(self, stage: int) -> range:
        """Global layer indices of one stage."""
        start = sum(self.stage_layers[:stage])
        return range(start, start + self.stage_layers[stage])

    @classmethod
    def build(
        cls, config: Qwen3Config, tp: int, pp: int, num_layer_list: str | Sequence[int] | None = None
    ) -> McoreLayout:
        """Validate a target split (flag names in the errors) and return it."""
        if tp < 1 or pp < 1:
            raise ConfigError(
                f"--target-tensor-parallel-size ({tp}) and --target-pipeline-parallel-size ({pp}) must be >= 1"
            )
        for what, value in (
            ("num_key_value_heads", config.num_key_value_heads),
            ("num_attention_heads", config.num_attention_heads),
            ("intermediate_size", config.intermediate_size),
        ):
            if value % tp:
                raise ConfigError(
                    f"--target-tensor-parallel-size {tp} does not divide the model's {what} ({value}); "
                    f"choose a TP size that divides {what}"
                )
        layers = config.num_hidden_layers
        if num_layer_list is None:
            if layers % pp:
                raise ConfigError(
                    f"--target-pipeline-parallel-size {pp} does not divide the {layers} layers; choose a divisor "
                    "or give --num-layer-list (layers per stage, e.g. 7,7,7,7)"
                )
            return cls(tp, (layers // pp,) * pp)
        try:
            given = num_layer_list.split(",") if isinstance(num_layer_list, str) else num_layer_list
            counts = tuple(int(n) for n in given)
        except ValueError:
            raise ConfigError(
                f"--num-layer-list {num_layer_list!r} must be comma-separated integers, e.g. 7,7,7,7"
            ) from None
        if len(counts) != pp or sum(counts) != layers or min(counts) < 1:
            raise ConfigError(
                f"--num-layer-list {num_layer_list!r} must give {pp} positive layer counts (one per pipeline stage, "
                f"--target-pipeline-parallel-size {pp}) that sum to the model's {layers} layers"
            )
        return cls(tp, counts)


def megatron_args(config: Qwen3Config, layout: McoreLayout, dtype: torch.dtype) -> argparse.Namespace:
    """The `args` Megatron/MindSpeed read from a checkpoint, enough to rebuild the model config."""
    uneven = len(set(layout.stage_layers)) > 1
    return argparse.Namespace(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.intermediate_size,
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_key_value_heads,
        group_query_attention=config.num_key_value_heads != config.num_attention_heads,
        kv_channels=config.head_dim,
        qk_layernorm=True,
        vocab_size=config.vocab_size,
        padded_vocab_size=padded_vocab_size(config.vocab_size, layout.tp),
        make_vocab_size_divisible_by=1,
        max_position_embeddings=config.max_position_embeddings,
        position_embedding_type="rope",
        add_position_embedding=False,
        use_rotary_position_embeddings=True,
        rotary_base=int(config.rope_theta) if float(config.rope_theta).is_integer() else config.rope_theta,
        rotary_percent=1.0,
        normalization="RMSNorm",
        norm_epsilon=config.rms_norm_eps,
        swiglu=True,
        add_bias_linear=False,
        add_qkv_bias=False,
        untie_embeddings_and_output_weights=not config.tie_word_embeddings,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        num_layer_list=",".join(map(str, layout.stage_layers)) if uneven else None,
        num_layers_per_virtual_pipeline_stage=None,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_mcore_models=True,
        transformer_impl="local",
        model_type_hf="qwen3",
        consumed_train_samples=0,
        consumed_valid_samples=0,
    )


def config_from_args(args: argparse.Namespace, dtype: torch.dtype, source: Path) -> Qwen3Config:
    """Rebuild the Qwen3Config from a checkpoint's Megatron args (`source` names the file in errors)."""
    def need(name: str) -> Any:
        value = getattr(args, name, None)
        if value is None:
            raise McoreCheckpointError(
                f"{source}: args has no {name!r}; pass --hf-cfg-dir with the model's config.json"
            )
        return value

    heads = need("num_attention_heads")
    hidden = need("hidden_size")
    groups = getattr(args, "num_query_groups", None) if getattr(args, "group_query_attention", False) else None
    values: dict[str, Any] = {
        "vocab_size": getattr(args, "vocab_size", None) or need("padded_vocab_size"),
        "hidden_size": hidden,
        "intermediate_size": need("ffn_hidden_size"),
        "num_hidden_layers": need("num_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": groups or heads,
        "head_dim": getattr(args, "kv_channels", None) or hidden // heads,
        "tie_word_embeddings": not getattr(args, "untie_embeddings_and_output_weights", False),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    optional = {
        "max_position_embeddings": getattr(args, "max_position_embeddings", None),
        "rope_theta": getattr(args, "rotary_base", None),
        "rms_norm_eps": getattr(args, "norm_epsilon", None) or getattr(args, "layernorm_epsilon", None),
    }
    values.update({k: v for k, v in optional.items() if v is not None})
    values["rope_theta"] = float(values.get("rope_theta", Qwen3Config.rope_theta))
    try:
        return Qwen3Config(**values)
    except ConfigError as exc:
        raise McoreCheckpointError(f"{source}: the model in args is not a valid Qwen3 ({exc})") from exc


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
    """Write HF-named tensors as the `mp_rank_*/model_optim_rng.pt` files of `iteration_dir` (an existing
    directory, e.g. a native checkpoint's `iter_N` before it is committed), so that Megatron/MindSpeed load
    the same directory as an mcore (`--ckpt-format torch`) checkpoint of `layout`.

    With `pp_ranks` below the layout's stage count (a virtual pipeline), pipeline rank r's file holds stage
    r + v * pp_ranks as "model{v}", as Megatron's interleaved schedule saves it.
    """
    scratch = iteration_dir / ".mcore"
    write_mcore_checkpoint(tensors, config, scratch, layout, iteration)
    written = scratch / f"iter_{iteration:07d}"
    ranks = layout.pp if pp_ranks is None else pp_ranks
    if ranks == layout.pp:
        for rank_dir in sorted(written.iterdir()):
            os.replace(rank_dir, iteration_dir / rank_dir.name)
    else:
        virtual = layout.pp // ranks
        for tp_rank in range(layout.tp):
            for pp_rank in range(ranks):
                chunks = [load_pt(written / rank_dir_name(tp_rank, pp_rank + v * ranks, layout.pp) / MODEL_FILE)
                          for v in range(virtual)]
                merged = {k: v for k, v in chunks[0].items() if k != "model"}
                merged.update({f"model{v}": chunk["model"] for v, chunk in enumerate(chunks)})
                merged["args"] = argparse.Namespace(**{
                    **vars(chunks[0]["args"]), "pipeline_model_parallel_size": ranks, "num_layer_list": None,
                    "num_layers_per_virtual_pipeline_stage": layout.stage_layers[0],
                })
                rank_dir = iteration_dir / rank_dir_name(tp_rank, pp_rank, ranks)
                rank_dir.mkdir()
                torch.save(merged, rank_dir / MODEL_FILE)
    shutil.rmtree(scratch)



class _Entry(NamedTuple):
    """One tensor of one stage's files: its mcore key, how it is built and from which HF tensors."""

    stage: int
    key: str
    spec: ParamSpec
    hf_names: tuple[str, ...]


def _hf_layer_key(layer: int, suffix: str) -> str:
    return f"model.layers.{layer}.{suffix}"


def _stage_entries(config: Qwen3Config, layout: McoreLayout) -> list[list[_Entry]]:
    """Every tensor of every stage, in Megatron's order."""
    stages = []
    for stage in range(layout.pp):
        entries = []
        if stage == 0:
            entries.append(_Entry(stage, EMBEDDING.mcore, EMBEDDING, (EMBEDDING.hf[0][0],)))
        for local, layer in enumerate(layout.stage_range(stage)):
            for spec in LAYER_PARAMS:
                names = tuple(_hf_layer_key(layer, n) for n, _ in spec.hf)
                entries.append(_Entry(stage, f"decoder.layers.{local}.{spec.mcore}", spec, names))
        if stage == layout.pp - 1:
            entries.append(_Entry(stage, FINAL_NORM.mcore, FINAL_NORM, (FINAL_NORM.hf[0][0],)))
            if not config.tie_word_embeddings:
                entries.append(_Entry(stage, OUTPUT_LAYER.mcore, OUTPUT_LAYER, (OUTPUT_LAYER.hf[0][0],)))
            elif layout.pp > 1:  # Megatron keeps a copy of the tied embedding as the last stage's output layer
                entries.append(_Entry(stage, OUTPUT_LAYER.mcore, EMBEDDING, (EMBEDDING.hf[0][0],)))
        stages.append(entries)
    return stages


def hf_tensor_shapes(config: Qwen3Config) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name the config implies (no lm_head.weight when tied) -> its shape, in HF order."""
    shapes = {name: shape(config) for name, shape in EMBEDDING.hf}
    for layer in range(config.num_hidden_layers):
        shapes.update({_hf_layer_key(layer, name): shape(config) for spec in LAYER_PARAMS for name, shape in spec.hf})
    shapes.update({name: shape(config) for name, shape in FINAL_NORM.hf})
    if not config.tie_word_embeddings:
        shapes.update({name: shape(config) for name, shape in OUTPUT_LAYER.hf})
    return shapes


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
    shards: list[dict[str, list[torch.Tensor]]] = [{} for _ in stages]
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
            if _HF_IGNORED.match(name) or (name == OUTPUT_LAYER.hf[0][0] and config.tie_word_embeddings):
                continue
            _check_hf_tensor(name, tensor, shapes, received)
            received.add(name)
            dtype = tensor.dtype if dtype is None else dtype
            pending[name] = tensor
            for entry in consumers[name]:
                if all(n in pending for n in entry.hf_names):
                    shards[entry.stage][entry.key] = split_param(
                        entry.spec, [pending[n] for n in entry.hf_names], config, layout.tp
                    )
                    remaining[entry.stage] -= 1
                    if not remaining[entry.stage]:
                        stage = entry.stage
                        _write_stage(iter_dir, stages[stage], shards[stage], config, layout, dtype, iteration)
            pending = {n: t for n, t in pending.items() if any(e.key not in shards[e.stage] for e in consumers[n])}
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
            f"unexpected tensor {name!r} in the HF checkpoint: not part of a dense Qwen3 model with this "
            "config.json (check --load-dir and --model-type-hf)"
        )
    if tuple(tensor.shape) != shapes[name]:
        raise McoreCheckpointError(
            f"HF tensor {name!r} has shape {tuple(tensor.shape)} but config.json implies {shapes[name]}; "
            "the weights and config.json do not belong together"
        )
    if name in received:
        raise McoreCheckpointError(f"HF tensor {name!r} appears twice in the checkpoint")


def _write_stage(
    iter_dir: Path, entries: list[_Entry], shards: dict[str, list[torch.Tensor]], config: Qwen3Config,
    layout: McoreLayout, dtype: torch.dtype, iteration: int,
) -> None:
    """torch.save the TP files of one complete stage, then free its shards (the dict is emptied)."""
    args = megatron_args(config, layout, dtype)
    stage = entries[0].stage
    for rank in range(layout.tp):
        model = {e.key: shards[e.key][rank] for e in entries}
        rank_dir = iter_dir / rank_dir_name(rank, stage, layout.pp)
        rank_dir.mkdir(parents=True)
        checkpoint = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration, "model": model}
        torch.save(checkpoint, rank_dir / MODEL_FILE)
    for key in shards:
        shards[key] = []  # keep the keys (they mark the entries done), drop the tensors


# ---- reading mcore -------------------------------------------------------------------------------------

_RANK_DIR = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?(_\d{3})?$")


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

    def file(self, tp_rank: int, pp_rank: int) -> Path:
        return self.iter_dir / rank_dir_name(tp_rank, pp_rank, self.pp) / MODEL_FILE


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


def _rank_grid(iter_dir: Path) -> tuple[int, int]:
    """(TP, PP) from the mp_rank_* directory names."""
    ranks: set[tuple[int, int | None]] = set()
    for entry in iter_dir.iterdir():
        match = _RANK_DIR.match(entry.name)
        if not match:
            continue
        if match.group(3):
            raise McoreCheckpointError(f"{entry} is an expert-parallel rank; dense Qwen3 checkpoints have no experts")
        ranks.add((int(match.group(1)), None if match.group(2) is None else int(match.group(2))))
    if not ranks:
        raise McoreCheckpointError(f"{iter_dir} has no mp_rank_* directories; the checkpoint is incomplete")
    if len({pp is None for _, pp in ranks}) > 1:
        raise McoreCheckpointError(f"{iter_dir} mixes mp_rank_TT and mp_rank_TT_PPP directories; remove the stale ones")
    tp = max(t for t, _ in ranks) + 1
    pp = 1 if next(iter(ranks))[1] is None else max(p or 0 for _, p in ranks) + 1
    return tp, pp


def _model_keys(path: Path, loaded: dict[str, Any]) -> tuple[str, ...]:
    if "model" in loaded:
        return ("model",)
    keys = sorted((k for k in loaded if re.fullmatch(r"model\d+", k)), key=lambda k: int(k[5:]))
    if not keys:
        raise McoreCheckpointError(f"{path} has no 'model' entry (its keys: {sorted(loaded)[:8]})")
    return tuple(keys)


def open_mcore_checkpoint(path: str | os.PathLike[str]) -> McoreCheckpoint:
    """Locate an mcore checkpoint and check that every TP x PP rank file is present (reads rank 0's file)."""
    iter_dir, iteration = _iteration_dir(Path(path))
    if (iter_dir / "metadata.json").is_file() or (iter_dir / "common.pt").is_file():
        raise McoreCheckpointError(
            f"{iter_dir} is a Megatron distributed (torch_dist) checkpoint; convert it to the legacy format "
            "first (Megatron: --ckpt-format torch_dist --ckpt-convert-format torch --ckpt-convert-save DIR)"
        )
    tp, pp = _rank_grid(iter_dir)
    first_file = iter_dir / rank_dir_name(0, 0, pp) / MODEL_FILE
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
    checkpoint = McoreCheckpoint(
        iter_dir,
        int(first.get("iteration", iteration)),
        max(tp, getattr(args, "tensor_model_parallel_size", 1) or 1),
        max(pp, getattr(args, "pipeline_model_parallel_size", 1) or 1),
        args,
        model_keys,
        embedding.dtype,
    )
    for t in range(checkpoint.tp):
        for p in range(checkpoint.pp):
            if not checkpoint.file(t, p).is_file():
                raise McoreCheckpointError(
                    f"{checkpoint.file(t, p)} is missing (the checkpoint has TP={checkpoint.tp}, PP={checkpoint.pp}); "
                    "copy every rank directory of the checkpoint"
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
    checkpoint: McoreCheckpoint, tp_rank: int, pp_rank: int, model_key: str
) -> tuple[Path, dict[str, Any]]:
    """One rank's model chunk, copied out of the file's memory map so the mapping (and the optimizer
    state of training checkpoints, never touched) is released before the next file is read."""
    path = checkpoint.file(tp_rank, pp_rank)
    state = load_pt(path).get(model_key)
    if not isinstance(state, dict):
        raise McoreCheckpointError(
            f"{path} has no {model_key!r} state dict; every rank must hold the same model chunks"
        )
    return path, {
        k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items() if not k.endswith("_extra_state")
    }


def _chunk_layers(path: Path, state: dict[str, Any]) -> int:
    """Number of layers in one chunk's state dict (local numbering must be 0..n-1)."""
    local = {int(m.group(1)) for m in map(_MCORE_LAYER_KEY.match, state) if m}
    if local != set(range(len(local))):
        raise McoreCheckpointError(f"{path}: layer numbers {sorted(local)} are not 0..n-1 (local numbering per stage)")
    return len(local)


def _validate_keys(path: Path, state: dict[str, Any], expected: list[str]) -> None:
    unexpected = sorted(set(state) - set(expected))
    missing = [k for k in expected if k not in state]
    if unexpected:
        raise McoreCheckpointError(
            f"{path}: unexpected tensors {unexpected[:4]}; this converter handles dense Qwen3 "
            "(RMSNorm, q/k layernorm, SwiGLU, no biases)"
        )
    if missing:
        raise McoreCheckpointError(f"{path}: missing tensors {missing[:4]}; the checkpoint is incomplete or not Qwen3")


def _iter_merged(
    checkpoint: McoreCheckpoint, config: Qwen3Config, progress: ProgressFn | None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream full HF tensors, one model chunk (all its TP files) at a time; shards are freed once merged."""
    chunks = [(v, p, key) for v, key in enumerate(checkpoint.model_keys) for p in range(checkpoint.pp)]
    hf_shapes = hf_tensor_shapes(config)
    offset = done = 0
    for index, (_, pp_rank, model_key) in enumerate(chunks):
        loaded = [_chunk_state(checkpoint, t, pp_rank, model_key) for t in range(checkpoint.tp)]
        path, state = loaded[0]
        layers = _chunk_layers(path, state)
        plan: list[tuple[str, ParamSpec, str | None]] = []  # (mcore key, spec, HF layer prefix)
        if index == 0:
            plan.append((EMBEDDING.mcore, EMBEDDING, None))
        plan += [
            (f"decoder.layers.{i}.{s.mcore}", s, f"model.layers.{offset + i}.")
            for i in range(layers)
            for s in LAYER_PARAMS
        ]
        if index == len(chunks) - 1:
            plan.append((FINAL_NORM.mcore, FINAL_NORM, None))
            if not config.tie_word_embeddings:
                plan.append((OUTPUT_LAYER.mcore, OUTPUT_LAYER, None))
        expected = [key for key, _, _ in plan]
        optional = {OUTPUT_LAYER.mcore} if config.tie_word_embeddings and index == len(chunks) - 1 else set()
        for rank_path, rank_state in loaded:
            _validate_keys(rank_path, {k: v for k, v in rank_state.items() if k not in optional}, expected)
        for key, spec, prefix in plan:
            names = [(prefix or "") + name for name, _ in spec.hf]
            for name, tensor in zip(names, merge_param(spec, [s.pop(key) for _, s in loaded], config), strict=True):
                if tuple(tensor.shape) != hf_shapes.get(name):
                    raise McoreCheckpointError(
                        f"{path}: {key} merges to {name} of shape {tuple(tensor.shape)}, but the config implies "
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
