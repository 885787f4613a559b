"""--async-save resumes exactly like a synchronous save (1 and 2 processes), and --keep-last-checkpoints never
deletes the checkpoint a run resumed from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from qwen3_pretrain.checkpoint.native import LATEST_FILE, load_model_tensors
from qwen3_pretrain.config import parse_train_args
from qwen3_pretrain.train.trainer import run_training

from distributed_helpers import free_port, join_gloo_group, leave_gloo_group
from train_helpers import tiny_flags, write_tiny_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny_text_document")


def _same_weights(a: Path, b: Path) -> None:
    left, right = load_model_tensors(a), load_model_tensors(b)
    assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def _sync_and_async(data: str, out: Path, world_size: int | None = None) -> dict[str, list[float]]:
    """Full runs saving every 2 iterations, sync and async, then a resume of each from iteration 4."""
    losses = {}
    for mode in ("sync", "async"):
        save = out / mode
        flags = tiny_flags(data, save=save, save_interval=2, async_save=mode == "async")
        losses[mode] = run_training(parse_train_args(flags, world_size=world_size)).losses
        resume = tiny_flags(data, load=save / "iter_0000004", save=out / f"{mode}-resumed", async_save=mode == "async")
        losses[f"{mode}-resumed"] = run_training(parse_train_args(resume, world_size=world_size)).losses
    return losses


def _check(losses: dict[str, list[float]], out: Path) -> None:
    assert losses["async"] == losses["sync"]
    assert losses["async-resumed"] == losses["sync-resumed"] == losses["sync"][4:]
    for iteration in ("iter_0000002", "iter_0000004", "iter_0000006"):
        _same_weights(out / "sync" / iteration, out / "async" / iteration)
    assert (out / "async" / LATEST_FILE).read_text().strip() == "6"


def test_async_save_resumes_exactly(dataset: str, tmp_path: Path) -> None:
    _check(_sync_and_async(dataset, tmp_path), tmp_path)


def _worker(rank: int, port: int, data: str, out: str) -> None:
    join_gloo_group(rank, 2, port)
    losses = _sync_and_async(data, Path(out), world_size=2)
    if rank == 0:
        (Path(out) / "losses.json").write_text(json.dumps(losses))
    leave_gloo_group()


def test_async_save_resumes_exactly_on_two_processes(dataset: str, tmp_path: Path) -> None:
    mp.spawn(_worker, args=(free_port(), dataset, str(tmp_path)), nprocs=2, join=True)
    _check(json.loads((tmp_path / "losses.json").read_text()), tmp_path)


@pytest.mark.parametrize("async_save", [False, True])
def test_keep_last_never_deletes_the_resume_point(dataset: str, tmp_path: Path, async_save: bool) -> None:
    save = tmp_path / "ck"
    run_training(parse_train_args(tiny_flags(dataset, save=save, exit_interval=2)))
    flags = tiny_flags(dataset, save=save, load=save, save_interval=2, keep_last_checkpoints=1, async_save=async_save)
    assert run_training(parse_train_args(flags)).iterations == [3, 4, 5, 6]
    assert sorted(p.name for p in save.iterdir() if p.is_dir()) == ["iter_0000002", "iter_0000006"]
    assert (save / LATEST_FILE).read_text().strip() == "6"
