"""Pick the accelerator once (npu if torch_npu imports, else cuda, else cpu) and its backend."""

from __future__ import annotations

import functools
import importlib.util
import os
import sys

import torch

_BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}


@functools.lru_cache(maxsize=1)
def device_type() -> str:
    """'npu', 'cuda' or 'cpu'; `QWEN3_PRETRAIN_DEVICE` overrides the detection."""
    forced = os.environ.get("QWEN3_PRETRAIN_DEVICE")
    if forced:
        if forced not in _BACKENDS:
            raise ValueError(f"QWEN3_PRETRAIN_DEVICE={forced!r}: use one of {sorted(_BACKENDS)}")
        return forced
    if importlib.util.find_spec("torch_npu") is not None:
        import torch_npu  # noqa: F401  (registers the npu device)

        if torch.npu.is_available():  # type: ignore[attr-defined]
            return "npu"
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def backend() -> str:
    """The torch.distributed backend for the chosen device."""
    return _BACKENDS[device_type()]


def local_device(local_rank: int | None = None) -> torch.device:
    """This process's device: `<type>:<LOCAL_RANK>` on accelerators, `cpu` otherwise."""
    kind = device_type()
    if kind == "cpu":
        return torch.device("cpu")
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return torch.device(kind, local_rank)


def device_module(kind: str | None = None):
    """The torch submodule for the device (memory stats, synchronize, set_device)."""
    return getattr(torch, kind or device_type())


def peak_memory_bytes(device: torch.device) -> int:
    """This process's peak memory so far: the accelerator allocator's `max_memory_allocated`, or on CPU the
    process's peak resident set (`ru_maxrss`, which counts the Python runtime and libraries too)."""
    if device.type != "cpu":
        return int(device_module(device.type).max_memory_allocated(device))
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def device_memory_bytes(local_processes: int = 1) -> int:
    """Memory of one device: the accelerator's total memory, or on CPU this machine's RAM shared by its
    `local_processes`."""
    kind = device_type()
    if kind != "cpu":
        return int(device_module(kind).get_device_properties(local_device()).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(local_processes, 1)
