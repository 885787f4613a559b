"""GPT sample index, blending and the DP sampler: parity with megatron-core and the stream properties."""

from __future__ import annotations

import os
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen3_pretrain.data.gpt_dataset import (
    BlendedDataset,
    DataConfigError,
    GPTDataset,
    build_gpt_datasets,
    parse_data_path,
    parse_split,
)
from qwen3_pretrain.data.indexed import IndexedDatasetWriter
from qwen3_pretrain.data.loader import PretrainingSampler, build_pretraining_loader

EOD = 151643
SEQ = 16


def write_documents(prefix: Path, seed: int, count: int) -> list[np.ndarray]:
    """Random documents of 1..40 tokens, each ending with EOD; token values encode (document, position)."""
    rng = np.random.default_rng(seed)
    docs = []
    with IndexedDatasetWriter(prefix, np.int32) as writer:
        for d in range(count):
            length = int(rng.integers(1, 40))
            doc = np.append(1000 * (d + 1) + np.arange(length), EOD)
            writer.add_document(doc)
            docs.append(doc)
        writer.finalize()
    return docs


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("samples")
    return {
        "folder": folder,
        "a": (str(folder / "a_text_document"), write_documents(folder / "a_text_document", 0, 50)),
        "b": (str(folder / "b_text_document"), write_documents(folder / "b_text_document", 1, 23)),
    }


def megatron_datasets(blend, split: str, sizes: list[int], seed: int, **flags):
    """The same datasets built by megatron-core (CPU, no process group, so no blend cache)."""
    pytest.importorskip("megatron.core")
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset as MegatronGPTDataset
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    tokenizer = types.SimpleNamespace(eod=EOD, pad=EOD, vocab_size=None, special_tokens_dict={}, unique_identifiers={})
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=SEQ, blend=blend, split=split, path_to_cache=None,
        tokenizer=tokenizer, reset_attention_mask=False, create_attention_mask=False, **flags,
    )
    return BlendedMegatronDatasetBuilder(MegatronGPTDataset, sizes, lambda: True, config).build()


def assert_same_samples(ours, theirs) -> None:
    assert (ours is None) == (theirs is None)
    if ours is None:
        return
    assert len(ours) == len(theirs)
    for i in range(len(ours)):
        a, b = ours[i], theirs[i]
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (i, key)


@pytest.mark.parametrize(
    "data_path,split,sizes,flags",
    [
        (["a"], "80,15,5", [40, 20, 3], {"eod_mask_loss": True, "reset_position_ids": True}),
        (["a"], "100,0,0", [130, 0, 0], {"eod_mask_loss": False, "reset_position_ids": False}),  # 3 epochs, last apart
        (["a"], "100,0,0", [110, 0, 0], {"eod_mask_loss": True, "reset_position_ids": False}),  # 2 epochs together
        (["0.3", "a", "0.7", "b"], "90,10,0", [150, 10, 0], {"eod_mask_loss": True, "reset_position_ids": False}),
        (["a", "b", "a"], "100,0,0", [70, 0, 0], {"eod_mask_loss": False, "reset_position_ids": True}),
    ],
)
def test_samples_equal_megatron_core(data, tmp_path, data_path, split, sizes, flags) -> None:
    resolved = [data[p][0] if p in data else p for p in data_path]
    ours = build_gpt_datasets(
        resolved, split, SEQ, 1234, tuple(sizes), cache_dir=str(tmp_path / "ours"), eod_token_id=EOD, **flags
    )
    prefixes, weights = parse_data_path(resolved)
    theirs = megatron_datasets((prefixes, weights), split, sizes, 1234, **flags)
    for a, b in zip(ours, theirs, strict=True):
        assert_same_samples(a, b)
    if weights is not None:
        assert isinstance(ours[0], BlendedDataset)


def stream_of(dataset: GPTDataset) -> np.ndarray:
    return np.concatenate([dataset.indexed[int(d)] for d in dataset.document_index]).astype(np.int64)


def test_one_epoch_covers_every_token_of_the_split(data, tmp_path) -> None:
    prefix, docs = data["a"]
    train, valid, _ = build_gpt_datasets([prefix], "90,10,0", SEQ, 7, (30, 5, 0), cache_dir=str(tmp_path))
    n_train = round(0.9 * len(docs))
    split_tokens = np.concatenate(docs[:n_train])
    assert train.num_epochs == 1 and sorted(train.document_index) == list(range(n_train))
    assert sorted(valid.document_index) == list(range(n_train, len(docs)))
    windows = [train.window(i) for i in range(len(train))]
    assert all(len(w) == SEQ + 1 for w in windows)
    assert len(train) == (len(split_tokens) - 1) // SEQ
    covered = np.concatenate([w[:-1] for w in windows])  # each token once (the last is the next window's first)
    np.testing.assert_array_equal(np.sort(covered), np.sort(stream_of(train)[: len(train) * SEQ]))
    assert len(split_tokens) - len(covered) <= SEQ  # only the partial tail window is left out


def test_epochs_shuffle_and_seed(data, tmp_path) -> None:
    prefix, docs = data["a"]
    (train, _, _) = build_gpt_datasets([prefix], "100,0,0", SEQ, 3, (200, 0, 0), cache_dir=str(tmp_path))
    assert train.num_epochs > 1 and len(train) >= 200
    counts = np.bincount(np.asarray(train.document_index), minlength=len(docs))
    assert (counts == train.num_epochs).all()  # every document once per epoch
    # unshuffled windows read the concatenated document stream, consecutive windows sharing one token
    stream = stream_of(train)
    position_of = np.argsort(np.asarray(train.shuffle_index))  # shuffled position of each unshuffled sample
    for j in range(len(train)):
        np.testing.assert_array_equal(train.window(int(position_of[j])), stream[j * SEQ : j * SEQ + SEQ + 1])
    same = build_gpt_datasets([prefix], "100,0,0", SEQ, 3, (200, 0, 0), cache_dir=str(tmp_path / "other"))[0]
    other_seed = build_gpt_datasets([prefix], "100,0,0", SEQ, 4, (200, 0, 0), cache_dir=str(tmp_path / "other"))[0]
    assert all(torch.equal(train[i]["tokens"], same[i]["tokens"]) for i in range(len(train)))
    assert not all(torch.equal(train[i]["tokens"], other_seed[i]["tokens"]) for i in range(20))


def test_index_cache_is_reused_and_keyed(data, tmp_path) -> None:
    prefix, _ = data["a"]
    first = build_gpt_datasets([prefix], "100,0,0", SEQ, 5, (40, 0, 0))[0]  # default: next to the data
    cache = Path(prefix).parent / "index-cache"
    files = sorted(os.listdir(cache))
    assert len([f for f in files if f.endswith("description.json")]) == 1 and not [f for f in files if ".tmp" in f]
    again = build_gpt_datasets([prefix], "100,0,0", SEQ, 5, (40, 0, 0))[0]
    assert isinstance(again.shuffle_index, np.memmap)  # loaded, not rebuilt
    np.testing.assert_array_equal(again.shuffle_index, first.shuffle_index)
    build_gpt_datasets([prefix], "100,0,0", SEQ, 6, (40, 0, 0))
    assert len([f for f in os.listdir(cache) if f.endswith("description.json")]) == 2
    blend = build_gpt_datasets(["1", prefix, "2", data["b"][0]], "100,0,0", SEQ, 6, (30, 0, 0))[0]
    assert [f for f in os.listdir(cache) if f.endswith("-blend-description.json")]
    reloaded = build_gpt_datasets(["1", prefix, "2", data["b"][0]], "100,0,0", SEQ, 6, (30, 0, 0))[0]
    assert isinstance(reloaded.dataset_index, np.memmap)
    np.testing.assert_array_equal(reloaded.dataset_sample_index, blend.dataset_sample_index)


def test_blend_follows_weights(data, tmp_path) -> None:
    path = ["0.25", data["a"][0], "0.75", data["b"][0]]
    train = build_gpt_datasets(path, "100,0,0", SEQ, 1, (400, 0, 0), cache_dir=str(tmp_path))[0]
    assert len(train) == 400
    drawn = np.bincount(np.asarray(train.dataset_index))
    assert abs(drawn[0] - 100) <= 1 and abs(drawn[1] - 300) <= 1
    prefix_of = [w // 1000 for w in (train[i]["tokens"][0].item() for i in range(8))]  # token values name the doc
    assert all(p >= 1 for p in prefix_of)


def test_loss_mask_and_position_ids(tmp_path) -> None:
    prefix = tmp_path / "tiny_text_document"
    with IndexedDatasetWriter(prefix, np.int32) as writer:
        for doc in ([1, 2, 3, EOD], [4, 5, EOD], [6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, EOD]):
            writer.add_document(doc)
        writer.finalize()
    dataset = GPTDataset.__new__(GPTDataset)  # only the per-sample transform, on a known window
    dataset.seq_length, dataset.eod_token_id, dataset.eod_mask_loss, dataset.reset_position_ids = 8, EOD, True, True
    dataset.window = lambda idx: np.array([1, 2, 3, EOD, 4, 5, EOD, 6, 7])
    sample = dataset[0]
    assert sample["tokens"].tolist() == [1, 2, 3, EOD, 4, 5, EOD, 6]
    assert sample["labels"].tolist() == [2, 3, EOD, 4, 5, EOD, 6, 7]
    assert sample["loss_mask"].tolist() == [1, 1, 1, 0, 1, 1, 0, 1]
    assert sample["position_ids"].tolist() == [0, 1, 2, 3, 0, 1, 2, 0]
    assert sample["tokens"].dtype == torch.int64 and sample["loss_mask"].dtype == torch.float32


def test_dp_ranks_split_each_global_batch_and_resume_exactly(data, tmp_path) -> None:
    train = build_gpt_datasets([data["a"][0]], "100,0,0", SEQ, 9, (120, 0, 0), cache_dir=str(tmp_path))[0]
    micro, dp = 2, 3
    streams = [list(build_pretraining_loader(train, 0, micro, r, dp)) for r in range(dp)]
    assert len(streams[0]) == len(train) // (micro * dp)
    for step in range(len(streams[0])):
        parts = [streams[r][step]["tokens"] for r in range(dp)]
        assert all(p.shape == (micro, SEQ) for p in parts)
        expected = torch.stack([train[i]["tokens"] for i in range(step * micro * dp, (step + 1) * micro * dp)])
        assert torch.equal(torch.cat(parts), expected)  # rank slices, in rank order, make the global batch
    consumed = 5 * micro * dp
    for r in range(dp):
        resumed = list(build_pretraining_loader(train, consumed, micro, r, dp, num_workers=0))
        assert len(resumed) == len(streams[r]) - 5
        for a, b in zip(resumed, streams[r][5:], strict=True):
            assert all(torch.equal(a[k], b[k]) for k in a)


def test_sampler_and_flag_errors() -> None:
    with pytest.raises(ValueError, match="consumed_samples 10 leaves nothing"):
        PretrainingSampler(10, 10, 1, 0, 1)
    with pytest.raises(ValueError, match="DP rank 2 is outside"):
        PretrainingSampler(10, 0, 1, 2, 2)
    assert parse_split("100,0,0") == [(0.0, 1.0), None, None]
    assert parse_split("98,2,0")[1] == pytest.approx((0.98, 1.0))
    with pytest.raises(DataConfigError, match="--split 'abc'"):
        parse_split("abc")
    with pytest.raises(DataConfigError, match="WEIGHT PREFIX pairs"):
        parse_data_path(["0.3", "a", "b", "c"])
    assert parse_data_path(["a", "b"]) == (["a", "b"], None)
    assert parse_data_path(["0.3", "a", "0.7", "b"]) == (["a", "b"], [0.3, 0.7])
