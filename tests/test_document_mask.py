"""`--reset-attention-mask`: attention never crosses an end-of-document inside a packed sample.

Document ids (EODs strictly before each token) give Megatron's reset attention mask; the masked kernel equals
attention over each document alone (GQA, bf16 on float32 units), and so does the model (logits and gradients,
positions restarting per document); a decoder block with the mask compiles without graph breaks. Training with
`--reset-attention-mask --reset-position-ids --eod-mask-loss` gives one process's losses and gradient norms under
TP 2 + sequence parallel, PP 2 and DP 2, and differs from training without the mask.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from qwen3_pretrain.config import parse_train_args
from qwen3_pretrain.config.model import Qwen3Config
from qwen3_pretrain.model import kernels
from qwen3_pretrain.model.layers import DecoderLayer, RotaryEmbedding
from qwen3_pretrain.model.qwen3 import Qwen3ForCausalLM
from qwen3_pretrain.train.trainer import TrainResult, document_ids, run_training

from distributed_helpers import free_port, join_gloo_group, leave_gloo_group
from model_helpers import rel_err
from train_helpers import tiny_flags, write_tiny_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

EOD = 1
HEADS, KV_HEADS, D = 4, 2, 16
DOCUMENTS = ((5, 7, 4), (9, 3, 4))  # document lengths of the two packed samples [2, 16] (each ends with EOD)
ITERS = 3
LAYOUTS: dict[str, dict[str, Any]] = {
    "TP 2, sequence parallel": {"tensor_model_parallel_size": 2, "sequence_parallel": True},
    "PP 2": {"pipeline_model_parallel_size": 2},
    "DP 2": {},
}


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _packed_ids() -> torch.Tensor:
    """Document ids [2, 16] of the packed samples in DOCUMENTS."""
    return torch.tensor([[d for d, n in enumerate(lengths) for _ in range(n)] for lengths in DOCUMENTS])


def _spans(lengths: tuple[int, ...]) -> list[tuple[int, int]]:
    """(start, end) of each document in a packed sample."""
    ends = torch.tensor(lengths).cumsum(0).tolist()
    return list(zip([0, *ends[:-1]], ends, strict=True))


# ---- document ids and the mask ------------------------------------------------------------------------


def test_document_ids_give_megatrons_reset_attention_mask() -> None:
    pytest.importorskip("megatron.core")
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    tokens = torch.tensor([3, EOD, EOD, 5, 6, EOD, 7, 8, 9, EOD])  # an empty document, an EOD last
    ids = document_ids(tokens[None], EOD)  # [1, s]
    assert ids.tolist() == [[0, 0, 1, 2, 2, 2, 3, 3, 3, 3]]  # an EOD closes its document
    masked, _, _ = _get_ltor_masks_and_position_ids(tokens, EOD, True, True, True, True)  # [1, s, s], True = masked
    assert torch.equal(~kernels.document_causal_mask(ids)[0], masked)


# ---- kernel ---------------------------------------------------------------------------------------------


def _per_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of each document of each packed sample on its own, put back in place."""
    out = torch.empty_like(q)
    for row, lengths in enumerate(DOCUMENTS):
        for start, end in _spans(lengths):
            part = (t[row : row + 1, start:end] for t in (q, k, v))  # [1, n, (kv_)heads, d]
            out[row : row + 1, start:end] = kernels.attention(*part, D**-0.5)
    return out


def _qkv(kv_heads: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    s = sum(DOCUMENTS[0])
    return (_randn(2, s, HEADS, D, seed=0, dtype=dtype), _randn(2, s, kv_heads, D, seed=1, dtype=dtype),
            _randn(2, s, kv_heads, D, seed=2, dtype=dtype))


@pytest.mark.parametrize("kv_heads", [HEADS, KV_HEADS])
def test_masked_attention_is_per_document_attention(kv_heads: int) -> None:
    q, k, v = _qkv(kv_heads, torch.float32)
    got = kernels.attention(q, k, v, D**-0.5, document_ids=_packed_ids())
    torch.testing.assert_close(got, _per_document_attention(q, k, v), rtol=1e-5, atol=1e-6)
    assert rel_err(kernels.attention(q, k, v, D**-0.5), got) > 1e-2  # plain causal attention crosses documents


@pytest.mark.parametrize("kv_heads", [HEADS, KV_HEADS])
def test_masked_attention_bf16_via_float32(monkeypatch: pytest.MonkeyPatch, kv_heads: int) -> None:
    monkeypatch.setattr(kernels, "cpu_has_fast_bf16_matmul", lambda: False)
    q, k, v = _qkv(kv_heads, torch.bfloat16)
    got = kernels.attention(q, k, v, D**-0.5, document_ids=_packed_ids())
    expected = kernels.attention(q.float(), k.float(), v.float(), D**-0.5, document_ids=_packed_ids()).bfloat16()
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)
    torch.testing.assert_close(got, _per_document_attention(q, k, v))  # bf16 tolerances


def test_decoder_layer_with_document_mask_compiles_without_graph_breaks() -> None:
    torch.manual_seed(0)
    layer = DecoderLayer(_config(), kernels.KernelOptions())
    x = _randn(2, sum(DOCUMENTS[0]), 48, seed=5).requires_grad_()
    cos, sin = RotaryEmbedding(D, 10_000.0)(torch.arange(x.shape[1])[None], torch.float32)  # [1, s, d] each
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="eager", fullgraph=True)  # fullgraph: any graph break raises
    out = compiled(x, cos, sin, _packed_ids())
    torch.testing.assert_close(out, layer(x, cos, sin, _packed_ids()), rtol=0, atol=0)
    out.sum().backward()
    assert x.grad is not None and bool(x.grad.isfinite().all())


# ---- model ----------------------------------------------------------------------------------------------


def _config() -> Qwen3Config:
    return Qwen3Config(
        vocab_size=64, hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, head_dim=D, max_position_embeddings=64, rope_theta=10_000.0,
        tie_word_embeddings=False, torch_dtype="float32", bos_token_id=0, eos_token_id=EOD,
    )


def _loss_and_grads(
    model: Qwen3ForCausalLM, tokens: torch.Tensor, labels: torch.Tensor, **ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Logits, summed token loss, and the parameters' gradients of that loss."""
    model.zero_grad()
    out = model(tokens, labels, loss_reduction="sum", **ids)
    out.loss.backward()
    return out.logits, out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_packed_sample_equals_its_documents_run_separately() -> None:
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(_config())
    s = sum(DOCUMENTS[0])
    tokens = torch.randint(2, 64, (2, s), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 64, (2, s), generator=torch.Generator().manual_seed(2))
    positions = torch.zeros(2, s, dtype=torch.long)
    for row, lengths in enumerate(DOCUMENTS):
        for start, end in _spans(lengths):
            tokens[row, end - 1] = EOD
            positions[row, start:end] = torch.arange(end - start)
    ids = document_ids(tokens, EOD)
    assert torch.equal(ids, _packed_ids())
    logits, loss, grads = _loss_and_grads(model, tokens, labels, position_ids=positions, document_ids=ids)

    separate_logits, separate_grads = torch.empty_like(logits), dict.fromkeys(grads, 0.0)
    separate_loss = torch.zeros(())
    for row, lengths in enumerate(DOCUMENTS):
        for start, end in _spans(lengths):
            doc = (row, slice(start, end))
            doc_logits, doc_loss, doc_grads = _loss_and_grads(model, tokens[doc][None], labels[doc][None])
            separate_logits[doc] = doc_logits[0]
            separate_loss += doc_loss
            separate_grads = {n: separate_grads[n] + g for n, g in doc_grads.items()}
    assert rel_err(logits, separate_logits) <= 1e-5
    assert rel_err(loss, separate_loss) <= 1e-5
    for name, grad in grads.items():
        assert rel_err(grad, separate_grads[name]) <= 1e-5, name


# ---- training -------------------------------------------------------------------------------------------


def _flags(data: str, **overrides: Any) -> list[str]:
    flags: dict[str, Any] = {"reset_attention_mask": True, "reset_position_ids": True, "eod_mask_loss": True}
    return tiny_flags(data, train_iters=ITERS, log_interval=1, **{**flags, **overrides})


def _summary(result: TrainResult) -> dict[str, Any]:
    return {"losses": result.losses, "grad_norms": result.grad_norms,
            "validation": [loss for _, loss in result.validation]}


def _worker(rank: int, port: int, data: str, out: str) -> None:
    """One of two ranks: train in every layout; rank 0 writes the results."""
    join_gloo_group(rank, 2, port)
    results = {name: _summary(run_training(parse_train_args(_flags(data, **flags), world_size=2)))
               for name, flags in LAYOUTS.items()}
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    leave_gloo_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One process with and without the mask, and every two-process layout with it."""
    root = tmp_path_factory.mktemp("document_mask")
    data = write_tiny_dataset(root / "tiny_text_document")
    unmasked = _flags(data, reset_attention_mask=None)
    results = {"one process": _summary(run_training(parse_train_args(_flags(data)))),
               "one process, no mask": _summary(run_training(parse_train_args(unmasked)))}
    out = root / "layouts.json"
    mp.spawn(_worker, args=(free_port(), data, str(out)), nprocs=2, join=True)
    return {**results, **json.loads(out.read_text())}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_with_document_mask_equals_one_process(runs: dict[str, Any], name: str) -> None:
    reference = runs["one process"]
    for key in ("losses", "grad_norms", "validation"):
        ours, theirs = runs[name][key], reference[key]
        assert len(ours) == len(theirs) > 0, (name, key)
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert abs(a - b) <= 1e-5 * abs(b), f"{name}, {key} {i + 1}: {a} vs one process {b}"


def test_document_mask_changes_training(runs: dict[str, Any]) -> None:
    masked, unmasked = runs["one process"]["losses"], runs["one process, no mask"]["losses"]
    # every iteration differs by more than the 1e-5 the layouts agree to (the first by ~1e-4: near-uniform attention)
    assert all(abs(a - b) > 1e-5 * abs(b) for a, b in zip(masked, unmasked, strict=True)), (masked, unmasked)
