"""Shared pieces of the tests that run themselves as torchrun workers."""

from __future__ import annotations

import os
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
    except BaseException:  # noqa: BLE001  (report any failure, then leave)
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_as_torchrun(script: str, nproc: int, out_dir: Path, timeout: int = 300) -> None:
    """Run `script out_dir` under torchrun with `nproc` CPU processes; fail with its output if it fails."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", script, str(out_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QWEN3_PRETRAIN_DEVICE": "cpu"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
