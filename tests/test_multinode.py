"""Multi-node launch: two `torchrun --nnodes 2 --node-rank {0,1}` on loopback (one process per node,
gloo) train together through the real CLI, and log the per-iteration losses of a single-process run
of the same flags. A node that fails or hangs cannot hang the test: both launches run in their own
process groups, are watched against one deadline, and are killed with all their workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from qwen3_pretrain.cli import main

from distributed_helpers import free_port
from train_helpers import tiny_flags, write_tiny_dataset

pytestmark = pytest.mark.usefixtures("one_thread")
NODES = 2
ITERS = 4
DEADLINE_S = 240.0


@dataclass
class NodeRun:
    """How one node's torchrun ended: exit code (None: killed by us), output, process group id."""

    node_rank: int
    returncode: int | None
    output: str
    pgid: int


def _torchrun_command(node_rank: int, port: int, flags: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", str(NODES), "--nproc-per-node", "1",
        "--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
        "-m", "qwen3_pretrain.cli", "train", *flags,
    ]


def run_nodes(node_ranks: list[int], flags: list[str], log_dir: Path, deadline_s: float) -> list[NodeRun]:
    """Start one torchrun per node rank at once; wait until all exit, one fails, or the deadline passes;
    then kill whatever still runs (torchrun and its workers: each launch is its own process group)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QWEN3_PRETRAIN_DEVICE": "cpu"}
    port = free_port()
    logs = [log_dir / f"node{rank}.log" for rank in node_ranks]
    procs: list[subprocess.Popen[bytes]] = []
    killed: set[int] = set()
    end = time.monotonic() + deadline_s
    try:
        for rank, log in zip(node_ranks, logs, strict=True):
            with open(log, "w") as out:
                procs.append(subprocess.Popen(_torchrun_command(rank, port, flags), env=env, stdout=out,
                                              stderr=subprocess.STDOUT, start_new_session=True))
        while time.monotonic() < end:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                killed.add(p.pid)
            p.wait()
    return [NodeRun(rank, None if p.pid in killed else p.returncode, log.read_text(), p.pid)
            for rank, p, log in zip(node_ranks, procs, logs, strict=True)]


def live_members(pgid: int) -> list[int]:
    """Pids of the processes of group `pgid` that are still running (zombies left out)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
        except (OSError, IndexError):
            continue  # the process ended while we looked
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _report(runs: list[NodeRun]) -> str:
    parts = []
    for run in runs:
        killed = "killed: still running at the deadline or after a peer failed"
        status = killed if run.returncode is None else f"exit code {run.returncode}"
        parts.append(f"--- node {run.node_rank} ({status}), last output:\n{run.output[-4000:]}")
    return "\n".join(parts)


def _logged_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["lm_loss"] for r in records if "lm_loss" in r}


def _flags(data: str, run_dir: Path) -> list[str]:
    return tiny_flags(data, train_iters=ITERS, log_interval=1, eval_iters=0, run_dir=run_dir)


def test_two_nodes_train_together_like_one_process(tmp_path: Path) -> None:
    data = write_tiny_dataset(tmp_path / "tiny_text_document")
    assert main(["train", *_flags(data, tmp_path / "one_process")]) == 0
    reference = _logged_losses(tmp_path / "one_process")
    assert sorted(reference) == list(range(1, ITERS + 1))

    runs = run_nodes(list(range(NODES)), _flags(data, tmp_path / "two_nodes"), tmp_path, DEADLINE_S)
    assert all(run.returncode == 0 for run in runs), _report(runs)
    assert "2 process(es) on cpu = TP 1 x PP 1 x DP 2" in runs[0].output, _report(runs)  # rank 0's summary
    assert f"iteration {ITERS:8d}/{ITERS:8d}" in runs[1].output, _report(runs)  # the last rank's log line
    losses = _logged_losses(tmp_path / "two_nodes")
    assert sorted(losses) == sorted(reference), _report(runs)
    for iteration, expected in reference.items():
        got = losses[iteration]
        assert abs(got - expected) <= 1e-5 * abs(expected), (
            f"iteration {iteration}: two nodes {got}, one process {expected}"
        )


def test_a_node_without_its_peer_is_killed_at_the_deadline(tmp_path: Path) -> None:
    """Node 0 alone waits for node 1 in the rendezvous: run_nodes kills its whole process group."""
    data = write_tiny_dataset(tmp_path / "tiny_text_document")
    start = time.monotonic()
    (run,) = run_nodes([0], _flags(data, tmp_path / "run"), tmp_path, deadline_s=8.0)
    assert run.returncode is None, _report([run])
    assert time.monotonic() - start < 30
    assert live_members(run.pgid) == [], "the launch's processes outlived the kill"
