"""The process group and the one DeviceMesh of a run, with dims ("pp", "dp", "tp") (size 1 where unused).

A single process without `torchrun` (WORLD_SIZE unset or 1) runs without any process group: the
model is not wrapped and every collective below is skipped. Under `torchrun`, the default group
uses the backend of the chosen device (hccl / nccl / gloo), and host-side agreements (stop signals,
token counts) go over a gloo group so they never wait for the accelerator.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from qwen3_pretrain.distributed.device import backend, device_module, device_type, local_device

MESH_DIMS = ("pp", "dp", "tp")


@dataclass
class ParallelEnv:
    """Where this process sits: ranks, sizes, the mesh and the groups the trainer needs."""

    rank: int
    world_size: int
    device: torch.device
    pp: int
    dp: int
    tp: int
    mesh: DeviceMesh | None  # None in a single process without a process group
    control_group: dist.ProcessGroup | None  # gloo group for host-side agreement
    owns_process_group: bool  # created here, so destroyed here

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    @property
    def is_last_rank(self) -> bool:
        """Megatron prints the iteration line on the last rank (the one holding the loss under PP)."""
        return self.rank == self.world_size - 1

    @property
    def dp_rank(self) -> int:
        return self.mesh["dp"].get_local_rank() if self.mesh is not None else 0

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        return self.mesh["dp"].get_group() if self.mesh is not None else None

    @property
    def pp_rank(self) -> int:
        return self.mesh["pp"].get_local_rank() if self.mesh is not None else 0

    @property
    def pp_group(self) -> dist.ProcessGroup | None:
        return self.mesh["pp"].get_group() if self.mesh is not None else None

    def host_sum(self, value: int) -> int:
        """Sum of a host integer over all ranks (over the gloo control group; no accelerator sync)."""
        if self.mesh is None:
            return value
        box = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(box, group=self.control_group)
        return int(box.item())

    def host_max(self, value: int) -> int:
        """Maximum of a host integer over all ranks (over the gloo control group)."""
        if self.mesh is None:
            return value
        box = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(box, op=dist.ReduceOp.MAX, group=self.control_group)
        return int(box.item())

    def host_any(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on any rank."""
        return self.host_sum(int(flag)) > 0


def init_parallel(tp: int, pp: int, timeout_minutes: float = 30.0) -> ParallelEnv:
    """Join (or create, under torchrun) the process group and build the ("pp", "dp", "tp") mesh."""
    device = local_device()
    owns, timeout = False, timedelta(minutes=timeout_minutes)
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            return ParallelEnv(0, 1, device, 1, 1, 1, None, None, owns_process_group=False)
        if device.type != "cpu":
            device_module().set_device(device)
        dist.init_process_group(backend(), timeout=timeout)
        owns = True
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by TP {tp} x PP {pp}")
    dp = world // (tp * pp)
    mesh = init_device_mesh(device_type(), (pp, dp, tp), mesh_dim_names=MESH_DIMS)
    # the host-side gloo group waits as long as the collectives (a gloo group's default is 30 minutes)
    control = dist.new_group(backend="gloo", timeout=timeout) if dist.get_backend() != "gloo" else dist.group.WORLD
    return ParallelEnv(dist.get_rank(), world, device, pp, dp, tp, mesh, control, owns_process_group=owns)


def shutdown_parallel(env: ParallelEnv) -> None:
    """Barrier, then destroy the process group if this module created it (see DESIGN.md's gloo trap)."""
    if env.mesh is None:
        return
    dist.barrier(group=env.control_group)
    if env.owns_process_group:
        dist.destroy_process_group()
