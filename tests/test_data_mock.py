"""MockGPTDataset (`--mock-data`): the items of GPTDataset, deterministic per (seed, index)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from qwen3_pretrain.data.gpt_dataset import DataConfigError, build_gpt_datasets
from qwen3_pretrain.data.indexed import IndexedDatasetWriter
from qwen3_pretrain.data.loader import build_pretraining_loader
from qwen3_pretrain.data.mock import MockGPTDataset

SEQ = 16


def test_items_match_gpt_dataset_items(tmp_path: Path) -> None:
    prefix = tmp_path / "docs_text_document"
    with IndexedDatasetWriter(prefix, np.int32) as writer:
        for d in range(20):
            writer.add_document(np.arange(30) + 100 * d)
        writer.finalize()
    real = build_gpt_datasets([str(prefix)], "100,0,0", SEQ, 1, (8, 0, 0), cache_dir=str(tmp_path))[0][0]
    mock = MockGPTDataset(8, SEQ, vocab_size=512)[3]
    assert mock.keys() == real.keys()
    for key in real:
        assert (mock[key].dtype, mock[key].shape) == (real[key].dtype, real[key].shape), key
    assert torch.equal(mock["labels"][:-1], mock["tokens"][1:])  # labels are the tokens shifted by one
    assert torch.equal(mock["loss_mask"], torch.ones(SEQ)) and torch.equal(mock["position_ids"], torch.arange(SEQ))


def test_window_is_uniform_tokens_seeded_by_seed_and_index() -> None:
    dataset = MockGPTDataset(4, SEQ, vocab_size=1000, seed=7)
    expected = np.random.default_rng([7, 2]).integers(0, 1000, size=SEQ + 1, dtype=np.int64)
    assert dataset[2]["tokens"].tolist() == expected[:-1].tolist()
    assert dataset[2]["labels"].tolist() == expected[1:].tolist()
    large = MockGPTDataset(1, 4096, vocab_size=151936, seed=0)[0]["tokens"]
    assert int(large.min()) >= 0 and int(large.max()) < 151936 and len(set(large.tolist())) > 4000


def test_deterministic_across_instances_and_order_and_seeds_differ() -> None:
    a, b = MockGPTDataset(6, SEQ, 512, seed=3), MockGPTDataset(6, SEQ, 512, seed=3)
    forward = [a[i]["tokens"] for i in range(6)]
    backward = [b[i]["tokens"] for i in reversed(range(6))][::-1]
    assert all(torch.equal(x, y) for x, y in zip(forward, backward, strict=True))
    assert not torch.equal(forward[0], forward[1])  # samples differ from each other
    assert not torch.equal(forward[0], MockGPTDataset(6, SEQ, 512, seed=4)[0]["tokens"])


def test_feeds_the_pretraining_loader() -> None:
    dataset = MockGPTDataset(12, SEQ, 512)
    batches = list(build_pretraining_loader(dataset, consumed_samples=4, micro_batch_size=2, dp_rank=1, dp_size=2))
    assert len(batches) == 2
    assert batches[0]["tokens"].shape == (2, SEQ) and batches[0]["tokens"].dtype == torch.int64
    assert torch.equal(batches[1]["tokens"], torch.stack([dataset[10]["tokens"], dataset[11]["tokens"]]))


def test_bad_arguments_name_the_value() -> None:
    with pytest.raises(DataConfigError, match="num_samples=0"):
        MockGPTDataset(0, SEQ, 512)
    with pytest.raises(DataConfigError, match="--seq-length must be at least 2, got 1"):
        MockGPTDataset(4, 1, 512)
    with pytest.raises(DataConfigError, match="vocab_size=0"):
        MockGPTDataset(4, SEQ, 0)
    with pytest.raises(DataConfigError, match="--seed must be non-negative"):
        MockGPTDataset(4, SEQ, 512, seed=-1)
    with pytest.raises(IndexError, match="sample 4 is outside the mock dataset of 4 samples"):
        MockGPTDataset(4, SEQ, 512)[4]
