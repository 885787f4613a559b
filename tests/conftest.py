"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from qwen3_pretrain.model import kernels
from qwen3_pretrain.tokenizer import build_qwen3_tokenizer


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly built offline Qwen3 tokenizer directory (tokenizer.json + tokenizer_config.json).

    Built once per test session (a few seconds) so tests never depend on a stale cache; load it with
    `qwen3_pretrain.tokenizer.load_tokenizer(qwen3_tokenizer_dir)`.
    """
    return build_qwen3_tokenizer(tmp_path_factory.mktemp("qwen3-tokenizer"))


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny matmuls on two busy vCPUs run far faster on one thread than on two (use via usefixtures)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["native", "via-float32"])
def cpu_bf16_kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a bf16 test with torch's own CPU bf16 kernels and with bf16 on float32 units (`model.kernels`)."""
    monkeypatch.setattr(kernels, "cpu_has_fast_bf16_matmul", lambda: request.param == "native")
    return str(request.param)
