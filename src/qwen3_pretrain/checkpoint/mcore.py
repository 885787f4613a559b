"""Megatron-LM / MindSpeed mcore checkpoints (legacy `torch` format) for Qwen3 and Qwen3-MoE.

On disk (see DESIGN.md, "Megatron / MindSpeed mcore checkpoint"):

    <dir>/latest_checkpointed_iteration.txt          "1" (or "release")
    <dir>/iter_0000001/mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]/model_optim_rng.pt

(`_{pp:03d}` when PP > 1, `_{ep:03d}` when EP > 1, as Megatron's `get_checkpoint_name`.) Each .pt holds
{"args": Namespace, "checkpoint_version": 3.0, "iteration": N, "model": state dict} (or "model0", "model1",
... with a virtual pipeline), with layer numbers restarting at 0 on every pipeline stage. The HF <-> mcore
mapping is the table `PARAMS` (and `ROUTER`, `SEQUENTIAL_EXPERT_PARAMS`, `GROUPED_EXPERT_PARAMS` for the MLP
of a MoE layer): each entry names the HF tensors, the mcore tensor they become, how they are packed and which
dimension is split across TP ranks.

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
from qwen3_pretrain.config.model import LOAD_BALANCING_TYPES, ConfigError, Qwen3Config, Qwen3MoeConfig

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


def _moe(c: Qwen3Config) -> Qwen3MoeConfig:
    if not isinstance(c, Qwen3MoeConfig):
        raise TypeError(f"expert tensors need a Qwen3MoeConfig, got {type(c).__name__}")
    return c


def _router_rows(c: Qwen3Config) -> tuple[int, ...]:
    return (_moe(c).num_experts, c.hidden_size)


def _expert_rows(c: Qwen3Config) -> tuple[int, ...]:
    return (_moe(c).moe_intermediate_size, c.hidden_size)


def _expert_cols(c: Qwen3Config) -> tuple[int, ...]:
    return (c.hidden_size, _moe(c).moe_intermediate_size)


def _pack_single(parts: Sequence[torch.Tensor], config: Qwen3Config) -> torch.Tensor:
    return parts[0]


def _unpack_single(shard: torch.Tensor, config: Qwen3Config, count: int) -> list[torch.Tensor]:
    return [shard]


def _pack_gate_up(parts: Sequence[torch.Tensor], config: Qwen3Config) -> torch.Tensor:
    return torch.cat(list(parts), dim=0)  # [2 F/TP, H]


def _unpack_gate_up(shard: torch.Tensor, config: Qwen3Config, count: int) -> list[torch.Tensor]:
    return list(shard.chunk(2, dim=0))  # [F/TP, H] each


def _pack_qkv(parts: Sequence[torch.Tensor], config: Qwen3Config) -> torch.Tensor:
    """q [g qpg hd, H], k [g hd, H], v [g hd, H] of g query groups -> [g (qpg + 2) hd, H], per group [q | k | v]."""
    q, k, v = parts
    d, hidden = config.head_dim, q.shape[1]
    groups = k.shape[0] // d
    grouped = torch.cat(
        [q.view(groups, -1, hidden), k.view(groups, d, hidden), v.view(groups, d, hidden)], dim=1
    )  # [g, (qpg + 2) hd, H]
    return grouped.reshape(-1, hidden)  # [g (qpg + 2) hd, H]


def _unpack_qkv(shard: torch.Tensor, config: Qwen3Config, count: int) -> list[torch.Tensor]:
    d, hidden = config.head_dim, shard.shape[1]
    q_per_group = config.num_attention_heads // config.num_key_value_heads
    grouped = shard.view(-1, (q_per_group + 2) * d, hidden)  # [g, (qpg + 2) hd, H]
    q, k, v = grouped.split([q_per_group * d, d, d], dim=1)
    return [t.reshape(-1, hidden) for t in (q, k, v)]  # [g qpg hd, H], [g hd, H], [g hd, H]


def _pack_grouped_fc1(parts: Sequence[torch.Tensor], config: Qwen3Config) -> torch.Tensor:
    """gate_0, up_0, gate_1, up_1, ... [F/TP, H] of n experts -> weight1 [H, n 2F/TP], memory [n, H, 2F/TP]."""
    fc1 = torch.stack([torch.cat(list(parts[i : i + 2])) for i in range(0, len(parts), 2)])  # [n, 2F/TP, H]
    per_expert = fc1.transpose(1, 2).contiguous()  # [n, H, 2F/TP]
    return per_expert.view(config.hidden_size, -1)  # [H, n 2F/TP]: the same memory, as GroupedMLP allocates it


def _unpack_grouped_fc1(shard: torch.Tensor, config: Qwen3Config, count: int) -> list[torch.Tensor]:
    per_expert = shard.view(count // 2, config.hidden_size, -1)  # [n, H, 2F/TP], as GroupedMLP views it
    return [part for fc1 in per_expert for part in fc1.t().chunk(2, dim=0)]  # gate_e, up_e [F/TP, H] per expert


def _pack_grouped_fc2(parts: Sequence[torch.Tensor], config: Qwen3Config) -> torch.Tensor:
    """down_0, down_1, ... [H, F/TP] of n experts -> weight2 [n F/TP, H], memory [n, F/TP, H]."""
    per_expert = torch.stack([down.t() for down in parts])  # [n, F/TP, H]
    return per_expert.view(-1, config.hidden_size)  # [n F/TP, H]


def _unpack_grouped_fc2(shard: torch.Tensor, config: Qwen3Config, count: int) -> list[torch.Tensor]:
    per_expert = shard.view(count, -1, config.hidden_size)  # [n, F/TP, H]
    return [fc2.t() for fc2 in per_expert]  # down_e [H, F/TP]


@dataclass(frozen=True)
class Packing:
    """How the TP-local slices of a parameter's HF tensors combine into one mcore tensor, and back
    (`unpack` gets the number of HF tensors the mcore tensor holds)."""

    pack: Callable[[Sequence[torch.Tensor], Qwen3Config], torch.Tensor]
    unpack: Callable[[torch.Tensor, Qwen3Config, int], list[torch.Tensor]]


SINGLE = Packing(_pack_single, _unpack_single)
GATE_UP = Packing(_pack_gate_up, _unpack_gate_up)  # rank r: cat([gate chunk r, up chunk r])
QKV = Packing(_pack_qkv, _unpack_qkv)  # rank r: the query groups it owns, each [its q heads | k | v]
GROUPED_FC1 = Packing(_pack_grouped_fc1, _unpack_grouped_fc1)  # the local experts' fc1, each [H, 2F/TP]
GROUPED_FC2 = Packing(_pack_grouped_fc2, _unpack_grouped_fc2)  # the local experts' fc2, each [F/TP, H]


@dataclass(frozen=True)
class ParamSpec:
    """One mcore tensor: its name, the HF tensors it packs (name, shape), the packing and the TP dim.

    Layer entries use suffixes under `decoder.layers.{i}.` / `model.layers.{i}.`; `stage` says where the
    others live ("first": first pipeline stage, "last": last stage). `pads_vocab`: rows are the
    vocabulary, padded to a multiple of TP. Expert entries name the local expert `{local}` (mcore) and the
    global one `{expert}` (HF); a grouped entry's HF tensors repeat once per local expert.
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
ATTENTION_PARAMS = tuple(p for p in LAYER_PARAMS if not p.mcore.startswith("mlp."))  # and the two norms
DENSE_MLP_PARAMS = tuple(p for p in LAYER_PARAMS if p.mcore.startswith("mlp."))
EMBEDDING, FINAL_NORM, OUTPUT_LAYER = (p for p in PARAMS if p.stage != "layer")

_GATE_UP_HF = (
    ("mlp.experts.{expert}.gate_proj.weight", _expert_rows), ("mlp.experts.{expert}.up_proj.weight", _expert_rows)
)
_DOWN_HF = (("mlp.experts.{expert}.down_proj.weight", _expert_cols),)
ROUTER = ParamSpec("mlp.router.weight", (("mlp.gate.weight", _router_rows),))
SEQUENTIAL_EXPERT_PARAMS = (
    ParamSpec("mlp.experts.local_experts.{local}.linear_fc1.weight", _GATE_UP_HF, GATE_UP, tp_dim=0),
    ParamSpec("mlp.experts.local_experts.{local}.linear_fc2.weight", _DOWN_HF, tp_dim=1),
)
GROUPED_EXPERT_PARAMS = (
    ParamSpec("mlp.experts.weight1", _GATE_UP_HF, GROUPED_FC1, tp_dim=0),
    ParamSpec("mlp.experts.weight2", _DOWN_HF, GROUPED_FC2, tp_dim=1),
)
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


def merge_param(
    spec: ParamSpec, shards: Sequence[torch.Tensor], config: Qwen3Config, count: int = 0
) -> list[torch.Tensor]:
    """TP shards of one parameter -> its `count` (default: the spec's) full HF tensors (vocab padding removed)."""
    count = count or len(spec.hf)
    if spec.tp_dim is None:
        return spec.packing.unpack(shards[0], config, count)
    per_rank = [spec.packing.unpack(shard, config, count) for shard in shards]
    parts = [torch.cat(list(chunks), dim=spec.tp_dim) for chunks in zip(*per_rank, strict=True)]
    return [part[: config.vocab_size] for part in parts] if spec.pads_vocab else parts


# ---- layout ----------------------------------------------------------------------------------------


def rank_dir_name(tp_rank: int, pp_rank: int, pp: int, ep_rank: int = 0, ep: int = 1) -> str:
    """Megatron's directory of one model-parallel rank: mp_rank_TT, + _PPP when PP > 1, + _EEE when EP > 1."""
    name = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return name if ep == 1 else f"{name}_{ep_rank:03d}"


@dataclass(frozen=True)
class McoreLayout:
    """TP size, the layer count of every pipeline stage, EP size and the expert layout (grouped GEMM or not)."""

    tp: int
    stage_layers: tuple[int, ...]
    ep: int = 1
    grouped: bool = False

    @property
    def pp(self) -> int:
        return len(self.stage_layers)

    def stage_range(self, stage: int) -> range:
        """Global layer indices of one stage."""
        start = sum(self.stage_layers[:stage])
        return range(start, start + self.stage_layers[stage])

    @classmethod
    def build(
        cls, config: Qwen3Config, tp: int, pp: int, num_layer_list: str | Sequence[int] | None = None,
        ep: int = 1, grouped: bool = False,
    ) -> McoreLayout:
        """Validate a target split (flag names in the errors) and return it."""
        if tp < 1 or pp < 1 or ep < 1:
            raise ConfigError(
                f"--target-tensor-parallel-size ({tp}), --target-pipeline-parallel-size ({pp}) and "
                f"--target-expert-parallel-size ({ep}) must be >= 1"
            )
        sizes = [
            ("num_key_value_heads", config.num_key_value_heads),
            ("num_attention_heads", config.num_attention_heads),
            ("intermediate_size", config.intermediate_size),
        ]
        moe = config if isinstance(config, Qwen3MoeConfig) and config.num_experts else None
        experts = moe.num_experts if moe is not None else 0
        if moe is not None:
            sizes.append(("moe_intermediate_size", moe.moe_intermediate_size))
        elif ep > 1 or grouped:
            raise ConfigError(
                "--target-expert-parallel-size > 1 and --moe-grouped-gemm need a mixture-of-experts model; "
                f"this one is dense ({type(config).__name__})"
            )
        if experts % ep:
            raise ConfigError(
                f"--target-expert-parallel-size {ep} does not divide the model's {experts} experts; "
                "choose an EP size that divides num_experts"
            )
        for what, value in sizes:
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
            return cls(tp, (layers // pp,) * pp, ep, grouped)
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
        return cls(tp, counts, ep, grouped)


def megatron_args(config: Qwen3Config, layout: McoreLayout, dtype: torch.dtype) -> argparse.Namespace:
    """The `args` Megatron/MindSpeed read from a checkpoint, enough to rebuild the model config."""
    uneven = len(set(layout.stage_layers)) > 1
    args = argparse.Namespace(
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
    if isinstance(config, Qwen3MoeConfig) and config.num_experts:
        vars(args).update(_moe_args(config, layout))
    return args


def _moe_args(config: Qwen3MoeConfig, layout: McoreLayout) -> dict[str, Any]:
    """Megatron's (and MindSpeed's) MoE args: the router mapped explicitly, since the defaults differ (HF
    norm_topk_prob=False is megatron-core's moe_router_pre_softmax=True), MoE layers as a 0/1 pattern."""
    return {
        "model_type_hf": "qwen3-moe",
        "num_experts": config.num_experts,
        "moe_router_topk": config.num_experts_per_tok,
        "moe_ffn_hidden_size": config.moe_intermediate_size,
        "moe_router_pre_softmax": not config.norm_topk_prob,
        "norm_topk_prob": config.norm_topk_prob,
        "moe_layer_freq": [int(config.is_moe_layer(i)) for i in range(config.num_hidden_layers)],
        "moe_aux_loss_coeff": config.router_aux_loss_coef,
        "moe_router_load_balancing_type": config.moe_router_load_balancing_type,
        "moe_grouped_gemm": layout.grouped,
        "expert_model_parallel_size": layout.ep,
        "expert_tensor_parallel_size": layout.tp,
    }


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
    experts = getattr(args, "num_experts", None)
    try:
        if experts:
            return Qwen3MoeConfig(**values, **_moe_values_from_args(args, experts, need))
        return Qwen3Config(**values)
    except ConfigError as exc:
        raise McoreCheckpointError(f"{source}: the model in args is not a valid Qwen3 ({exc})") from exc


def _moe_values_from_args(args: argparse.Namespace, experts: int, need: Callable[[str], Any]) -> dict[str, Any]:
    """Qwen3MoeConfig fields from Megatron/MindSpeed MoE args (inverse of `_moe_args`)."""
    layers = need("num_layers")
    freq = getattr(args, "moe_layer_freq", 1) or 1
    pattern = list(freq) if isinstance(freq, (list, tuple)) else [int(i % freq == 0) for i in range(layers)]
    if len(pattern) != layers:
        raise McoreCheckpointError(f"args.moe_layer_freq {freq} does not give one entry per layer ({layers})")
    first_dense = getattr(args, "first_k_dense_replace", None) or 0  # MindSpeed: the first k layers are dense
    norm = getattr(args, "norm_topk_prob", None)  # MindSpeed's flag; else megatron-core's router semantics
    values = {
        "num_experts": experts,
        "num_experts_per_tok": need("moe_router_topk"),
        "moe_intermediate_size": getattr(args, "moe_ffn_hidden_size", None) or need("ffn_hidden_size"),
        "norm_topk_prob": bool(norm) if norm is not None else not getattr(args, "moe_router_pre_softmax", False),
        "mlp_only_layers": [i for i in range(layers) if i < first_dense or not pattern[i]],
    }
    coef = getattr(args, "moe_aux_loss_coeff", None)  # Megatron also allows one per balancing type (a list)
    balancing = getattr(args, "moe_router_load_balancing_type", None)
    if isinstance(coef, (int, float)):
        values["router_aux_loss_coef"] = float(coef)
    if balancing in LOAD_BALANCING_TYPES:
        values["moe_router_load_balancing_type"] = balancing
    return values


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
    per_rank = _moe(config).num_experts // ep
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
            if _HF_IGNORED.match(name) or (name == OUTPUT_LAYER.hf[0][0] and config.tie_word_embeddings):
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
    local = {int(m.group(1)) for m in map(_MCORE_LAYER_KEY.match, state) if m}
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
