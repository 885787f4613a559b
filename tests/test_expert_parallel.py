"""Expert parallelism trains like one process: per-iteration loss and gradient norm of EP 2 (FSDP2 and --no-shard),
EP 2 x DP 2, EP 2 x TP 2 (with and without sequence parallel), EP 2 x PP 2, and of a MoE model under TP 2 or (without a
load-balancing loss) CP 2 on gloo equal a single process within 1e-5 (fp32, a 4-layer qwen3-moe-tiny with one dense
layer, 8 experts top-2, loss tokens masked at document ends); the logged expert loads are the global batch's; an EP 2
checkpoint resumes in one process. "global_aux_loss" sums the expert loads over the DP ranks and counts each micro
batch once under activation recompute."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qwen3_pretrain.config import get_preset, parse_train_args
from qwen3_pretrain.distributed.expert_parallel import GlobalExpertLoad, install_global_expert_load
from qwen3_pretrain.model.kernels import KernelOptions
from qwen3_pretrain.model.moe import MoEMLP
from qwen3_pretrain.train.trainer import TrainResult, run_training

from distributed_helpers import free_port, join_gloo_group, leave_gloo_group
from train_helpers import tiny_flags, write_tiny_dataset

pytestmark = pytest.mark.usefixtures("one_thread")
ITERS, SAVE_AT = 4, 2
EP2 = {"expert_model_parallel_size": 2}
GLOBAL = {"moe_router_load_balancing_type": "global_aux_loss"}
NO_LOSS = {"moe_router_load_balancing_type": "none"}
CASES: dict[int, dict[str, dict[str, Any]]] = {
    2: {
        "EP 2": EP2,  # also saves a checkpoint at SAVE_AT, resumed by one process
        "EP 2, replicated (--no-shard)": {**EP2, "no_shard": True},
        "TP 2, whole experts on every rank": {"tensor_model_parallel_size": 2},
        "CP 2, no load-balancing loss": {**NO_LOSS, "context_parallel_size": 2},
        "EP 2, global aux loss": {**EP2, **GLOBAL},
        "EP 2, global aux loss, recompute": {**EP2, **GLOBAL, "recompute_granularity": "full"},
    },
    4: {
        "EP 2 x DP 2": EP2,
        "EP 2 x TP 2": {**EP2, "tensor_model_parallel_size": 2},
        "EP 2 x TP 2, sequence parallel": {**EP2, "tensor_model_parallel_size": 2, "sequence_parallel": True},
        "EP 2 x PP 2": {**EP2, "pipeline_model_parallel_size": 2},
    },
}


def _flags(data: str, **overrides: Any) -> list[str]:
    return tiny_flags(data, model="qwen3-moe-tiny", num_layers=4, moe_aux_loss_coeff=0.1, train_iters=ITERS,
                      log_interval=1, **overrides)


def _summary(result: TrainResult) -> dict[str, Any]:
    return {"iterations": result.iterations, "losses": result.losses, "grad_norms": result.grad_norms}


def _worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    join_gloo_group(rank, world, port)
    extra = {"EP 2": {"save": str(Path(out).parent / "ckpt"), "save_interval": SAVE_AT},
             "EP 2 x TP 2": {"run_dir": str(Path(out).parent / "ep_tp_run")}}
    results = {name: _summary(run_training(parse_train_args(_flags(data, **flags, **extra.get(name, {})),
                                                            world_size=world)))
               for name, flags in CASES[world].items()}
    if world == 2:
        hook = GlobalExpertLoad(dist.group.WORLD)
        first = hook(torch.tensor([1.0, 2.0 + rank]))  # summed over the 2 ranks
        second = hook(torch.tensor([3.0, 0.0]))  # the running mean over micro batches: ([2, 5] + [6, 0]) / 2
        results["hook"] = {"values": [first.tolist(), second.tolist()]}
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    leave_gloo_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("ep")
    data = write_tiny_dataset(root / "tiny_text_document")
    results = {"one process": _summary(run_training(parse_train_args(_flags(data, run_dir=root / "one_run")))),
               "one process, no load-balancing loss": _summary(run_training(parse_train_args(_flags(data, **NO_LOSS))))}
    for world in CASES:
        out = root / f"world{world}.json"
        mp.spawn(_worker, args=(world, free_port(), data, str(out)), nprocs=world, join=True)
        results.update(json.loads(out.read_text()))
    for name, run in (("loads, one process", "one_run"), ("loads, EP 2 x TP 2", "ep_tp_run")):
        records = [json.loads(line) for line in (root / run / "metrics.jsonl").read_text().splitlines()]
        results[name] = [r for r in records if "tokens_per_expert_max" in r]
    resumed = _flags(data, load=root / "ckpt" / f"iter_{SAVE_AT:07d}")
    results["EP 2 -> one process"] = _summary(run_training(parse_train_args(resumed)))
    return results


def _assert_close(ours: list[float], reference: list[float], what: str) -> None:
    assert len(ours) == len(reference) > 0, what
    for i, (a, b) in enumerate(zip(ours, reference, strict=True)):
        assert abs(a - b) <= 1e-5 * abs(b), f"{what}, value {i + 1}: {a} vs reference {b}"


@pytest.mark.parametrize("name", ["EP 2", "EP 2, replicated (--no-shard)", "TP 2, whole experts on every rank",
                                  "EP 2 x DP 2", "EP 2 x TP 2", "EP 2 x TP 2, sequence parallel", "EP 2 x PP 2"])
def test_expert_parallel_layout_equals_one_process(runs: dict[str, Any], name: str) -> None:
    ours, reference = runs[name], runs["one process"]
    assert ours["iterations"] == list(range(1, ITERS + 1))
    for key in ("losses", "grad_norms"):
        _assert_close(ours[key], reference[key], f"{name}: {key}")


def test_moe_context_parallel_equals_one_process(runs: dict[str, Any]) -> None:
    ours, reference = runs["CP 2, no load-balancing loss"], runs["one process, no load-balancing loss"]
    for key in ("losses", "grad_norms"):
        _assert_close(ours[key], reference[key], f"CP 2: {key}")


def test_expert_loads_are_those_of_the_global_batch(runs: dict[str, Any]) -> None:
    """Per-layer tokens per expert summed over the ranks (TP ranks, which route the same tokens, counted once)."""
    ours, reference = runs["loads, EP 2 x TP 2"], runs["loads, one process"]
    assert [r["iteration"] for r in ours] == list(range(1, ITERS + 1))
    assert all(r["moe_layers"] == [0, 2, 3] for r in ours)
    assert all(r["tokens_per_expert_mean"] == [8 * 32 * 2 / 8] * 3 for r in ours)  # GBS x SEQ x top-k / experts
    assert [r["tokens_per_expert_max"] for r in ours] == [r["tokens_per_expert_max"] for r in reference]
    _assert_close([r["load_balancing_loss"] for r in ours], [r["load_balancing_loss"] for r in reference], "aux")


def test_expert_parallel_checkpoint_resumes_in_one_process(runs: dict[str, Any]) -> None:
    ours, reference = runs["EP 2 -> one process"], runs["one process"]
    assert ours["iterations"] == list(range(SAVE_AT + 1, ITERS + 1))
    for key in ("losses", "grad_norms"):
        _assert_close(ours[key], reference[key][SAVE_AT:], f"resumed: {key}")


def test_global_aux_loss_counts_each_micro_batch_once(runs: dict[str, Any]) -> None:
    plain, recomputed = runs["EP 2, global aux loss"], runs["EP 2, global aux loss, recompute"]
    for key in ("losses", "grad_norms"):
        _assert_close(recomputed[key], plain[key], f"recompute: {key}")
    assert plain["grad_norms"] != runs["EP 2"]["grad_norms"]  # the mode changes the gradients
    assert runs["hook"]["values"] == [[2.0, 5.0], [4.0, 2.5]]


def _router_grad(recompute: bool) -> torch.Tensor:
    """The router gradient of two micro batches (both forwards, then both backwards in the same order, as the
    pipeline schedules run them) of a "global_aux_loss" MoE MLP, its forwards optionally recomputed in backward."""
    config = get_preset("qwen3-moe-tiny")
    config.moe_router_load_balancing_type, config.router_aux_loss_coef = "global_aux_loss", 1.0
    torch.manual_seed(0)
    mlp = MoEMLP(config, KernelOptions())
    (hook,) = install_global_expert_load(mlp, None)
    inputs = [torch.randn(2, 8, config.hidden_size) * scale for scale in (1.0, 5.0)]  # [b, s, hidden] each
    run = (lambda x: torch.utils.checkpoint.checkpoint(mlp, x, use_reentrant=False)) if recompute else mlp
    outputs = [run(x) for x in inputs]
    for out in outputs:
        out.sum().backward()
    assert hook.micro_batches == 2
    return mlp.gate.weight.grad


def test_global_expert_load_replays_under_recompute() -> None:
    torch.testing.assert_close(_router_grad(recompute=True), _router_grad(recompute=False), rtol=0, atol=0)
