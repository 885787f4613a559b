"""GPT training samples from indexed datasets, with Megatron-core GPTDataset/BlendedDataset semantics.

For one dataset prefix and one split (a contiguous range of its sequences, `--split 99,1,0`):
  document index  the split's sequences repeated for as many epochs as `num_samples` windows need,
                  shuffled together with RandomState(seed) (so each appears once per epoch); the
                  last epoch is shuffled on its own when less than 80% of it is needed, as in Megatron
  sample index    sample i is the window of seq_length + 1 tokens starting at token i * seq_length
                  of the concatenated document stream (windows cross document boundaries; two
                  consecutive samples share one token); stored as (document index position, offset)
  shuffle index   a permutation of the samples
The three arrays are the same as megatron-core builds for the same files, split, seed and sizes (the
tests compare every sample), and are cached as .npy files keyed by a hash of their parameters.
Several prefixes are blended by weight the way megatron-core's BlendedDataset does.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from qwen3_pretrain.data.indexed import IndexedDataset, idx_path

SPLIT_NAMES = ("train", "valid", "test")
QWEN3_EOD = 151643
SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80  # Megatron shuffles a final epoch used below 80% on its own
BLEND_SURPLUS = 0.005  # Megatron builds 0.5% more samples per blended dataset than the blend draws
CACHE_FORMAT = 1
Sample = dict[str, torch.Tensor]


class DataConfigError(ValueError):
    """A --data-path / --split value or a dataset does not allow building the samples asked for."""


def parse_data_path(data_path: list[str]) -> tuple[list[str], list[float] | None]:
    """Megatron's `--data-path`: `PREFIX...` or `WEIGHT PREFIX WEIGHT PREFIX ...` -> (prefixes, weights)."""
    if not data_path:
        raise DataConfigError("--data-path is empty: give a dataset prefix, or weight prefix pairs")
    if len(data_path) % 2:
        return [p.strip() for p in data_path], None
    weights: list[float | None] = []
    for raw in data_path[0::2]:
        try:
            weights.append(float(raw))
        except ValueError:
            weights.append(None)
    if all(w is None for w in weights):
        return [p.strip() for p in data_path], None
    if any(w is None or w <= 0 for w in weights):
        raise DataConfigError(
            f"--data-path {' '.join(data_path)}: expected WEIGHT PREFIX pairs with positive weights "
            f"(e.g. 0.3 data/a_text_document 0.7 data/b_text_document)"
        )
    return [p.strip() for p in data_path[1::2]], [w for w in weights if w is not None]


def parse_split(split: str) -> list[tuple[float, float] | None]:
    """`--split 99,1,0` -> the [begin, end) fraction of the sequences per split (None when empty)."""
    parts = [p for p in re.split(r"[,/]", split) if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if not 1 <= len(values) <= 3 or any(v < 0 for v in values) or sum(values) <= 0:
        raise DataConfigError(f"--split {split!r}: expected up to three non-negative numbers, e.g. 99,1,0")
    values += [0.0] * (3 - len(values))
    total = sum(values)
    bounds = np.cumsum([0.0] + [v / total for v in values])
    return [(float(bounds[i]), float(bounds[i + 1])) if values[i] > 0 else None for i in range(3)]


def _shuffled_document_index(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState) -> np.ndarray:
    index = np.tile(documents.astype(np.int32), num_epochs)  # int32[num_epochs * len(documents)]
    rng.shuffle(index)
    return index


def build_document_index(
    documents: np.ndarray, num_epochs: int, rng: np.random.RandomState, separate_final_epoch: bool
) -> np.ndarray:
    """Sequence ids for all epochs, shuffled (the final epoch separately when asked)."""
    if not separate_final_epoch or num_epochs == 1:
        return _shuffled_document_index(documents, num_epochs, rng)
    first = _shuffled_document_index(documents, num_epochs - 1, rng)
    return np.concatenate([first, _shuffled_document_index(documents, 1, rng)])


def build_sample_index(sequence_lengths: np.ndarray, document_index: np.ndarray, seq_length: int) -> np.ndarray:
    """int64[num_samples + 1, 2]: (position in document_index, token offset) where each sample starts.

    Sample i covers tokens [i * seq_length, (i + 1) * seq_length] of the concatenated stream; the
    last partial window is dropped.
    """
    lengths = sequence_lengths[document_index].astype(np.int64)
    ends = np.cumsum(lengths)
    num_samples = (int(ends[-1]) - 1) // seq_length
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    position = np.searchsorted(ends, starts, side="right")  # the document holding each start token
    offset = starts - (ends[position] - lengths[position])
    index = np.stack([position, offset], axis=1)  # [num_samples + 1, 2]
    index[0] = 0
    return index


def build_shuffle_index(num_samples: int, total_size: int, rng: np.random.RandomState) -> np.ndarray:
    """A permutation of [0, num_samples) followed by one of [num_samples, total_size)."""
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate([first, last])


def _cache_key(parameters: dict) -> str:
    return hashlib.md5(json.dumps(parameters, sort_keys=True).encode()).hexdigest()


def _load_or_build(cache_dir: str | None, stem: str, parameters: dict, build) -> dict[str, np.ndarray]:
    """Arrays from `<cache_dir>/<hash>-<stem>-<name>.npy`, or `build()` them and save them atomically."""
    if cache_dir is None:
        return build()
    base = os.path.join(cache_dir, f"{_cache_key(parameters)}-{stem}")
    description = f"{base}-description.json"
    if os.path.isfile(description):  # written last: present means every array is complete
        with open(description) as f:
            names = json.load(f)["arrays"]
        return {name: np.load(f"{base}-{name}.npy", mmap_mode="r") for name in names}
    arrays = build()
    try:
        os.makedirs(cache_dir, exist_ok=True)
        for name, array in arrays.items():
            _atomic_write(f"{base}-{name}.npy", lambda f, a=array: np.save(f, a))
        content = json.dumps({**parameters, "arrays": list(arrays)}, indent=1)
        _atomic_write(description, lambda f: f.write(content.encode()))
    except OSError as exc:
        warnings.warn(
            f"could not cache the sample index in {cache_dir} ({exc}); it is rebuilt on every start", stacklevel=1
        )
    return arrays


def _atomic_write(path: str, write) -> None:
    handle, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=os.path.basename(path) + ".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp)
        raise


def _file_identity(prefix: str) -> dict:
    stat = os.stat(idx_path(prefix))
    return {"prefix": os.path.abspath(prefix), "idx_bytes": stat.st_size, "idx_mtime_ns": stat.st_mtime_ns}


class GPTDataset(torch.utils.data.Dataset):
    """Samples of `seq_length` tokens (plus the one-token shift) from one split of one indexed dataset."""

    def __init__(
        self,
        indexed: IndexedDataset,
        documents: np.ndarray,
        num_samples: int | None,
        seq_length: int,
        seed: int,
        split_name: str,
        cache_dir: str | None,
        eod_token_id: int = QWEN3_EOD,
        eod_mask_loss: bool = False,
        reset_position_ids: bool = False,
    ) -> None:
        if seq_length < 2:
            raise DataConfigError(f"--seq-length must be at least 2, got {seq_length}")
        self.indexed, self.seq_length = indexed, seq_length
        self.eod_token_id, self.eod_mask_loss, self.reset_position_ids = eod_token_id, eod_mask_loss, reset_position_ids
        tokens_per_epoch = int(indexed.sequence_lengths[documents].sum(dtype=np.int64))
        if tokens_per_epoch < 2:
            raise DataConfigError(
                f"the {split_name} split of {indexed.prefix} ({len(documents)} documents) holds {tokens_per_epoch} "
                f"tokens: too few for one sample; change --split or add data"
            )
        self.num_epochs = 1
        if num_samples is not None:  # the smallest number of epochs with num_samples windows
            self.num_epochs = max(1, math.ceil((num_samples * seq_length + 1) / tokens_per_epoch))
        parameters = {
            "format": CACHE_FORMAT, **_file_identity(indexed.prefix), "split": split_name,
            "documents": [int(documents[0]), int(documents[-1]) + 1] if len(documents) else [0, 0],
            "num_samples": num_samples, "seq_length": seq_length, "seed": seed,
        }

        def build() -> dict[str, np.ndarray]:
            return self._build_indices(documents, num_samples, tokens_per_epoch, seed)

        stem = f"{os.path.basename(indexed.prefix)}-{split_name}"
        arrays = _load_or_build(cache_dir, stem, parameters, build)
        self.document_index, self.sample_index = arrays["document_index"], arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

    def _build_indices(
        self, documents: np.ndarray, num_samples: int | None, tokens_per_epoch: int, seed: int
    ) -> dict[str, np.ndarray]:
        separate_final_epoch, samples_before_final = False, 0
        if num_samples is not None and self.num_epochs > 1:  # more than one epoch only when num_samples is set
            samples_before_final = ((self.num_epochs - 1) * tokens_per_epoch - 1) // self.seq_length
            samples_per_epoch = (tokens_per_epoch - 1) // self.seq_length
            separate_final_epoch = num_samples - samples_before_final < int(
                SEPARATE_FINAL_EPOCH_THRESHOLD * samples_per_epoch
            )
        rng = np.random.RandomState(seed)
        document_index = build_document_index(documents, self.num_epochs, rng, separate_final_epoch)
        sample_index = build_sample_index(self.indexed.sequence_lengths, document_index, self.seq_length)
        total = len(sample_index) - 1
        shuffle_index = build_shuffle_index(samples_before_final if separate_final_epoch else total, total, rng)
        return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}

    def __len__(self) -> int:
        return len(self.sample_index) - 1

    def window(self, idx: int) -> np.ndarray:
        """int64[seq_length + 1]: the tokens of sample `idx` (after shuffling)."""
        j = int(self.shuffle_index[idx])
        (first, begin), (last, end) = self.sample_index[j], self.sample_index[j + 1]
        doc = self.document_index
        if first == last:
            parts = [self.indexed.get(int(doc[first]), int(begin), int(end - begin) + 1)]
        else:
            parts = [self.indexed.get(int(doc[first]), int(begin))]
            parts += [self.indexed.get(int(doc[k])) for k in range(int(first) + 1, int(last))]
            parts.append(self.indexed.get(int(doc[last]), 0, int(end) + 1))
        return np.concatenate(parts).astype(np.int64)

    def __getitem__(self, idx: int) -> Sample:
        window = torch.from_numpy(self.window(idx))
        tokens, labels = window[:-1].clone(), window[1:].clone()
        is_eod = tokens == self.eod_token_id
        loss_mask = torch.ones(self.seq_length, dtype=torch.float32)
        if self.eod_mask_loss:  # Megatron: no loss where the input token is EOD (predicting across documents)
            loss_mask[is_eod] = 0.0
        position_ids = torch.arange(self.seq_length, dtype=torch.int64)
        if self.reset_position_ids:  # positions restart after every EOD
            restart = torch.where(is_eod, position_ids + 1, torch.zeros_like(position_ids))
            restart = torch.cat([torch.zeros(1, dtype=torch.int64), restart[:-1]])
            position_ids = position_ids - torch.cummax(restart, dim=0).values
        return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}


def normalize(weights: Sequence[float]) -> list[float]:
    """Weights divided by their sum, in float64 (the exact arithmetic Megatron uses)."""
    array = np.asarray(weights, dtype=np.float64)
    return (array / array.sum()).tolist()


def build_blend_indices(weights: list[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Megatron's greedy blend: sample s comes from the dataset furthest below its share of s samples.

    Returns (dataset of each sample int16[size], index of the sample within its dataset int64[size]).
    """
    dataset_index = np.zeros(size, dtype=np.int16)
    dataset_sample_index = np.zeros(size, dtype=np.int64)
    drawn = [0] * len(weights)
    for s in range(size):
        scale = max(float(s), 1.0)
        errors = [w * scale - c for w, c in zip(weights, drawn, strict=True)]
        best = errors.index(max(errors))  # first maximum, as Megatron's strict > comparison
        dataset_index[s] = best
        dataset_sample_index[s] = drawn[best]
        drawn[best] += 1
    return dataset_index, dataset_sample_index


class BlendedDataset(torch.utils.data.Dataset):
    """`size` samples drawn from several datasets in proportion to `weights` (normalised)."""

    def __init__(self, datasets: list[GPTDataset], weights: Sequence[float], size: int, cache_dir: str | None) -> None:
        if any(w <= 0 for w in weights):
            raise DataConfigError(f"blend weights must be positive, got {weights}")
        self.datasets, self.weights, self.size = datasets, normalize(weights), size
        parameters = {
            "format": CACHE_FORMAT, "weights": self.weights, "size": size,
            "datasets": [{**_file_identity(d.indexed.prefix), "len": len(d)} for d in datasets],
        }

        def build() -> dict[str, np.ndarray]:
            dataset_index, dataset_sample_index = build_blend_indices(self.weights, size)
            return {"dataset_index": dataset_index, "dataset_sample_index": dataset_sample_index}

        arrays = _load_or_build(cache_dir, "blend", parameters, build)
        self.dataset_index, self.dataset_sample_index = arrays["dataset_index"], arrays["dataset_sample_index"]
        drawn = np.bincount(np.asarray(self.dataset_index), minlength=len(datasets))
        for i, dataset in enumerate(datasets):
            if drawn[i] > len(dataset):
                raise DataConfigError(
                    f"the blend draws {drawn[i]} samples from {dataset.indexed.prefix}, which has {len(dataset)}"
                )

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> Sample:
        return self.datasets[int(self.dataset_index[idx])][int(self.dataset_sample_index[idx])]


def build_gpt_datasets(
    data_path: list[str],
    split: str,
    seq_length: int,
    seed: int,
    num_samples: tuple[int, int, int],
    cache_dir: str | None = None,
    eod_token_id: int = QWEN3_EOD,
    eod_mask_loss: bool = False,
    reset_position_ids: bool = False,
) -> tuple[torch.utils.data.Dataset | None, torch.utils.data.Dataset | None, torch.utils.data.Dataset | None]:
    """Train/valid/test datasets (None for an empty split) as Megatron builds them from the same flags.

    `num_samples` = samples wanted per split (train: train_iters x global_batch_size). The sample
    indices are cached in `cache_dir`, or in an `index-cache` folder next to each dataset (a blend's
    next to its first dataset).
    """
    prefixes, weights = parse_data_path(data_path)
    bounds = parse_split(split)
    indexed = [IndexedDataset(prefix) for prefix in prefixes]

    def dataset(i: int, split_index: int, samples: int | None) -> GPTDataset:
        count = len(indexed[i])
        split_bounds = bounds[split_index]
        assert split_bounds is not None, "called only for a non-empty split"
        begin, end = (round(b * count) for b in split_bounds)
        if begin == end:
            raise DataConfigError(
                f"the {SPLIT_NAMES[split_index]} split ({split}) of {prefixes[i]} has no documents ({count} in all); "
                f"change --split"
            )
        documents = np.arange(begin, end, dtype=np.int32)
        split_name = SPLIT_NAMES[split_index]
        return GPTDataset(
            indexed[i], documents, samples, seq_length, seed, split_name, cache_of(i), eod_token_id=eod_token_id,
            eod_mask_loss=eod_mask_loss, reset_position_ids=reset_position_ids,
        )

    def cache_of(i: int) -> str:
        return cache_dir or os.path.join(os.path.dirname(os.path.abspath(prefixes[i])), "index-cache")

    results: list[torch.utils.data.Dataset | None] = []
    for s in range(3):
        if bounds[s] is None:
            results.append(None)
        elif len(prefixes) == 1 and weights is None:
            results.append(dataset(0, s, num_samples[s]))
        elif weights is not None:  # Megatron: each dataset gets its share (+0.5%), the blend draws the shares
            shares = [math.ceil(num_samples[s] * w) for w in normalize(weights)]
            parts = [dataset(i, s, math.ceil(share * (1 + BLEND_SURPLUS))) for i, share in enumerate(shares)]
            results.append(BlendedDataset(parts, normalize(weights), sum(shares), cache_of(0)))
        else:  # unweighted prefixes: one epoch of each, blended by their sizes
            parts = [dataset(i, s, None) for i in range(len(prefixes))]
            sizes = [len(p) for p in parts]
            results.append(BlendedDataset(parts, sizes, min(num_samples[s], sum(sizes)), cache_of(0)))
    return results[0], results[1], results[2]
