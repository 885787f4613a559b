"""--distributed-timeout-minutes reaches every process group of the mesh, not only the default one.

torch gives the groups a DeviceMesh creates its backend default (30 minutes for gloo, 10 for NCCL)
unless told otherwise, so a TP or PP collective would give up long before (or after) the default group.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta

import torch.multiprocessing as mp

from distributed_helpers import free_port

TIMEOUT_MINUTES = 7.0


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch

    from qwen3_pretrain.distributed.mesh import MESH_DIMS, init_parallel, shutdown_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), QWEN3_PRETRAIN_DEVICE="cpu")
    torch.set_num_threads(1)
    env = init_parallel(tp=2, pp=1, timeout_minutes=TIMEOUT_MINUTES)
    assert env.mesh is not None
    timeouts = {
        dim: env.mesh[dim].get_group()._get_backend(torch.device("cpu")).options._timeout for dim in MESH_DIMS
    }
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        json.dump({dim: t.total_seconds() for dim, t in timeouts.items()}, f)
    shutdown_parallel(env)


def test_every_mesh_dimension_gets_the_distributed_timeout(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    expected = timedelta(minutes=TIMEOUT_MINUTES).total_seconds()
    for rank in range(world):
        timeouts = json.loads((tmp_path / f"rank{rank}.txt").read_text())
        assert {"pp", "dp", "tp"} <= timeouts.keys(), timeouts
        assert set(timeouts.values()) == {expected}, timeouts
