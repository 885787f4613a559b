"""Tokenizers: load any HF tokenizer directory, or build the real Qwen3 tokenizer offline.

The Qwen BPE ranks (151,643 byte strings, the regular vocabulary of Qwen2/2.5/3) ship in the PyPI
package `dashscope` as `dashscope/resources/qwen.tiktoken`. From them we derive the vocabulary and
the merge list of a byte-level BPE, add Qwen3's normaliser, split regex and 26 added tokens, and
write a `tokenizer.json` + `tokenizer_config.json` directory that `transformers.AutoTokenizer` loads.

CLI: `qwen3-pretrain tokenizer build OUT_DIR`.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tokenizers
    import transformers

QWEN3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_RANK_COUNT = 151_643  # regular BPE tokens; added tokens start at this id
# Qwen3's added tokens in id order (151643..151668): (content, special).
QWEN3_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
QWEN3_EOS = "<|endoftext|>"  # also the pad token; Qwen3 adds no BOS
QWEN3_MODEL_MAX_LENGTH = 131_072
QWEN3_FILES = ("tokenizer.json", "tokenizer_config.json")
# A Hugging Face tokenizer directory holds its vocabulary in one of these (tokenizer_config.json alone
# is not enough: transformers would build an empty tokenizer from it).
HF_VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
BUILD_HINT = "build the Qwen3 tokenizer offline with `qwen3-pretrain tokenizer build DIR` and pass DIR"


class TokenizerError(ValueError):
    """A tokenizer directory or the offline Qwen vocabulary is missing or unusable."""


def load_tokenizer(path: str | os.PathLike) -> transformers.PreTrainedTokenizerBase:
    """Load the Hugging Face tokenizer in directory `path` from local files only (never the hub)."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise TokenizerError(
            f"tokenizer directory {directory} does not exist. Pass the tokenizer directory that ships "
            f"with the weights, or {BUILD_HINT}."
        )
    if not any((directory / name).is_file() for name in HF_VOCABULARY_FILES):
        raise TokenizerError(
            f"{directory} holds no tokenizer vocabulary (expected one of {', '.join(HF_VOCABULARY_FILES)}). "
            f"Pass the tokenizer directory that ships with the weights, or {BUILD_HINT}."
        )
    from transformers import AutoTokenizer

    files = ", ".join(sorted(p.name for p in directory.iterdir() if p.is_file()))
    damaged = f"Its files ({files}) may be corrupt or incomplete: copy them again from the model, or {BUILD_HINT}."
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # transformers raises many types for unreadable files
        raise TokenizerError(
            f"could not load the tokenizer in {directory}: {type(exc).__name__}: {exc}. {damaged}"
        ) from exc
    if not tokenizer.encode("Hello", add_special_tokens=False):
        raise TokenizerError(f"the tokenizer in {directory} encodes plain text to no tokens. {damaged}")
    return tokenizer


def find_qwen_ranks_file() -> Path:
    """Locate `dashscope/resources/qwen.tiktoken` without importing dashscope."""
    spec = importlib.util.find_spec("dashscope")  # finds the package without running its __init__
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "resources" / "qwen.tiktoken"
        if candidate.is_file():
            return candidate
    raise TokenizerError(
        "the Qwen BPE vocabulary dashscope/resources/qwen.tiktoken was not found. "
        "Install it with `pip install --no-deps dashscope` (it brings only that package's files)."
    )


def read_bpe_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a tiktoken ranks file (`base64(token) rank` per line) and check the ranks are 0..n-1."""
    path = Path(path)
    ranks: dict[bytes, int] = {}
    with path.open("rb") as stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                encoded, rank_text = line.split()
                ranks[base64.b64decode(encoded, validate=True)] = int(rank_text)
            except (ValueError, binascii.Error) as exc:
                raise TokenizerError(
                    f"{path}:{number} is not `base64-token rank`: {line[:80]!r}. "
                    "Reinstall the vocabulary with `pip install --force-reinstall --no-deps dashscope`."
                ) from exc
    if sorted(ranks.values()) != list(range(len(ranks))) or any(bytes([b]) not in ranks for b in range(256)):
        raise TokenizerError(
            f"{path} is not a complete BPE vocabulary (ranks must be 0..n-1 without gaps or repeats "
            "and include all 256 single bytes). Reinstall it with `pip install --force-reinstall --no-deps dashscope`."
        )
    return ranks


def derive_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list that reproduces rank-based BPE: one (left, right) pair per multi-byte token.

    A token's merge is the two pieces that BPE reaches when it encodes the token's own bytes using only
    lower-ranked tokens; merges are ordered by the rank of the token they create.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        pieces = [token[i : i + 1] for i in range(len(token))]
        while len(pieces) > 2:
            best_rank, best_at = rank, -1
            for at in range(len(pieces) - 1):
                pair_rank = ranks.get(pieces[at] + pieces[at + 1], rank)
                if pair_rank < best_rank:
                    best_rank, best_at = pair_rank, at
            if best_at < 0:
                raise TokenizerError(
                    f"BPE token {token!r} (rank {rank}) cannot be built from lower-ranked tokens; "
                    "the ranks file is not a BPE vocabulary."
                )
            pieces[best_at : best_at + 2] = [pieces[best_at] + pieces[best_at + 1]]
        merges.append((pieces[0], pieces[1]))
    return merges


def byte_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: printable Latin-1 bytes map to themselves, the rest to U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    others = [byte for byte in range(256) if byte not in mapping]
    mapping.update({byte: chr(256 + index) for index, byte in enumerate(others)})
    return mapping


def qwen3_tokenizer_object(ranks: dict[bytes, int]) -> tokenizers.Tokenizer:
    """The Qwen3 `tokenizers.Tokenizer`: NFC, split regex, byte-level BPE over `ranks`, added tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    alphabet = byte_to_unicode()

    def to_text(token: bytes) -> str:
        return "".join(alphabet[byte] for byte in token)

    vocab = {to_text(token): rank for token, rank in ranks.items()}
    merges = [(to_text(left), to_text(right)) for left, right in derive_merges(ranks)]
    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=False,
        )
    )
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN3_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    # add_tokens keeps each AddedToken's own `special` flag; ids follow the order given.
    tokenizer.add_tokens(
        [AddedToken(content, special=special, normalized=False) for content, special in QWEN3_ADDED_TOKENS]
    )
    for offset, (content, _) in enumerate(QWEN3_ADDED_TOKENS):
        if tokenizer.token_to_id(content) != len(ranks) + offset:
            raise TokenizerError(f"added token {content!r} did not get id {len(ranks) + offset}")
    return tokenizer


def qwen3_tokenizer_config(first_added_id: int = QWEN_RANK_COUNT) -> dict:
    """`tokenizer_config.json` of the Qwen3 base models (no chat template: this is for pretraining)."""
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(first_added_id + offset): {"content": content, **flags, "special": special}
            for offset, (content, special) in enumerate(QWEN3_ADDED_TOKENS)
        },
        "additional_special_tokens": [c for c, special in QWEN3_ADDED_TOKENS if special and c != QWEN3_EOS],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": QWEN3_EOS,
        "errors": "replace",
        "model_max_length": QWEN3_MODEL_MAX_LENGTH,
        "pad_token": QWEN3_EOS,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _publish(staging: Path, out_dir: Path) -> None:
    """Move the finished files from `staging` into `out_dir`: a rename, or one atomic replace per file."""
    try:
        staging.rename(out_dir)  # out_dir absent (or an empty directory): the whole directory at once
        return
    except OSError:
        if not out_dir.is_dir():
            raise
    for name in QWEN3_FILES:
        os.replace(staging / name, out_dir / name)
    shutil.rmtree(staging)


def build_qwen3_tokenizer(out_dir: str | os.PathLike) -> Path:
    """Build the real Qwen3 tokenizer from dashscope's `qwen.tiktoken` into `out_dir`; return it.

    Files are written to a temporary directory next to `out_dir`, then moved into place.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise TokenizerError(f"{out_dir} exists and is not a directory; choose another output directory.")
    ranks_file = find_qwen_ranks_file()
    ranks = read_bpe_ranks(ranks_file)
    if len(ranks) != QWEN_RANK_COUNT:
        raise TokenizerError(
            f"{ranks_file} has {len(ranks)} BPE tokens, the Qwen vocabulary has {QWEN_RANK_COUNT}. "
            "Reinstall it with `pip install --force-reinstall --no-deps dashscope`."
        )
    tokenizer = qwen3_tokenizer_object(ranks)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
        (staging / "tokenizer.json").write_text(tokenizer.to_str(pretty=True), encoding="utf-8")
        config = json.dumps(qwen3_tokenizer_config(len(ranks)), indent=2, ensure_ascii=False)
        (staging / "tokenizer_config.json").write_text(config + "\n", encoding="utf-8")
        _publish(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def default_tokenizer_dir() -> Path:
    """Where the offline Qwen3 tokenizer is cached: $QWEN3_PRETRAIN_CACHE or ~/.cache/qwen3_pretrain."""
    root = os.environ.get("QWEN3_PRETRAIN_CACHE") or Path.home() / ".cache" / "qwen3_pretrain"
    return Path(root).expanduser() / "qwen3-tokenizer"


def ensure_qwen3_tokenizer(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return a directory holding the offline Qwen3 tokenizer, building it on first use.

    `cache_dir` is the tokenizer directory itself (default: `default_tokenizer_dir()`).
    """
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_tokenizer_dir()
    if all((directory / name).is_file() for name in QWEN3_FILES):
        return directory
    return build_qwen3_tokenizer(directory)


def main(argv: list[str]) -> int:
    """`qwen3-pretrain tokenizer build OUT_DIR`."""
    parser = argparse.ArgumentParser(
        prog="qwen3-pretrain tokenizer", description="Build the real Qwen3 tokenizer offline."
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    build = actions.add_parser(
        "build", help="build the Qwen3 tokenizer offline from dashscope's Qwen BPE vocabulary"
    )
    build.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="directory to write tokenizer files into")
    args = parser.parse_args(argv)

    print(f"building the Qwen3 tokenizer into {args.out_dir} (deriving BPE merges, a few seconds) ...", flush=True)
    started = time.perf_counter()
    try:
        out_dir = build_qwen3_tokenizer(args.out_dir)
        vocab_size = len(load_tokenizer(out_dir))
    except TokenizerError as exc:
        print(f"qwen3-pretrain tokenizer: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {', '.join(QWEN3_FILES)} to {out_dir}: vocab size {vocab_size} "
          f"({time.perf_counter() - started:.1f} s)")
    return 0
