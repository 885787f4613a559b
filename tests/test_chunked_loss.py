"""The chunked fused LM head + cross entropy (model/loss.py) against the plain logits path: loss and gradients,
ignored labels, tied/untied heads, fp32/bf16/autocast, logits never materialised whole, and under FSDP2 and
tensor parallelism (two gloo processes)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qwen3_pretrain.model import Qwen3Config, Qwen3ForCausalLM, causal_lm_loss, chunked_lm_head_loss

from distributed_helpers import exit_after

VOCAB, HIDDEN = 128, 32
BATCH, SEQ, CHUNK = 2, 13, 8  # 26 tokens: three full chunks and a partial one
WORLD = 2


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(tied: bool) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, rope_theta=10_000.0,
        tie_word_embeddings=tied, torch_dtype="float32", bos_token_id=0, eos_token_id=1,
    )


def _model(tied: bool, dtype: torch.dtype = torch.float32) -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(_config(tied))
    model.init_weights(std=0.2)  # large weights: a peaked softmax, so wrong gradients show
    model.loss_chunk_tokens = CHUNK
    return model.to(dtype)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    labels[0, 2:7] = -100  # ignored, across a chunk boundary
    labels[1, -1] = -100
    return ids, labels


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


def _loss_and_grads(
    model: Qwen3ForCausalLM, loss_only: bool, fused: bool, reduction: str = "mean"
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward/backward with `return_logits=not loss_only`; asserts whether the fused path (no lm_head call) ran."""
    model.zero_grad(set_to_none=True)
    head_calls: list[int] = []
    hook = model.lm_head.register_forward_hook(lambda *_: head_calls.append(1))
    ids, labels = _batch()
    out = model(ids, labels, return_logits=not loss_only, loss_reduction=reduction)
    out.loss.backward()
    hook.remove()
    assert (out.logits is None) == loss_only and len(head_calls) == (0 if fused else 1)
    return out.loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


# ---- the function alone -----------------------------------------------------------------------------


def _inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(BATCH, SEQ, HIDDEN, generator=generator).to(dtype).requires_grad_()
    weight = (0.5 * torch.randn(VOCAB, HIDDEN, generator=generator)).to(dtype).requires_grad_()
    return hidden, weight, _batch()[1]


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _grads(loss_fn: LossFn, dtype: torch.dtype) -> list[torch.Tensor]:
    hidden, weight, labels = _inputs(dtype)
    loss = loss_fn(hidden, weight, labels)
    (loss * 2.5).backward()  # an incoming gradient other than 1, as under loss scaling or a 1/tokens factor
    return [loss.detach(), hidden.grad, weight.grad]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk", [1, 5, CHUNK, 1000])
def test_function_equals_plain_cross_entropy_fp32(reduction: str, chunk: int) -> None:
    plain = _grads(lambda h, w, y: causal_lm_loss(h @ w.T, y, reduction), torch.float32)
    fused = _grads(lambda h, w, y: chunked_lm_head_loss(h, w, y, chunk, reduction), torch.float32)
    for what, got, expected in zip(("loss", "hidden grad", "weight grad"), fused, plain, strict=True):
        assert got.dtype == expected.dtype and _rel(got, expected) <= 1e-6, what


@pytest.mark.usefixtures("cpu_bf16_kernels")
def test_function_equals_plain_cross_entropy_bf16_and_autocast() -> None:
    exact = _grads(lambda h, w, y: causal_lm_loss(h.double() @ w.double().T, y), torch.float32)
    plain = _grads(lambda h, w, y: causal_lm_loss(h @ w.T, y), torch.bfloat16)
    fused = _grads(lambda h, w, y: chunked_lm_head_loss(h, w, y, CHUNK), torch.bfloat16)
    for got, expected, truth in zip(fused, plain, exact, strict=True):
        assert got.dtype == expected.dtype
        assert _rel(got, expected) <= 2e-2 and _rel(got, truth) <= 2e-2  # bf16 rounding of inputs and logits

    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 tensors, bf16 matmuls, as nn.Linear under autocast
        plain = _grads(lambda h, w, y: causal_lm_loss(torch.nn.functional.linear(h, w), y), torch.float32)
        fused = _grads(lambda h, w, y: chunked_lm_head_loss(h, w, y, CHUNK), torch.float32)
    for got, expected, truth in zip(fused, plain, exact, strict=True):
        assert got.dtype == expected.dtype == torch.float32
        assert _rel(got, expected) <= 2e-2 and _rel(got, truth) <= 2e-2
    assert _rel(fused[2], exact[2]) > 1e-6  # the matmuls really ran in bf16


def test_function_never_holds_the_whole_logits() -> None:
    class LargestOutput(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.numel = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            for tensor in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(tensor, torch.Tensor):
                    self.numel = max(self.numel, tensor.numel())
            return out

    hidden = torch.randn(16, 64, HIDDEN, requires_grad=True)  # 1024 tokens
    weight = torch.randn(VOCAB, HIDDEN, requires_grad=True)
    labels = torch.randint(0, VOCAB, (16, 64))
    with LargestOutput() as largest:
        chunked_lm_head_loss(hidden, weight, labels, chunk_tokens=64).backward()
    assert largest.numel == max(64 * VOCAB, hidden.numel())  # one chunk's logits, or the hidden-state gradient
    with LargestOutput() as plain:
        causal_lm_loss(hidden @ weight.T, labels).backward()
    assert plain.numel == 1024 * VOCAB


def test_all_labels_ignored() -> None:
    hidden, weight, labels = _inputs(torch.float32)
    labels = torch.full_like(labels, -100)
    summed = chunked_lm_head_loss(hidden, weight, labels, CHUNK, "sum")
    summed.backward()
    assert summed.item() == 0.0 and not hidden.grad.any() and not weight.grad.any()
    assert chunked_lm_head_loss(hidden, weight, labels, CHUNK).isnan()  # mean over nothing, like F.cross_entropy
    assert causal_lm_loss(hidden @ weight.T, labels).isnan()


def test_no_grad_gives_the_loss_alone() -> None:
    hidden, weight, labels = _inputs(torch.float32)
    with torch.no_grad():
        loss = chunked_lm_head_loss(hidden, weight, labels, CHUNK)
        expected = causal_lm_loss(hidden @ weight.T, labels)
    assert not loss.requires_grad and _rel(loss, expected) <= 1e-6


def test_bad_arguments_are_refused() -> None:
    hidden, weight, labels = _inputs(torch.float32)
    with pytest.raises(ValueError, match="chunk_tokens must be a positive integer, got 0"):
        chunked_lm_head_loss(hidden, weight, labels, 0)
    with pytest.raises(ValueError, match="loss reduction 'max' is not supported; use one of mean, sum"):
        chunked_lm_head_loss(hidden, weight, labels, CHUNK, "max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"labels of shape \(2, 12\) do not match hidden states \(2, 13, 32\)"):
        chunked_lm_head_loss(hidden, weight, labels[:, 1:], CHUNK)
    loss = chunked_lm_head_loss(hidden, weight, labels, CHUNK)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward through the chunked LM-head loss"):
        loss.backward()


# ---- through the model -------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_model_loss_only_forward_equals_logits_path_fp32(tied: bool, reduction: str) -> None:
    model = _model(tied)
    expected_loss, expected = _loss_and_grads(model, loss_only=False, fused=False, reduction=reduction)
    loss, grads = _loss_and_grads(model, loss_only=True, fused=True, reduction=reduction)
    assert _rel(loss, expected_loss) <= 1e-6
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        # 2e-6: float32 summation order alone gives up to 1.06e-6 (a k_norm weight, AMD EPYC AVX2, torch 2.13)
        assert _rel(grad, expected[name]) <= 2e-6, name


@pytest.mark.usefixtures("cpu_bf16_kernels")
@pytest.mark.parametrize("tied", [True, False])
def test_model_loss_only_forward_equals_logits_path_bf16(tied: bool) -> None:
    model = _model(tied, torch.bfloat16)
    expected_loss, expected = _loss_and_grads(model, loss_only=False, fused=False)
    loss, grads = _loss_and_grads(model, loss_only=True, fused=True)
    assert _rel(loss, expected_loss) <= 1e-2
    for name, grad in grads.items():
        assert grad.dtype == torch.bfloat16 and _rel(grad, expected[name]) <= 2e-2, name


def test_model_paths_selection() -> None:
    model = _model(tied=True)
    ids, labels = _batch()
    with torch.no_grad():
        both = model(ids, labels)  # default: logits and loss
        assert both.logits.shape == (BATCH, SEQ, VOCAB)
        assert model(ids).loss is None
        model.loss_chunk_tokens = None  # the plain path, still without returning logits
        plain = model(ids, labels, return_logits=False)
    assert plain.logits is None and torch.equal(plain.loss, both.loss)
    with pytest.raises(ValueError, match=r"return_logits=False\) needs labels"):
        model(ids, return_logits=False)


# ---- FSDP2 and tensor parallel (two gloo processes) ----------------------------------------------------

CASES = {"fsdp-tied": ("fsdp", True), "fsdp-untied": ("fsdp", False), "tp-tied": ("tp", True)}


def _worker(out_dir: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from qwen3_pretrain.distributed.tensor_parallel import apply_tensor_parallel, vocab_parallel_loss

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (WORLD,))
    for name, (kind, tied) in CASES.items():
        model = _model(tied)
        if kind == "fsdp":
            for block in model.model.layers.values():
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)  # every rank sees the same batch: averaged gradients = one process
        else:
            apply_tensor_parallel(model, mesh, loss_parallel=True)  # DTensor head: the forward falls back to logits
        with vocab_parallel_loss(kind == "tp"):
            loss, grads = _loss_and_grads(model, loss_only=True, fused=kind == "fsdp")
        grads = {n: g.full_tensor() if isinstance(g, DTensor) else g for n, g in grads.items()}
        if dist.get_rank() == 0:
            loss = loss.full_tensor() if isinstance(loss, DTensor) else loss
            torch.save({"loss": loss, "grads": grads}, out_dir / f"{name}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("chunked-loss")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}"]
    command = [*launcher, __file__, str(out_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QWEN3_PRETRAIN_DEVICE": "cpu"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return out_dir


@pytest.mark.parametrize("name", list(CASES))
def test_fsdp2_and_tensor_parallel_match_one_process(distributed_results: Path, name: str) -> None:
    _, tied = CASES[name]
    expected_loss, expected = _loss_and_grads(_model(tied), loss_only=False, fused=False)
    result = torch.load(distributed_results / f"{name}.pt", weights_only=True)
    assert _rel(result["loss"], expected_loss) <= 1e-6
    assert result["grads"].keys() == expected.keys()
    for param, grad in expected.items():
        assert _rel(result["grads"][param], grad) <= 1e-5, f"{name}: {param}"


if __name__ == "__main__":
    exit_after(_worker, sys.argv[1])
