"""The process group and the one DeviceMesh of a run, with dims ("pp", "dp", "cp", "tp") (size 1 where unused).

CP ranks hold different tokens of the same samples and share the weights, so weights are sharded (and
gradients summed) over the flattened ("dp", "cp") dims, "dp_cp", as torchtitan does; the loss sum of a step is
likewise summed over dp_cp. Expert parallelism splits "dp" into ("edp", "ep") in a second mesh (`expert_mesh`):
a MoE layer's experts are split over the "ep" ranks and FSDP-sharded over "edp".

A single process without `torchrun` (WORLD_SIZE unset or 1) runs without any process group: the
model is not wrapped and every collective below is skipped. Under `torchrun`, the default group
uses the backend of the chosen device (hccl / nccl / gloo), and host-side agreements (stop signals,
token counts) go over a gloo group so they never wait for the accelerator.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from qwen3_pretrain.distributed.device import backend, device_module, device_type, local_device

MESH_DIMS = ("pp", "dp", "cp", "tp")
DP_CP = "dp_cp"  # the flattened ("dp", "cp") dims
EXPERT_DIMS = ("edp", "ep")  # "dp" split for expert parallelism: ranks holding the same experts x the EP group


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
    cp: int = 1
    dp_cp_mesh: DeviceMesh | None = None  # with CP: the flattened ("dp", "cp") dims (torch: keep it, not by name)
    ep: int = 1
    expert_mesh: DeviceMesh | None = None  # with EP: ("pp", "edp", "ep", "cp", "tp"), "dp" split into edp x ep

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
    def ranks_per_dp_slot(self) -> int:
        """Ranks that read the same micro batches (each keeping its part of the work): TP x PP x CP."""
        return self.tp * self.pp * self.cp

    @property
    def cp_rank(self) -> int:
        return self.mesh["cp"].get_local_rank() if self.mesh is not None else 0

    @property
    def cp_group(self) -> dist.ProcessGroup | None:
        return self.mesh["cp"].get_group() if self.mesh is not None else None

    @property
    def shard_mesh(self) -> DeviceMesh | None:
        """The 1-D mesh FSDP shards weights over: "dp", or "dp_cp" with context parallelism."""
        if self.mesh is None:
            return None
        return self.dp_cp_mesh if self.dp_cp_mesh is not None else self.mesh["dp"]

    @property
    def batch_group(self) -> dist.ProcessGroup | None:
        """The ranks over which a step's loss sum is summed: DP x CP (None when that is one rank)."""
        if self.mesh is None or self.dp * self.cp == 1:
            return None
        return self.dp_cp_mesh.get_group() if self.dp_cp_mesh is not None else self.dp_group

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


def init_parallel(tp: int, pp: int, timeout_minutes: float = 30.0, cp: int = 1, ep: int = 1) -> ParallelEnv:
    """Join (or create, under torchrun) the process group and build the ("pp", "dp", "cp", "tp") mesh; with
    expert parallelism (`ep` > 1) also the expert mesh, whose "ep" ranks are consecutive DP ranks."""
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
    if world % (tp * pp * cp):
        raise ValueError(f"world size {world} is not divisible by TP {tp} x PP {pp} x CP {cp}")
    dp = world // (tp * pp * cp)
    sizes = (pp, dp, cp, tp)
    # A dimension spanning the world reuses the default group (which has `timeout`); every other dimension
    # gets new groups, which torch would give its backend default (30 min, NCCL 10 min) unless told.
    overrides: dict[int | str, Any] = {
        name: options for name, size in zip(MESH_DIMS, sizes, strict=True) if size != world
        if (options := _timeout_options(dist.get_backend(), timeout)) is not None
    }
    mesh = init_device_mesh(device_type(), sizes, mesh_dim_names=MESH_DIMS, backend_override=overrides)
    dp_cp_mesh = None
    if cp > 1:
        flat_options = _timeout_options(dist.get_backend(), timeout) if dp * cp != world else None
        dp_cp_mesh = mesh["dp", "cp"]._flatten(DP_CP, backend_override=flat_options)
    # the host-side gloo group waits as long as the collectives (a gloo group's default is 30 minutes)
    control = dist.new_group(backend="gloo", timeout=timeout) if dist.get_backend() != "gloo" else dist.group.WORLD
    expert_mesh = None
    if ep > 1:
        if dp % ep:
            raise ValueError(f"EP {ep} does not divide the data-parallel size {dp}")
        options = _timeout_options(dist.get_backend(), timeout)
        expert_mesh = mesh._unflatten("dp", (dp // ep, ep), EXPERT_DIMS,
                                      backend_override=dict.fromkeys(EXPERT_DIMS, options) if options else None)
        expert_mesh[EXPERT_DIMS]._flatten()  # one all-reduce (not two) for norms over all experts' shards
    return ParallelEnv(dist.get_rank(), world, device, pp, dp, tp, mesh, control, owns_process_group=owns, cp=cp,
                       dp_cp_mesh=dp_cp_mesh, ep=ep, expert_mesh=expert_mesh)


def _timeout_options(backend_name: str, timeout: timedelta) -> Any | None:
    """Process-group options carrying `timeout` for a gloo or NCCL group; None for other backends (their default)."""
    options: Any
    if backend_name == "gloo":
        options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]  # torch's stubs omit it
    elif backend_name == "nccl" and hasattr(dist, "ProcessGroupNCCL"):
        options = dist.ProcessGroupNCCL.Options()
    else:
        return None
    options._timeout = timeout
    return options


def shutdown_parallel(env: ParallelEnv) -> None:
    """Barrier, then destroy the process group if this module created it (see DESIGN.md's gloo trap)."""
    if env.mesh is None:
        return
    dist.barrier(group=env.control_group)
    if env.owns_process_group:
        dist.destroy_process_group()
