"""Process supervision for the launcher: no process outlives the one that started it.

`python -m qwen3_pretrain.train.supervise COMMAND...` becomes COMMAND (exec, same pid) after asking the kernel to
SIGKILL it when its parent dies and setting SIGTERM to be ignored; the launcher starts torchrun this way (torchrun
itself would answer SIGTERM by stopping its workers and exiting 1: the launcher sends SIGTERM to the workers
instead). Workers call `die_with_parent` themselves, so SIGKILL of the launcher takes torchrun and its workers
with it. Linux only (prctl); elsewhere the command just runs.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path

PR_SET_PDEATHSIG = 1  # prctl(2) option: the signal this process gets when its parent dies


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux only; elsewhere nothing happens)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def child_pids(pid: int) -> list[int]:
    """The live (not zombie) child processes of `pid`, from /proc ([] where there is none)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]  # after "pid (comm)"
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
        if int(ppid) == pid and state != "Z":
            children.append(int(stat.parent.name))
    return children


if __name__ == "__main__":
    die_with_parent()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # exec keeps an ignored signal ignored
    os.execv(sys.argv[1], sys.argv[1:])
