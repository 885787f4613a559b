"""`qwen3-pretrain preprocess`: tokenize raw text into Megatron `.bin/.idx` files.

Flag-compatible with MindSpeed-LLM's `preprocess_data.py` for pretraining data: the same command
line works with only the program name changed, and writes `{output_prefix}_{key}_document.bin/.idx`
for each `--json-keys` key (one sequence per document; empty documents skipped; EOD only with
`--append-eod`).

The input streams in batches of rows (memory is bounded by a few batches, whatever the input size);
the fastest engine that reproduces the HF tokenizer (`engines`) tokenizes whole batches in `--workers`
threads (1: one per core), each batch on one thread, while the next batches are read, and results are
written in input order, so the output is byte-identical whatever the engine and worker count. Files are written under
temporary names and renamed when everything succeeded.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qwen3_pretrain.data.engines import (
    ALIASES,
    ENGINES,
    Engine,
    HFEngine,
    bounded_chunks,
    needs_reference,
    select_engine,
    utf8_documents,
)
from qwen3_pretrain.data.handlers import HANDLERS, build_handler
from qwen3_pretrain.data.indexed import (
    IndexedDatasetError,
    IndexedDatasetWriter,
    best_dtype,
    bin_path,
    check_vocab_fits,
    idx_path,
)
from qwen3_pretrain.data.inputs import BATCH_CHARS, DataInputError, ReadStats, expand_inputs, read_batches

Task = tuple[int, list[str]]  # (output key index, non-empty document texts)
Result = tuple[int, np.ndarray, np.ndarray, int]  # (key index, tokens [T], lengths int64 [n], text bytes)
PENDING_TASKS_PER_WORKER = 2  # bounded look-ahead: memory stays O(workers x task)
CHECK_BYTES = 1 << 16  # documents re-checked against the HF engine are at most this long


class BatchEncoder:
    """Picklable batch encoder giving the same ids as calling the HF tokenizer on each text.

    Runs the engine `engines.select_engine` chose. With a fast engine, documents that `needs_reference`
    flags go to the HF engine (`reference`) instead, and the fast engine's ids of one other document of
    every batch (the first of at most CHECK_BYTES) are re-checked against it.
    """

    def __init__(self, engine: Engine, reference: HFEngine | None, eod: int | None) -> None:
        self.engine, self.reference, self.eod = engine, reference, eod

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
        """Tokens of all texts concatenated (EOD appended to each when set), each length, and the UTF-8 bytes."""
        documents = utf8_documents(texts)
        tokens, lengths = self._token_ids(documents)
        if self.eod is not None:
            tokens = np.insert(tokens, np.cumsum(lengths), self.eod)  # [T + n]: EOD after each document
            lengths = lengths + 1
        return tokens, lengths, sum(map(len, documents))

    def _token_ids(self, documents: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        if self.reference is None:
            return self.engine.encode(documents)
        unstable = [needs_reference(d) for d in documents]
        fast = [d for d, u in zip(documents, unstable, strict=True) if not u]
        if not fast:
            return self.reference.encode(documents)
        tokens, lengths = self.engine.encode(fast)
        self._check(fast, tokens, lengths)
        if len(fast) == len(documents):
            return tokens, lengths
        pieces = iter(np.split(tokens, np.cumsum(lengths)[:-1]))  # fast documents' ids, in order
        slow = iter(self.reference.ids([d for d, u in zip(documents, unstable, strict=True) if u]))
        ids = [np.asarray(next(slow), tokens.dtype) if u else next(pieces) for u in unstable]
        return np.concatenate(ids), np.array([len(i) for i in ids], dtype=np.int64)

    def _check(self, documents: list[bytes], tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Compare the ids of the first document of at most CHECK_BYTES (HF needs ~150 bytes per byte) with HF's."""
        assert self.reference is not None  # only fast engines are checked
        index = next((i for i, d in enumerate(documents) if len(d) <= CHECK_BYTES), None)
        if index is None:
            return
        start = int(lengths[:index].sum())
        if tokens[start : start + lengths[index]].tolist() != self.reference.ids(documents[index : index + 1])[0]:
            raise DataInputError(
                f"the tokenizer engine and the HF tokenizer disagree on the document starting "
                f"{documents[index][:60].decode('utf-8', 'replace')!r}; "
                f"rerun with --tokenizer-engine hf (and report this)"
            )


class _WorkerState:
    """This process's encoder, set by `_init_worker` (the pool initializer, or in-process for one worker)."""

    encoder: BatchEncoder | None = None


def _init_worker(encoder: BatchEncoder) -> None:
    _WorkerState.encoder = encoder


def _tokenize_task(task: Task) -> Result:
    key_index, texts = task
    encoder = _WorkerState.encoder
    assert encoder is not None, "_init_worker has not run in this process"
    return key_index, *encoder.encode(texts)


def ordered_map(
    fn: Callable[[Task], Result], tasks: Iterable[Task], workers: int, encoder: BatchEncoder
) -> Iterator[Result]:
    """`map(fn, tasks)` in input order, reading ahead a bounded number of tasks, over `workers` threads (1: one
    per core) when the engine releases the GIL, so reading overlaps tokenizing; else over `workers` processes
    (the slow transformers tokenizer)."""
    _init_worker(encoder)
    pool: Executor
    if encoder.engine.releases_gil:
        workers = workers if workers > 1 else os.cpu_count() or 1
        pool = ThreadPoolExecutor(workers)
    elif workers > 1:  # spawn: safe with pyarrow/tokenizer threads in this process
        pool = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), _init_worker, (encoder,))
    else:
        yield from map(fn, tasks)
        return
    with pool:
        pending: deque[Future[Result]] = deque()
        for task in tasks:
            pending.append(pool.submit(fn, task))
            if len(pending) >= PENDING_TASKS_PER_WORKER * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@dataclass
class Counters:
    """What the run did, for the progress lines and the summary."""

    rows: int = 0
    documents: int = 0
    empty: int = 0
    dropped: int = 0
    tokens: int = 0
    text_bytes: int = 0
    read: ReadStats = field(default_factory=ReadStats)


class Progress:
    """Prints a progress line every `interval` documents."""

    def __init__(self, interval: int, counters: Counters) -> None:
        self.interval, self.counters = interval, counters
        self.start = time.perf_counter()
        self.next_report = interval

    def rates(self) -> str:
        c, elapsed = self.counters, max(time.perf_counter() - self.start, 1e-9)
        return (
            f"{c.documents / elapsed:.0f} docs/s, {c.tokens / elapsed:.0f} tokens/s, "
            f"{c.text_bytes / elapsed / 1e6:.2f} MB/s"
        )

    def update(self) -> None:
        c = self.counters
        if c.documents >= self.next_report:
            self.next_report = (c.documents // self.interval + 1) * self.interval
            print(f"processed {c.documents} documents, {c.tokens} tokens ({self.rates()})", flush=True)


def _tasks(files: list[str], handler: Any, args: argparse.Namespace, counters: Counters) -> Iterator[Task]:
    for path in files:
        batches = read_batches(
            path, handler.required, handler.optional, args.batch_size, counters.read, args.skip_bad_lines
        )
        for batch in batches:
            try:
                texts = handler.texts(batch)
            except DataInputError as exc:
                raise DataInputError(f"{path}: {exc}") from exc
            for key_index, key in enumerate(handler.output_keys):
                documents = [t for t in texts[key] if t]
                counters.empty += len(texts[key]) - len(documents)
                for chunk in bounded_chunks(documents, BATCH_CHARS):  # parquet/arrow batches count rows only
                    yield key_index, chunk


def output_prefixes(output_prefix: str, keys: list[str]) -> list[str]:
    """MindSpeed's file names: `{output_prefix}_{key}_document`."""
    return [f"{output_prefix}_{key}_document" for key in keys]


def preprocess(args: argparse.Namespace) -> Counters:
    """Run the whole preprocessing described by parsed `args`; returns the counters."""
    from qwen3_pretrain.tokenizer import load_tokenizer

    files = expand_inputs(args.input)
    tokenizer = load_tokenizer(args.tokenizer_name_or_path)
    handler = build_handler(args.handler_name, args.json_keys, args.map_keys, tokenizer)
    vocab_size = len(tokenizer)
    dtype = np.dtype(best_dtype(vocab_size) if args.token_dtype == "auto" else args.token_dtype)
    check_vocab_fits(vocab_size, dtype)
    eod = None
    if args.append_eod:
        eod = tokenizer.eos_token_id
        if eod is None:
            raise DataInputError(f"--append-eod: the tokenizer in {args.tokenizer_name_or_path} has no eos token")
    prefixes = output_prefixes(args.output_prefix, handler.output_keys)
    engine, reference, engine_name = select_engine(tokenizer, args.tokenizer_engine)
    encoder = BatchEncoder(engine, reference, eod)
    print(
        f"preprocess: {len(files)} input file(s), handler {type(handler).__name__}, vocab {vocab_size} "
        f"-> {dtype.name}, eod {f'{eod} appended' if eod is not None else 'not appended'}, "
        f"engine {engine_name}, {args.workers} worker(s), output {', '.join(prefixes)}",
        flush=True,
    )
    counters = Counters()
    progress = Progress(args.log_interval, counters)
    with ExitStack() as stack:
        try:
            writers = [stack.enter_context(IndexedDatasetWriter(prefix, dtype)) for prefix in prefixes]
        except IndexedDatasetError as exc:
            raise IndexedDatasetError(f"--output-prefix {args.output_prefix}: {exc}") from exc
        tasks = _tasks(files, handler, args, counters)
        results = ordered_map(_tokenize_task, tasks, args.workers, encoder)
        for key_index, tokens, lengths, text_bytes in results:
            kept_tokens, kept_lengths = tokens, lengths
            if args.seq_length is not None:  # MindSpeed drops documents of seq_length tokens or more
                keep = lengths < args.seq_length
                counters.dropped += int(len(lengths) - keep.sum())
                kept_tokens, kept_lengths = tokens[np.repeat(keep, lengths)], lengths[keep]
            writers[key_index].add_documents(kept_tokens, kept_lengths)
            counters.documents += len(kept_lengths)
            counters.tokens += len(kept_tokens)
            counters.text_bytes += text_bytes
            progress.update()
        for writer in writers:
            writer.finalize()
    c = counters
    dropped = f", dropped {c.dropped} of {args.seq_length}+ tokens (--seq-length)" if args.seq_length else ""
    bad = ""
    if args.skip_bad_lines:
        bad = f", skipped {c.read.bad_lines} bad lines and {c.read.missing_fields} records missing a column"
    print(
        f"done: {c.documents} documents, {c.tokens} tokens written; skipped {c.empty} empty{dropped}{bad}; "
        f"{c.text_bytes / 1e6:.2f} MB of text in {time.perf_counter() - progress.start:.2f} s ({progress.rates()})",
        flush=True,
    )
    for prefix in prefixes:
        print(f"wrote {bin_path(prefix)} ({os.path.getsize(bin_path(prefix))} bytes) and {idx_path(prefix)}")
    return counters


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen3-pretrain preprocess",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Tokenize text (parquet, arrow, jsonl, json, csv, txt; .gz/.zst; `datasets` save_to_disk "
        "directories) into Megatron .bin/.idx files; the flags are MindSpeed-LLM preprocess_data.py's.",
    )
    data = parser.add_argument_group("input data")
    data.add_argument(
        "--input", required=True,
        help="a file, a directory (its files by name, or a `datasets` save_to_disk directory), a glob, "
        "or several comma-separated",
    )
    data.add_argument("--handler-name", default="GeneralPretrainHandler", help=f"one of {', '.join(HANDLERS)}")
    data.add_argument("--json-keys", nargs="+", default=["text"], help="columns to tokenize, one output per key")
    data.add_argument(
        "--map-keys", type=json.loads, default=None,
        help='Alpaca handlers: JSON {"prompt": column, "query": column, "response": column}',
    )
    data.add_argument(
        "--skip-bad-lines", action="store_true",
        help="skip (and count) JSONL/text lines that are not valid UTF-8 or JSON, and records without a "
        "--json-keys column, instead of failing",
    )
    data.add_argument("--batch-size", type=int, default=1000, help="documents per tokenization task")
    tok = parser.add_argument_group("tokenizer")
    tok.add_argument("--tokenizer-name-or-path", required=True, help="HF tokenizer directory (ships with the weights)")
    tok.add_argument("--tokenizer-type", default="PretrainedFromHF", choices=["PretrainedFromHF"])
    tok.add_argument(
        "--tokenizer-engine", default="auto", choices=[*ENGINES, *ALIASES],
        help="auto: the fastest of gigatoken, tiktoken that reproduces the HF tokenizer exactly on probe texts, "
        "else HF tokenizers (hf; `tokenizers` is an alias); naming an engine forces it",
    )
    tok.add_argument("--append-eod", action="store_true", help="append the tokenizer's eos token to each document")
    tok.add_argument("--seq-length", type=int, default=None, help="drop documents of this many tokens or more")
    tok.add_argument(
        "--token-dtype", default="auto", choices=["auto", "uint16", "int32"],
        help="token dtype of the .bin (auto: uint16 for vocabularies below 65500, else int32)",
    )
    out = parser.add_argument_group("output data")
    out.add_argument("--output-prefix", required=True, help="files are {prefix}_{key}_document.bin/.idx")
    out.add_argument(
        "--workers", type=int, default=1,
        help="tokenizer threads (processes for a slow transformers tokenizer); 1: one thread per core",
    )
    out.add_argument("--log-interval", type=int, default=100, help="documents between progress lines")
    ignored = ("--streaming", "--overwrite-cache", "--tokenizer-not-use-fast")
    ignored_values = (
        "--dataset-impl", "--n-subs", "--cache-dir", "--prompt-type", "--prompt-type-path", "--seed",
        "--make-vocab-size-divisible-by", "--pad-vocab-size-to",
    )
    compat = parser.add_argument_group(
        "MindSpeed compatibility",
        f"accepted and ignored (input always streams, no cache, the chat template comes from the tokenizer): "
        f"{', '.join(ignored + ignored_values)}",
    )
    for flag in ignored:
        compat.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    for flag in ignored_values:
        compat.add_argument(flag, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--split-sentences", action="store_true", help=argparse.SUPPRESS)
    return parser


def validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject flag values we cannot honour, naming the flag."""
    for flag in ("--workers", "--log-interval", "--batch-size"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    if args.seq_length is not None and args.seq_length < 1:
        parser.error(f"--seq-length must be positive, got {args.seq_length}")
    if args.split_sentences:
        parser.error("--split-sentences is not supported (pretraining documents are kept whole)")
    if args.dataset_impl not in (None, "mmap"):
        parser.error(f"--dataset-impl {args.dataset_impl}: only the mmap format is written")


def main(argv: list[str]) -> int:
    """Entry point of `qwen3-pretrain preprocess`."""
    from qwen3_pretrain.tokenizer import TokenizerError

    parser = build_parser()
    args = parser.parse_args(argv)
    validate(parser, args)
    try:
        preprocess(args)
    except (DataInputError, IndexedDatasetError, TokenizerError) as exc:
        print(f"qwen3-pretrain preprocess: error: {exc}", file=sys.stderr)
        return 1
    return 0
