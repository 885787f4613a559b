"""Context parallelism on CPU: one long sequence's forward + backward at CP 1 (one process) and CP C (C gloo
processes, ring `megatron_cp_algo` or Ulysses), same model, tokens and dtype.

Per CP size: the peak memory each rank adds during the timed steps (the growth of the resident set high-water
mark over the RSS after a warm-up step, with glibc's mmap threshold fixed so freed tensors leave RSS: on this tiny
model that growth is the activation memory), its ratio to CP 1's, tokens/s of the whole sequence (the slowest
rank's time), and the attention work each rank does: the query-key pairs (summed over heads) its attention blocks
compute per forward, counted from the blocks the ring actually runs (CP 1 and Ulysses: the causal triangle of
its heads). With the 2C split every rank's share is equal; "contiguous" is the max/min a ring over a contiguous
split would have.
Gradients are not reduced across ranks (the benchmark measures attention and activations, not FSDP).

    PYTHONPATH=src python benchmarks/context_parallel.py [--seq-length 8192] [--model qwen3-tiny] [--cp 2 4]
        [--algo megatron_cp_algo] [--iters 2] [--warmup 1] [--json OUT]
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import re
import shlex
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from train_throughput import machine_info, write_json_atomic  # benchmarks/ is the script's directory

from qwen3_pretrain.config.layout import RING_CP_ALGO
from qwen3_pretrain.config.model import get_preset
from qwen3_pretrain.distributed import context_parallel
from qwen3_pretrain.model.qwen3 import Qwen3ForCausalLM

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MIB = 2**20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen3-tiny", help="a dense Qwen3 preset")
    parser.add_argument("--seq-length", type=int, default=8192)
    parser.add_argument("--cp", type=int, nargs="+", default=[2, 4], help="CP sizes to compare with CP 1")
    parser.add_argument("--algo", default=RING_CP_ALGO, choices=context_parallel.CP_ALGOS)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", default=None, help="write the results here (atomically)")
    return parser.parse_args(argv)


def _status_bytes(key: str) -> int:
    """A `/proc/self/status` field (kB) in bytes."""
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {key}")
    return int(match.group(1)) * 1024


class _WorkCounter:
    """Wraps `attention_blocks.block_forward` as the ring calls it, adding up the query-key pairs computed."""

    def __init__(self) -> None:
        self.pairs = 0
        self.inner = context_parallel.block_forward

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
                 allowed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        b, heads, sq, _ = q.shape
        per_head = sq * (sq + 1) // 2 if causal else sq * k.shape[2] if allowed is None else int(allowed.sum()) // b
        self.pairs += b * heads * per_head
        return self.inner(q, k, v, scale, causal, allowed)


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out_dir: str) -> None:
    """One rank: warm-up, then the timed steps with its peak memory growth and attention work."""
    torch.set_num_threads(1)
    if ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 64 * 1024) != 1:
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed")
    config = get_preset(args.model)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    tokens, labels = (torch.randint(0, config.vocab_size, (1, args.seq_length)) for _ in range(2))
    positions = torch.arange(args.seq_length).unsqueeze(0)  # [1, s]
    counter = _WorkCounter()
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        context_parallel.apply_context_parallel(model, args.algo, dist.group.WORLD)
        context_parallel.block_forward = counter  # type: ignore[assignment]
        tokens, labels, positions = (context_parallel.shard_sequence(t, rank, world, args.algo)
                                     for t in (tokens, labels, positions))

    def step() -> None:
        model(tokens, labels, position_ids=positions, return_logits=False, loss_reduction="sum").loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    gc.collect()
    counter.pairs = 0
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    baseline = _status_bytes("VmRSS")
    if world > 1:
        dist.barrier()
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    if world > 1:
        dist.barrier()
    seconds = time.perf_counter() - start
    per_layer_pairs = counter.pairs / args.iters / config.num_hidden_layers
    if world == 1 or args.algo != RING_CP_ALGO:  # one causal attention over the whole sequence, heads / C each
        per_layer_pairs = config.num_attention_heads / world * args.seq_length * (args.seq_length + 1) / 2
    result = {"rank": rank, "peak_growth_bytes": _status_bytes("VmHWM") - baseline, "seconds": seconds,
              "attention_pairs_per_layer": per_layer_pairs}
    (Path(out_dir) / f"cp{world}_rank{rank}.json").write_text(json.dumps(result))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # no interpreter teardown (gloo can abort there; see DESIGN.md)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def contiguous_imbalance(cp: int) -> float:
    """Max / min causal attention work over ranks if each held one contiguous 1/C of the sequence."""
    return (2 * cp - 1) / 1.0  # rank r attends to r full blocks and one triangle: (2r + 1) half blocks


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every CP size in its own processes; the per-rank results and their summary."""
    rows = []
    with tempfile.TemporaryDirectory() as out_dir:
        for world in (1, *args.cp):
            mp.start_processes(_worker, args=(world, _free_port(), args, out_dir), nprocs=world, join=True,
                               start_method="spawn")
            ranks = [json.loads((Path(out_dir) / f"cp{world}_rank{r}.json").read_text()) for r in range(world)]
            work = [r["attention_pairs_per_layer"] for r in ranks]
            rows.append({
                "cp": world, "algo": args.algo if world > 1 else None, "ranks": ranks,
                "peak_growth_mib": max(r["peak_growth_bytes"] for r in ranks) / MIB,
                "tokens_per_s": args.iters * args.seq_length / max(r["seconds"] for r in ranks),
                "attention_work_max_over_min": max(work) / min(work),
                "contiguous_max_over_min": contiguous_imbalance(world) if world > 1 else 1.0,
            })
    base = rows[0]["peak_growth_mib"]
    for row in rows:
        row["memory_vs_cp1"] = row["peak_growth_mib"] / base
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]), "machine": machine_info(),
        "config": {"model": args.model, "seq_length": args.seq_length, "dtype": "fp32", "iters": args.iters,
                   "warmup": args.warmup, "algo": args.algo},
        "results": rows,
    }


def format_table(report: dict[str, Any]) -> str:
    header = (f"{'CP':>3} {'algo':>16} | {'peak MiB/rank':>13} {'vs CP 1':>8} | {'tokens/s':>9} | "
              f"{'attn work max/min':>17} {'contiguous':>10}")
    lines = [header, "-" * len(header)]
    for row in report["results"]:
        lines.append(
            f"{row['cp']:>3} {row['algo'] or '-':>16} | {row['peak_growth_mib']:>13.1f} {row['memory_vs_cp1']:>8.2f} | "
            f"{row['tokens_per_s']:>9.0f} | {row['attention_work_max_over_min']:>17.3f} "
            f"{row['contiguous_max_over_min']:>10.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    print(format_table(report))
    if args.json:
        write_json_atomic(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
