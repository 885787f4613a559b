"""A tiktoken engine for byte-level BPE tokenizers, giving the HF tokenizer's ids about twice as fast.

Qwen's vocabulary is a tiktoken vocabulary (ranks = token ids), and tiktoken runs the same split
regex and byte-level BPE as the HF `tokenizers` engine at about half the CPU time. It is built only
for a tokenizer.json of the exact shape whose results tiktoken reproduces (`tiktoken_engine_for` says
why not otherwise); `engines` then probes it against the HF engine before using it.

Shape required: BPE model over GPT-2 byte symbols with no dropout/unk/prefix/suffix/byte fallback,
merge i creating the token of rank 256 + i (tiktoken merges by the rank of the result); normalizer
none or NFC; pre-tokenizer Split(regex, Isolated) then ByteLevel without its own regex; a
post-processor that adds nothing; added tokens matched verbatim (no strip/single-word/normalised
matching) with none a prefix of another.
"""

from __future__ import annotations

import itertools
import json
import re
import unicodedata
from typing import Any

import numpy as np


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character of each byte, inverted (character -> byte)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def _shape_problem(spec: dict) -> str | None:
    """Why tokenizer.json `spec` is not of the shape tiktoken reproduces (None when it is)."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return f"model type {model.get('type')}"
    if model.get("dropout") or model.get("unk_token") or model.get("byte_fallback"):
        return "BPE dropout, unk token or byte fallback"
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return "BPE subword prefix/suffix"
    if (spec.get("normalizer") or {"type": "NFC"})["type"] != "NFC":
        return f"normalizer {spec['normalizer']['type']}"
    steps = (spec.get("pre_tokenizer") or {}).get("pretokenizers") or []
    if not (
        len(steps) == 2
        and steps[0].get("type") == "Split"
        and "Regex" in steps[0].get("pattern", {})
        and steps[0].get("behavior") == "Isolated"
        and not steps[0].get("invert")
        and steps[1].get("type") == "ByteLevel"
        and not steps[1].get("use_regex")
        and not steps[1].get("add_prefix_space")
    ):
        return "pre-tokenizer is not Split(regex) + ByteLevel"
    if (spec.get("post_processor") or {"type": "ByteLevel"})["type"] != "ByteLevel":
        return f"post-processor {spec['post_processor']['type']} may add tokens"
    added = spec.get("added_tokens") or []
    if any(t["lstrip"] or t["rstrip"] or t["single_word"] or t["normalized"] for t in added):
        return "added tokens with strip/single-word/normalised matching"
    contents = [t["content"] for t in added]
    if any(a != b and b.startswith(a) for a in contents for b in contents):
        return "an added token is a prefix of another"
    return None


class TiktokenBPE:
    """Encodes texts with tiktoken exactly as the HF tokenizer it was built from."""

    def __init__(self, pattern: str, ranks: dict[bytes, int], added: dict[str, int], nfc: bool) -> None:
        import tiktoken

        self.encoding = tiktoken.Encoding(
            "hf-byte-level-bpe", pat_str=pattern, mergeable_ranks=ranks, special_tokens=added
        )
        self.added, self.nfc = added, nfc
        self.added_set = frozenset(added)
        self.added_pattern = re.compile("|".join(map(re.escape, added))) if added else None

    def encode(self, text: str) -> list[int]:
        if not self.nfc or unicodedata.is_normalized("NFC", text):
            return self.encoding.encode(text, allowed_special=self.added_set)
        # HF matches added tokens on the raw text and normalises only the text between them
        ids: list[int] = []
        start = 0
        for match in self.added_pattern.finditer(text) if self.added_pattern else ():
            ids += self.encoding.encode_ordinary(unicodedata.normalize("NFC", text[start : match.start()]))
            ids.append(self.added[match.group()])
            start = match.end()
        ids += self.encoding.encode_ordinary(unicodedata.normalize("NFC", text[start:]))
        return ids

    def encode_documents(self, documents: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """Tokens of the UTF-8 `documents` concatenated, and each one's length."""
        return flatten_ids([self.encode(d.decode("utf-8")) for d in documents])


def flatten_ids(ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Lists of ids as (all ids concatenated as int32, each list's length as int64)."""
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    return np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum())), lengths


def tiktoken_engine_for(backend: Any) -> tuple[TiktokenBPE | None, str]:
    """A TiktokenBPE equal to the `tokenizers.Tokenizer` `backend`, or None and the reason it is not used."""
    try:
        import tiktoken  # noqa: F401
    except ImportError:
        return None, "tiktoken is not installed"
    spec = json.loads(backend.to_str())
    problem = _shape_problem(spec)
    if problem:
        return None, problem
    model, to_byte = spec["model"], _byte_decoder()
    if len(model["vocab"]) != 256 + len(model["merges"]):
        return None, "the vocabulary is not the 256 bytes plus one token per merge"
    if not set("".join(model["vocab"])) <= to_byte.keys():
        return None, "vocabulary has symbols outside the byte-level alphabet"
    as_latin1 = {ord(c): chr(b) for c, b in to_byte.items()}  # symbol -> the char whose latin-1 code is its byte
    ranks = {token.translate(as_latin1).encode("latin-1"): rank for token, rank in model["vocab"].items()}
    if sorted(ranks.get(bytes([b]), -1) for b in range(256)) != list(range(256)):
        return None, "the 256 single bytes are not the tokens of ranks 0..255"
    for i, merge in enumerate(model["merges"]):
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        if model["vocab"].get(left + right) != 256 + i:
            return None, f"merge {i} ({left!r} + {right!r}) does not create the token of rank {256 + i}"
    added = {t["content"]: t["id"] for t in spec.get("added_tokens") or []}
    pattern = spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"]
    try:
        engine = TiktokenBPE(pattern, ranks, added, nfc=spec.get("normalizer") is not None)
    except ValueError as exc:  # e.g. a regex tiktoken's engine does not support
        return None, f"tiktoken cannot load it ({exc})"
    return engine, "tiktoken"
