"""`qwen3-pretrain train`: Megatron/MindSpeed flags (and a YAML recipe) -> a pretraining run.

Runs in this process, or as one rank under `torchrun`; `--nproc-per-node N` starts torchrun itself
with the same flags. The flags are validated for the final world size before anything starts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from qwen3_pretrain.config import ConfigError, build_parser, parse_train_args

LAUNCH_FLAG = "--nproc-per-node"


def _take_nproc(argv: list[str]) -> tuple[int | None, list[str]]:
    """Remove `--nproc-per-node N` (or `=N`) from argv."""
    rest: list[str] = []
    nproc: int | None = None
    i = 0
    while i < len(argv):
        name, eq, inline = argv[i].partition("=")
        if name not in (LAUNCH_FLAG, "--nproc_per_node"):
            rest.append(argv[i])
            i += 1
            continue
        raw = inline if eq else (argv[i + 1] if i + 1 < len(argv) else "")
        if not raw.isdigit() or int(raw) < 1:
            raise ConfigError(f"{LAUNCH_FLAG} expects a positive number of processes, got {raw!r}")
        nproc = int(raw)
        i += 1 if eq else 2
    return nproc, rest


def _launch(nproc: int, argv: list[str]) -> int:
    """Run `torchrun --standalone --nproc-per-node N -m qwen3_pretrain.cli train ARGV` and wait for it."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "-m", "qwen3_pretrain.cli", "train", *argv,
    ]
    child = subprocess.Popen(command)

    def forward(signum: int, _frame: object) -> None:
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str]) -> int:
    """Validate the flags, then train here or launch torchrun for `--nproc-per-node`."""
    if "-h" in argv or "--help" in argv:
        build_parser().print_help()
        print(f"\nlauncher:\n  {LAUNCH_FLAG} N     start torchrun with N processes on this machine")
        return 0
    under_torchrun = "LOCAL_RANK" in os.environ
    try:
        nproc, argv = _take_nproc(argv)
        world = nproc if nproc is not None and not under_torchrun else None
        config = parse_train_args(argv, world_size=world)
        from qwen3_pretrain.train.preflight import preflight  # torch: only past --help and the flag checks

        preflight(config, world_size=world)
    except ConfigError as exc:
        print(f"qwen3-pretrain train: error: {exc}", file=sys.stderr)
        return 2
    if nproc is not None and not under_torchrun:
        return _launch(nproc, argv)

    from qwen3_pretrain.train.trainer import TrainingError, run_training

    try:
        run_training(config)
        code = 0
    except TrainingError as exc:
        print(f"qwen3-pretrain train: error: {exc}", file=sys.stderr)
        code = 1
    if under_torchrun and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # gloo + DTensor/FSDP2 can abort at interpreter exit after correct results (DESIGN.md):
        # the process group is already destroyed, so leave without running exit handlers.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
