"""Tokenizer engines for `preprocess`: the HF tokenizer's ids, from the fastest engine that reproduces them.

`--tokenizer-engine auto` tries, fastest first, gigatoken (a Rust byte-level BPE, ~7x tiktoken's speed
per core), then tiktoken (`tiktoken_bpe`), then falls back to the HF `tokenizers` engine itself. A fast
engine is used only when it is installed, loads the tokenizer, and gives exactly the HF engine's ids on
`PROBE_TEXTS`; otherwise the reason is printed and the next one is tried. Naming an engine forces it
(an error if it cannot be used). While preprocessing, `BatchEncoder` re-checks one document of every
batch against the HF engine and stops on any difference.

The engines' Unicode tables differ in age (HF tokenizers' NFC keeps the N'Ko marks U+07F3 U+07FD, the
second new in Unicode 11, in this order; Python's and gigatoken's NFC swap them). `needs_reference` finds the documents
where that can matter, those with a character unassigned here or a mark or composable character newer
than Unicode 3.2 (7 of 16,691 Python source files, 0.2% of the bytes), and `BatchEncoder` gives them to
the HF engine.

Engines take documents as UTF-8 bytes (what gigatoken reads fastest, and their byte count is the MB/s
measure). `utf8_documents` makes them: a lone surrogate (JSON can spell one, `"\\ud800"`; the HF engine
rejects it) becomes U+FFFD, as tiktoken does, so that every engine sees the same text.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Iterator, Sequence, Sized
from typing import Any, Protocol

import numpy as np

from qwen3_pretrain.data.inputs import DataInputError
from qwen3_pretrain.data.tiktoken_bpe import TiktokenBPE, flatten_ids, tiktoken_engine_for

ENGINES = ("auto", "gigatoken", "tiktoken", "hf")
ALIASES = {"tokenizers": "hf"}  # the name before gigatoken existed
FAST_ENGINES = ("gigatoken", "tiktoken")  # auto's order
ASCII = bytes(range(128))
HF_CHUNK_BYTES = 1 << 20  # HF Encodings hold ~100 bytes per token: at most this much text per encode_batch call
PROBE_TEXTS = (
    "Hello, world! I'M sure it's fine; they'll've gone. DON'T you'd?",
    "你好，世界！保持健康的三个提示：多运动，均衡饮食。日本語のテキスト、한국어 텍스트.",
    "numbers 1234567890 3.14159 -42 1e-6 ١٢٣ and symbols #@!$%^&*()_+{}[]|\\:;\"'<>,.?/~`",
    "  leading\tand  multiple   spaces\n\n\ntrailing  \r\nCRLF\r\n\r\n   ",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\tif x >= 0:\n\t\tpass\n",
    "emoji 🙂👍🏽 👨‍👩‍👧‍👦 flags 🇨🇳🇺🇸 math ∑∫√ arrows →⇒ accents café naïve Ångström",
    "decomposed e\u0301 a\u030a o\u0308 and \u212b angstrom sign, fullwidth ＡＢＣ１２３ ligature ﬁ",
    "special <|endoftext|> inside <|im_start|>user\nhi<|im_end|> <think>\n\n</think> and >\u0338 <\u0338",
    "<|endoftext|><|endoftext|>x<|im_start|>", "partial <|endoftext <|im_end| |>",
    "Русский текст, ελληνικά, العربية, עברית, हिन्दी, ไทย",
    "x" * 300 + " " + "ab" * 150 + " \u00a0nbsp\u2003em-space\u200bzero-width\ufeffbom\u0000nul",
    "   ", "\n", "\t \r\n ", "\ufffd replacement",
    "",
)


class Engine(Protocol):
    """Encodes a batch of UTF-8 documents; thread-safe."""

    releases_gil: bool  # its encode runs in native code, so worker threads parallelise it (else: processes)

    def encode(self, documents: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """(all documents' ids concatenated, each document's length as int64)."""
        ...


def utf8_documents(texts: list[str]) -> list[bytes]:
    """Each text as UTF-8, lone surrogates replaced by U+FFFD."""
    return [_utf8(text) for text in texts]


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates; a surrogate pair spelled as two code points is joined
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")


@functools.cache
def _unstable(char: str) -> bool:
    """Whether engines with different Unicode versions may normalise `char` differently (see the module doc)."""
    category = unicodedata.category(char)
    if category == "Cn":
        return True
    if unicodedata.ucd_3_2_0.category(char) != "Cn":
        return False
    decomposition = unicodedata.decomposition(char)
    return category[0] == "M" or bool(decomposition and not decomposition.startswith("<"))


def needs_reference(document: bytes) -> bool:
    """Whether only the HF engine is sure to give the HF ids of this UTF-8 document (see the module doc)."""
    non_ascii = document.translate(None, ASCII)
    return bool(non_ascii) and any(map(_unstable, set(non_ascii.decode("utf-8"))))


class HFEngine:
    """The `tokenizers.Tokenizer` behind a fast HF tokenizer: the reference."""

    releases_gil = True

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def ids(self, documents: list[bytes]) -> list[list[int]]:
        texts = [d.decode("utf-8") for d in documents]
        return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=True)]

    def encode(self, documents: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        parts = [flatten_ids(self.ids(chunk)) for chunk in bounded_chunks(documents, HF_CHUNK_BYTES)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def bounded_chunks(items: Sequence[Sized], max_size: int) -> Iterator[list]:
    """Consecutive runs of `items` of total `len` at most `max_size` (or one longer item)."""
    chunk: list = []
    size = 0
    for item in items:
        if chunk and size + len(item) > max_size:
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += len(item)
    if chunk:
        yield chunk


class SlowHFEngine:
    """A transformers tokenizer without a fast backend (slow, but the only choice for it); picklable."""

    releases_gil = False

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def encode(self, documents: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        texts = [d.decode("utf-8") for d in documents]
        return flatten_ids(self.tokenizer(texts, add_special_tokens=True)["input_ids"])


class TiktokenEngine:
    """tiktoken (see tiktoken_bpe)."""

    releases_gil = True

    def __init__(self, bpe: TiktokenBPE) -> None:
        self.bpe = bpe

    def encode(self, documents: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        return self.bpe.encode_documents(documents)


class GigatokenEngine:
    """gigatoken's native batch API over the tokenizer.json."""

    releases_gil = True

    def __init__(self, tokenizer_json: str) -> None:
        import gigatoken

        self.tokenizer = gigatoken.Tokenizer.from_json(tokenizer_json)

    def encode(self, documents: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        layout = self.tokenizer.encode_batch(documents, parallel=False).layout  # awkward ListOffsetArray
        offsets = np.asarray(layout.offsets)  # [n + 1]
        return np.asarray(layout.content.data)[offsets[0] : offsets[-1]], np.diff(offsets)


def _gigatoken(backend: Any) -> tuple[Engine | None, str]:
    try:
        return GigatokenEngine(backend.to_str()), "gigatoken"
    except ImportError:
        return None, "gigatoken is not installed"
    except Exception as exc:  # gigatoken raises ValueError/RuntimeError for tokenizers it does not support
        return None, f"gigatoken cannot load it ({type(exc).__name__}: {str(exc)[:120]})"


def _tiktoken(backend: Any) -> tuple[Engine | None, str]:
    bpe, reason = tiktoken_engine_for(backend)
    return (TiktokenEngine(bpe), reason) if bpe is not None else (None, reason)


BUILDERS = {"gigatoken": _gigatoken, "tiktoken": _tiktoken}


def probe_mismatch(engine: Engine, reference: HFEngine, texts: tuple[str, ...] = PROBE_TEXTS) -> str | None:
    """The first of `texts` on which `engine` and the HF engine disagree, or None."""
    documents = utf8_documents(list(texts))
    tokens, lengths = engine.encode(documents)
    ends = np.cumsum(lengths)
    for text, ids, start, end in zip(texts, reference.ids(documents), ends - lengths, ends, strict=True):
        if tokens[start:end].tolist() != ids:
            return text
    return None


@functools.lru_cache(maxsize=8)  # building and probing takes seconds; a tokenizer object is checked once
def fast_engine(name: str, backend: Any) -> tuple[Engine | None, str]:
    """The engine `name` for the `tokenizers.Tokenizer` `backend` if it reproduces it, else None and why not."""
    engine, reason = BUILDERS[name](backend)
    if engine is None:
        return None, reason
    mismatch = probe_mismatch(engine, HFEngine(backend))
    if mismatch is not None:
        return None, f"{name} differs from the HF tokenizer on {mismatch[:40]!r}"
    return engine, name


def select_engine(tokenizer: Any, choice: str) -> tuple[Engine, HFEngine | None, str]:
    """(engine, the HF reference to re-check it against or None when it is the reference, description)."""
    choice = ALIASES.get(choice, choice)
    if not getattr(tokenizer, "is_fast", False):
        if choice in FAST_ENGINES:
            raise DataInputError(f"--tokenizer-engine {choice}: the tokenizer has no fast (tokenizers) backend")
        return SlowHFEngine(tokenizer), None, "transformers (not a fast tokenizer)"
    reference = HFEngine(tokenizer.backend_tokenizer)
    if choice == "hf":
        return reference, None, "hf tokenizers (--tokenizer-engine)"
    refused: list[str] = []
    for name in FAST_ENGINES if choice == "auto" else (choice,):
        engine, reason = fast_engine(name, tokenizer.backend_tokenizer)
        if engine is not None:
            return engine, reference, f"{name} ({'; '.join(refused)})" if refused else name
        if choice != "auto":
            raise DataInputError(f"--tokenizer-engine {choice}: {reason}; use --tokenizer-engine auto or hf")
        refused.append(f"no {name}: {reason}")
    return reference, None, f"hf tokenizers ({'; '.join(refused)})"
