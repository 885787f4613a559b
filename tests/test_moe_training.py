"""Training Qwen3-MoE: the MoE flags -> model config (Megatron's and MindSpeed's meanings), a tiny MoE run equal to
a hand-built loop (our model, hand-written Switch loss, torch AdamW) in losses, load-balancing loss and expert loads,
and the planner's MoE memory and all-to-all volume."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_train_loop import reference_lr

from qwen3_pretrain.config import ConfigError, Qwen3MoeConfig, TrainConfig, get_preset, parse_train_args
from qwen3_pretrain.data.gpt_dataset import build_gpt_datasets
from qwen3_pretrain.distributed.planner import (
    Layout,
    all_to_all_bytes,
    estimate_memory,
    format_table,
    plan,
    validate_layout,
)
from qwen3_pretrain.model import Qwen3ForCausalLM, moe_layers, set_aux_loss_scale
from qwen3_pretrain.train.trainer import TrainResult, run_training

from train_helpers import BETAS, CLIP, EOD, EPS, GBS, ITERS, LR, MBS, SEQ, WD, tiny_flags, write_tiny_dataset

pytestmark = pytest.mark.usefixtures("one_thread")
DATA = "/nonexistent/prefix"  # resolve() runs the pure checks only
COEF = 0.1  # large enough that a wrongly scaled load-balancing gradient changes the losses


def resolved_model(world_size: int = 1, base: str | None = "qwen3-moe-tiny", **flags: Any) -> Any:
    config = parse_train_args(tiny_flags(DATA, model=base, **flags), world_size=world_size)
    preset = get_preset(base) if base is not None else None
    return config.resolve(world_size, preset, None, None).model_config


def test_megatron_flags_make_a_dense_shape_moe_with_megatron_defaults() -> None:
    cfg = resolved_model(base="qwen3-tiny", num_experts=8, moe_ffn_hidden_size=32)
    assert isinstance(cfg, Qwen3MoeConfig)
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (8, 2, 32)
    assert cfg.norm_topk_prob and cfg.router_aux_loss_coef == 0.0 and cfg.mlp_only_layers == []
    assert resolved_model(base="qwen3-tiny", num_experts=4).moe_intermediate_size == cfg.intermediate_size
    flags_only = resolved_model(base=None, num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                                padded_vocab_size=512, num_experts=8, moe_router_topk=4)
    assert isinstance(flags_only, Qwen3MoeConfig) and flags_only.num_experts_per_tok == 4
    assert type(resolved_model(base="qwen3-tiny")).__name__ == "Qwen3Config"


def test_given_flags_override_a_moe_preset() -> None:
    preset = get_preset("qwen3-moe-tiny")
    assert resolved_model() == resolved_model(moe_token_dispatcher_type="alltoall") != preset  # dtype only differs
    cfg = resolved_model(moe_router_topk=3, moe_aux_loss_coeff=0.01, moe_router_load_balancing_type="seq_aux_loss")
    assert (cfg.num_experts_per_tok, cfg.router_aux_loss_coef, cfg.moe_router_load_balancing_type) == (
        3, 0.01, "seq_aux_loss")
    assert cfg.mlp_only_layers == preset.mlp_only_layers == [1]  # no layer flag: the preset's pattern
    assert resolved_model(moe_router_load_balancing_type="softmax_topk").moe_router_load_balancing_type == "none"


@pytest.mark.parametrize(
    ("flags", "norm"),
    [({}, True), ({"moe_router_pre_softmax": True}, False), ({"moe_router_pre_softmax": True, "norm_topk_prob": True},
                                                             True)],
)
def test_router_normalisation_flags(flags: dict[str, Any], norm: bool) -> None:
    assert resolved_model(**flags).norm_topk_prob is norm
    assert resolved_model(base="qwen3-tiny", num_experts=4, **flags).norm_topk_prob is norm


@pytest.mark.parametrize(
    ("flags", "dense"),
    [
        ({"moe_layer_freq": "1"}, []),
        ({"moe_layer_freq": "-1", "first_k_dense_replace": "-1"}, []),  # MindSpeed's 30B-A3B script
        ({"moe_layer_freq": "2"}, [1]),  # Megatron: layers i % 2 == 0 are MoE
        ({"moe_layer_freq": "[0]+[1]*2"}, [0]),
        ({"first_k_dense_replace": "1"}, [0]),
        ({"first_k_dense_replace": "1", "moe_layer_freq": "2"}, [0, 1]),
    ],
)
def test_moe_layer_pattern_flags(flags: dict[str, Any], dense: list[int]) -> None:
    cfg = resolved_model(**flags)
    assert cfg.mlp_only_layers == dense and cfg.decoder_sparse_step == 1
    assert [i for i in range(3) if not cfg.is_moe_layer(i)] == dense


@pytest.mark.parametrize(
    ("world_size", "flags", "message"),
    [
        (1, {"moe_layer_freq": "[1]*2"}, r"--moe-layer-freq lists 2 layers but the model has 3"),
        (1, {"moe_layer_freq": "__import__('os')"}, r"--moe-layer-freq .*: give an integer N"),
        (1, {"first_k_dense_replace": "3"}, r"--first-k-dense-replace 3 leaves no MoE layer"),
        (2, {"expert_model_parallel_size": "3"}, r"--expert-model-parallel-size 3 does not divide the 8 experts"),
        (2, {"expert_model_parallel_size": "4"}, r"does not divide the 8 experts|does not divide the data-parallel"),
        (2, {"expert_model_parallel_size": "2", "tensor_model_parallel_size": "2"},
         r"does not divide the data-parallel size 1"),
        (1, {"expert_tensor_parallel_size": "2"}, r"--expert-tensor-parallel-size 2: experts are not tensor-parallel"),
        (2, {"model": "qwen3-tiny", "expert_model_parallel_size": "2"}, r"needs a MoE model"),
        (2, {"context_parallel_size": "2"}, r"--context-parallel-size 2 with --moe-router-load-balancing-type aux"),
    ],
)
def test_moe_flag_errors_name_the_flag(world_size: int, flags: dict[str, Any], message: str) -> None:
    base = flags.pop("model", "qwen3-moe-tiny")
    with pytest.raises(ConfigError, match=message):
        resolved_model(world_size, base, **flags)


def test_moe_flags_on_a_dense_model_are_noted_without_effect() -> None:
    """As in Megatron without --num-experts (MindSpeed's dense Qwen3 scripts pass --norm-topk-prob)."""
    config = parse_train_args(tiny_flags(DATA, model="qwen3-tiny", norm_topk_prob=True, moe_router_topk=2),
                              world_size=1)
    resolved = config.resolve(1, get_preset("qwen3-tiny"), None, None)
    assert type(resolved.model_config).__name__ == "Qwen3Config"
    assert "--moe-router-topk --norm-topk-prob (the model has no experts)" in resolved.notes


def test_expert_parallel_layouts_that_resolve() -> None:
    assert resolved_model(2, expert_model_parallel_size=2).num_experts == 8
    assert resolved_model(4, expert_model_parallel_size=2, expert_tensor_parallel_size=1).num_experts == 8
    assert resolved_model(2, context_parallel_size=2, moe_router_load_balancing_type="none").num_experts == 8
    config = parse_train_args(tiny_flags(DATA, model="qwen3-moe-tiny", model_type_hf="qwen3-moe"), world_size=1)
    assert config.checkpoint.model_type_hf == "qwen3-moe"


# ---- a tiny MoE run against a hand-built loop ------------------------------------------------------------------


def switch_loss(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Megatron's per-layer aux_loss, written out: E * sum_e (share of the k T assignments to e) * (mean prob of e)."""
    num_experts = probs.shape[1]
    share = torch.stack([(experts == e).sum() for e in range(num_experts)]).float() / experts.numel()  # [E]
    return num_experts * (share * probs.mean(dim=0)).sum()


def reference_run(config: TrainConfig) -> tuple[list[float], list[float], list[list[float]]]:
    """Our model with its own loss hook off (scale 0), the Switch loss added by hand as the mean over micro batches:
    per iteration the LM loss, the load-balancing loss (mean over layers and micro batches) and, per MoE layer,
    the tokens each expert got over the global batch."""
    torch.manual_seed(config.training.seed)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config.require_resolved().model_config)
    model.to_empty(device="cpu")
    model.init_weights()
    set_aux_loss_scale(model, 0.0)
    routings: list[Any] = []
    for layer in moe_layers(model).values():
        layer.gate.register_forward_hook(lambda _m, _a, routing: routings.append(routing))
    matrices = [p for p in model.parameters() if p.ndim > 1]
    vectors = [p for p in model.parameters() if p.ndim == 1]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": WD}, {"params": vectors, "weight_decay": 0.0}],
                                  lr=LR, betas=BETAS, eps=EPS)
    data = config.data
    train, _, _ = build_gpt_datasets(data.data_path, data.split, SEQ, config.training.seed, (ITERS * GBS, GBS, GBS),
                                     cache_dir=data.data_cache_path, eod_token_id=EOD, eod_mask_loss=True)
    micro_batches = GBS // MBS
    losses, balancing, loads = [], [], []
    for k in range(ITERS):
        samples = [train[i] for i in range(k * GBS, (k + 1) * GBS)]
        mask = torch.stack([s["loss_mask"] for s in samples])  # [GBS, SEQ]
        total, lm, aux_values = torch.zeros(()), 0.0, []
        step_loads = torch.zeros(len(moe_layers(model)), 8)
        for j in range(micro_batches):
            part = samples[j * MBS:(j + 1) * MBS]
            tokens = torch.stack([s["tokens"] for s in part])  # [MBS, SEQ]
            labels = torch.stack([s["labels"] for s in part]).masked_fill(
                torch.stack([s["loss_mask"] for s in part]) == 0, -100)  # [MBS, SEQ]
            routings.clear()
            logits = model(tokens).logits  # [MBS, SEQ, vocab]
            lm_part = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / mask.sum()
            layer_losses = [switch_loss(r.probs, r.experts) for r in routings]
            total = total + lm_part + COEF * torch.stack(layer_losses).sum() / micro_batches
            lm += lm_part.item()
            aux_values += [x.item() for x in layer_losses]
            for row, r in enumerate(routings):
                step_loads[row] += torch.bincount(r.experts.flatten(), minlength=8).float()
        losses.append(lm)
        balancing.append(sum(aux_values) / len(aux_values))
        loads.append(step_loads.max(dim=1).values.tolist())
        for group in optimizer.param_groups:
            group["lr"] = reference_lr(k)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad()
    return losses, balancing, loads


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainConfig, TrainResult, str, Path]:
    root = tmp_path_factory.mktemp("moe")
    dataset = write_tiny_dataset(root / "tiny_text_document")
    config = parse_train_args(tiny_flags(dataset, model="qwen3-moe-tiny", moe_aux_loss_coeff=COEF, log_interval=1,
                                         run_dir=root / "run"))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        result = run_training(config)
    return config, result, stdout.getvalue(), root / "run"


def test_moe_run_equals_the_hand_built_loop(moe_run: tuple[TrainConfig, TrainResult, str, Path]) -> None:
    config, result, stdout, run_dir = moe_run
    losses, balancing, loads = reference_run(config)
    assert result.losses == pytest.approx(losses, rel=1e-5) and not any(result.skipped)
    assert result.losses[-1] < result.losses[0]
    logged = [float(v) for v in re.findall(r" lm loss: \S+ \| load_balancing_loss: (\S+) \| loss scale:", stdout)]
    assert logged == pytest.approx(balancing, rel=1e-5)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    router = [r for r in records if "tokens_per_expert_max" in r]
    assert [r["iteration"] for r in router] == list(range(1, ITERS + 1))
    assert all(r["moe_layers"] == [0, 2] for r in router)  # qwen3-moe-tiny: layer 1 is dense
    assert [r["tokens_per_expert_max"] for r in router] == loads
    assert all(r["tokens_per_expert_mean"] == [GBS * SEQ * 2 / 8] * 2 for r in router)  # k T assignments over E
    lines = [r for r in records if "lm_loss" in r]
    assert [r["load_balancing_loss"] for r in lines] == pytest.approx(balancing, rel=1e-6)


# ---- the planner's MoE model --------------------------------------------------------------------------------------


def test_planner_counts_experts_per_ep_rank_and_the_all_to_all() -> None:
    cfg = get_preset("qwen3-30b-a3b")
    assert isinstance(cfg, Qwen3MoeConfig)
    total, active = cfg.num_parameters(), cfg.num_parameters(active=True)
    assert cfg.flops_per_token(4096) < 6 * total / 5  # MFU counts the active parameters (about 3B of 30B)
    one, two = (estimate_memory(cfg, Layout(1, 1, 16, 1, ep=ep), 4096) for ep in (1, 2))
    assert one.optimizer == two.optimizer == pytest.approx(8 * total / 16)  # FSDP shards experts over dp / ep
    experts = sum(cfg.mlp_parameters(i) - cfg.hidden_size * cfg.num_experts for i in range(cfg.num_hidden_layers))
    replicated = [estimate_memory(cfg, Layout(1, 1, 16, 1, ep=ep, shard=False), 4096) for ep in (1, 4)]
    assert replicated[0].optimizer - replicated[1].optimizer == pytest.approx(8 * experts * 3 / 4)
    block_experts = experts / cfg.num_hidden_layers  # FSDP's two unsharded blocks hold 1/ep of their experts
    assert one.weights - two.weights == pytest.approx(2 * 2 * block_experts / 2)
    assert all_to_all_bytes(cfg, Layout(1, 1, 16, 1), 4096, 64) == 0
    tokens_out = 4 * (1 / 2) * 4096 * cfg.num_experts_per_tok * 2 * cfg.hidden_size  # per layer and micro batch
    assert all_to_all_bytes(cfg, Layout(1, 1, 16, 1, ep=2), 4096, 64) == pytest.approx(tokens_out * 48 * 4)
    assert validate_layout(cfg, Layout(1, 1, 16, 1, ep=3), 64) is not None
    rows = plan(cfg, 16, 64 * 2**30, 4096, 64, 280.0, 196.0)
    assert {row.layout.ep for row in rows} == {1, 2, 4, 8, 16} and active < total / 9
    assert all(row.layout.cp == 1 for row in rows)  # train refuses CP with a load-balancing loss
    assert " ep " in format_table(rows, 3).splitlines()[0]
