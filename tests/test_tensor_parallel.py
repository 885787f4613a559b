"""Tensor (+ sequence) parallelism on 2 gloo processes equals one process: losses, grad norms, every gradient.

One `torchrun` launch runs all cases (this file is the worker script); the parent compares each
rank-0 result with a single-process run of the same model and batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from qwen3_pretrain.config.layout import check_tensor_parallel
from qwen3_pretrain.config.model import Qwen3Config, get_preset
from qwen3_pretrain.distributed.clip import clip_grad_norm_
from qwen3_pretrain.distributed.recompute import apply_activation_checkpointing
from qwen3_pretrain.distributed.tensor_parallel import vocab_parallel_loss
from qwen3_pretrain.model.qwen3 import Qwen3ForCausalLM

from distributed_helpers import exit_after, run_as_torchrun

TP = 2
STEPS = 3
BATCH, SEQ = 2, 16


@dataclasses.dataclass(frozen=True)
class Case:
    tied: bool
    sequence_parallel: bool
    loss_parallel: bool
    recompute: str | None


CASES = {
    "tp": Case(tied=True, sequence_parallel=False, loss_parallel=True, recompute=None),
    "tp_sequence_parallel_selective_recompute": Case(
        tied=True, sequence_parallel=True, loss_parallel=True, recompute="selective"
    ),
    "tp_untied_gathered_logits_full_recompute": Case(
        tied=False, sequence_parallel=False, loss_parallel=False, recompute="full"
    ),
}


def _model(tied: bool) -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    return Qwen3ForCausalLM(dataclasses.replace(get_preset("qwen3-tiny"), tie_word_embeddings=tied))


def _batches(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab_size, (STEPS, BATCH, SEQ), generator=generator)
    labels = torch.randint(0, vocab_size, (STEPS, BATCH, SEQ), generator=generator)
    labels[:, 0, :5] = -100
    return input_ids, labels


def _full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _placements(tensor: torch.Tensor) -> str:
    return str(getattr(tensor, "placements", None))


def _train(model: Qwen3ForCausalLM, loss_context: Any) -> dict[str, Any]:
    """STEPS steps of SGD with gradient clipping; the losses, grad norms and first-step gradients."""
    input_ids, labels = _batches(model.config.vocab_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses, norms, grads, logits_shape, placements_differ = [], [], {}, [], []
    for step in range(STEPS):
        with loss_context():
            output = model(input_ids[step], labels=labels[step])
            output.loss.backward()
        losses.append(_full(output.loss).detach())
        if step == 0:
            grads = {name: _full(p.grad).clone() for name, p in model.named_parameters()}
            placements_differ = [name for name, p in model.named_parameters() if _placements(p.grad) != _placements(p)]
            local_logits = output.logits.to_local() if hasattr(output.logits, "to_local") else output.logits
            logits_shape = list(local_logits.shape)
        norms.append(clip_grad_norm_([model], max_norm=1.0))
        optimizer.step()
        optimizer.zero_grad()
    return {
        "losses": torch.stack(losses),
        "grad_norms": torch.stack(norms),
        "grads": grads,
        "logits_shape": logits_shape,
        "grad_placements_differ": placements_differ,
    }


# ---- worker (run by torchrun) ------------------------------------------------------------------


def _worker(out_dir: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from qwen3_pretrain.distributed.tensor_parallel import apply_tensor_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (TP,), mesh_dim_names=("tp",))
    for name, case in CASES.items():
        model = _model(case.tied)
        apply_tensor_parallel(model, mesh, sequence_parallel=case.sequence_parallel, loss_parallel=case.loss_parallel)
        if case.recompute is not None:
            apply_activation_checkpointing(model, case.recompute)  # type: ignore[arg-type]
        result = _train(model, functools.partial(vocab_parallel_loss, case.loss_parallel))
        result["all_params_dtensor"] = all(isinstance(p, DTensor) for p in model.parameters())
        result["head_is_embedding"] = model.lm_head.weight is model.model.embed_tokens.weight
        result["head_placements"] = str(model.lm_head.weight.placements)
        if dist.get_rank() == 0:
            torch.save(result, out_dir / f"{name}.pt")
    dist.barrier()
    dist.destroy_process_group()


# ---- tests -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("tensor-parallel")
    run_as_torchrun(__file__, TP, out_dir)
    return out_dir


@pytest.fixture(scope="module")
def references() -> dict[bool, dict[str, Any]]:
    return {tied: _train(_model(tied), contextlib.nullcontext) for tied in (True, False)}


def _assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-5) -> None:
    error = float((actual - expected).norm() / expected.norm())
    assert error <= rtol, f"{what}: relative error {error:.2e} > {rtol:.0e}"


@pytest.mark.parametrize("name", list(CASES))
def test_tensor_parallel_matches_single_process(
    tp_results: Path, references: dict[bool, dict[str, Any]], name: str
) -> None:
    case = CASES[name]
    result = torch.load(tp_results / f"{name}.pt", weights_only=True)
    expected = references[case.tied]

    assert result["grads"].keys() == expected["grads"].keys()
    for param, grad in expected["grads"].items():  # incl. q_norm/k_norm (shared by heads on both ranks) and embeddings
        _assert_close_relative(result["grads"][param], grad, f"{name}: gradient of {param}")
    torch.testing.assert_close(result["losses"], expected["losses"], rtol=1e-5, atol=0)
    torch.testing.assert_close(result["grad_norms"], expected["grad_norms"], rtol=1e-5, atol=0)
    assert bool((expected["grad_norms"] > 1.0).all())  # clipping was active in every step

    assert result["all_params_dtensor"]
    assert result["grad_placements_differ"] == []  # no Partial norm grads, no full-vocab embedding grad left behind
    assert result["head_is_embedding"] == case.tied
    assert result["head_placements"] == "(Shard(dim=0),)"  # vocab-parallel LM head (and embedding when tied)
    vocab = get_preset("qwen3-tiny").vocab_size
    assert result["logits_shape"] == [BATCH, SEQ, vocab // TP if case.loss_parallel else vocab]


@pytest.mark.parametrize(
    ("field", "tp_size", "message"),
    [
        ("num_attention_heads", 4, "--tensor-model-parallel-size 4 does not divide the model's num_attention_heads"),
        ("num_key_value_heads", 4, "--tensor-model-parallel-size 4 does not divide the model's num_key_value_heads"),
        ("vocab_size", 2, "--tensor-model-parallel-size 2 does not divide the model's vocab_size"),
    ],
)
def test_invalid_tensor_parallel_sizes_name_the_flag(field: str, tp_size: int, message: str) -> None:
    changes = {
        "num_attention_heads": {"num_attention_heads": 6, "num_key_value_heads": 6},
        "num_key_value_heads": {"num_attention_heads": 8, "num_key_value_heads": 2},
        "vocab_size": {"vocab_size": 511},
    }[field]
    config: Qwen3Config = dataclasses.replace(get_preset("qwen3-tiny"), **changes)
    with pytest.raises(ValueError, match=message):
        check_tensor_parallel(config, tp_size)


def test_invalid_sequence_parallel_length_and_size() -> None:
    config = get_preset("qwen3-tiny")
    with pytest.raises(ValueError, match=r"--sequence-parallel needs --seq-length \(15\) divisible"):
        check_tensor_parallel(config, 2, sequence_parallel=True, seq_length=15)
    with pytest.raises(ValueError, match="--tensor-model-parallel-size must be a positive integer"):
        check_tensor_parallel(config, 0)


if __name__ == "__main__":
    exit_after(_worker, sys.argv[1])
