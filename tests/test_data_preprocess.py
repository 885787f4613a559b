"""`qwen3-pretrain preprocess`: tokens equal the HF tokenizer's, every input format, workers, errors."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import qwen3_pretrain.tokenizer as tokenizer_module
from qwen3_pretrain.cli import main as cli_main
from qwen3_pretrain.data.handlers import ALPACA_PRETRAIN_TEMPLATE
from qwen3_pretrain.data.indexed import IndexedDataset

PHRASES = [
    "Hello, world!",
    "你好，世界！",
    "Give three tips for staying healthy.",
    "保持健康的三个提示：多运动，均衡饮食，充足睡眠。",
    "Mixed 中英文 text with numbers 12345 and symbols #@!\nand a second line.",
    "  leading spaces and trailing\t",
    "emoji 🙂 and accents café naïve",
]


def alpaca_rows(count: int) -> list[dict]:
    """Alpaca-style rows; every 5th text empty and every 11th None, inputs present on odd rows."""
    rows = []
    for i in range(count):
        text = " ".join(PHRASES[(i + k) % len(PHRASES)] for k in range(1 + i % 4))
        if i % 5 == 3:
            text = ""
        if i % 11 == 7:
            text = None
        rows.append(
            {
                "instruction": PHRASES[i % len(PHRASES)],
                "input": PHRASES[(i + 2) % len(PHRASES)] if i % 2 else "",
                "output": PHRASES[(i + 4) % len(PHRASES)],
                "text": text,
            }
        )
    return rows


ROWS = alpaca_rows(60)


@pytest.fixture(autouse=True)
def cached_tokenizer_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Load each tokenizer directory once per session (the real loader, memoised) to keep tests fast."""
    monkeypatch.setattr(tokenizer_module, "load_tokenizer", _cached_load)


@functools.cache
def _cached_load(path: str):
    return _real_load(path)


_real_load = tokenizer_module.load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(qwen3_tokenizer_dir: Path):
    return _cached_load(str(qwen3_tokenizer_dir))


@pytest.fixture(scope="module")
def alpaca_parquet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("input") / "train-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path, row_group_size=16)
    assert pq.ParquetFile(path).num_row_groups == 4
    return path


def run(*args: str | Path) -> int:
    return cli_main(["preprocess", *map(str, args)])


def read_docs(prefix: Path) -> list[list[int]]:
    dataset = IndexedDataset(prefix)
    return [dataset[i].tolist() for i in range(len(dataset))]


def expected_ids(tokenizer, texts, eod: bool) -> list[list[int]]:
    """Each non-empty text through the HF tokenizer, one call per text."""
    return [tokenizer(t)["input_ids"] + ([tokenizer.eos_token_id] if eod else []) for t in texts if t]


def run_failing(capsys, out_dir: Path, *args: str | Path) -> str:
    """Run a preprocess that must fail; return its error message and check no file was left."""
    out_dir.mkdir(exist_ok=True)
    assert run(*args, "--output-prefix", out_dir / "out") == 1
    assert os.listdir(out_dir) == []
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def eod_output(tmp_path_factory, alpaca_parquet, qwen3_tokenizer_dir) -> Path:
    out = tmp_path_factory.mktemp("eod") / "alpaca"
    assert run("--input", alpaca_parquet, "--tokenizer-name-or-path", qwen3_tokenizer_dir,
               "--tokenizer-type", "PretrainedFromHF", "--handler-name", "GeneralPretrainHandler",
               "--output-prefix", out, "--json-keys", "text", "--append-eod", "--workers", "1",
               "--log-interval", "1000", "--batch-size", "7") == 0
    return Path(f"{out}_text_document")


def test_parquet_tokens_equal_hf_tokenizer_with_eod(eod_output, tokenizer) -> None:
    expected = expected_ids(tokenizer, [r["text"] for r in ROWS], eod=True)
    assert read_docs(eod_output) == expected
    assert IndexedDataset(eod_output).dtype == np.int32  # Qwen3 vocabulary 151669 > 65500
    assert tokenizer("Hello, world!")["input_ids"] == [9707, 11, 1879, 0]


def test_parquet_tokens_without_eod(tmp_path, alpaca_parquet, qwen3_tokenizer_dir, tokenizer, capsys) -> None:
    assert run("--input", alpaca_parquet, "--tokenizer-name-or-path", qwen3_tokenizer_dir,
               "--output-prefix", tmp_path / "plain", "--log-interval", "10", "--batch-size", "16") == 0
    texts = [r["text"] for r in ROWS]
    assert read_docs(tmp_path / "plain_text_document") == expected_ids(tokenizer, texts, eod=False)
    out = capsys.readouterr().out
    empty = sum(1 for t in texts if not t)
    assert f"done: {len(texts) - empty} documents" in out and f"skipped {empty} empty" in out
    assert "engine gigatoken," in out  # the parity above holds for the fastest engine
    progress = re.findall(r"^processed (\d+) documents, \d+ tokens \(.* MB/s\)$", out, re.M)
    assert len(progress) >= 3 and progress == sorted(progress, key=int)
    assert sorted(os.listdir(tmp_path)) == ["plain_text_document.bin", "plain_text_document.idx"]


def test_one_file_pair_per_json_key(tmp_path, alpaca_parquet, qwen3_tokenizer_dir, tokenizer) -> None:
    assert run("--input", alpaca_parquet, "--tokenizer-name-or-path", qwen3_tokenizer_dir,
               "--output-prefix", tmp_path / "multi", "--json-keys", "output", "instruction") == 0
    for key in ("output", "instruction"):
        expected = expected_ids(tokenizer, [r[key] for r in ROWS], eod=False)
        assert read_docs(tmp_path / f"multi_{key}_document") == expected


def test_two_workers_write_identical_bytes(tmp_path, eod_output, alpaca_parquet, qwen3_tokenizer_dir) -> None:
    assert run("--input", alpaca_parquet, "--tokenizer-name-or-path", qwen3_tokenizer_dir,
               "--output-prefix", tmp_path / "w2", "--append-eod", "--workers", "2", "--batch-size", "3") == 0
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"w2_text_document{suffix}").read_bytes() == Path(f"{eod_output}{suffix}").read_bytes()


def test_reference_engine_writes_identical_bytes(tmp_path, eod_output, alpaca_parquet, qwen3_tokenizer_dir) -> None:
    assert run("--input", alpaca_parquet, "--tokenizer-name-or-path", qwen3_tokenizer_dir,
               "--output-prefix", tmp_path / "ref", "--append-eod", "--tokenizer-engine", "tokenizers") == 0
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"ref_text_document{suffix}").read_bytes() == Path(f"{eod_output}{suffix}").read_bytes()


def test_small_vocabulary_tokenizer_uses_uint16_and_hf_engine(tmp_path, capsys) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "</s>", "hello", "world", "你好", "!", ","]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tiny = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>")
    tiny.save_pretrained(tmp_path / "tiny")
    jsonl = tmp_path / "in.jsonl"
    texts = ["hello world !", "你好 , world", "unknown words here", ""]
    jsonl.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    assert run("--input", jsonl, "--tokenizer-name-or-path", tmp_path / "tiny", "--output-prefix", tmp_path / "o",
               "--append-eod") == 0
    out = capsys.readouterr().out
    assert "engine hf tokenizers (no gigatoken: " in out and "; no tiktoken: model type WordLevel)" in out
    assert IndexedDataset(tmp_path / "o_text_document").dtype == np.uint16
    assert read_docs(tmp_path / "o_text_document") == [[2, 3, 5, 1], [4, 6, 3, 1], [0, 0, 0, 1]]


def write_formats(folder: Path, rows: list[dict]) -> dict[str, Path]:
    """The same rows as jsonl, json array, json lines, csv and txt (txt: text only, no newlines)."""
    folder.mkdir()
    paths = {name: folder / name for name in ("a.jsonl", "b.json", "c.csv", "d.txt")}
    with open(paths["a.jsonl"], "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with open(paths["b.json"], "w", encoding="utf-8") as f:
        json.dump(rows, f, ensure_ascii=False, indent=1)
    pa.csv.write_csv(pa.Table.from_pylist(rows), paths["c.csv"])
    with open(paths["d.txt"], "w", encoding="utf-8") as f:
        f.writelines((r["text"] or "").replace("\n", " ") + "\n" for r in rows)
    return paths


@pytest.fixture(scope="module")
def format_files(tmp_path_factory) -> dict[str, Path]:
    import pyarrow.csv  # noqa: F401  (registers pa.csv)

    return write_formats(tmp_path_factory.mktemp("formats") / "in", ROWS[:20])


@pytest.mark.parametrize("name", ["a.jsonl", "b.json", "c.csv", "d.txt"])
def test_each_format(tmp_path, format_files, qwen3_tokenizer_dir, tokenizer, name) -> None:
    assert run("--input", format_files[name], "--tokenizer-name-or-path", qwen3_tokenizer_dir,
               "--output-prefix", tmp_path / "x", "--batch-size", "6") == 0
    texts = [r["text"] for r in ROWS[:20]]
    if name == "d.txt":
        texts = [(t or "").replace("\n", " ") for t in texts]
    assert read_docs(tmp_path / "x_text_document") == expected_ids(tokenizer, texts, eod=False)


def test_directory_glob_and_list_inputs_read_files_in_order(
    tmp_path, format_files, qwen3_tokenizer_dir, tokenizer
) -> None:
    folder = format_files["a.jsonl"].parent
    structured = [str(folder / n) for n in ("a.jsonl", "b.json", "c.csv")]
    texts = [r["text"] for r in ROWS[:20]]
    one = expected_ids(tokenizer, texts, eod=False)
    txt = expected_ids(tokenizer, [(t or "").replace("\n", " ") for t in texts], eod=False)
    cases = ((folder, one * 3 + txt), (folder / "[abc].*", one * 3), (",".join(structured[::-1]), one * 3))
    for spec, expected in cases:
        out = tmp_path / f"run{len(os.listdir(tmp_path))}"
        assert run("--input", spec, "--tokenizer-name-or-path", qwen3_tokenizer_dir, "--output-prefix", out) == 0
        assert read_docs(Path(f"{out}_text_document")) == expected


def test_alpaca_handlers_and_seq_length(tmp_path, alpaca_parquet, qwen3_tokenizer_dir, tokenizer, capsys) -> None:
    assert run("--input", alpaca_parquet, "--tokenizer-name-or-path", qwen3_tokenizer_dir,
               "--handler-name", "AlpacaPretrainHandler", "--output-prefix", tmp_path / "ap", "--append-eod") == 0
    texts = [
        ALPACA_PRETRAIN_TEMPLATE.format(
            instruction=r["instruction"], inputs=f" Input:\n{r['input']}" if r["input"] else None, response=r["output"]
        )
        for r in ROWS
    ]
    assert "###None\n\n### Response: ASSISTANT: " in texts[0]  # MindSpeed's rendering of a row without input
    expected = expected_ids(tokenizer, texts, eod=True)
    assert read_docs(tmp_path / "ap_text_document") == expected

    limit = int(np.median([len(e) for e in expected]))
    assert run("--input", alpaca_parquet, "--tokenizer-name-or-path", qwen3_tokenizer_dir,
               "--handler-name", "AlpacaPretrainHandler", "--output-prefix", tmp_path / "short",
               "--append-eod", "--seq-length", str(limit)) == 0
    kept = [e for e in expected if len(e) < limit]
    assert 0 < len(kept) < len(expected)
    assert read_docs(tmp_path / "short_text_document") == kept
    assert f"dropped {len(expected) - len(kept)} of {limit}+ tokens" in capsys.readouterr().out


def test_instruction_handler_uses_chat_template(tmp_path, alpaca_parquet, qwen3_tokenizer_dir) -> None:
    chat_dir = tmp_path / "chat-tokenizer"
    shutil.copytree(qwen3_tokenizer_dir, chat_dir)
    config = json.loads((chat_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    (chat_dir / "tokenizer_config.json").write_text(json.dumps(config))
    assert run("--input", alpaca_parquet, "--tokenizer-name-or-path", chat_dir,
               "--handler-name", "AlpacaStyleInstructionHandler", "--output-prefix", tmp_path / "chat") == 0
    chat_tokenizer = _cached_load(str(chat_dir))
    texts = [
        f"<|im_start|>user\n{r['instruction']}" + (f"\n{r['input']}" if r["input"] else "")
        + f"<|im_end|>\n<|im_start|>assistant\n{r['output']}<|im_end|>\n"
        for r in ROWS
    ]
    docs = read_docs(tmp_path / "chat_text_document")
    assert docs == expected_ids(chat_tokenizer, texts, eod=False)
    assert docs[0][0] == chat_tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_bad_input_errors_leave_no_files(tmp_path, alpaca_parquet, qwen3_tokenizer_dir, capsys) -> None:
    tok = ("--tokenizer-name-or-path", qwen3_tokenizer_dir)
    out = tmp_path / "out"
    err = run_failing(capsys, out, "--input", tmp_path / "missing.jsonl", *tok)
    assert "--input" in err and "missing.jsonl: no such file or directory" in err
    err = run_failing(capsys, out, "--input", alpaca_parquet, *tok, "--json-keys", "content")
    assert "'content' not found; the file has columns 'instruction', 'input', 'output', 'text'" in err
    err = run_failing(capsys, out, "--input", alpaca_parquet, *tok, "--handler-name", "NoSuchHandler")
    assert "'NoSuchHandler' is not supported; choose one of: GeneralPretrainHandler" in err
    err = run_failing(capsys, out, "--input", alpaca_parquet, *tok, "--token-dtype", "uint16")
    assert "151669 tokens does not fit in uint16" in err

    broken = tmp_path / "broken.parquet"
    broken.write_bytes(alpaca_parquet.read_bytes()[:-100])
    err = run_failing(capsys, out, "--input", broken, *tok)
    assert "broken.parquet: not a readable parquet file" in err

    jsonl = tmp_path / "keys.jsonl"
    jsonl.write_text('{"content": "a", "id": 1}\n')
    err = run_failing(capsys, out, "--input", jsonl, *tok)
    assert "'text' not found; the file has columns 'content', 'id'" in err


def test_bad_jsonl_lines_name_the_line_or_are_skipped(tmp_path, qwen3_tokenizer_dir, tokenizer, capsys) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": f"document {i} 你好"}) + "\n" for i in range(30)))
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n\n{"text": "broken \xff\xfe utf8"}\n{"text": "also fine"}\n{"text": \n')
    tok = ("--tokenizer-name-or-path", qwen3_tokenizer_dir)
    # the good file fills several batches before the bad one fails: still nothing is left behind
    err = run_failing(capsys, tmp_path / "o1", "--input", f"{good},{bad}", *tok, "--batch-size", "4")
    assert f"{bad}:3: invalid UTF-8" in err and "--skip-bad-lines" in err
    bad.write_bytes(bad.read_bytes().replace(b"\xff\xfe", b"ok"))
    err = run_failing(capsys, tmp_path / "o2", "--input", bad, *tok)
    assert f"{bad}:5: invalid JSON" in err

    bad.write_bytes(b'{"text": "fine"}\n{"text": "broken \xff utf8"}\n[1, 2]\n{"text": "also fine"}\n')
    assert run("--input", bad, *tok, "--output-prefix", tmp_path / "skip", "--skip-bad-lines") == 0
    assert read_docs(tmp_path / "skip_text_document") == expected_ids(tokenizer, ["fine", "also fine"], eod=False)
    assert "skipped 2 bad lines" in capsys.readouterr().out
