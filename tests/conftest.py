"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from qwen3_pretrain.tokenizer import build_qwen3_tokenizer


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly built offline Qwen3 tokenizer directory (tokenizer.json + tokenizer_config.json).

    Built once per test session (a few seconds) so tests never depend on a stale cache; load it with
    `qwen3_pretrain.tokenizer.load_tokenizer(qwen3_tokenizer_dir)`.
    """
    return build_qwen3_tokenizer(tmp_path_factory.mktemp("qwen3-tokenizer"))
