"""How long a checkpoint save stalls the training loop, synchronous against --async-save, in one run each.

Trains a preset (default qwen3-demo, fp32, mock data, one process on CPU) for `2 * --save-interval` iterations
with two saves, and times each `Trainer.save` call (the time the step loop is blocked: for --async-save, the
copy of the state to host memory and waiting for the previous save), the wait for the last save to commit at
the end, and the whole run. Prints a table and writes JSON.

    python benchmarks/async_save.py [--preset qwen3-demo] [--save-interval 4] [--workdir DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from qwen3_pretrain.checkpoint.native import iteration_dir_name
from qwen3_pretrain.config import parse_train_args
from qwen3_pretrain.train import trainer
from qwen3_pretrain.train.trainer import run_training


def cpu_model() -> str:
    """The CPU's model name as `lscpu` reports it."""
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name:")), "?")


def timed_run(flags: list[str]) -> dict[str, Any]:
    """Run training with `flags`; the seconds of each save call, of the final wait and of the whole run."""
    stalls: list[float] = []
    waits: list[float] = []
    save, wait = trainer.Trainer.save, trainer.Trainer.wait_for_save

    def timed_save(self: trainer.Trainer) -> bool:
        start = time.perf_counter()
        try:
            return save(self)
        finally:
            stalls.append(time.perf_counter() - start)

    def timed_wait(self: trainer.Trainer) -> None:
        start = time.perf_counter()
        wait(self)
        waits.append(time.perf_counter() - start)

    trainer.Trainer.save, trainer.Trainer.wait_for_save = timed_save, timed_wait  # type: ignore[method-assign]
    try:
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            result = run_training(parse_train_args(flags))
        total = time.perf_counter() - start
    finally:
        trainer.Trainer.save, trainer.Trainer.wait_for_save = save, wait  # type: ignore[method-assign]
    return {"save_stalls_s": stalls, "final_wait_s": waits[-1], "run_s": total, "losses": result.losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="qwen3-demo", help="model preset (default qwen3-demo)")
    parser.add_argument("--save-interval", type=int, default=4, help="iterations between the two saves")
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--workdir", type=Path, help="write the checkpoints here (default: a temporary directory)")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    workdir = Path(tempfile.mkdtemp(dir=args.workdir, prefix="async-save-bench-"))
    base = [
        "--model", args.preset, "--mock-data", "--seq-length", str(args.seq_length), "--micro-batch-size", "1",
        "--global-batch-size", "2", "--train-iters", str(2 * args.save_interval), "--lr", "1e-4",
        "--lr-decay-style", "constant", "--log-interval", "1000", "--eval-iters", "0",
        "--save-interval", str(args.save_interval),
    ]
    runs: dict[str, dict[str, Any]] = {}
    size = 0
    try:
        for mode in ("sync", "async"):
            flags = [*base, "--save", str(workdir / mode), *(["--async-save"] if mode == "async" else [])]
            runs[mode] = timed_run(flags)
            saved = workdir / mode / iteration_dir_name(args.save_interval)
            size = sum(p.stat().st_size for p in saved.rglob("*") if p.is_file())
            shutil.rmtree(workdir / mode)  # one mode's checkpoints on disk at a time (big presets on small disks)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    same = runs["sync"].pop("losses") == runs["async"].pop("losses")
    report = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "config": {"preset": args.preset, "seq_length": args.seq_length, "save_interval": args.save_interval},
        "checkpoint_bytes": size,
        "same_losses": same,
        "runs": runs,
    }
    machine = report["machine"]
    print(f"{args.preset}: 2 saves of {size / 1e6:.0f} MB ({machine['cpu']}, {machine['cpu_count']} CPUs); "
          f"losses {'bit-identical' if same else 'DIFFER'}")
    print(f"{'mode':<6} {'stall save 1 s':>15} {'stall save 2 s':>15} {'final wait s':>13} {'run s':>7}")
    for mode, run in runs.items():
        first, second = run["save_stalls_s"]
        print(f"{mode:<6} {first:>15.3f} {second:>15.3f} {run['final_wait_s']:>13.3f} {run['run_s']:>7.2f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
