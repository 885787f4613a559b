"""Shared pieces of the tests that run the training loop: a tiny dataset and the flags of a small fp32 run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qwen3_pretrain.data.indexed import IndexedDatasetWriter

EOD = 0
ITERS, MBS, GBS, SEQ = 6, 2, 8, 32
LR, MIN_LR, WARMUP_ITERS, WD, CLIP, BETAS, EPS = 4e-3, 4e-4, 2, 0.1, 1.0, (0.9, 0.95), 1e-8


def write_tiny_dataset(prefix: Path, documents: int = 150, seed: int = 0) -> str:
    """Documents of learnable token patterns (arithmetic progressions mod 500) ending in EOD=0."""
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for _ in range(documents):
            n, start, step = int(rng.integers(5, 50)), int(rng.integers(1, 400)), int(rng.integers(1, 4))
            writer.add_document(np.append(1 + (start + step * np.arange(n)) % 500, EOD))
        writer.finalize()
    return str(prefix)


def tiny_flags(data_prefix: str, **overrides: Any) -> list[str]:
    """Flags of a small fp32 run; overrides replace or add flags (value True = bare flag, None = drop)."""
    values: dict[str, Any] = {
        "model": "qwen3-tiny", "data-path": data_prefix, "split": "95,5,0", "seq-length": SEQ, "eod-token-id": EOD,
        "eod-mask-loss": True, "micro-batch-size": MBS, "global-batch-size": GBS, "train-iters": ITERS, "lr": LR,
        "min-lr": MIN_LR, "lr-decay-style": "cosine", "lr-warmup-iters": WARMUP_ITERS, "weight-decay": WD,
        "clip-grad": CLIP, "adam-beta1": BETAS[0], "adam-beta2": BETAS[1], "adam-eps": EPS, "seed": 7,
        "log-interval": 2, "eval-interval": 1000, "eval-iters": 1, "num-workers": 0,
    }
    values.update({k.replace("_", "-"): v for k, v in overrides.items()})
    flags: list[str] = []
    for key, value in values.items():
        if value is None or value is False:
            continue
        flags.append(f"--{key}")
        if value is not True:
            flags.append(str(value))
    return flags
