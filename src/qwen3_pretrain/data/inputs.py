"""Streaming readers of raw text datasets, in the forms HF `datasets` users have.

Files: parquet, Arrow IPC (`.arrow`, the stream format `datasets` writes or the file format), JSON
lines, JSON arrays, CSV and plain text; the text forms also gzip- (`.gz`) or zstd- (`.zst`)
compressed. `--input` may also name a directory (its files of those forms, sorted by name), a
`datasets` `save_to_disk` directory (its `.arrow` shards in `state.json` order) or a glob.

Every reader yields column batches (`{column: [value, ...]}`, at most `batch_size` rows; the text
forms end a batch at `BATCH_CHARS` characters too) and keeps memory bounded by the batch, never the
file: parquet through pyarrow `iter_batches`, Arrow one record batch of the file at a time (`datasets`
writes 1000-row batches), compressed files decompressed as they are read, JSON lines and text line by
line, JSON arrays object by object, CSV row by row.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any, TextIO

Batch = dict[str, list]
TEXT_SUFFIXES = (".jsonl", ".json", ".csv", ".txt")
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}  # suffix -> pyarrow codec (multi-member/-frame files work)
SUPPORTED_SUFFIXES = (
    ".parquet", ".arrow", *TEXT_SUFFIXES, *(t + c for t in TEXT_SUFFIXES for c in COMPRESSIONS)
)
SUPPORTED = ".parquet, .arrow, .jsonl, .json, .csv, .txt (the last four also as .gz or .zst)"
TEXT_FILE_COLUMN = "text"  # a .txt file is one document per line, in this column (as HF `datasets` does)
JSON_ARRAY_CHUNK = 1 << 20
JSON_ARRAY_MAX_OBJECT = 256 << 20  # a JSON array element larger than this is treated as corrupt
BATCH_CHARS = 1 << 23  # a batch of a text form also ends at this many characters: long documents stay bounded
READ_BUFFER = 1 << 20  # bytes of decompressed data buffered when reading a compressed file
ARROW_FILE_MAGIC = b"ARROW1"  # the IPC file format starts with it; the stream format does not
SAVE_TO_DISK_FILES = ("state.json", "dataset_info.json")  # `datasets` writes both next to its shards


class DataInputError(ValueError):
    """The input data cannot be read as asked: missing file, unknown format, missing column, bad line."""


@dataclass
class ReadStats:
    """Counters the readers update while streaming."""

    bad_lines: int = 0
    missing_fields: int = 0  # records without a required column, skipped (--skip-bad-lines)


def expand_inputs(spec: str) -> list[str]:
    """Resolve `--input`: comma-separated files, directories or glob patterns, to the files to read in order.

    A glob's matches are sorted by name and each is taken as if named alone.
    """
    files: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if glob.has_magic(part):
            matches = sorted(glob.glob(part))
            if not matches:
                raise DataInputError(f"--input {part}: the pattern matches no file")
            for match in matches:
                files += _expand_path(match)
        elif os.path.exists(part):
            files += _expand_path(part)
        else:
            raise DataInputError(f"--input {part}: no such file or directory")
    if not files:
        raise DataInputError(f"--input {spec!r} names no file")
    return files


def _expand_path(path: str) -> list[str]:
    """A file (checked to be of a supported form) or the data files of a directory."""
    if not os.path.isdir(path):
        return [_check_suffix(path)]
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        splits = sorted(name for name in os.listdir(path) if os.path.isdir(os.path.join(path, name)))
        raise DataInputError(
            f"--input {path}: a `datasets` DatasetDict directory (dataset_dict.json); pass one split's "
            f"directory: {', '.join(os.path.join(path, split) for split in splits)}"
        )
    if any(os.path.isfile(os.path.join(path, name)) for name in SAVE_TO_DISK_FILES):
        return _save_to_disk_files(path)
    found = sorted(
        os.path.join(path, name)
        for name in os.listdir(path)
        if name.endswith(SUPPORTED_SUFFIXES) and os.path.isfile(os.path.join(path, name))
    )
    if not found:
        raise DataInputError(f"--input {path}: the directory holds no data files; supported: {SUPPORTED}")
    return found


def _save_to_disk_files(path: str) -> list[str]:
    """The `.arrow` shards of a `datasets` `save_to_disk` directory, in the order its state.json lists them."""
    state_path = os.path.join(path, "state.json")
    if not os.path.isfile(state_path):
        raise DataInputError(f"--input {path}: a `datasets` save_to_disk directory without its state.json")
    try:
        with open(state_path, encoding="utf-8") as f:
            names = [entry["filename"] for entry in json.load(f)["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataInputError(f"{state_path}: cannot read its `_data_files` list ({exc!r})") from exc
    if not names:
        raise DataInputError(f"--input {path}: the `datasets` save_to_disk directory lists no .arrow data files")
    missing = [name for name in names if not os.path.isfile(os.path.join(path, name))]
    if missing:
        raise DataInputError(
            f"--input {path}: data file(s) {', '.join(missing)} listed in its state.json are missing"
        )
    return [_check_suffix(os.path.join(path, name)) for name in names]


def _check_suffix(path: str) -> str:
    if not path.endswith(SUPPORTED_SUFFIXES):
        raise DataInputError(f"--input {path}: unsupported file type; supported: {SUPPORTED}, or a directory")
    return path


def _split_suffix(path: str) -> tuple[str, str | None]:
    """(format suffix, pyarrow compression codec or None) of a supported file name."""
    for suffix, codec in COMPRESSIONS.items():
        if path.endswith(suffix):
            return os.path.splitext(path[: -len(suffix)])[1], codec
    return os.path.splitext(path)[1], None


def _open_binary(path: str) -> IO[bytes]:
    """`path` opened for reading bytes, decompressed on the fly when it is compressed."""
    codec = _split_suffix(path)[1]
    if codec is None:
        return open(path, "rb")
    import pyarrow as pa

    return io.BufferedReader(pa.input_stream(path, compression=codec), READ_BUFFER)


def read_batches(
    path: str,
    required: list[str],
    optional: list[str],
    batch_size: int,
    stats: ReadStats,
    skip_bad_lines: bool = False,
) -> Iterator[Batch]:
    """Stream `path` as batches holding the `required` columns (an error if absent) and `optional` ones
    (None where absent)."""
    try:
        yield from _batches(path, required, optional, batch_size, stats, skip_bad_lines)
    except OSError as exc:  # unreadable file, or damaged compressed data (pyarrow's codecs raise OSError)
        raise DataInputError(f"{path}: cannot read the file ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise DataInputError(f"{path}: invalid UTF-8 ({exc.reason})") from exc


def _batches(
    path: str, required: list[str], optional: list[str], batch_size: int, stats: ReadStats, skip_bad_lines: bool
) -> Iterator[Batch]:
    form = _split_suffix(path)[0]
    if form == ".parquet":
        yield from _parquet_batches(path, required, optional, batch_size)
    elif form == ".arrow":
        yield from _arrow_batches(path, required, optional, batch_size)
    elif form == ".csv":
        yield from _csv_batches(path, required, optional, batch_size)
    elif form == ".txt":
        extra = [c for c in required if c != TEXT_FILE_COLUMN]
        if extra:
            raise DataInputError(
                f"{path}: a .txt file has one column, {TEXT_FILE_COLUMN!r} (one document per line); "
                f"missing {extra}: use --json-keys text or a structured format"
            )
        lines = ((f"{path}:{n}", {TEXT_FILE_COLUMN: line}) for n, line in _text_lines(path, stats, skip_bad_lines))
        yield from _record_batches(path, lines, required, optional, batch_size, stats, skip_bad_lines)
    elif _is_json_array(path):
        records = _json_array_records(path)
        yield from _record_batches(path, records, required, optional, batch_size, stats, skip_bad_lines)
    else:
        records = _json_line_records(path, stats, skip_bad_lines)
        yield from _record_batches(path, records, required, optional, batch_size, stats, skip_bad_lines)


def _missing_column_error(where: str, missing: list[str], present: list[str], record: bool = False) -> DataInputError:
    """The columns asked for are not in the file (its schema, or one `record` of it, at `where`)."""
    skip = "; --skip-bad-lines skips (and counts) such records" if record else ""
    return DataInputError(
        f"{where}: column(s) {', '.join(map(repr, missing))} not found; the file has columns "
        f"{', '.join(map(repr, present))}{' in this record' if record else ''}. Pass --json-keys with the text "
        f"column(s) or pick another --handler-name{skip}"
    )


def _parquet_batches(path: str, required: list[str], optional: list[str], batch_size: int) -> Iterator[Batch]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for non-parquet or damaged files
        raise DataInputError(f"{path}: not a readable parquet file ({exc})") from exc
    names = parquet.schema_arrow.names
    missing = [c for c in required if c not in names]
    if missing:
        raise _missing_column_error(path, missing, names)
    present = [c for c in required + optional if c in names]
    for record_batch in _checked(parquet.iter_batches(batch_size=batch_size, columns=present), path, "parquet"):
        yield _with_optional(record_batch, optional)


def _arrow_batches(path: str, required: list[str], optional: list[str], batch_size: int) -> Iterator[Batch]:
    """An Arrow IPC stream (what `datasets` writes) or file, read one of its record batches at a time (not
    memory-mapped, so RSS stays flat), of which `batch_size` rows at a time become Python objects."""
    import pyarrow as pa

    with pa.OSFile(path) as source:
        try:
            file_format = source.read(len(ARROW_FILE_MAGIC)) == ARROW_FILE_MAGIC
            source.seek(0)
            reader = pa.ipc.open_file(source) if file_format else pa.ipc.open_stream(source)
        except (pa.ArrowException, OSError) as exc:
            raise DataInputError(f"{path}: not a readable Arrow IPC stream or file ({exc})") from exc
        names = reader.schema.names
        missing = [c for c in required if c not in names]
        if missing:
            raise _missing_column_error(path, missing, names)
        present = [c for c in required + optional if c in names]
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches)) if file_format else iter(reader)
        for record_batch in _checked(batches, path, "Arrow"):
            selected = record_batch.select(present)
            for start in range(0, selected.num_rows, batch_size):
                yield _with_optional(selected.slice(start, batch_size), optional)


def _checked(batches: Iterator[Any], path: str, what: str) -> Iterator[Any]:
    """The record batches of a pyarrow reader; a read error becomes a DataInputError naming the file and batch."""
    import pyarrow as pa

    index = 0
    while True:
        try:
            record_batch = next(batches, None)
        except (pa.ArrowException, OSError) as exc:
            raise DataInputError(f"{path}: damaged {what} data in record batch {index} ({exc})") from exc
        if record_batch is None:
            return
        index += 1
        yield record_batch


def _with_optional(record_batch: Any, optional: list[str]) -> Batch:
    """A pyarrow record batch as {column: values}, with None for the optional columns it lacks."""
    batch: Batch = record_batch.to_pydict()
    for column in optional:
        batch.setdefault(column, [None] * record_batch.num_rows)
    return batch


def _csv_batches(path: str, required: list[str], optional: list[str], batch_size: int) -> Iterator[Batch]:
    csv.field_size_limit(1 << 30)
    with io.TextIOWrapper(_open_binary(path), encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        names = list(reader.fieldnames or [])
        missing = [c for c in required if c not in names]
        if missing:
            raise _missing_column_error(path, missing, names)
        rows = ((f"{path}:{reader.line_num}", row) for row in reader)  # short rows hold None: never missing
        yield from _record_batches(path, rows, required, optional, batch_size, ReadStats(), skip_bad_lines=False)


def _record_batches(
    path: str,
    records: Iterator[tuple[str, dict]],
    required: list[str],
    optional: list[str],
    batch_size: int,
    stats: ReadStats,
    skip_bad_lines: bool,
) -> Iterator[Batch]:
    """Group (where, record) pairs into column batches (`batch_size` rows, or fewer holding `BATCH_CHARS`). A
    record without a required column is an error naming where it is, or with `skip_bad_lines` skipped and counted;
    a file none of whose records has them is an error."""
    columns = required + optional
    batch: Batch = {c: [] for c in columns}
    rows = in_batch = chars = 0
    first_missing: tuple[list[str], list[str]] | None = None
    for where, record in records:
        missing = [c for c in required if c not in record]
        if missing:
            if not skip_bad_lines:
                raise _missing_column_error(where, missing, list(record), record=True)
            stats.missing_fields += 1
            first_missing = first_missing or (missing, list(record))
            continue
        for column in columns:
            value = record.get(column)
            batch[column].append(value)
            chars += len(value) if isinstance(value, str) else 0
        rows, in_batch = rows + 1, in_batch + 1
        if in_batch == batch_size or chars >= BATCH_CHARS:
            yield batch
            batch, in_batch, chars = {c: [] for c in columns}, 0, 0
    if in_batch:
        yield batch
    if rows == 0 and first_missing is not None:
        raise _missing_column_error(path, *first_missing)


def _text_lines(path: str, stats: ReadStats, skip_bad_lines: bool) -> Iterator[tuple[int, str]]:
    """(line number, line without its newline) of a UTF-8 file, read in binary to report bad lines."""
    with _open_binary(path) as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                _bad_line(path, number, f"invalid UTF-8 ({exc.reason} at byte {exc.start})", stats, skip_bad_lines)
                continue
            yield number, line.rstrip("\r\n")


def _bad_line(path: str, number: int, why: str, stats: ReadStats, skip_bad_lines: bool) -> None:
    if not skip_bad_lines:
        raise DataInputError(f"{path}:{number}: {why}; fix the line or pass --skip-bad-lines to skip such lines")
    stats.bad_lines += 1


def _json_line_records(path: str, stats: ReadStats, skip_bad_lines: bool) -> Iterator[tuple[str, dict]]:
    for number, line in _text_lines(path, stats, skip_bad_lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            _bad_line(path, number, f"invalid JSON ({exc.msg} at column {exc.colno})", stats, skip_bad_lines)
            continue
        if not isinstance(record, dict):
            _bad_line(path, number, f"expected a JSON object, got {type(record).__name__}", stats, skip_bad_lines)
            continue
        yield f"{path}:{number}", record


def _is_json_array(path: str) -> bool:
    """A .json file is either a JSON array of objects or JSON lines: peek at its first character."""
    if _split_suffix(path)[0] != ".json":
        return False
    with _open_binary(path) as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


class _JsonArrayScanner:
    """Walk a top-level JSON array in a file, one element at a time, over a sliding text buffer."""

    def __init__(self, path: str, f: TextIO) -> None:
        self.path, self.f = path, f
        self.buffer, self.pos, self.eof = "", 0, False

    def _more(self) -> None:
        chunk = self.f.read(JSON_ARRAY_CHUNK)
        self.buffer, self.pos, self.eof = self.buffer[self.pos :] + chunk, 0, not chunk

    def next_char(self) -> str:
        """Skip whitespace and return the next character without consuming it ("" at the end)."""
        while True:
            while self.pos < len(self.buffer) and self.buffer[self.pos] in " \t\r\n\ufeff":
                self.pos += 1
            if self.pos < len(self.buffer) or self.eof:
                return self.buffer[self.pos : self.pos + 1]
            self._more()

    def expect(self, chars: str, where: str) -> str:
        char = self.next_char()
        if not char or char not in chars:
            found = repr(char) if char else "the end of the file (truncated?)"
            raise DataInputError(f"{self.path}: expected {' or '.join(map(repr, chars))} {where}, found {found}")
        self.pos += 1
        return char

    def element(self, index: int) -> object:
        decoder = json.JSONDecoder()
        while True:
            try:
                value, self.pos = decoder.raw_decode(self.buffer, self.pos)
                return value
            except json.JSONDecodeError as exc:
                if self.eof or len(self.buffer) - self.pos > JSON_ARRAY_MAX_OBJECT:
                    raise DataInputError(
                        f"{self.path}: element {index} of the JSON array is invalid JSON ({exc.msg})"
                    ) from exc
                self._more()


def _json_array_records(path: str) -> Iterator[tuple[str, dict]]:
    with io.TextIOWrapper(_open_binary(path), encoding="utf-8-sig") as f:
        scanner = _JsonArrayScanner(path, f)
        try:
            scanner.expect("[", "at the start of the JSON array")
            if scanner.next_char() == "]":
                return
            index = 0
            while True:
                scanner.next_char()
                record = scanner.element(index)
                if not isinstance(record, dict):
                    raise DataInputError(
                        f"{path}: element {index} of the JSON array is a {type(record).__name__}, expected an object"
                    )
                yield f"{path}: element {index} of the JSON array", record
                index += 1
                if scanner.expect(",]", f"after element {index - 1} of the JSON array") == "]":
                    return
        except UnicodeDecodeError as exc:
            raise DataInputError(f"{path}: invalid UTF-8 in the JSON array ({exc.reason})") from exc
