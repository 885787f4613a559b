"""Megatron/MindSpeed mixture-of-experts flags -> Qwen3-MoE config fields, and the expert-parallel layout rules.

Which layers are MoE: Megatron's `--moe-layer-freq N` makes layer i (0-based) MoE when i % N == 0, or takes a
list pattern ("([1]*3+[0]*1)*3", 1 = MoE); MindSpeed adds `--first-k-dense-replace K` (layers below K stay
dense) and writes `-1` for "every layer" in both. HF's rule ((i + 1) % decoder_sparse_step == 0, minus
`mlp_only_layers`) is a different one, so the flags are turned into decoder_sparse_step 1 and the list of dense
layers, which says exactly the same thing.

Router: HF's `norm_topk_prob` = Megatron's default top-k-then-softmax (`--moe-router-pre-softmax` off) or
MindSpeed's `--norm-topk-prob` renormalisation; `--moe-router-pre-softmax` alone = norm_topk_prob False.
MindSpeed's `softmax_topk` load-balancing type (softmax, top-k, no balancing loss) is "none" here.
"""

from __future__ import annotations

import ast
from typing import Any

from qwen3_pretrain.config.model import LOAD_BALANCING_TYPES, ConfigError

MOE_DISPATCHERS = ("allgather", "alltoall", "alltoall_seq")
BALANCING_TYPES = (*LOAD_BALANCING_TYPES, "softmax_topk")
EP_FLAG = "--expert-model-parallel-size"
ETP_FLAG = "--expert-tensor-parallel-size"
# Megatron's defaults for a MoE model built from flags alone (TransformerConfig / arguments.py).
MEGATRON_TOPK = 2
MEGATRON_AUX_LOSS_COEFF = 0.0


def balancing_mode(load_balancing_type: str) -> str:
    """The model's load-balancing mode for a `--moe-router-load-balancing-type` value."""
    return "none" if load_balancing_type == "softmax_topk" else load_balancing_type


def parse_layer_freq(text: str) -> int | list[int]:
    """`--moe-layer-freq`: an integer, or a Python list expression of 0/1 built from lists, + and * only."""
    try:
        return int(text)
    except ValueError:
        pass

    def value(node: ast.AST) -> Any:
        if isinstance(node, ast.List):
            return [value(item) for item in node.elts]
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(node)

    try:
        pattern = value(ast.parse(text, mode="eval").body)
    except (SyntaxError, ValueError, TypeError):
        pattern = None
    if not isinstance(pattern, list) or any(v not in (0, 1) for v in pattern):
        raise ConfigError(
            f"--moe-layer-freq {text!r}: give an integer N (every N-th layer is MoE) or a list of 0/1 such as "
            "\"([1]*3+[0]*1)*3\""
        )
    return pattern


def dense_layers(num_layers: int, layer_freq: str | None, first_k_dense: int | None) -> list[int]:
    """The layers (0-based) that keep a dense MLP under Megatron's --moe-layer-freq and MindSpeed's
    --first-k-dense-replace (both default to every layer MoE)."""
    freq = parse_layer_freq(layer_freq) if layer_freq is not None else 1
    if isinstance(freq, list):
        if len(freq) != num_layers:
            raise ConfigError(f"--moe-layer-freq lists {len(freq)} layers but the model has {num_layers}")
        moe = [bool(v) for v in freq]
    elif freq == 0:
        raise ConfigError("--moe-layer-freq 0: give N >= 1 (every N-th layer is MoE) or -1 (every layer)")
    else:
        moe = [i % freq == 0 for i in range(num_layers)]
    first = first_k_dense or 0
    if first >= num_layers:
        raise ConfigError(f"--first-k-dense-replace {first} leaves no MoE layer in {num_layers} layers")
    return [i for i, is_moe in enumerate(moe) if not is_moe or i < first]


def check_expert_parallel(num_experts: int, ep: int, dp: int, etp: int | None, cp: int = 1) -> None:
    """EP ranks are data-parallel ranks: EP must divide the experts and the DP size; experts are never TP-split."""
    if etp not in (None, 1):
        raise ConfigError(
            f"{ETP_FLAG} {etp}: experts are not tensor-parallel here (each EP rank runs whole experts; TP splits "
            f"attention and the dense MLPs); use {ETP_FLAG} 1 or drop it"
        )
    if ep == 1:
        return
    if num_experts <= 0:
        raise ConfigError(f"{EP_FLAG} {ep} needs a MoE model (--num-experts or a Qwen3-MoE --model)")
    if num_experts % ep:
        raise ConfigError(f"{EP_FLAG} {ep} does not divide the {num_experts} experts; pick a divisor of --num-experts")
    if cp > 1:
        raise ConfigError(f"{EP_FLAG} {ep} with --context-parallel-size {cp} is not implemented; use one of them")
    if dp % ep:
        raise ConfigError(
            f"{EP_FLAG} {ep} does not divide the data-parallel size {dp} (EP ranks are DP ranks: world size / "
            "(TP x PP x CP)); change the number of processes or the EP size"
        )


def check_moe_context_parallel(load_balancing: str, aux_loss_coef: float, cp: int) -> None:
    """A load-balancing loss under context parallelism would see each rank's share of the sequence only (Megatron
    sums the expert loads over the CP ranks first, which the MoE layer does not do yet): refused."""
    if cp > 1 and load_balancing != "none" and aux_loss_coef > 0:
        raise ConfigError(
            f"--context-parallel-size {cp} with --moe-router-load-balancing-type {load_balancing}: the "
            "load-balancing loss over a split sequence is not implemented; use --context-parallel-size 1, or "
            "--moe-router-load-balancing-type none (or --moe-aux-loss-coeff 0)"
        )
