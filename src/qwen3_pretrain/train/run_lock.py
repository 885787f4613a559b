"""One writer per run directory: rank 0 holds an exclusive `flock` on `<dir>/.lock` in each directory the run
writes (`--save`, and `--run-dir` when it differs) for the life of the run.

The lock belongs to an open file, so the kernel releases it when the holder dies, however it dies: a lock
file left by a dead run is simply taken over. The file records the holder (host, pid, start time) for the
message a second run gets. Processes forked from the holder (data-loader workers) close their copy of the
descriptor at once, so only the holder itself keeps the directory locked. On a network file system
`flock` is as reliable as the file system's locking; where it has none (Lustre mounted without `-o flock`) the
run warns and goes on unlocked.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path

from qwen3_pretrain.config import TrainConfig

LOCK_FILE = ".lock"
NO_LOCKING = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)  # e.g. Lustre mounted without -o flock


class RunDirectoryInUse(RuntimeError):
    """Another live process holds the lock of a run directory; the message names the directory and the holder."""


def run_directories(config: TrainConfig) -> list[Path]:
    """The directories this run writes into: --save and --run-dir (which defaults to --save), each once."""
    named = (config.checkpoint.save, config.logging.run_dir)
    return list(dict.fromkeys(Path(d).resolve() for d in named if d is not None))


def _holder(path: Path) -> str:
    """Who the lock file says holds it."""
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on host {info['host']}, running since {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not recorded itself yet"


def _take(directory: Path) -> int:
    """Lock `directory` (created if missing) without waiting; the open descriptor holds the lock."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirectoryInUse(
            f"{directory} is in use by another run: {_holder(path)} (lock file {path}). Two runs writing one "
            "directory would mix their checkpoints and metrics: wait for that run to end or stop it, or give this "
            "run another --save / --run-dir"
        ) from None
    except OSError as exc:
        if exc.errno not in NO_LOCKING:
            os.close(fd)
            raise
        print(f"warning: {directory} is on a file system without flock ({exc.strerror}): nothing stops a second "
              "run from writing there too", file=sys.stderr, flush=True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_free(directories: Iterable[Path]) -> None:
    """Raise RunDirectoryInUse if a live run holds one of `directories` (nothing is held afterwards)."""
    for directory in directories:
        if (directory / LOCK_FILE).exists():
            os.close(_take(directory))


_held: list[int] = []  # descriptors of the locks this process holds


def _close_in_forked_child() -> None:
    """A forked child closes its copies of the held descriptors (closing, unlike unlocking, leaves the parent's
    lock in place)."""
    for fd in _held:
        os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_in_forked_child)


@contextlib.contextmanager
def hold(directories: Iterable[Path]) -> Iterator[None]:
    """Hold the lock of every directory for the `with` block; RunDirectoryInUse if a live run holds one."""
    record = json.dumps({
        "host": socket.gethostname(), "pid": os.getpid(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    fds: list[int] = []
    try:
        for directory in directories:
            fd = _take(directory)
            fds.append(fd)
            _held.append(fd)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{record}\n".encode(), 0)
        yield
    finally:
        for fd in fds:
            _held.remove(fd)
            os.close(fd)  # the last descriptor of the open file: the lock is released
