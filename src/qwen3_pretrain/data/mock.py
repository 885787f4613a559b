"""Random-token training samples for benchmarks and smoke runs without files (what Megatron's `--mock-data` reads).

Each sample is a window of seq_length + 1 uniformly random token ids drawn from a generator seeded by
(seed, sample index), so sample i is the same in every process, DataLoader worker and access order,
and items have exactly the keys, dtypes and shapes of `GPTDataset` items (tokens, labels shifted by
one, loss_mask, position_ids). The loss on such data cannot fall below ln(vocab_size).
"""

from __future__ import annotations

import numpy as np
import torch

from qwen3_pretrain.data.gpt_dataset import DataConfigError, Sample


class MockGPTDataset(torch.utils.data.Dataset):
    """`num_samples` deterministic random samples of `seq_length` tokens from [0, vocab_size)."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int = 1234) -> None:
        if num_samples < 1:
            raise DataConfigError(f"mock data needs at least one sample, got num_samples={num_samples}")
        if seq_length < 2:
            raise DataConfigError(f"--seq-length must be at least 2, got {seq_length}")
        if vocab_size < 1:
            raise DataConfigError(f"mock data needs a positive vocabulary size, got vocab_size={vocab_size}")
        if seed < 0:
            raise DataConfigError(f"--seed must be non-negative for mock data, got {seed}")
        self.num_samples, self.seq_length, self.vocab_size, self.seed = num_samples, seq_length, vocab_size, seed

    def __len__(self) -> int:
        return self.num_samples

    def window(self, idx: int) -> np.ndarray:
        """int64[seq_length + 1]: the random tokens of sample `idx`."""
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} is outside the mock dataset of {self.num_samples} samples")
        rng = np.random.default_rng([self.seed, idx])
        return rng.integers(0, self.vocab_size, size=self.seq_length + 1, dtype=np.int64)

    def __getitem__(self, idx: int) -> Sample:
        window = torch.from_numpy(self.window(int(idx)))
        return {
            "tokens": window[:-1].clone(),
            "labels": window[1:].clone(),
            "loss_mask": torch.ones(self.seq_length, dtype=torch.float32),
            "position_ids": torch.arange(self.seq_length, dtype=torch.int64),
        }
