"""Tokenizer engines of `preprocess`: each equals the HF tokenizer on tricky texts, every engine and worker
count writes identical bytes, and a missing or disagreeing fast engine is refused (auto falls back)."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from qwen3_pretrain.cli import main as cli_main
from qwen3_pretrain.data import engines
from qwen3_pretrain.data.engines import GigatokenEngine, needs_reference, select_engine, utf8_documents
from qwen3_pretrain.data.indexed import IndexedDataset
from qwen3_pretrain.data.inputs import DataInputError
from qwen3_pretrain.tokenizer import load_tokenizer

LONG = "".join(f"line {i}: 你好 world <tag attr='{i}'>\t{'x' * (i % 97)}\n" for i in range(60_000))  # ~3.6 MB
TRICKY = [
    *engines.PROBE_TEXTS,
    "<|endoftext|>", "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|im_end|>",
    "text<|endoftext|>more<|endoftext|>", "<|im_start|><|im_end|><think></think>",
    "lone \ud800 high and \udfff low surrogates", "\ud83d\ude00 a pair spelled as two code points",
    " ", "\n\n\n", "\u3000\u00a0 ", LONG,
]
# Characters the engines' Unicode tables disagree on: HF's NFC keeps U+07F3 U+07FD (N'Ko, Unicode 11) in this
# order, gigatoken's and tiktoken's swap them; U+0378 is unassigned. Preprocess gives such documents to HF.
UNSTABLE = ["N'Ko x\u07f3\u07fd marks in a document", "unassigned \u0378 character\u0301"]
MARKER = "CORRUPTME"  # no probe text holds it


@pytest.fixture(scope="module")
def tokenizer(qwen3_tokenizer_dir: Path):
    return load_tokenizer(str(qwen3_tokenizer_dir))


@pytest.fixture(autouse=True)
def fresh_engine_cache() -> Iterator[None]:
    """Engines are probed once per tokenizer; monkeypatched engines must be probed again, and not cached."""
    engines.fast_engine.cache_clear()
    yield
    engines.fast_engine.cache_clear()


def hf_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """The HF tokenizer's ids of each text, after the surrogate repair every engine shares."""
    return [tokenizer(d.decode("utf-8"))["input_ids"] for d in utf8_documents(texts)]


def split(tokens: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
    return [t.tolist() for t in np.split(tokens, np.cumsum(lengths)[:-1])]


@pytest.mark.parametrize("choice", ["gigatoken", "tiktoken", "hf"])
def test_engine_equals_hf_on_tricky_texts(tokenizer, choice) -> None:
    engine, _, name = select_engine(tokenizer, choice)
    assert name.startswith(choice)
    tokens, lengths = engine.encode(utf8_documents(TRICKY))
    assert lengths.dtype == np.int64 and len(lengths) == len(TRICKY)
    assert split(tokens, lengths) == hf_ids(tokenizer, TRICKY)


def test_special_tokens_and_surrogates_have_known_ids(tokenizer) -> None:
    ids = hf_ids(tokenizer, ["<|endoftext|>", "<|im_start|>", "a\ud800b"])
    assert ids[:2] == [[151643], [151644]]
    assert utf8_documents(["a\ud800b", "\ud83d\ude00"]) == ["a\ufffdb".encode(), "😀".encode()]
    assert tokenizer.decode(ids[2]) == "a\ufffdb"


def test_documents_with_unstable_characters_need_the_hf_engine(tokenizer) -> None:
    assert [needs_reference(d) for d in utf8_documents(UNSTABLE)] == [True, True]
    assert not any(needs_reference(d) for d in utf8_documents([*engines.PROBE_TEXTS, LONG]))
    gigatoken, reference, _ = select_engine(tokenizer, "gigatoken")
    documents = utf8_documents(UNSTABLE[:1])
    assert gigatoken.encode(documents)[0].tolist() != reference.ids(documents)[0]  # why they are routed


@pytest.fixture(scope="module")
def tricky_jsonl(tmp_path_factory) -> Path:
    """TRICKY (JSON escapes keep the surrogates) with empty and whitespace-only records in between."""
    path = tmp_path_factory.mktemp("tricky") / "in.jsonl"
    records = [t for text in [*TRICKY, *UNSTABLE] for t in (text, "", "  \n")]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in records), encoding="ascii")
    return path


def preprocess(jsonl: Path, tokenizer_dir: Path, prefix: Path, *flags: str) -> int:
    return cli_main(["preprocess", "--input", str(jsonl), "--tokenizer-name-or-path", str(tokenizer_dir),
                     "--output-prefix", str(prefix), "--append-eod", "--batch-size", "5", *flags])


@pytest.fixture(scope="module")
def expected_documents(tricky_jsonl, tokenizer) -> list[list[int]]:
    """The HF tokenizer's ids (+ EOD) of every non-empty record of `tricky_jsonl`."""
    records = [json.loads(line)["text"] for line in tricky_jsonl.read_text().splitlines()]
    return [[*ids, tokenizer.eos_token_id] for ids in hf_ids(tokenizer, [r for r in records if r])]


@pytest.fixture(scope="module")
def hf_output(tmp_path_factory, tricky_jsonl, qwen3_tokenizer_dir) -> Path:
    """`tricky_jsonl` preprocessed by the HF engine: the reference bytes."""
    prefix = tmp_path_factory.mktemp("hf") / "reference"
    assert preprocess(tricky_jsonl, qwen3_tokenizer_dir, prefix, "--tokenizer-engine", "hf") == 0
    return prefix


@functools.cache
def outputs(prefix: str) -> tuple[bytes, bytes]:
    return Path(f"{prefix}_text_document.bin").read_bytes(), Path(f"{prefix}_text_document.idx").read_bytes()


@pytest.mark.parametrize(
    ("engine", "workers"),
    [("auto", "1"), ("gigatoken", "1"), ("tiktoken", "1"), ("hf", "1"), ("tokenizers", "1"), ("gigatoken", "2"),
     ("tiktoken", "2")],
)
def test_every_engine_and_worker_count_writes_identical_bytes(
    tmp_path, tricky_jsonl, qwen3_tokenizer_dir, expected_documents, hf_output, engine, workers, capsys
) -> None:
    prefix = tmp_path / "out"
    flags = ("--tokenizer-engine", engine, "--workers", workers)
    assert preprocess(tricky_jsonl, qwen3_tokenizer_dir, prefix, *flags) == 0
    expected_name = {"auto": "gigatoken", "tokenizers": "hf"}.get(engine, engine)
    assert f"engine {expected_name}" in capsys.readouterr().out
    dataset = IndexedDataset(prefix.parent / "out_text_document")
    assert [dataset[i].tolist() for i in range(len(dataset))] == expected_documents  # empty records skipped
    assert outputs(str(prefix)) == outputs(str(hf_output))


def test_missing_gigatoken_falls_back_or_is_refused_by_name(
    tmp_path, tricky_jsonl, qwen3_tokenizer_dir, tokenizer, monkeypatch, capsys
) -> None:
    monkeypatch.setitem(sys.modules, "gigatoken", None)  # import gigatoken raises ImportError
    _, reference, name = select_engine(tokenizer, "auto")
    assert name == "tiktoken (no gigatoken: gigatoken is not installed)" and reference is not None
    with pytest.raises(DataInputError, match="--tokenizer-engine gigatoken: gigatoken is not installed"):
        select_engine(tokenizer, "gigatoken")
    assert preprocess(tricky_jsonl, qwen3_tokenizer_dir, tmp_path / "x", "--tokenizer-engine", "gigatoken") == 1
    assert "--tokenizer-engine gigatoken: gigatoken is not installed" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    engines.fast_engine.cache_clear()
    assert select_engine(tokenizer, "auto")[2] == (
        "hf tokenizers (no gigatoken: gigatoken is not installed; no tiktoken: tiktoken is not installed)"
    )


def test_gigatoken_disagreeing_on_probes_is_refused(
    tmp_path, tricky_jsonl, qwen3_tokenizer_dir, hf_output, monkeypatch, capsys
) -> None:
    real = GigatokenEngine.encode

    def off_by_one(self, documents):
        tokens, lengths = real(self, documents)
        return tokens + (np.arange(len(tokens)) == len(tokens) - 1), lengths  # last token changed

    monkeypatch.setattr(GigatokenEngine, "encode", off_by_one)
    assert preprocess(tricky_jsonl, qwen3_tokenizer_dir, tmp_path / "out") == 0
    assert "engine tiktoken (no gigatoken: gigatoken differs from the HF tokenizer on" in capsys.readouterr().out
    assert outputs(str(tmp_path / "out")) == outputs(str(hf_output))
    assert preprocess(tricky_jsonl, qwen3_tokenizer_dir, tmp_path / "f", "--tokenizer-engine", "gigatoken") == 1
    assert "--tokenizer-engine gigatoken: gigatoken differs from the HF tokenizer on" in capsys.readouterr().err


def test_disagreement_on_a_document_stops_the_run(tmp_path, qwen3_tokenizer_dir, monkeypatch, capsys) -> None:
    real = GigatokenEngine.encode

    def wrong_on_marker(self, documents):
        tokens, lengths = real(self, documents)
        return (tokens[1:], lengths - np.eye(len(lengths), dtype=np.int64)[0]) if MARKER.encode() in documents[0] \
            else (tokens, lengths)  # first token of the first document dropped

    monkeypatch.setattr(GigatokenEngine, "encode", wrong_on_marker)
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["fine", "also fine", f"{MARKER} here"]))
    assert preprocess(jsonl, qwen3_tokenizer_dir, tmp_path / "o", "--batch-size", "1") == 1
    err = capsys.readouterr().err
    assert f"disagree on the document starting '{MARKER} here'" in err and "--tokenizer-engine hf" in err
    assert not list(tmp_path.glob("o_*"))


def test_slow_tokenizer_runs_in_worker_processes_in_order(tmp_path) -> None:
    from transformers import BertTokenizer

    from qwen3_pretrain.data.engines import SlowHFEngine
    from qwen3_pretrain.data.preprocess import BatchEncoder, _tokenize_task, ordered_map

    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[SEP]", "hello", "world", "!", "##s"]) + "\n")
    slow = BertTokenizer(str(tmp_path / "vocab.txt"), do_lower_case=True)
    encoder = BatchEncoder(SlowHFEngine(slow), None, eod=2)
    assert not encoder.engine.releases_gil  # so --workers 2 spawns processes
    tasks = [(0, [f"Hello {'worlds ' * i}!", "hello"]) for i in range(6)]
    results = [list(ordered_map(_tokenize_task, tasks, workers, encoder)) for workers in (1, 2)]
    for one, two in zip(*results, strict=True):
        assert one[0] == two[0] and one[3] == two[3]
        assert one[1].tolist() == two[1].tolist() and one[2].tolist() == two[2].tolist()
    assert split(*results[1][2][1:3]) == [
        [*slow("Hello worlds worlds !", add_special_tokens=True)["input_ids"], 2], [*slow("hello")["input_ids"], 2]
    ]


def test_batches_and_tasks_are_bounded_by_characters(
    tmp_path, tricky_jsonl, qwen3_tokenizer_dir, hf_output, monkeypatch
) -> None:
    from qwen3_pretrain.data import inputs
    from qwen3_pretrain.data import preprocess as preprocess_module

    monkeypatch.setattr(inputs, "BATCH_CHARS", 200)
    monkeypatch.setattr(preprocess_module, "BATCH_CHARS", 200)
    batches = list(inputs.read_batches(str(tricky_jsonl), ["text"], [], 1000, inputs.ReadStats()))
    assert len(batches) > 3 and all(sum(map(len, b["text"][:-1])) < 200 for b in batches)
    assert [b["text"][-1] for b in batches if LONG in b["text"]] == [LONG]  # a longer document ends its batch
    assert preprocess(tricky_jsonl, qwen3_tokenizer_dir, tmp_path / "out", "--batch-size", "1000") == 0
    assert outputs(str(tmp_path / "out")) == outputs(str(hf_output))
