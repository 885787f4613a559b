"""Megatron indexed dataset files: `<prefix>.bin` (tokens) and `<prefix>.idx` (index), read and write.

Format (little-endian), the one megatron-core's `IndexedDataset` reads:
  .idx = magic b"MMIDIDX\\x00\\x00" | u64 version 1 | u8 dtype code | u64 sequence count N
         | u64 document count D (documents + 1) | int32[N] lengths | int64[N] byte offsets into .bin
         | int64[D] document indices (entry k = the sequence index where document k ends, first 0)
  .bin = the tokens of all sequences, concatenated, in the index's dtype.
We write one sequence per document, as Megatron's and MindSpeed's preprocessors do.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count
DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
UINT16_VOCAB_LIMIT = 65500  # Megatron stores tokens as uint16 below this vocabulary size
TOKEN_RANGE_SUFFIX = ".maxid"  # `<prefix>.maxid`: the cached smallest and largest token id of `<prefix>.bin`
TOKEN_SCAN_CHUNK = 1 << 24  # tokens per step when scanning a .bin for its token id range


class IndexedDatasetError(ValueError):
    """An indexed dataset file pair is missing, truncated, corrupt or inconsistent."""


def bin_path(prefix: str | os.PathLike) -> str:
    """Path of the token file of `prefix`."""
    return f"{os.fspath(prefix)}.bin"


def idx_path(prefix: str | os.PathLike) -> str:
    """Path of the index file of `prefix`."""
    return f"{os.fspath(prefix)}.idx"


def strip_suffix(path: str) -> str:
    """Accept `prefix`, `prefix.bin` or `prefix.idx` and return the prefix."""
    for suffix in (".bin", ".idx"):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


def best_dtype(vocab_size: int) -> type[np.number]:
    """The token dtype Megatron picks: uint16 when the vocabulary is below 65500, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < UINT16_VOCAB_LIMIT else np.int32


def dtype_code(dtype: type[np.number] | np.dtype) -> int:
    """The .idx code of a numpy dtype (raises for a dtype the format cannot store)."""
    wanted = np.dtype(dtype)
    for code, candidate in DTYPE_CODES.items():
        if np.dtype(candidate) == wanted:
            return code
    names = ", ".join(np.dtype(d).name for d in DTYPE_CODES.values())
    raise IndexedDatasetError(f"dtype {wanted.name} cannot be stored in a .idx file (use one of {names})")


def check_vocab_fits(vocab_size: int, dtype: type[np.number] | np.dtype) -> None:
    """Raise when token ids up to `vocab_size - 1` do not fit in `dtype`."""
    limit = np.iinfo(dtype).max
    if vocab_size - 1 > limit:
        raise IndexedDatasetError(
            f"a vocabulary of {vocab_size} tokens does not fit in {np.dtype(dtype).name} (max id {limit}); "
            f"use int32 (best_dtype({vocab_size}) = {np.dtype(best_dtype(vocab_size)).name})"
        )


def _write_atomically(path: str, content: str) -> None:
    """Write `content` to `path` through a temporary file renamed into place (removed when that fails)."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(content)
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp)
        raise


class IndexedDatasetWriter:
    """Write `<prefix>.bin/.idx`, one sequence per document, atomically.

    Tokens stream to `<prefix>.bin.tmp-<pid>`; `finalize()` writes the index the same way and renames
    both into place (the .idx last), so an interrupted run leaves no pair that looks complete.
    Use as a context manager: an exception (or leaving without `finalize()`) removes the temp files.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: type[np.number] | np.dtype) -> None:
        self.prefix = os.fspath(prefix)
        self.dtype = np.dtype(dtype)
        self._code = dtype_code(self.dtype)
        if not np.issubdtype(self.dtype, np.integer):
            raise IndexedDatasetError(f"token dtype must be an integer type, got {self.dtype.name}")
        self._max_token = int(np.iinfo(self.dtype).max)
        suffix = f".tmp-{os.getpid()}"
        self._tmp_bin = bin_path(self.prefix) + suffix
        self._tmp_idx = idx_path(self.prefix) + suffix
        try:
            Path(self._tmp_bin).parent.mkdir(parents=True, exist_ok=True)
            self._bin = open(self._tmp_bin, "wb")  # noqa: SIM115  (open for the writer's lifetime: closed in finalize/abort)
        except OSError as exc:
            raise self._write_error(bin_path(self.prefix), exc) from exc
        self._lengths = array.array("i")
        self.num_tokens = 0
        self._done = False

    def add_document(self, tokens: Iterable[int] | np.ndarray) -> None:
        """Append one document (one sequence) of token ids."""
        ids = np.asarray(tokens)
        if ids.ndim != 1:
            raise IndexedDatasetError(f"a document must be a 1-D token sequence, got shape {ids.shape}")
        self._check_range(ids)
        self._write(ids.astype(self.dtype, copy=False).tobytes())
        self._lengths.append(len(ids))
        self.num_tokens += len(ids)

    def add_documents(self, flat_tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append many documents at once: their tokens concatenated and each one's length."""
        if int(np.sum(lengths)) != len(flat_tokens):
            raise IndexedDatasetError(f"lengths sum to {int(np.sum(lengths))} but {len(flat_tokens)} tokens given")
        self._check_range(flat_tokens)
        self._write(np.asarray(flat_tokens).astype(self.dtype, copy=False).tobytes())
        self._lengths.extend(np.asarray(lengths, dtype=np.int32).tolist())
        self.num_tokens += len(flat_tokens)

    def _write(self, data: bytes) -> None:
        try:
            self._bin.write(data)
        except OSError as exc:
            raise self._write_error(bin_path(self.prefix), exc) from exc

    @staticmethod
    def _write_error(path: str, exc: OSError) -> IndexedDatasetError:
        """A one-line error naming the file that could not be written (disk full, no permission, ...)."""
        return IndexedDatasetError(f"cannot write {path}: {exc.strerror or exc}")

    def _check_range(self, ids: np.ndarray) -> None:
        if ids.size == 0:
            return
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high > self._max_token:
            raise IndexedDatasetError(
                f"token id {high if high > self._max_token else low} does not fit in {self.dtype.name} "
                f"({self.prefix}); the tokenizer's vocabulary is too large for this dtype: use int32"
            )

    @property
    def num_documents(self) -> int:
        return len(self._lengths)

    def finalize(self) -> None:
        """Write the index and move both files to their final names."""
        try:
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
        except OSError as exc:
            raise self._write_error(bin_path(self.prefix), exc) from exc
        lengths = np.frombuffer(self._lengths, dtype=np.int32)
        offsets = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], dtype=np.int64, out=offsets[1:])
        offsets *= self.dtype.itemsize
        document_indices = np.arange(len(lengths) + 1, dtype=np.int64)
        try:
            with open(self._tmp_idx, "wb") as f:
                f.write(HEADER.pack(MAGIC, VERSION, self._code, len(lengths), len(document_indices)))
                f.write(lengths.tobytes())
                f.write(offsets.tobytes())
                f.write(document_indices.tobytes())
                f.flush()
                os.fsync(f.fileno())
            os.replace(self._tmp_bin, bin_path(self.prefix))
            os.replace(self._tmp_idx, idx_path(self.prefix))
        except OSError as exc:
            raise self._write_error(idx_path(self.prefix), exc) from exc
        self._done = True

    def abort(self) -> None:
        """Close and delete the temp files (no-op after `finalize()`)."""
        if self._done:
            return
        with contextlib.suppress(OSError):  # flushing the rest fails on a full disk: the file goes anyway
            self._bin.close()
        for path in (self._tmp_bin, self._tmp_idx):
            if os.path.exists(path):
                os.remove(path)
        self._done = True

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


class IndexedDataset:
    """Memory-mapped reader of `<prefix>.bin/.idx`; item `i` is sequence `i` as a numpy array.

    Opening checks the header, the index size and (unless `check_bin_size=False`) that the .bin holds
    exactly the tokens the index describes, so a truncated or mismatched pair fails here with the
    file named, not mid-training.
    """

    def __init__(self, prefix: str | os.PathLike, check_bin_size: bool = True) -> None:
        self.prefix = strip_suffix(os.fspath(prefix))
        self.idx_file, self.bin_file = idx_path(self.prefix), bin_path(self.prefix)
        for path in (self.idx_file, self.bin_file):
            if not os.path.isfile(path):
                raise IndexedDatasetError(
                    f"{path} not found: pass the prefix of a .bin/.idx pair written by `qwen3-pretrain preprocess` "
                    f"(e.g. out/alpaca_text_document)"
                )
        idx_size = os.path.getsize(self.idx_file)
        if idx_size < HEADER.size:
            raise IndexedDatasetError(f"{self.idx_file} is truncated: {idx_size} bytes, shorter than the header")
        self._idx = np.memmap(self.idx_file, dtype=np.uint8, mode="r")
        magic, version, code, num_sequences, num_doc_indices = HEADER.unpack(bytes(self._idx[: HEADER.size]))
        if magic != MAGIC:
            raise IndexedDatasetError(f"{self.idx_file} is not a Megatron index file (magic {magic!r})")
        if version != VERSION:
            raise IndexedDatasetError(f"{self.idx_file}: index version {version} is not supported (only 1)")
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(
                f"{self.idx_file}: unknown dtype code {code} (known: {sorted(DTYPE_CODES)}); the file is corrupt"
            )
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = HEADER.size + num_sequences * (4 + 8) + num_doc_indices * 8
        if idx_size != expected:
            raise IndexedDatasetError(
                f"{self.idx_file} is {idx_size} bytes but its header ({num_sequences} sequences, "
                f"{num_doc_indices} document indices) needs {expected}: the file is truncated or corrupt "
                f"(multimodal indexes are not supported)"
            )
        offset = HEADER.size
        self._lengths = np.frombuffer(self._idx, np.int32, num_sequences, offset)
        offset += self._lengths.nbytes
        self._pointers = np.frombuffer(self._idx, np.int64, num_sequences, offset)
        offset += self._pointers.nbytes
        self._document_indices = np.frombuffer(self._idx, np.int64, num_doc_indices, offset)
        if check_bin_size:
            self.check_bin_size()
        self._bin = np.memmap(self.bin_file, dtype=np.uint8, mode="r") if os.path.getsize(self.bin_file) else None

    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}  # reopen (and re-map) in the receiving process, never copy the maps

    def __setstate__(self, state: dict) -> None:
        type(self).__init__(self, state["prefix"])

    def expected_bin_size(self) -> int:
        """Bytes the .bin must have: the end of the last sequence."""
        if len(self._lengths) == 0:
            return 0
        return int(self._pointers[-1]) + int(self._lengths[-1]) * self.dtype.itemsize

    def check_bin_size(self) -> None:
        """Raise when the .bin size differs from what the index describes."""
        actual, expected = os.path.getsize(self.bin_file), self.expected_bin_size()
        if actual != expected:
            state = "truncated" if actual < expected else "longer than its index"
            raise IndexedDatasetError(
                f"{self.bin_file} is {state}: {actual} bytes, the index describes {expected} "
                f"({expected // self.dtype.itemsize} {self.dtype.name} tokens); re-run preprocessing"
            )

    def __len__(self) -> int:
        return len(self._lengths)

    def __getitem__(self, idx: int) -> np.ndarray:
        return self.get(idx)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `[offset, offset + length)` of sequence `idx` (to its end when length is None)."""
        if not -len(self) <= idx < len(self):
            raise IndexError(f"sequence {idx} out of range for {self.prefix} ({len(self)} sequences)")
        size = int(self._lengths[idx])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens [{offset}, {offset + length}) outside sequence {idx} of length {size}")
        if length == 0:
            return np.empty(0, dtype=self.dtype)
        if self._bin is None:  # an empty .bin under a non-empty sequence: only when opened with check_bin_size=False
            raise IndexedDatasetError(f"{self.bin_file} is empty but sequence {idx} has {size} tokens")
        start = int(self._pointers[idx]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, self.dtype, length, start)

    @property
    def sequence_lengths(self) -> np.ndarray:
        """int32[N]: the length of each sequence."""
        return self._lengths

    @property
    def sequence_pointers(self) -> np.ndarray:
        """int64[N]: the byte offset of each sequence in the .bin."""
        return self._pointers

    @property
    def document_indices(self) -> np.ndarray:
        """int64[D]: document k spans sequences [document_indices[k], document_indices[k + 1])."""
        return self._document_indices

    @property
    def num_tokens(self) -> int:
        return int(self._lengths.sum(dtype=np.int64))

    def token_id_range(self, cache_dir: str | None = None) -> tuple[int, int]:
        """(smallest, largest) token id in the .bin, (0, -1) when it holds none.

        Scanned once per version of the .bin (its size and mtime), in chunks over the memory map after a
        full `validate()`, and cached in `<prefix>.maxid`, or in `cache_dir` when the dataset's directory is
        not writable (without either the scan repeats on every call).
        """
        stat = os.stat(self.bin_file)
        key = {"bin_bytes": stat.st_size, "bin_mtime_ns": stat.st_mtime_ns}
        name = hashlib.md5(os.path.abspath(self.prefix).encode()).hexdigest() + TOKEN_RANGE_SUFFIX
        places = [self.prefix + TOKEN_RANGE_SUFFIX, *([os.path.join(cache_dir, name)] if cache_dir else [])]
        for place in places:
            try:
                with open(place, encoding="utf-8") as f:
                    cached = json.load(f)
                if {k: cached.get(k) for k in key} == key:
                    return int(cached["min"]), int(cached["max"])
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue  # absent, unreadable or damaged: scan again
        self.validate()
        tokens = np.frombuffer(self._bin, self.dtype, self.num_tokens) if self._bin is not None else np.empty(0)
        chunks = [tokens[i : i + TOKEN_SCAN_CHUNK] for i in range(0, len(tokens), TOKEN_SCAN_CHUNK)]
        low, high = (min(int(c.min()) for c in chunks), max(int(c.max()) for c in chunks)) if chunks else (0, -1)
        content = json.dumps({**key, "min": low, "max": high})
        for place in places:
            try:
                _write_atomically(place, content)
                break
            except OSError:
                continue  # a read-only dataset directory: try the cache directory
        return low, high

    def validate(self) -> None:
        """Full consistency check of the index (O(N)): offsets follow lengths, document indices ascend."""
        if (self._lengths < 0).any():
            raise IndexedDatasetError(f"{self.idx_file}: negative sequence lengths; the file is corrupt")
        expected = np.zeros(len(self), dtype=np.int64)
        np.cumsum(self._lengths[:-1], dtype=np.int64, out=expected[1:])
        bad = np.flatnonzero(expected * self.dtype.itemsize != self._pointers)
        if bad.size:
            raise IndexedDatasetError(
                f"{self.idx_file}: byte offset of sequence {bad[0]} is {self._pointers[bad[0]]}, "
                f"expected {expected[bad[0]] * self.dtype.itemsize}; the file is corrupt"
            )
        docs = self._document_indices
        if len(docs) == 0 or docs[0] != 0 or docs[-1] != len(self) or (np.diff(docs) < 0).any():
            raise IndexedDatasetError(
                f"{self.idx_file}: document indices must ascend from 0 to {len(self)}; the file is corrupt"
            )
