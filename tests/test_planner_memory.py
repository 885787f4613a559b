"""The planner's memory estimate is within 20% of the measured peak of real training runs on CPU.

Each layout trains a small Qwen3 (4 layers, hidden 256, vocabulary 8192 or 512: 4-6M parameters,
90-430 MB at the peak) for two iterations of two micro batches each, so the gradients of the
first micro batch are alive during the second one's forward, as the planner assumes. The runs are
fp32 but for two bf16 ones, which on a CPU without bf16 units take the float32-matmul path
(`kernels.bf16_via_float32`) the estimate accounts for, as `train` does. One process
runs the single-process layouts one after the other, two torchrun processes (gloo) the FSDP2, the
tensor + sequence parallel and the context parallel (ring, Ulysses) layouts; every rank reports its own peak.

How the peak is measured: the growth of the process's resident set high-water mark (VmHWM) over
the run. Before each measured run the process trains the same layout once with the tiny model, so
code pages, lazy imports, thread pools and process-group buffers are already resident; then the
high-water mark is reset to the current RSS (`/proc/self/clear_refs`, "5") and that RSS is the
baseline. glibc's mmap threshold is fixed at 64 KiB first: by default it grows up to 32 MiB and
buffers below it come from the heap, which keeps freed memory, so RSS would count freed and
fragmented buffers; with the fixed threshold every tensor buffer is its own mapping, unmapped when
freed, and RSS follows the live bytes. The high-water mark is exact (no sampling), and pages are
only counted once touched, as allocated-and-used memory is on an accelerator.

The estimate's fixed `overhead` (device context, caching-allocator slack, collective buffers of an
accelerator) is excluded: the CPU runtime's fixed costs are in the baseline after the warm-up run.
Weights, gradients, optimizer states, activations, the loss buffers and the backward working set
are the planner's own: an estimate that ignored the activations (the micro batch 8 layout), the
loss buffers (micro batch 4) or the recomputed block (full recompute) would be off by more than 20%, and so
would one that recomputed a uniform group block by block, or counted a recomputed block of
`--recompute-method block` on top of the activations the kept blocks have freed by then.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from qwen3_pretrain.config import parse_train_args
from qwen3_pretrain.distributed.planner import Layout
from qwen3_pretrain.train.preflight import memory_estimate, prepare
from qwen3_pretrain.train.trainer import run_training

from distributed_helpers import exit_after, run_as_torchrun
from train_helpers import tiny_flags, write_tiny_dataset

TOLERANCE = 0.2
SEQ = 256
MIB = 2**20
SHAPE = {  # 4 layers of hidden 256, FFN 1024, 4 query heads and 2 kv heads of 64
    "num_layers": 4, "hidden_size": 256, "ffn_hidden_size": 1024, "num_attention_heads": 4, "num_query_groups": 2,
    "kv_channels": 64, "seq_length": SEQ, "max_position_embeddings": SEQ,
}
RUN = {"train_iters": 2, "lr_warmup_iters": 1, "eval_iters": 0, "log_interval": 1}
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


@dataclass(frozen=True)
class Case:
    """One measured layout: the planner's Layout and the vocabulary of the model."""

    name: str
    layout: Layout
    vocab: int = 8192
    bf16: bool = False

    def flags(self, data: str, tiny: bool = False) -> list[str]:
        """Training flags of this layout (two micro batches per step); `tiny`: the qwen3-tiny warm-up run."""
        lay = self.layout
        mbs = 2 if tiny else lay.micro_batch_size
        parallel = {
            "micro_batch_size": mbs, "global_batch_size": 2 * mbs * lay.dp,
            "tensor_model_parallel_size": lay.tp, "sequence_parallel": lay.sequence_parallel,
            "recompute_granularity": None if lay.recompute == "none" else lay.recompute, "no_shard": not lay.shard,
            "recompute_method": lay.recompute_method, "recompute_num_layers": lay.recompute_num_layers,
            "bf16": self.bf16, "context_parallel_size": lay.cp, "context_parallel_algo": lay.cp_algo,
        }
        shape = {} if tiny else {**SHAPE, "padded_vocab_size": self.vocab}
        return tiny_flags(data, **RUN, **parallel, **shape)


CASES = [
    Case("1 process, micro batch 4", Layout(1, 1, 1, 4)),
    Case("1 process, micro batch 8", Layout(1, 1, 1, 8)),
    Case("1 process, selective recompute, vocab 512", Layout(1, 1, 1, 4, "selective"), vocab=512),
    Case("1 process, full recompute, vocab 512", Layout(1, 1, 1, 4, "full"), vocab=512),
    Case("1 process, full recompute of 2 blocks of 4, vocab 512",
         Layout(1, 1, 1, 4, "full", recompute_method="block", recompute_num_layers=2), vocab=512),
    Case("1 process, full recompute in groups of 2 blocks, vocab 512",
         Layout(1, 1, 1, 4, "full", recompute_method="uniform", recompute_num_layers=2), vocab=512),
    Case("FSDP2 over 2 processes", Layout(1, 1, 2, 4)),
    Case("1 process, bf16, micro batch 4", Layout(1, 1, 1, 4), bf16=True),
    Case("FSDP2 over 2 processes, bf16", Layout(1, 1, 2, 4), bf16=True),
    Case("TP 2 + sequence parallel", Layout(2, 1, 1, 4, sequence_parallel=True)),
    Case("CP 2, ring", Layout(1, 1, 1, 4, cp=2)),
    Case("CP 2, Ulysses", Layout(1, 1, 1, 4, cp=2, cp_algo="ulysses_cp_algo")),
]


def _status_bytes(key: str) -> int:
    """A `/proc/self/status` field (kB) in bytes."""
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {key}")
    return int(match.group(1)) * 1024


def _peak_rss_resettable() -> bool:
    """Whether this kernel lets a process reset its own VmHWM (Linux >= 4.0, not every sandbox)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_bytes("VmHWM") > 0
    except (OSError, RuntimeError):
        return False


pytestmark = pytest.mark.skipif(not _peak_rss_resettable(), reason="needs a resettable VmHWM in /proc/self")


def _worker(out_dir: Path) -> None:
    """Measure the peak of every case of this world size; write {case: bytes} for this rank."""
    torch.set_num_threads(1)
    if ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 64 * 1024) != 1:
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    data = (out_dir / "data_prefix").read_text()
    peaks = {}
    for case in (c for c in CASES if c.layout.world_size == world):
        run_training(parse_train_args(case.flags(data, tiny=True), world_size=world))
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        baseline = _status_bytes("VmRSS")
        run_training(parse_train_args(case.flags(data), world_size=world))
        peaks[case.name] = _status_bytes("VmHWM") - baseline
    rank = dist.get_rank() if world > 1 else 0
    (out_dir / f"peaks_rank{rank}.json").write_text(json.dumps(peaks))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny_text_document")


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory, data: str) -> Callable[[int], list[dict[str, int]]]:
    """world size -> per rank {case name: peak bytes}, measured once per world size."""
    cache: dict[int, list[dict[str, int]]] = {}

    def peaks(world: int) -> list[dict[str, int]]:
        if world not in cache:
            out = tmp_path_factory.mktemp(f"world{world}")
            (out / "data_prefix").write_text(data)
            run_as_torchrun(__file__, world, out)
            cache[world] = [json.loads((out / f"peaks_rank{r}.json").read_text()) for r in range(world)]
        return cache[world]

    return peaks


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_estimate_within_20_percent_of_measured_peak(
    case: Case, data: str, measured: Callable[[int], list[dict[str, int]]]
) -> None:
    config = prepare(case.flags(data), world_size=case.layout.world_size)
    estimate = dataclasses.replace(memory_estimate(config), overhead=0)  # what `train` checks, less the fixed part
    parts = ", ".join(f"{k} {v * 1024:.1f}" for k, v in estimate.as_gib().items())
    for rank, peaks in enumerate(measured(case.layout.world_size)):
        peak = peaks[case.name]
        assert abs(estimate.total - peak) <= TOLERANCE * peak, (
            f"{case.name}, rank {rank}: measured peak {peak / MIB:.1f} MiB, estimate {estimate.total / MIB:.1f} MiB "
            f"({parts} MiB)"
        )


if __name__ == "__main__":
    exit_after(_worker, sys.argv[1])
