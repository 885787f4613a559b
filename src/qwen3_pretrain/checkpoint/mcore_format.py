"""The Megatron mcore checkpoint format for Qwen3 and Qwen3-MoE: file names and constants, the HF <-> mcore
parameter table (`PARAMS`, `ROUTER`, `SEQUENTIAL_EXPERT_PARAMS`, `GROUPED_EXPERT_PARAMS`: which HF tensors
become which mcore tensor, how they are packed, which dimension TP splits), the TP/PP/EP layout of the rank
files, and the Megatron args a checkpoint carries. Reading and writing the files is `checkpoint.mcore`.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qwen3_pretrain.config.model import LOAD_BALANCING_TYPES, ConfigError, Qwen3Config, Qwen3MoeConfig

TRACKER_FILE = "latest_checkpointed_iteration.txt"
MODEL_FILE = "model_optim_rng.pt"
HF_CONFIG_SUBDIR = "hf_config"  # config.json + tokenizer files kept next to a converted checkpoint
CHECKPOINT_VERSION = 3.0
CONVERTED_ITERATION = 1  # Megatron treats iteration 0 as "no checkpoint"; converters write 1


class McoreCheckpointError(ValueError):
    """An mcore checkpoint is missing, incomplete, unsupported or unsafe; the message names the file."""


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


def as_moe(c: Qwen3Config) -> Qwen3MoeConfig:
    """`c` as a Qwen3MoeConfig: expert tensors exist only in MoE models."""
    if not isinstance(c, Qwen3MoeConfig):
        raise TypeError(f"expert tensors need a Qwen3MoeConfig, got {type(c).__name__}")
    return c


def _router_rows(c: Qwen3Config) -> tuple[int, ...]:
    return (as_moe(c).num_experts, c.hidden_size)


def _expert_rows(c: Qwen3Config) -> tuple[int, ...]:
    return (as_moe(c).moe_intermediate_size, c.hidden_size)


def _expert_cols(c: Qwen3Config) -> tuple[int, ...]:
    return (c.hidden_size, as_moe(c).moe_intermediate_size)


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
HF_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")  # buffers in old HF files
MCORE_LAYER_KEY = re.compile(r"decoder\.layers\.(\d+)\.(.+)$")


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

