"""The offline Qwen3 tokenizer: known ids, parity with tiktoken over the same ranks, files, errors, CLI."""

from __future__ import annotations

import json
import random
import shutil
import unicodedata
from pathlib import Path

import pytest
import tiktoken
from tokenizers import Tokenizer

from qwen3_pretrain import cli
from qwen3_pretrain import tokenizer as tok
from qwen3_pretrain.tokenizer import (
    QWEN3_ADDED_TOKENS,
    QWEN3_FILES,
    TokenizerError,
    build_qwen3_tokenizer,
    default_tokenizer_dir,
    derive_merges,
    ensure_qwen3_tokenizer,
    find_qwen_ranks_file,
    load_tokenizer,
    read_bpe_ranks,
)

# The split regex exactly as DESIGN.md and the real Qwen3 tokenizer.json give it.
QWEN3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

FRAGMENTS = [
    "Hello, world!", "The quick brown fox jumps over the lazy dog.", "I'll", "DON'T", "we've", "She's",
    "they'RE", "it'd", "you'M", "state-of-the-art", "e-mail: someone@example.com", "https://qwen.ai/?q=1&x=2",
    "你好，世界！", "我们今天去北京大学。", "機械学習は楽しい", "こんにちは、カタカナ", "안녕하세요 세계",
    "Привет, мир", "مرحبا بالعالم", "नमस्ते दुनिया", "Ελληνικά", "naïve café résumé", "Ångström", "ﬁne ﬂow",
    "e\u0301", "A\u030a", "\u1e9b\u0323",  # decomposed: NFC changes them
    "😀", "👍🏽", "👨\u200d👩\u200d👧\u200d👦", "🇨🇳🇺🇸", "❤️", "∑_{i=1}^{n} x_i ≤ √2",
    "def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    "if __name__ == \"__main__\":\r\n    main()", "SELECT * FROM t WHERE id = 42;", "<div class=\"x\">hi</div>",
    "{\"key\": [1, 2.5, -3e10, null]}", "$ ls -la | grep .py", "x+=1;y-=2", "// comment", "#!/usr/bin/env bash",
    "0", "7", "42", "2024-06-01", "3.14159265358979", "1,000,000", "12345678901234567890", "０１２３",
    " ", "  ", "    ", "\t", "\n", "\n\n", "\r\n", " \n ", "\t\t\n", "   \n\n   ", "\u3000", "\u00a0", "\u200b",
    "!!!", "...", "?!", "——", "「引用」", "(parenthetical)", "[brackets]", "~tilde~", "`code`", "'quoted'",
]


CODE_POINT_RANGES = [(0x20, 0x7F), (0xA0, 0x2FF), (0x4E00, 0x9FFF), (0x3040, 0x30FF), (0x1F300, 0x1FAFF)]


def random_text(rng: random.Random) -> str:
    """A string of fragments, random words and random code points joined by varied whitespace."""
    parts = []
    for _ in range(rng.randint(1, 8)):
        kind = rng.random()
        if kind < 0.6:
            parts.append(rng.choice(FRAGMENTS))
        elif kind < 0.8:
            parts.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyzABC'0123") for _ in range(rng.randint(1, 12))))
        else:
            low, high = rng.choice(CODE_POINT_RANGES)
            parts.append("".join(chr(rng.randint(low, high)) for _ in range(rng.randint(1, 6))))
        parts.append(rng.choice(["", " ", " ", "  ", "\n", "\t", " \n", "\r\n", "   "]))
    return "".join(parts)


TEXTS = FRAGMENTS + [random_text(random.Random(seed)) for seed in range(400)]


@pytest.fixture(scope="module")
def hf(qwen3_tokenizer_dir: Path):
    return load_tokenizer(qwen3_tokenizer_dir)


@pytest.fixture(scope="module")
def reference() -> tiktoken.Encoding:
    """tiktoken over the same ranks and pattern: the reference BPE."""
    return tiktoken.Encoding(
        name="qwen-reference",
        pat_str=QWEN3_PATTERN,
        mergeable_ranks=read_bpe_ranks(find_qwen_ranks_file()),
        special_tokens={content: 151643 + i for i, (content, _) in enumerate(QWEN3_ADDED_TOKENS)},
    )


def test_known_answers(hf) -> None:
    assert hf.encode("Hello, world!") == [9707, 11, 1879, 0]
    assert hf.encode("你好，世界！") == [108386, 3837, 99489, 6313]


def test_same_ids_as_tiktoken(hf, reference, qwen3_tokenizer_dir: Path) -> None:
    expected = [reference.encode_ordinary(unicodedata.normalize("NFC", text)) for text in TEXTS]
    assert hf(TEXTS, add_special_tokens=False)["input_ids"] == expected
    # The written tokenizer.json on its own (transformers may rebuild parts of the pipeline).
    raw = Tokenizer.from_file(str(qwen3_tokenizer_dir / "tokenizer.json"))
    assert [encoding.ids for encoding in raw.encode_batch(TEXTS, add_special_tokens=False)] == expected


def test_decode_inverts_encode_up_to_nfc(hf) -> None:
    for text in TEXTS:
        assert hf.decode(hf.encode(text)) == unicodedata.normalize("NFC", text)


def test_added_tokens(hf, reference) -> None:
    assert len(hf) == 151669
    ids = {content: 151643 + i for i, (content, _) in enumerate(QWEN3_ADDED_TOKENS)}
    assert ids["<|endoftext|>"] == 151643 and ids["<think>"] == 151667 and ids["</think>"] == 151668
    assert [hf.convert_tokens_to_ids(content) for content in ids] == list(ids.values())
    assert {i: (t.content, t.special) for i, t in hf.added_tokens_decoder.items()} == {
        151643 + i: (content, special) for i, (content, special) in enumerate(QWEN3_ADDED_TOKENS)
    }
    assert [c for c, special in QWEN3_ADDED_TOKENS if not special][-2:] == ["<think>", "</think>"]
    text = "<|im_start|>user\nhi<|im_end|>\n<think>\nok\n</think><|endoftext|>"
    assert hf.encode(text) == reference.encode(text, allowed_special="all")
    assert hf.decode(hf.encode(text), skip_special_tokens=True) == "user\nhi\n<think>\nok\n</think>"


def test_special_token_settings(hf) -> None:
    assert hf.eos_token == hf.pad_token == "<|endoftext|>"
    assert hf.eos_token_id == hf.pad_token_id == 151643
    assert hf.bos_token is None
    assert hf("plain text")["input_ids"] == hf.encode("plain text", add_special_tokens=False)  # no BOS/EOS added
    assert hf.model_max_length == 131072


def test_written_files_match_qwen3(qwen3_tokenizer_dir: Path) -> None:
    assert sorted(p.name for p in qwen3_tokenizer_dir.iterdir()) == sorted(QWEN3_FILES)
    assert not list(qwen3_tokenizer_dir.parent.glob(".*.tmp"))  # no staging directory left behind
    data = json.loads((qwen3_tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert data["normalizer"] == {"type": "NFC"}
    split, byte_level = data["pre_tokenizer"]["pretokenizers"]
    assert split["pattern"] == {"Regex": QWEN3_PATTERN} and split["behavior"] == "Isolated"
    assert (byte_level["type"], byte_level["add_prefix_space"], byte_level["use_regex"]) == ("ByteLevel", False, False)
    assert data["decoder"]["type"] == "ByteLevel"
    assert data["model"]["type"] == "BPE" and len(data["model"]["vocab"]) == 151643
    assert len(data["model"]["merges"]) == 151643 - 256  # one merge per multi-byte token, as in Qwen's file
    assert data["model"]["merges"][0] == ["Ġ", "Ġ"]  # rank 256 is two spaces in the Qwen vocabulary
    assert [(t["id"], t["content"], t["special"], t["normalized"]) for t in data["added_tokens"]] == [
        (151643 + i, content, special, False) for i, (content, special) in enumerate(QWEN3_ADDED_TOKENS)
    ]
    config = json.loads((qwen3_tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "Qwen2Tokenizer" and config["bos_token"] is None
    assert config["added_tokens_decoder"]["151667"]["content"] == "<think>"
    assert config["added_tokens_decoder"]["151667"]["special"] is False


def test_derive_merges_follows_bpe_order() -> None:
    ranks = {bytes([b]): b for b in range(256)}
    for token in (b"bc", b"ab", b"abc", b"cab"):  # ranks 256..259
        ranks[token] = len(ranks)
    # "abc": "bc" (256) merges before "ab" (257), so its merge is a + bc; "cab": c + ab.
    assert derive_merges(ranks) == [(b"b", b"c"), (b"a", b"b"), (b"a", b"bc"), (b"c", b"ab")]
    ranks[b"xyz"] = len(ranks)  # no "xy" or "yz": BPE can never produce it
    with pytest.raises(TokenizerError, match="xyz"):
        derive_merges(ranks)


def test_bad_ranks_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("IQ== 0\nnot-base64!! 1\n")
    with pytest.raises(TokenizerError, match=r"bad\.tiktoken:2"):
        read_bpe_ranks(bad)
    bad.write_text("IQ== 0\n")  # 255 single bytes missing
    with pytest.raises(TokenizerError, match="not a complete BPE vocabulary"):
        read_bpe_ranks(bad)


def test_missing_dashscope_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tok.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TokenizerError, match=r"pip install --no-deps dashscope"):
        build_qwen3_tokenizer("/nonexistent/never-written")


def test_missing_empty_and_corrupt_directories(tmp_path: Path, qwen3_tokenizer_dir: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(TokenizerError, match=rf"{missing}.*does not exist.*qwen3-pretrain tokenizer build"):
        load_tokenizer(missing)
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(qwen3_tokenizer_dir / "tokenizer_config.json", config_only)
    with pytest.raises(TokenizerError, match=rf"{config_only} holds no tokenizer vocabulary"):
        load_tokenizer(config_only)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    shutil.copy(qwen3_tokenizer_dir / "tokenizer_config.json", corrupt)
    (corrupt / "tokenizer.json").write_bytes((qwen3_tokenizer_dir / "tokenizer.json").read_bytes()[:50_000])
    with pytest.raises(TokenizerError, match=rf"{corrupt}.*tokenizer\.json.*corrupt or incomplete") as error:
        load_tokenizer(corrupt)
    assert isinstance(error.value, ValueError)


def test_ensure_builds_once_into_the_cache(
    tmp_path: Path, qwen3_tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QWEN3_PRETRAIN_CACHE", str(tmp_path / "cache"))
    assert default_tokenizer_dir() == tmp_path / "cache" / "qwen3-tokenizer"
    builds = []

    def fake_build(out_dir: Path) -> Path:
        builds.append(out_dir)
        shutil.copytree(qwen3_tokenizer_dir, out_dir)
        return out_dir

    monkeypatch.setattr(tok, "build_qwen3_tokenizer", fake_build)
    assert ensure_qwen3_tokenizer() == default_tokenizer_dir()
    assert ensure_qwen3_tokenizer() == default_tokenizer_dir()
    assert builds == [default_tokenizer_dir()]
    assert ensure_qwen3_tokenizer(tmp_path / "elsewhere") == tmp_path / "elsewhere"
    assert builds[-1] == tmp_path / "elsewhere"


def test_cli_build_into_existing_directory(
    tmp_path: Path, qwen3_tokenizer_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("{}")  # other files in the directory are kept
    (out / "tokenizer.json").write_text("stale")
    assert cli.main(["tokenizer", "build", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "vocab size 151669" in printed
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", *QWEN3_FILES])
    assert (out / "config.json").read_text() == "{}"
    for name in QWEN3_FILES:  # the build is deterministic
        assert (out / name).read_bytes() == (qwen3_tokenizer_dir / name).read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging directory left behind
    with pytest.raises(SystemExit):
        tok.main(["build"])  # OUT_DIR missing: argparse usage error
