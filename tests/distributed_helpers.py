"""Shared pieces of the tests that run themselves as torchrun workers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn


def exit_after(worker: Callable[[Path], None], out_dir: str) -> NoReturn:
    """Run one worker, print any failure, and leave without interpreter teardown.

    gloo + DTensor/FSDP2 may abort at interpreter exit after correct results (DESIGN.md), so the
    exit code is the worker's alone.
    """
    code = 0
    try:
        worker(Path(out_dir))
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_as_torchrun(script: str, nproc: int, out_dir: Path, timeout: int = 300) -> None:
    """Run `script out_dir` under torchrun with `nproc` CPU processes; fail with its output if it fails."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", script, str(out_dir)
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QWEN3_PRETRAIN_DEVICE": "cpu"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def free_port() -> int:
    """A TCP port on loopback that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def join_gloo_group(rank: int, world: int, port: int) -> None:
    """In an `mp.spawn` worker: one thread, and the gloo group of `world` ranks on loopback `port`."""
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def leave_gloo_group() -> NoReturn:
    """End an `mp.spawn` worker: barrier, destroy the group, and leave without interpreter teardown (see exit_after)."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
