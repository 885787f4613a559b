"""Micro batches for each data-parallel rank, resumable from `consumed_samples` (Megatron's sampler).

Global step k takes the `micro_batch_size x dp_size` consecutive sample indices starting at
`consumed_samples + k x micro_batch_size x dp_size`; rank r takes its slice
`[r x micro_batch_size, (r + 1) x micro_batch_size)` of them. The stream therefore depends only on
`consumed_samples`, so a resumed run continues exactly where the interrupted one stopped. The last
incomplete global batch is dropped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch


class PretrainingSampler:
    """Yields this rank's micro batches of sample indices (a `batch_sampler` for DataLoader)."""

    def __init__(
        self, total_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int
    ) -> None:
        if micro_batch_size < 1 or dp_size < 1:
            raise ValueError(f"micro batch size ({micro_batch_size}) and DP size ({dp_size}) must be positive")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"DP rank {dp_rank} is outside [0, {dp_size})")
        if not 0 <= consumed_samples < total_samples:
            raise ValueError(
                f"consumed_samples {consumed_samples} leaves nothing to read from a dataset of {total_samples} "
                f"samples: build the dataset for more samples (train iters x global batch size)"
            )
        self.total_samples, self.consumed_samples = total_samples, consumed_samples
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size

    @property
    def global_micro_size(self) -> int:
        return self.micro_batch_size * self.dp_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // self.global_micro_size

    def __iter__(self) -> Iterator[list[int]]:
        first = self.consumed_samples + self.dp_rank * self.micro_batch_size
        for step in range(len(self)):
            start = first + step * self.global_micro_size
            yield list(range(start, start + self.micro_batch_size))


def build_pretraining_loader(
    dataset: torch.utils.data.Dataset,
    consumed_samples: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """DataLoader of `{tokens, labels, loss_mask, position_ids}` micro batches ([micro, seq] each)."""
    if not isinstance(dataset, Sized):
        raise TypeError(f"the pretraining loader needs a dataset with a length, got {type(dataset).__name__}")
    sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )
