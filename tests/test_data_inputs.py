"""Input forms of `qwen3-pretrain preprocess`: one corpus in every form gives the same .bin/.idx bytes.

Forms: parquet, jsonl (plain, gzip, zstd), JSON array (plain, gzip), csv, Arrow IPC stream and file,
a `datasets` save_to_disk directory, a directory of parquet shards, a glob, and a directory mixing
forms; plus the errors for damaged or unsupported inputs.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

import qwen3_pretrain.tokenizer as tokenizer_module
from qwen3_pretrain.cli import main as cli_main
from qwen3_pretrain.data.indexed import IndexedDataset
from qwen3_pretrain.data.inputs import ReadStats, read_batches

PHRASES = [
    "Hello, world!",
    "你好，世界！",
    'quotes "inside", commas, and a\nnewline',
    "tabs\tand trailing spaces  ",
    "emoji 🙂 café naïve",
]
KEYS = ("text", "title")


def corpus_rows(count: int) -> list[dict]:
    """Rows with an int column that is never selected; some texts empty or None."""
    rows = []
    for i in range(count):
        text = " ".join(PHRASES[(i + k) % len(PHRASES)] for k in range(1 + i % 3))
        rows.append(
            {
                "id": i,
                "title": f"title {i} {PHRASES[i % len(PHRASES)]}" if i % 4 else "",
                "text": None if i % 9 == 4 else ("" if i % 7 == 2 else text),
            }
        )
    return rows


ROWS = corpus_rows(40)
TABLE = pa.Table.from_pylist(ROWS)


@pytest.fixture(autouse=True)
def cached_tokenizer_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Load the tokenizer directory once per session (the real loader, memoised)."""
    monkeypatch.setattr(tokenizer_module, "load_tokenizer", _cached_load)


_real_load = tokenizer_module.load_tokenizer


@functools.cache
def _cached_load(path: str):
    return _real_load(path)


def run(*args: str | Path) -> int:
    return cli_main(["preprocess", *map(str, args)])


def jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def write_arrow_stream(path: Path, table: pa.Table, rows_per_batch: int) -> None:
    with pa.ipc.new_stream(path, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=rows_per_batch):
            writer.write_batch(batch)


def write_save_to_disk(folder: Path, table: pa.Table, shards: int) -> None:
    """The layout of `datasets.Dataset.save_to_disk(folder, num_shards=shards)` (datasets 5.2):
    data-0000i-of-0000n.arrow (IPC streams of 1000-row batches), state.json, dataset_info.json."""
    folder.mkdir()
    features = {"id": {"dtype": "int64", "_type": "Value"}, "title": {"dtype": "string", "_type": "Value"},
                "text": {"dtype": "string", "_type": "Value"}}
    metadata = {"huggingface": json.dumps({"info": {"features": features}})}
    per_shard = -(-table.num_rows // shards)
    names = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]
    for i, name in enumerate(names):
        shard = table.slice(i * per_shard, per_shard).replace_schema_metadata(metadata)
        write_arrow_stream(folder / name, shard, 1000)
    state = {
        "_data_files": [{"filename": name} for name in names], "_fingerprint": "4bd5063c691d5ead",
        "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
        "_split": None,
    }
    (folder / "state.json").write_text(json.dumps(state, indent=2))
    info = {"citation": "", "description": "", "features": features, "homepage": "", "license": ""}
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=2))


def write_forms(root: Path) -> dict[str, Path | str]:
    """ROWS in every input form; compressed files have two gzip members / zstd frames."""
    half = len(ROWS) // 2
    paths: dict[str, Path | str] = {}
    pq.write_table(TABLE, root / "c.parquet", row_group_size=7)
    paths["parquet"] = root / "c.parquet"
    (root / "c.jsonl").write_bytes(jsonl_bytes(ROWS))
    paths["jsonl"] = root / "c.jsonl"
    (root / "c.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(ROWS[:half])) + gzip.compress(jsonl_bytes(ROWS[half:])))
    paths["jsonl.gz"] = root / "c.jsonl.gz"
    zstd = pa.Codec("zstd")
    (root / "c.jsonl.zst").write_bytes(
        zstd.compress(jsonl_bytes(ROWS[:half]), asbytes=True) + zstd.compress(jsonl_bytes(ROWS[half:]), asbytes=True)
    )
    paths["jsonl.zst"] = root / "c.jsonl.zst"
    array = json.dumps(ROWS, ensure_ascii=False, indent=1).encode()
    (root / "c.json").write_bytes(array)
    paths["json"] = root / "c.json"
    (root / "c.json.gz").write_bytes(gzip.compress(array))
    paths["json.gz"] = root / "c.json.gz"
    pa_csv.write_csv(TABLE, root / "c.csv")
    paths["csv"] = root / "c.csv"
    write_arrow_stream(root / "stream.arrow", TABLE, 8)
    paths["arrow stream"] = root / "stream.arrow"
    with pa.ipc.new_file(root / "file.arrow", TABLE.schema) as writer:
        writer.write_table(TABLE)  # one record batch of 40 rows, sliced by --batch-size
    paths["arrow file"] = root / "file.arrow"
    write_save_to_disk(root / "saved", TABLE, 3)
    paths["save_to_disk"] = root / "saved"
    (root / "shards").mkdir()
    for i, start in enumerate((0, 13, 27)):
        pq.write_table(TABLE.slice(start, [13, 14, 13][i]), root / "shards" / f"train-{i:05d}-of-00003.parquet")
    paths["parquet shards"] = root / "shards"
    paths["glob"] = str(root / "shards" / "train-*-of-00003.parquet")
    mixed = root / "mixed"
    mixed.mkdir()  # written last-first: the directory is read sorted by name
    pq.write_table(TABLE.slice(30), mixed / "part-2.parquet")
    (mixed / "part-1.jsonl.zst").write_bytes(zstd.compress(jsonl_bytes(ROWS[12:30]), asbytes=True))
    write_arrow_stream(mixed / "part-0.arrow", TABLE.slice(0, 12), 5)
    paths["mixed directory"] = mixed
    return paths


@pytest.fixture(scope="module")
def forms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | str]:
    return write_forms(tmp_path_factory.mktemp("forms"))


def preprocess_bytes(out: Path, spec: Path | str, tokenizer_dir: Path, *extra: str) -> dict[str, bytes]:
    """Run preprocess on `spec` with --json-keys text title; the bytes of each output file."""
    assert run("--input", spec, "--tokenizer-name-or-path", tokenizer_dir, "--output-prefix", out,
               "--json-keys", *KEYS, "--append-eod", "--batch-size", "5", *extra) == 0
    return {f"{key}{ext}": Path(f"{out}_{key}_document{ext}").read_bytes() for key in KEYS for ext in (".bin", ".idx")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, forms, qwen3_tokenizer_dir) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("reference") / "ref"
    files = preprocess_bytes(out, forms["parquet"], qwen3_tokenizer_dir)
    tokenizer = _cached_load(str(qwen3_tokenizer_dir))
    for key in KEYS:  # the reference itself holds the HF tokenizer's ids of every non-empty value
        dataset = IndexedDataset(f"{out}_{key}_document")
        expected = [tokenizer(r[key])["input_ids"] + [tokenizer.eos_token_id] for r in ROWS if r[key]]
        assert [dataset[i].tolist() for i in range(len(dataset))] == expected
    return files


@pytest.mark.parametrize(
    "form",
    ["jsonl", "jsonl.gz", "jsonl.zst", "json", "json.gz", "csv", "arrow stream", "arrow file", "save_to_disk",
     "parquet shards", "glob", "mixed directory"],
)
def test_every_form_writes_identical_bytes(tmp_path, forms, reference, qwen3_tokenizer_dir, form) -> None:
    assert preprocess_bytes(tmp_path / "out", forms[form], qwen3_tokenizer_dir) == reference


def test_two_workers_on_mixed_forms_write_identical_bytes(tmp_path, forms, reference, qwen3_tokenizer_dir) -> None:
    two_workers = preprocess_bytes(tmp_path / "w2", forms["mixed directory"], qwen3_tokenizer_dir, "--workers", "2")
    assert two_workers == reference


@pytest.mark.parametrize("form", ["arrow file", "arrow stream", "jsonl.zst"])
def test_reader_batches_are_bounded_and_select_columns(forms, form) -> None:
    batches = list(read_batches(str(forms[form]), ["title"], ["missing"], 6, ReadStats()))
    assert all(set(b) == {"title", "missing"} and 0 < len(b["title"]) <= 6 for b in batches)
    assert [t for b in batches for t in b["title"]] == [r["title"] for r in ROWS]
    assert all(v is None for b in batches for v in b["missing"])


def run_failing(capsys, out_dir: Path, spec: Path | str, tokenizer_dir: Path, *extra: str) -> str:
    """Run a preprocess that must fail; return its error message and check no file was left."""
    out_dir.mkdir(exist_ok=True)
    assert run("--input", spec, "--tokenizer-name-or-path", tokenizer_dir, "--output-prefix", out_dir / "o",
               *extra) == 1
    assert os.listdir(out_dir) == []
    return capsys.readouterr().err


def test_unsupported_and_empty_inputs_are_named(tmp_path, forms, qwen3_tokenizer_dir, capsys) -> None:
    def error(spec: Path | str) -> str:
        return run_failing(capsys, tmp_path / "out", spec, qwen3_tokenizer_dir)

    assert f"--input {tmp_path}/nothing-*.parquet: the pattern matches no file" in error(tmp_path / "nothing-*.parquet")
    for name in ("data.xml", "data.jsonl.bz2", "data.parquet.gz"):
        (tmp_path / name).write_text("x")
        assert f"{tmp_path / name}: unsupported file type; supported: .parquet, .arrow" in error(tmp_path / name)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "README.md").write_text("x")
    assert f"--input {tmp_path / 'docs'}: the directory holds no data files" in error(tmp_path / "docs")


def test_bad_save_to_disk_directories(tmp_path, qwen3_tokenizer_dir, capsys) -> None:
    def error(spec: Path) -> str:
        return run_failing(capsys, tmp_path / "out", spec, qwen3_tokenizer_dir)

    saved = tmp_path / "saved"
    write_save_to_disk(saved, TABLE, 2)
    (saved / "data-00001-of-00002.arrow").unlink()
    missing = f"--input {saved}: data file(s) data-00001-of-00002.arrow listed in its state.json are missing"
    assert missing in error(saved)
    (saved / "state.json").write_text(json.dumps({"_data_files": []}))
    assert f"--input {saved}: the `datasets` save_to_disk directory lists no .arrow data files" in error(saved)
    (saved / "state.json").write_text("{")
    assert f"{saved / 'state.json'}: cannot read its `_data_files` list" in error(saved)
    (saved / "state.json").unlink()
    assert f"--input {saved}: a `datasets` save_to_disk directory without its state.json" in error(saved)

    splits = tmp_path / "dict"
    splits.mkdir()
    (splits / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    write_save_to_disk(splits / "train", TABLE, 1)
    write_save_to_disk(splits / "test", TABLE, 1)
    message = error(splits)
    assert "a `datasets` DatasetDict directory" in message and f"{splits / 'train'}" in message


def test_damaged_files_are_named(tmp_path, forms, qwen3_tokenizer_dir, capsys) -> None:
    def error(name: str, data: bytes, *extra: str) -> str:
        (tmp_path / name).write_bytes(data)
        return run_failing(capsys, tmp_path / "out", tmp_path / name, qwen3_tokenizer_dir, *extra)

    zst = Path(forms["jsonl.zst"]).read_bytes()
    assert f"{tmp_path / 'cut.jsonl.zst'}: cannot read the file (" in error("cut.jsonl.zst", zst[: len(zst) // 2])
    assert f"{tmp_path / 'plain.jsonl.gz'}: cannot read the file (" in error("plain.jsonl.gz", jsonl_bytes(ROWS))
    bad_line = gzip.compress(jsonl_bytes(ROWS[:3]) + b'{"text": \n')
    assert f"{tmp_path / 'bad.jsonl.gz'}:4: invalid JSON" in error("bad.jsonl.gz", bad_line)

    stream = Path(forms["arrow stream"]).read_bytes()
    assert f"{tmp_path / 'cut.arrow'}: damaged Arrow data in record batch" in error("cut.arrow", stream[:-100])
    assert f"{tmp_path / 'junk.arrow'}: not a readable Arrow IPC stream or file" in error("junk.arrow", b"junk" * 50)
    message = error("cols.arrow", stream, "--json-keys", "content")
    assert "'content' not found; the file has columns 'id', 'title', 'text'" in message
