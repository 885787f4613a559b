"""`qwen3-pretrain data info PREFIX...`: what a tokenized dataset holds, and whether it is intact.

The token id range is cached in `<prefix>.maxid` (see `IndexedDataset.token_id_range`), which `train` reads too.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from qwen3_pretrain.data.indexed import IndexedDataset, IndexedDatasetError

HISTOGRAM_BAR = 40


def length_histogram(lengths: np.ndarray) -> list[str]:
    """Lines of a power-of-two histogram of sequence lengths: `[lo, hi)  count  share  bar`."""
    if len(lengths) == 0:
        return []
    edges = 2 ** np.arange(int(np.log2(max(int(lengths.max()), 1))) + 2)  # 1, 2, 4, ... past the max
    counts = np.histogram(lengths, bins=np.concatenate([[0], edges]))[0]
    lines = []
    low = 0
    for high, count in zip(edges, counts, strict=True):
        if count:
            share = count / len(lengths)
            bar = "#" * max(1, round(share * HISTOGRAM_BAR))
            lines.append(f"    [{low:>7}, {high:>7})  {count:>10}  {share:6.1%}  {bar}")
        low = int(high)
    return lines


def last_token_summary(dataset: IndexedDataset) -> str:
    """The most common final token of the sequences (the EOD when preprocessing appended one)."""
    lengths = dataset.sequence_lengths.astype(np.int64)
    nonempty = lengths > 0
    if not nonempty.any():
        return "no tokens"
    tokens = np.memmap(dataset.bin_file, dtype=dataset.dtype, mode="r")
    ends = dataset.sequence_pointers[nonempty] // dataset.dtype.itemsize + lengths[nonempty] - 1
    values, counts = np.unique(np.asarray(tokens[ends]), return_counts=True)
    top = int(np.argmax(counts))
    return f"{values[top]} ends {counts[top] / nonempty.sum():.1%} of sequences"


def describe(prefix: str) -> tuple[list[str], str | None]:
    """Report lines about `prefix` and the integrity problem found, if any."""
    dataset = IndexedDataset(prefix, check_bin_size=False)
    lengths = dataset.sequence_lengths
    lines = [
        f"{dataset.prefix}",
        f"  dtype:      {dataset.dtype.name}",
        f"  documents:  {len(dataset.document_indices) - 1}",
        f"  sequences:  {len(dataset)}",
        f"  tokens:     {dataset.num_tokens}",
    ]
    problem = None
    try:
        dataset.check_bin_size()
        dataset.validate()
        lines.append(f"  .bin size:  {os.path.getsize(dataset.bin_file)} bytes, matches the index")
        low, high = dataset.token_id_range()
        if high >= 0:
            lines.append(f"  token ids:  min {low}, max {high} (a model needs a vocabulary of more than {high})")
    except IndexedDatasetError as exc:
        problem = str(exc)
        lines.append(f"  PROBLEM:    {problem}")
    if len(lengths):
        p50, p99 = np.percentile(lengths, [50, 99])
        lines.append(
            f"  length:     min {lengths.min()}, median {p50:.0f}, mean {lengths.mean():.1f}, "
            f"p99 {p99:.0f}, max {lengths.max()}"
        )
        if problem is None:
            lines.append(f"  last token: {last_token_summary(dataset)}")
        lines.append("  length histogram:")
        lines += length_histogram(lengths)
    return lines, problem


def main(argv: list[str]) -> int:
    """Entry point of `qwen3-pretrain data`; exits 1 when a dataset is damaged."""
    parser = argparse.ArgumentParser(prog="qwen3-pretrain data", description=__doc__.split("\n")[0])
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    info = actions.add_parser("info", help="documents, tokens, dtype, length histogram and a size check")
    info.add_argument("prefixes", nargs="+", metavar="PREFIX", help="dataset prefix (PREFIX.bin/.idx, or either path)")
    args = parser.parse_args(argv)
    status = 0
    for prefix in args.prefixes:
        try:
            lines, problem = describe(prefix)
        except IndexedDatasetError as exc:
            print(f"qwen3-pretrain data info: error: {exc}", file=sys.stderr)
            status = 1
            continue
        print("\n".join(lines))
        if problem:
            print(f"qwen3-pretrain data info: error: {problem}", file=sys.stderr)
            status = 1
    return status
