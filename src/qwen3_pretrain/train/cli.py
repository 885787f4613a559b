"""`qwen3-pretrain train`: Megatron/MindSpeed flags (and a YAML recipe) -> a pretraining run.

Runs in this process, or as one rank under `torchrun`. The launcher flags (`config.flag_table.LAUNCHER_FLAGS`,
also in torchrun's underscore spelling) start torchrun with the other flags: `--nproc-per-node N` alone runs
it standalone on this machine; `--nnodes M` > 1 makes this machine node `--node-rank R` of M, which
meet at `--master-addr A --master-port P` (a static rendezvous: every node runs the same command with
its own R; `--rdzv-backend c10d` uses torchrun's elastic rendezvous there instead, and so does
`--max-restarts K` > 0 across machines, which a static rendezvous cannot restart together). The flags are
validated for the final world size, N x M processes, before anything starts. Under torchrun the
launcher flags are accepted and ignored, so one script serves both ways of starting.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

from qwen3_pretrain.config import ConfigError, build_parser, parse_train_args
from qwen3_pretrain.config.flag_table import LAUNCHER_FLAG_NAMES
from qwen3_pretrain.config.flags import help_epilog
from qwen3_pretrain.train import run_lock
from qwen3_pretrain.train.supervise import child_pids, die_with_parent

RDZV_BACKENDS = ("static", "c10d")
DEFAULT_MASTER_PORT = 29500  # torchrun's


@dataclass(frozen=True)
class Launch:
    """How to start torchrun on this machine, from the launcher flags."""

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    rdzv_backend: str = "static"
    max_restarts: int = 0

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    def torchrun_args(self) -> list[str]:
        """torchrun's options: standalone on one machine unless a rendezvous address is given."""
        args = [f"--nproc-per-node={self.nproc_per_node}", f"--max-restarts={self.max_restarts}"]
        if self.master_addr is None and self.master_port is None:
            return [*args, "--standalone"]
        addr, port = self.master_addr or "127.0.0.1", self.master_port or DEFAULT_MASTER_PORT
        args.append(f"--nnodes={self.nnodes}")
        if self.rdzv_backend == "c10d":
            return [*args, "--rdzv-backend=c10d", f"--rdzv-endpoint={addr}:{port}"]
        return [*args, f"--node-rank={self.node_rank}", f"--master-addr={addr}", f"--master-port={port}"]


def _take_launch_flags(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Remove the launcher flags (`--flag V`, `--flag=V`, dashes or underscores) from argv: ({flag: V}, rest)."""
    values: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        name, eq, inline = argv[i].partition("=")
        flag = name.replace("_", "-")
        if not name.startswith("--") or flag not in LAUNCHER_FLAG_NAMES:
            rest.append(argv[i])
            i += 1
            continue
        if not eq and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            raise ConfigError(f"{flag} expects a value")
        values[flag] = inline if eq else argv[i + 1]
        i += 1 if eq else 2
    return values, rest


def _whole_number(values: dict[str, str], flag: str, default: int, minimum: int) -> int:
    raw = values.get(flag)
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) < minimum:
        raise ConfigError(f"{flag} expects a whole number >= {minimum}, got {raw!r}")
    return int(raw)


def launch_plan(values: dict[str, str]) -> Launch:
    """The launcher flags' values -> a Launch; ConfigError names the flag to change."""
    nnodes = _whole_number(values, "--nnodes", 1, 1)
    node_rank = _whole_number(values, "--node-rank", 0, 0)
    port = values.get("--master-port")
    max_restarts = _whole_number(values, "--max-restarts", 0, 0)
    backend = values.get("--rdzv-backend")
    if backend is None:  # static cannot restart a job across machines (below); c10d can
        backend = "c10d" if nnodes > 1 and max_restarts > 0 else "static"
    elif backend == "static" and nnodes > 1 and max_restarts > 0:
        raise ConfigError(
            f"--rdzv-backend static with --max-restarts {max_restarts} on {nnodes} nodes: each machine's torchrun "
            "would restart its workers on its own, and they would meet the other machines' old workers; drop "
            "--rdzv-backend (it becomes c10d when restarts span machines) or pass --rdzv-backend c10d"
        )
    if node_rank >= nnodes:
        raise ConfigError(f"--node-rank {node_rank} must be below --nnodes {nnodes} (node ranks are 0 .. nnodes - 1)")
    if nnodes > 1 and "--master-addr" not in values:
        raise ConfigError(
            f"--nnodes {nnodes} needs --master-addr: the address of the machine with --node-rank 0, the same on "
            "every node"
        )
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(f"--master-port expects a TCP port (1 .. 65535), got {port!r}")
    if backend not in RDZV_BACKENDS:
        raise ConfigError(f"--rdzv-backend {backend!r}: use one of {', '.join(RDZV_BACKENDS)}")
    return Launch(
        nproc_per_node=_whole_number(values, "--nproc-per-node", 1, 1), nnodes=nnodes, node_rank=node_rank,
        master_addr=values.get("--master-addr"), master_port=int(port) if port is not None else None,
        rdzv_backend=backend, max_restarts=max_restarts,
    )


def _launch(launch: Launch, argv: list[str]) -> int:
    """Run `torchrun OPTIONS -m qwen3_pretrain.cli train ARGV` and wait for it.

    torchrun runs in its own session and dies with the launcher (as its workers die with it), so killing the
    launcher, even with SIGKILL, leaves no process behind. SIGTERM and SIGINT go to the workers: they finish
    the iteration, save and exit 0 (workers that torchrun starts later get the signal too); before any
    worker runs, SIGINT stops torchrun.
    """
    command = [
        sys.executable, "-m", "qwen3_pretrain.train.supervise",  # torchrun dies with us and ignores SIGTERM
        sys.executable, "-m", "torch.distributed.run", *launch.torchrun_args(), "-m", "qwen3_pretrain.cli", "train",
        *argv,
    ]
    # torch 2.13's c10d rendezvous shares one store across restarts, and restarted workers may then read the dead
    # workers' addresses from it (pytorch#135712): a store of their own per attempt (hosted by rank 0) avoids that
    env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **os.environ}
    env["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGINT,SIGHUP,SIGQUIT"  # not SIGTERM: torchrun ignores it (supervise)
    child = subprocess.Popen(command, env=env, start_new_session=True)
    received: list[int] = []
    signalled: set[int] = set()

    def signal_workers(signum: int, again: bool) -> None:
        workers = child_pids(child.pid)
        if not workers and again:
            workers, signum = [child.pid], signal.SIGINT
        for pid in workers:
            if again or pid not in signalled:
                signalled.add(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        signal_workers(signum, again=True)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired):
                return child.wait(timeout=1.0)
            if received:
                signal_workers(received[-1], again=False)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str]) -> int:
    """Validate the flags, then train here or launch torchrun for the launcher flags."""
    if "-h" in argv or "--help" in argv:
        build_parser().print_help()
        print(f"\n{help_epilog()}")
        return 0
    under_torchrun = "LOCAL_RANK" in os.environ
    if under_torchrun:  # a worker: dies with torchrun, and stops on SIGTERM though the launcher's torchrun ignores it
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        die_with_parent()
    try:
        launch_values, argv = _take_launch_flags(argv)
        launch = launch_plan(launch_values) if launch_values and not under_torchrun else None
        world = launch.world_size if launch is not None else None
        config = parse_train_args(argv, world_size=world)
        if under_torchrun:
            config.ignored += list(launch_values)
        from qwen3_pretrain.train.preflight import preflight  # torch: only past --help and the flag checks

        preflight(config, world_size=world, local_world_size=launch.nproc_per_node if launch is not None else None)
        if launch is not None and launch.node_rank == 0 and launch.rdzv_backend == "static":
            run_lock.check_free(run_lock.run_directories(config))  # rank 0 runs here: refuse before torchrun starts
    except (ConfigError, run_lock.RunDirectoryInUse) as exc:
        print(f"qwen3-pretrain train: error: {exc}", file=sys.stderr)
        return 2
    if launch is not None:
        return _launch(launch, argv)

    from qwen3_pretrain.train.trainer import TrainingError, run_training

    try:
        run_training(config)
        code = 0
    except (TrainingError, run_lock.RunDirectoryInUse) as exc:
        print(f"qwen3-pretrain train: error: {exc}", file=sys.stderr)
        code = 1
    if under_torchrun and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # gloo + DTensor/FSDP2 can abort at interpreter exit after correct results (DESIGN.md):
        # the process group is already destroyed, so leave without running exit handlers.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
