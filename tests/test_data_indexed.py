"""Megatron .bin/.idx reader and writer: byte compatibility with megatron-core both ways, and errors."""

from __future__ import annotations

import os
import re
import struct

import numpy as np
import pytest
import torch

pytest.importorskip("megatron.core")

from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexedDataset
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from qwen3_pretrain.data.indexed import (
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
    best_dtype,
    check_vocab_fits,
)


def random_documents(seed: int, count: int, high: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, high, size=int(rng.integers(5, 50))) for _ in range(count)]


def write_ours(prefix: str, docs: list[np.ndarray], dtype: type[np.number]) -> None:
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for doc in docs:
            writer.add_document(doc)
        writer.finalize()


def test_best_dtype_matches_megatron() -> None:
    from megatron.core.datasets.indexed_dataset import DType

    for vocab in (1000, 65499, 65500, 151936):
        assert np.dtype(best_dtype(vocab)) == np.dtype(DType.optimal_dtype(vocab))


@pytest.mark.parametrize("dtype,high", [(np.uint16, 65500), (np.int32, 151936)])
def test_megatron_reads_our_files(tmp_path, dtype, high) -> None:
    docs = random_documents(0, 37, high)
    prefix = str(tmp_path / "ours")
    write_ours(prefix, docs, dtype)
    ref = MegatronIndexedDataset(prefix)
    assert len(ref) == len(docs)
    assert ref.index.dtype == dtype
    np.testing.assert_array_equal(ref.document_indices, np.arange(len(docs) + 1))
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(ref[i], doc)
        np.testing.assert_array_equal(ref.get(i, offset=1, length=len(doc) - 1), doc[1:])


def test_our_files_equal_megatron_builder_bytes(tmp_path) -> None:
    docs = random_documents(1, 20, 151936)
    ours, theirs = str(tmp_path / "ours"), str(tmp_path / "theirs")
    write_ours(ours, docs, np.int32)
    builder = IndexedDatasetBuilder(theirs + ".bin", dtype=np.int32)
    for doc in docs:
        builder.add_item(torch.from_numpy(doc))
        builder.end_document()
    builder.finalize(theirs + ".idx")
    for suffix in (".bin", ".idx"):
        with open(ours + suffix, "rb") as a, open(theirs + suffix, "rb") as b:
            assert a.read() == b.read(), suffix


def test_we_read_megatron_builder_files(tmp_path) -> None:
    docs = random_documents(2, 25, 1000)
    prefix = str(tmp_path / "theirs")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    # two sequences in the first document, then one per document
    builder.add_document(torch.from_numpy(np.concatenate(docs[:2])), [len(docs[0]), len(docs[1])])
    for doc in docs[2:]:
        builder.add_item(torch.from_numpy(doc))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    ours = IndexedDataset(prefix + ".idx")
    ours.validate()
    assert ours.dtype == np.uint16 and len(ours) == len(docs)
    np.testing.assert_array_equal(ours.sequence_lengths, [len(d) for d in docs])
    np.testing.assert_array_equal(ours.document_indices, [0, 2, *range(3, len(docs) + 1)])
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(ours[i], doc)
    np.testing.assert_array_equal(ours.get(3, 2, 3), docs[3][2:5])
    assert ours.num_tokens == sum(len(d) for d in docs)


def test_writer_is_atomic_and_cleans_up(tmp_path) -> None:
    prefix = str(tmp_path / "out")
    with pytest.raises(RuntimeError), IndexedDatasetWriter(prefix, np.int32) as writer:
        writer.add_document([1, 2, 3])
        assert not os.path.exists(prefix + ".bin")
        raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []


def test_writer_rejects_ids_beyond_dtype(tmp_path) -> None:
    with (
        IndexedDatasetWriter(str(tmp_path / "x"), np.uint16) as writer,
        pytest.raises(IndexedDatasetError, match="does not fit in uint16"),
    ):
        writer.add_document([1, 151643])
    with pytest.raises(IndexedDatasetError, match="151936 tokens does not fit in uint16"):
        check_vocab_fits(151936, np.uint16)


def corrupt(prefix: str, kind: str) -> None:
    if kind == "truncated bin":
        os.truncate(prefix + ".bin", os.path.getsize(prefix + ".bin") - 2)
    elif kind == "truncated idx":
        os.truncate(prefix + ".idx", os.path.getsize(prefix + ".idx") - 8)
    elif kind == "dtype code":
        with open(prefix + ".idx", "r+b") as f:
            f.seek(17)
            f.write(struct.pack("<B", 42))
    elif kind == "magic":
        with open(prefix + ".idx", "r+b") as f:
            f.write(b"NOTANIDX")
    elif kind == "missing bin":
        os.remove(prefix + ".bin")


@pytest.mark.parametrize(
    "kind,message",
    [
        ("truncated bin", r"\.bin is truncated: \d+ bytes, the index describes"),
        ("truncated idx", r"\.idx is \d+ bytes but its header"),
        ("dtype code", r"unknown dtype code 42"),
        ("magic", r"not a Megatron index file"),
        ("missing bin", r"\.bin not found"),
    ],
)
def test_reader_reports_corrupt_files(tmp_path, kind, message) -> None:
    prefix = str(tmp_path / "ds")
    write_ours(prefix, random_documents(3, 5, 1000), np.uint16)
    corrupt(prefix, kind)
    with pytest.raises(IndexedDatasetError, match=message):
        IndexedDataset(prefix)


def test_data_info_reports_contents_and_truncation(tmp_path, capsys) -> None:
    from qwen3_pretrain.cli import main as cli_main

    docs = [np.array([5, 6, 7, 0]), np.array([9, 0]), [*np.arange(1, 20).tolist(), 0]]
    prefix = str(tmp_path / "ds_text_document")
    write_ours(prefix, [np.asarray(d) for d in docs], np.uint16)
    assert cli_main(["data", "info", prefix + ".bin"]) == 0
    out = capsys.readouterr().out
    for line in ("dtype:      uint16", "documents:  3", "sequences:  3", "tokens:     26",
                 ".bin size:  52 bytes, matches the index", "last token: 0 ends 100.0% of sequences",
                 "min 2, median 4, mean 8.7, p99 20, max 20"):
        assert line in out, line
    assert re.search(r"\[\s+2,\s+4\)\s+1\s+33\.3%", out) and re.search(r"\[\s+16,\s+32\)\s+1\s+33\.3%", out)

    os.truncate(prefix + ".bin", 50)
    assert cli_main(["data", "info", prefix]) == 1
    captured = capsys.readouterr()
    assert "tokens:     26" in captured.out
    assert "ds_text_document.bin is truncated: 50 bytes, the index describes 52" in captured.err
