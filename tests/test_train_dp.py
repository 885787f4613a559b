"""Two processes (gloo on loopback) give the losses of one process with the same global batch: FSDP2
sharded and replicated, with and without gradient accumulation, tensor parallel, and the
`--nproc-per-node` launcher. fp32, qwen3-tiny, loss tokens masked at document ends (so micro
batches hold different numbers of loss tokens)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch.multiprocessing as mp

from qwen3_pretrain.cli import main
from qwen3_pretrain.config import parse_train_args
from qwen3_pretrain.train.trainer import run_training

from distributed_helpers import free_port, join_gloo_group, leave_gloo_group
from train_helpers import GBS, tiny_flags, write_tiny_dataset

pytestmark = pytest.mark.usefixtures("one_thread")
WORLD = 2
ITERS = 3
CASES: dict[str, dict[str, Any]] = {
    "fsdp, no accumulation": {"micro_batch_size": GBS // WORLD},
    "fsdp, 2 accumulation steps": {"micro_batch_size": GBS // (2 * WORLD)},
    "replicated, 2 accumulation steps": {"micro_batch_size": GBS // (2 * WORLD), "no_shard": True},
    "tensor parallel 2, sequence parallel": {"tensor_model_parallel_size": 2, "sequence_parallel": True},
}


def _worker(rank: int, port: int, data: str, out: str) -> None:
    """One rank: join the group, run every case, write rank 0's losses, leave per the gloo trap."""
    join_gloo_group(rank, WORLD, port)
    losses = {
        name: run_training(parse_train_args(tiny_flags(data, train_iters=ITERS, **flags), world_size=WORLD)).losses
        for name, flags in CASES.items()
    }
    if rank == 0:
        Path(out).write_text(json.dumps(losses))
    leave_gloo_group()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[float]]:
    """The dataset and the single-process losses (micro batch 2: 4 accumulation steps)."""
    data = write_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny_text_document")
    return data, run_training(parse_train_args(tiny_flags(data, train_iters=ITERS))).losses


def _assert_close(ours: list[float], reference: list[float], what: str) -> None:
    assert len(ours) == ITERS, what
    for i, (a, b) in enumerate(zip(ours, reference, strict=True)):
        assert abs(a - b) <= 1e-5 * abs(b), f"{what}, iteration {i + 1}: {a} vs one process {b}"


def test_two_processes_equal_one(setup: tuple[str, list[float]], tmp_path: Path) -> None:
    data, reference = setup
    out = tmp_path / "losses.json"
    mp.spawn(_worker, args=(free_port(), data, str(out)), nprocs=WORLD, join=True)
    losses = json.loads(out.read_text())
    for name in CASES:
        _assert_close(losses[name], reference, name)


def test_nproc_per_node_launches_torchrun(setup: tuple[str, list[float]], tmp_path: Path,
                                         capfd: pytest.CaptureFixture[str]) -> None:
    data, reference = setup
    flags = tiny_flags(data, train_iters=ITERS, log_interval=1, save=tmp_path / "ckpt", eval_iters=0)
    assert main(["train", "--nproc-per-node", str(WORLD), *flags]) == 0
    out = capfd.readouterr().out
    assert "DP 2" in out and "FSDP2 sharded" in out
    records = [json.loads(line) for line in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    _assert_close([r["lm_loss"] for r in records], reference, "torchrun")
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == str(ITERS)


def _logged_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["lm_loss"] for r in records if "lm_loss" in r}


def test_resume_across_data_parallel_sizes(setup: tuple[str, list[float]], tmp_path: Path) -> None:
    """A 1-process checkpoint resumes with DP=2 and a DP=2 checkpoint in 1 process, like no stop at all."""
    data, _ = setup
    total, stop = 5, 3

    def flags(**overrides: Any) -> list[str]:
        return tiny_flags(data, train_iters=total, log_interval=1, eval_iters=0, **overrides)

    full = run_training(parse_train_args(flags(save=tmp_path / "one", save_interval=stop)))
    expected = dict(zip(full.iterations, full.losses, strict=True))
    # one process -> two processes
    assert main(["train", "--nproc-per-node", str(WORLD),
                 *flags(load=tmp_path / "one" / "iter_0000003", save=tmp_path / "one_to_two")]) == 0
    resumed_two = _logged_losses(tmp_path / "one_to_two")
    # two processes -> one process
    assert main(["train", "--nproc-per-node", str(WORLD), *flags(save=tmp_path / "two", save_interval=stop)]) == 0
    resumed_one = run_training(
        parse_train_args(flags(load=tmp_path / "two" / "iter_0000003", save=tmp_path / "two_to_one"))
    )
    assert resumed_one.iterations == [4, 5]
    resumed_one_losses = dict(zip(resumed_one.iterations, resumed_one.losses, strict=True))
    for iteration in (4, 5):
        for what, loss in (("1 -> DP 2", resumed_two[iteration]), ("DP 2 -> 1", resumed_one_losses[iteration])):
            assert abs(loss - expected[iteration]) <= 1e-5 * abs(expected[iteration]), f"{what}, iteration {iteration}"
