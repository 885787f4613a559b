"""Context parallel attention (ring and Ulysses) equals one process, forward and backward, in fp32.

One launch of 4 gloo ranks runs CP 2 (two groups of 2) and CP 4: each algorithm's attention output and
q/k/v gradients on every rank's shard, with and without document masking, and a tiny Qwen3's summed loss
and parameter gradients (sharded tokens, labels, global position ids and document ids; gradients summed
over CP) equal the single-process result at 1e-5. GQA with 4 query / 2 KV heads: Ulysses at CP 4 replicates
KV heads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qwen3_pretrain.config.model import Qwen3Config
from qwen3_pretrain.distributed.attention_blocks import block_backward, block_forward
from qwen3_pretrain.distributed.context_parallel import (
    CP_ALGOS,
    RING,
    apply_context_parallel,
    shard_indices,
    shard_sequence,
)
from qwen3_pretrain.model import kernels as ops
from qwen3_pretrain.model.qwen3 import Qwen3ForCausalLM

from distributed_helpers import free_port, join_gloo_group, leave_gloo_group
from model_helpers import rel_err

SEQ, HEADS, KV_HEADS, D = 32, 4, 2, 8
DOC_LENGTHS = (5, 11, 3, 13)  # boundaries inside chunks and across ranks
CASES = [f"{algo} CP {cp}{' docs' if docs else ''}" for algo in CP_ALGOS for cp in (2, 4) for docs in (False, True)]


def _document_ids() -> torch.Tensor:
    return torch.cat([torch.full((n,), i) for i, n in enumerate(DOC_LENGTHS)]).unsqueeze(0)  # [1, SEQ]


def _attention_errors(algo: str, group: dist.ProcessGroup, docs: bool) -> list[float]:
    """Relative errors of this rank's attention output and q/k/v gradients against one process."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, SEQ, n, D, generator=gen) for n in (HEADS, KV_HEADS, KV_HEADS))
    weight = torch.randn(2, SEQ, HEADS, D, generator=gen)
    ids = _document_ids().expand(2, SEQ) if docs else None
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = ops.attention(*full, D**-0.5, document_ids=ids)
    (ref * weight).sum().backward()

    rank, cp = dist.get_rank(group), dist.get_world_size(group)
    attention = _installed_attention(algo, group)
    local = [shard_sequence(t, rank, cp, algo).requires_grad_() for t in (q, k, v)]
    out = attention(*local, D**-0.5, ops.DEFAULT_KERNELS,
                    document_ids=None if ids is None else shard_sequence(ids, rank, cp, algo))
    (out * shard_sequence(weight, rank, cp, algo)).sum().backward()
    pairs = [(out, ref)] + [(t.grad, f.grad) for t, f in zip(local, full, strict=True)]
    return [rel_err(ours, shard_sequence(theirs, rank, cp, algo)) for ours, theirs in pairs]


def _installed_attention(algo: str, group: dist.ProcessGroup) -> Any:
    """The callable `apply_context_parallel` installs on an attention block."""
    model = Qwen3ForCausalLM(_config())
    apply_context_parallel(model, algo, group)
    return model.model.layers["0"].self_attn.core_attention


def _config() -> Qwen3Config:
    return Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, head_dim=D, max_position_embeddings=64, rope_theta=10_000.0,
        tie_word_embeddings=True, torch_dtype="float32", bos_token_id=0, eos_token_id=1,
    )


def _model_errors(algo: str, group: dist.ProcessGroup, docs: bool) -> list[float]:
    """Relative errors of a CP model's loss and parameter gradients (summed over CP) against one process."""
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(_config())
    gen = torch.Generator().manual_seed(1)
    tokens, labels = (torch.randint(0, 64, (1, SEQ), generator=gen) for _ in range(2))
    ids = {"document_ids": _document_ids()} if docs else {}
    positions = torch.arange(SEQ).unsqueeze(0)  # [1, SEQ]
    ref_loss = model(tokens, labels, position_ids=positions, loss_reduction="sum", **ids).loss
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    rank, cp = dist.get_rank(group), dist.get_world_size(group)
    apply_context_parallel(model, algo, group)
    shard = {name: shard_sequence(t, rank, cp, algo) for name, t in ids.items()}
    loss = model(shard_sequence(tokens, rank, cp, algo), shard_sequence(labels, rank, cp, algo),
                 position_ids=shard_sequence(positions, rank, cp, algo), loss_reduction="sum", **shard).loss
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total, group=group)
    errors = [rel_err(total, ref_loss.detach())]
    for name, param in model.named_parameters():
        dist.all_reduce(param.grad, group=group)
        errors.append(rel_err(param.grad, ref_grads[name]))
    return errors


def _worker(rank: int, port: int, out: str) -> None:
    join_gloo_group(rank, 4, port)
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    groups = {2: pairs[rank // 2], 4: dist.group.WORLD}
    results: dict[str, dict[str, float]] = {}
    for algo in CP_ALGOS:
        for cp, group in groups.items():
            for docs in (False, True):
                name = f"{algo} CP {cp}{' docs' if docs else ''}"
                results[name] = {"attention": max(_attention_errors(algo, group, docs)),
                                 "model": max(_model_errors(algo, group, docs))}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(results))
    leave_gloo_group()


@pytest.fixture(scope="module")
def errors(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, dict[str, float]]]:
    out = tmp_path_factory.mktemp("cp")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=4, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]


@pytest.mark.parametrize("case", CASES)
def test_context_parallel_equals_one_process(errors: list[dict[str, dict[str, float]]], case: str) -> None:
    for rank, per_rank in enumerate(errors):
        assert per_rank[case]["attention"] < 1e-5, (rank, per_rank[case])
        assert per_rank[case]["model"] < 1e-5, (rank, per_rank[case])


def test_ring_shards_are_megatrons_load_balanced_chunks() -> None:
    # 2C = 8 chunks of 4 tokens: rank 1 of 4 holds chunks 1 and 6
    assert shard_indices(SEQ, 1, 4, RING).tolist() == [*range(4, 8), *range(24, 28)]
    assert shard_indices(SEQ, 1, 4, "ulysses_cp_algo").tolist() == list(range(8, 16))
    with pytest.raises(ValueError, match="not divisible by 8"):
        shard_indices(20, 0, 4, RING)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("pattern", ["full", "causal", "documents"])
def test_attention_block_and_its_backward_equal_autograd(fused: bool, pattern: str) -> None:
    # one block is the whole row here, so its lse is the row's: forward and backward must equal autograd's
    gen = torch.Generator().manual_seed(2)
    q, k, v, grad = (torch.randn(2, HEADS, 12, D, generator=gen) for _ in range(4))
    allowed = None
    if pattern == "documents":  # query rows 0-2 see no key at all (lse -inf, out 0), the rest their document
        docs_q, docs_k = torch.tensor([[5] * 3 + [0] * 4 + [1] * 5]), torch.tensor([[0] * 6 + [1] * 6])
        allowed = (docs_q[:, :, None] == docs_k[:, None, :]).unsqueeze(1)  # [1, 1, 12, 12]
    causal = pattern == "causal"
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    mask = torch.ones(12, 12, dtype=torch.bool).tril() if causal else allowed
    scores = (leaves[0] @ leaves[1].transpose(-1, -2)) * D**-0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.nan_to_num(scores.softmax(-1))  # rows without any key: 0
    ref = probs @ leaves[2]
    (ref * grad).sum().backward()

    out, lse = block_forward(q, k, v, D**-0.5, causal, allowed, fused=fused)
    assert rel_err(out, ref) < 1e-5
    if pattern == "documents":
        assert bool(torch.isinf(lse[:, :, :3]).all()) and bool(lse[:, :, 3:].isfinite().all())
        return  # the backward takes finite row lses only (a ring row always sees its own token)
    grads = block_backward(grad, q, k, v, out, lse, D**-0.5, causal, allowed, fused=fused)
    for ours, leaf in zip(grads, leaves, strict=True):
        assert rel_err(ours, leaf.grad) < 1e-5


def test_benchmark_reports_balanced_ring_work_and_less_memory(tmp_path: Path) -> None:
    out = tmp_path / "cp.json"
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, str(root / "benchmarks" / "context_parallel.py"), "--seq-length", "512", "--cp", "2",
               "--iters", "1", "--json", str(out)]
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    one, two = report["results"]
    assert (one["cp"], two["cp"], len(two["ranks"])) == (1, 2, 2)
    assert two["attention_work_max_over_min"] == 1.0 and two["contiguous_max_over_min"] == 3.0
    # the ring's two ranks together compute exactly the causal triangle of the whole sequence
    assert sum(r["attention_pairs_per_layer"] for r in two["ranks"]) == one["ranks"][0]["attention_pairs_per_layer"]
    assert "peak MiB/rank" in done.stdout and two["memory_vs_cp1"] > 0
