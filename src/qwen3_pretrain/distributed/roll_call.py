"""Name the ranks that are gone when a collective fails.

A dead peer shows up on the others as a transport error naming an address ("Connection reset by peer
[10.0.0.2]:9615"), never a rank, and each node's torchrun reports only its own workers. So a rank whose
training fails with the process group alive calls `missing_ranks()`: it writes its own key into the job's
rendezvous store and waits a short while for every other rank to do the same. Ranks that never answer died,
or hang waiting on one that did. The store lives with the job (torchrun's per-attempt store), so keys of a
restarted attempt never mix with the last one's.
"""

from __future__ import annotations

import time

import torch.distributed as dist

ROLL_CALL_WAIT_S = 15.0  # survivors see a dead peer within seconds of each other (their sockets to it close)
_POLL_S = 0.25


_TRANSPORT_ERRORS = ("connection reset", "connection closed", "broken pipe", "gloo", "nccl", "hccl", "timed out")


def is_peer_failure(exc: BaseException) -> bool:
    """True for the errors a collective raises when a peer is gone (c10d's DistError, or gloo's RuntimeError)."""
    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(word in str(exc).lower() for word in _TRANSPORT_ERRORS)


def missing_ranks(wait_s: float = ROLL_CALL_WAIT_S) -> list[int] | None:
    """The ranks that did not answer within `wait_s` seconds; None when there is no process group or no store.

    If the store itself is unreachable, its host (rank 0's machine, the rendezvous) is gone: returns [0].
    """
    if not dist.is_initialized():
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    store = dist.distributed_c10d._get_default_store()
    keys = [f"qwen3_pretrain/roll_call/{r}" for r in range(world)]
    try:
        store.set(keys[rank], "here")
        deadline = time.monotonic() + wait_s
        while True:
            absent = [r for r in range(world) if not store.check([keys[r]])]
            if not absent or time.monotonic() >= deadline:
                return absent
            time.sleep(_POLL_S)
    except (RuntimeError, OSError):  # the store's server (rank 0's agent or process) is gone
        return [0]


def describe_failure(exc: BaseException, absent: list[int] | None) -> str:
    """One line: which rank failed how, and which ranks the roll call found missing."""
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    rank = dist.get_rank() if dist.is_initialized() else 0
    line = f"rank {rank}: a collective or the training step failed ({reason})"
    if absent:
        names = ", ".join(map(str, absent))
        return (f"{line}; rank(s) {names} did not answer a roll call within {ROLL_CALL_WAIT_S:g} s: they died or "
                "hang (waiting on one that died); see their node's log (torchrun's 'Root Cause')")
    if absent == []:
        return f"{line}; every rank answered the roll call, so no peer died: the cause is in this rank's traceback"
    return line
