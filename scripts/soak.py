"""Soak test of resuming (not run in CI): kill -9 a training run at random times until it finishes, then check
that its per-iteration losses equal those of an uninterrupted run, bit for bit.

Each round trains qwen3-tiny on mock data in a fresh directory as a subprocess (`qwen3-pretrain train ...
--save D --load D --save-interval K --log-interval 1`), SIGKILLs it after a random delay (a quarter to three
quarters of the uninterrupted run's time), restarts it, and so on until it exits on its own; then it compares the
last `metrics.jsonl` record of every iteration with the reference run. Rounds alternate synchronous and --async-save
checkpoints and repeat until --minutes have passed.

    python scripts/soak.py [--minutes 3] [--train-iters 200] [--save-interval 7] [--seed 0] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MAX_KILLS_PER_ROUND = 20  # then the run is left to finish, so a round always ends


def train_command(save_dir: Path, train_iters: int, save_interval: int, async_save: bool) -> list[str]:
    """The `qwen3-pretrain train` command line of one (re)start."""
    return [
        sys.executable, "-m", "qwen3_pretrain.cli", "train", "--model", "qwen3-tiny", "--mock-data",
        "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--train-iters", str(train_iters), "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine",
        "--lr-warmup-iters", "2", "--log-interval", "1", "--eval-iters", "0", "--seed", "7",
        "--save", str(save_dir), "--load", str(save_dir), "--save-interval", str(save_interval),
        *(["--async-save"] if async_save else []),
    ]


def logged_losses(save_dir: Path) -> dict[int, float]:
    """Iteration -> loss from `metrics.jsonl`, the last record of each iteration (a restart logs some again)."""
    losses: dict[int, float] = {}
    for line in (save_dir / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # the last line of a killed run may be cut short
            continue
        if "lm_loss" in record:
            losses[record["iteration"]] = record["lm_loss"]
    return losses


def run_once(command: list[str], env: dict[str, str], kill_after: float | None) -> int | None:
    """Run `command`; SIGKILL it after `kill_after` seconds. Its exit status, or None when it was killed."""
    with subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
        try:
            _, stderr = proc.communicate(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            return None
    if proc.returncode:
        print(stderr[-4000:], file=sys.stderr)
    return proc.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="keep starting rounds for this long")
    parser.add_argument("--train-iters", type=int, default=200)
    parser.add_argument("--save-interval", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--workdir", type=Path, help="run directories go here (default: a temporary directory)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QWEN3_PRETRAIN_DEVICE": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    workdir = Path(tempfile.mkdtemp(dir=args.workdir, prefix="soak-"))
    deadline = time.monotonic() + 60 * args.minutes
    try:
        start = time.monotonic()
        if run_once(train_command(workdir / "reference", args.train_iters, args.save_interval, False), env, None):
            return 1
        run_seconds = time.monotonic() - start
        reference = logged_losses(workdir / "reference")
        print(f"reference: {len(reference)} iterations in {run_seconds:.1f} s", flush=True)
        failures, rounds = 0, 0
        while time.monotonic() < deadline:
            async_save = rounds % 2 == 1
            save_dir = workdir / f"round{rounds}"
            command = train_command(save_dir, args.train_iters, args.save_interval, async_save)
            kills, resumes = 0, []  # the iteration `latest` named at each kill (0: none yet)
            while True:
                kill_after = rng.uniform(0.25, 0.75) * run_seconds if kills < MAX_KILLS_PER_ROUND else None
                status = run_once(command, env, kill_after)
                if status is None:
                    kills += 1
                    latest = save_dir / "latest_checkpointed_iteration.txt"
                    resumes.append(int(latest.read_text()) if latest.is_file() else 0)
                    continue
                break
            losses = logged_losses(save_dir) if status == 0 else {}
            same = status == 0 and losses == reference
            failures += not same
            mismatched = sorted(i for i in reference if losses.get(i) != reference[i])
            print(
                f"round {rounds} ({'async' if async_save else 'sync'} saves): {kills} kills "
                f"(latest at each: {resumes}), "
                + ("losses bit-identical to the reference" if same else
                   f"FAILED (exit status {status}, iterations differing: {mismatched})"),
                flush=True,
            )
            shutil.rmtree(save_dir, ignore_errors=True)
            rounds += 1
        print(f"soak: {rounds} rounds, {failures} failed", flush=True)
        return 1 if failures or not rounds else 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
