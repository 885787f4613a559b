"""Native DCP checkpoints: exact round trips, FSDP2 <-> single process resharding, kill -9 atomicity.

Kill -9 cases run this file as a CPU-only script that forks one child per fault; each child
SIGKILLs itself at an injected point of its save. The FSDP2 case runs it once per rank. See `_main`.
"""

from __future__ import annotations

import copy
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from qwen3_pretrain.checkpoint import native
from qwen3_pretrain.checkpoint.hf import save_pretrained
from qwen3_pretrain.checkpoint.loader import detect_format
from qwen3_pretrain.checkpoint.native import (
    LATEST_FILE,
    CheckpointError,
    load_checkpoint,
    load_model_config,
    load_model_tensors,
    save_checkpoint,
)
from qwen3_pretrain.config.model import get_preset
from qwen3_pretrain.model.qwen3 import Qwen3ForCausalLM

from distributed_helpers import free_port

CONFIG = {"model": {"hidden_size": 64, "num_hidden_layers": 2}, "train": {"lr": 1e-3, "betas": (0.9, 0.95)}}


def _setup(
    seed: int, hidden_size: int = 64
) -> tuple[Qwen3ForCausalLM, torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """A tiny tied Qwen3 with AdamW and a warmup+decay LambdaLR."""
    torch.manual_seed(seed)
    config = get_preset("qwen3-tiny")
    config.hidden_size = hidden_size
    model = Qwen3ForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 3) / (1 + 0.1 * step))
    return model, optimizer, scheduler


def _train(model: Qwen3ForCausalLM, optimizer: torch.optim.Optimizer, scheduler: Any, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tokens = torch.randint(0, model.config.vocab_size, (2, 9), generator=generator)  # [b, s + 1]
        model(tokens[:, :-1], labels=tokens[:, 1:]).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def _assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Exact structural equality of nested dicts/lists/tensors."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Layout-independent model + optimizer state (FQN keys, full tensors, on CPU)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    return {"model": model_state, "optimizer": optimizer_state}


def _draws() -> tuple[float, float, torch.Tensor]:
    return random.random(), float(np.random.rand()), torch.rand(3)


def _read_latest(save_dir: Path) -> str:
    return (save_dir / LATEST_FILE).read_text().strip()


# ---- single process ----------------------------------------------------------------------------


def test_round_trip_restores_everything_exactly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, optimizer, scheduler = _setup(seed=0)
    _train(model, optimizer, scheduler, steps=3, seed=1)
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    train_state = {"consumed_samples": 6, "skipped_iterations": 1, "nan_iterations": 0}
    final = save_checkpoint(tmp_path, 3, model, optimizer, scheduler, train_state, CONFIG)
    expected_state = copy.deepcopy(_full_state(model, optimizer))
    expected_scheduler = scheduler.state_dict()
    expected_draws = _draws()
    _train(model, optimizer, scheduler, steps=2, seed=2)
    expected_after = copy.deepcopy(model.state_dict())

    out = capsys.readouterr().out
    assert f"saving checkpoint at iteration       3 to {tmp_path}\n" in out
    assert f"  successfully saved checkpoint from iteration       3 to {tmp_path} (" in out
    assert final == tmp_path / "iter_0000003" and _read_latest(tmp_path) == "3"

    model2, optimizer2, scheduler2 = _setup(seed=1)
    loaded = load_checkpoint(tmp_path, model2, optimizer2, scheduler2)
    assert loaded == {**train_state, "iteration": 3}
    _assert_same(expected_draws, _draws(), "rng")
    _assert_same(expected_state, _full_state(model2, optimizer2))
    _assert_same(expected_scheduler, scheduler2.state_dict(), "scheduler")
    assert model2.lm_head.weight is model2.model.embed_tokens.weight  # the tie survives loading
    _train(model2, optimizer2, scheduler2, steps=2, seed=2)
    _assert_same(expected_after, model2.state_dict(), "after resume")
    config = load_model_config(tmp_path)
    assert config == {"model": CONFIG["model"], "train": {"lr": 1e-3, "betas": [0.9, 0.95]}}


def test_model_only_load_leaves_optimizer_and_rng_alone(tmp_path: Path) -> None:
    model, optimizer, scheduler = _setup(seed=0)
    _train(model, optimizer, scheduler, steps=1, seed=1)
    save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {}, CONFIG)
    model2, optimizer2, _ = _setup(seed=3)
    torch.manual_seed(9)
    expected = torch.rand(2)
    torch.manual_seed(9)
    load_checkpoint(tmp_path, model2, load_rng=False)
    _assert_same(expected, torch.rand(2), "rng untouched")
    _assert_same(model.state_dict(), model2.state_dict())
    assert not optimizer2.state
    _assert_same(model.state_dict(), load_model_tensors(tmp_path), "load_model_tensors")


def test_unstepped_optimizer_is_saved_as_empty_and_not_modified(tmp_path: Path) -> None:
    model, optimizer, scheduler = _setup(seed=0)
    save_checkpoint(tmp_path, 0, model, optimizer, scheduler, {}, CONFIG)
    assert not optimizer.state
    model2, optimizer2, scheduler2 = _setup(seed=1)
    load_checkpoint(tmp_path, model2, optimizer2, scheduler2)
    assert not optimizer2.state
    _assert_same(model.state_dict(), model2.state_dict())


def test_resave_same_iteration_and_keep_last(tmp_path: Path) -> None:
    model, optimizer, scheduler = _setup(seed=0)
    for iteration in (1, 2, 3, 4):
        _train(model, optimizer, scheduler, steps=1, seed=iteration)
        save_checkpoint(tmp_path, iteration, model, optimizer, scheduler, {"i": iteration}, CONFIG, keep_last=2)
    save_checkpoint(tmp_path, 4, model, optimizer, scheduler, {"i": 40}, CONFIG, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000003", "iter_0000004", LATEST_FILE]
    model2, _, _ = _setup(seed=1)
    assert load_checkpoint(tmp_path, model2)["i"] == 40
    assert load_checkpoint(tmp_path, model2, iteration=3)["i"] == 3
    assert load_checkpoint(tmp_path / "iter_0000003", model2)["i"] == 3


def test_clear_errors(tmp_path: Path) -> None:
    model, optimizer, scheduler = _setup(seed=0)
    with pytest.raises(CheckpointError, match="does not exist; check --load"):
        load_checkpoint(tmp_path / "nope", model)
    with pytest.raises(CheckpointError, match=f"has no {LATEST_FILE}"):
        load_checkpoint(tmp_path, model)
    _train(model, optimizer, scheduler, steps=1, seed=1)
    save_checkpoint(tmp_path, 1, model, None, None, {}, CONFIG)
    with pytest.raises(CheckpointError, match="holds no optimizer state; load it with --no-load-optim"):
        load_checkpoint(tmp_path, model, optimizer)
    with pytest.raises(CheckpointError, match="holds no LR scheduler state"):
        load_checkpoint(tmp_path, model, lr_scheduler=scheduler)
    with pytest.raises(CheckpointError, match=r"iteration 7 was requested, but .*iter_0000007 does not exist"):
        load_checkpoint(tmp_path, model, iteration=7)
    wider, _, _ = _setup(seed=0, hidden_size=32)
    with pytest.raises(CheckpointError, match=r"cannot load the model from .*iter_0000001"):
        load_checkpoint(tmp_path, wider)

    (tmp_path / LATEST_FILE).write_text("9\n")
    with pytest.raises(CheckpointError, match=r"names iteration 9, but .*iter_0000009 does not exist .*iter_0000001"):
        load_checkpoint(tmp_path, model)
    (tmp_path / LATEST_FILE).write_text("nine\n")
    with pytest.raises(CheckpointError, match="should hold an iteration number but holds 'nine'"):
        load_checkpoint(tmp_path, model)
    (tmp_path / LATEST_FILE).write_text("1\n")
    metadata = tmp_path / "iter_0000001" / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[:20])
    with pytest.raises(CheckpointError, match=r"\.metadata: 20 bytes, the manifest says \d+ \(truncated"):
        load_checkpoint(tmp_path, model)
    with pytest.raises(CheckpointError, match=r"\.metadata is unreadable \(UnpicklingError"):
        load_checkpoint(tmp_path, model, verify=False)
    (tmp_path / "iter_0000001" / "train_state.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"train_state.pt is corrupt"):
        load_checkpoint(tmp_path, model, verify=False)
    with pytest.raises(TypeError, match=r"config.model.bad = <object"):
        save_checkpoint(tmp_path, 2, model, None, None, {}, {"model": {"bad": object()}})
    with pytest.raises(TypeError, match="train state or LR scheduler state holds a type that cannot be loaded safely"):
        save_checkpoint(tmp_path, 2, model, None, None, {"consumed_samples": np.int64(4)}, CONFIG)
    assert not (tmp_path / "iter_0000002").exists() and not list(tmp_path.glob(".iter_0000002.*.incomplete"))


def test_detect_checkpoint_format(tmp_path: Path) -> None:
    model, _, _ = _setup(seed=0)
    save_checkpoint(tmp_path / "native", 5, model, None, None, {}, CONFIG)
    save_pretrained(model, tmp_path / "hf")
    mcore = tmp_path / "mcore" / "iter_0000001" / "mp_rank_00"
    mcore.mkdir(parents=True)
    torch.save({"model": {}}, mcore / "model_optim_rng.pt")
    (tmp_path / "mcore" / LATEST_FILE).write_text("1")
    (tmp_path / "empty").mkdir()
    assert detect_format(tmp_path / "native") == "native"
    assert detect_format(tmp_path / "native" / "iter_0000005") == "native"
    assert detect_format(tmp_path / "hf") == "hf"
    assert detect_format(tmp_path / "mcore") == "mcore"
    assert detect_format(tmp_path / "mcore" / "iter_0000001") == "mcore"
    assert detect_format(tmp_path / "empty") is None
    assert detect_format(tmp_path / "missing") is None


# ---- kill -9 in the middle of a save -------------------------------------------------------------

FAULTS = ("dcp_write", "before_rename", "before_latest", "resave_between_renames")
PRUNE_FAULTS = ("prune_rename", "prune_rmtree")  # a save with keep_last=1 killed while deleting the older one
MODES = ("sync", "async")


def _install_fault(fault: str) -> None:
    """Make this process SIGKILL itself at one point of the next save."""

    def die(*_: Any, **__: Any) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if fault == "dcp_write":  # shard files written, DCP metadata not yet
        from torch.distributed.checkpoint.filesystem import FileSystemWriter

        FileSystemWriter.finish = die  # type: ignore[method-assign]
    elif fault == "before_rename":  # staging complete, not yet renamed
        native.replace_directory = die  # type: ignore[assignment]
    elif fault == "prune_rmtree":  # the old iteration moved aside and partly deleted
        real_rmtree = shutil.rmtree

        def rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
            if Path(path).name.endswith(".pruned"):
                min(p for p in Path(path).rglob("*") if p.is_file()).unlink()
                die()
            real_rmtree(path, *args, **kwargs)

        native.shutil.rmtree = rmtree  # type: ignore[assignment]
    else:
        real_replace = os.replace

        def replace(src: Any, dst: Any) -> None:
            if fault == "before_latest" and Path(dst).name == LATEST_FILE:
                die()  # the new iteration is in place, `latest` still names the previous one
            if fault == "resave_between_renames" and Path(src).name.endswith(".incomplete"):
                die()  # the old directory of this iteration is moved aside, the new one not yet in
            if fault == "prune_rename" and Path(dst).name.endswith(".pruned"):
                die()  # `latest` names the new iteration, the old one is not yet moved aside
            real_replace(src, dst)

        native.os.replace = replace  # type: ignore[assignment]


def _fault_worker(workdir: Path) -> None:
    """Per fault and mode: save iteration 1, then fork a child that saves again (in the background with
    mode "async") with the fault installed; record the child's wait status in `workdir/FAULT-MODE/status` and
    the state the loadable latest checkpoint must hold in `expected.pt`."""
    for fault in (*FAULTS, *PRUNE_FAULTS):
        for mode in MODES:
            case = workdir / f"{fault}-{mode}"
            save_dir = case / "ckpt"
            model, optimizer, scheduler = _setup(seed=0)
            _train(model, optimizer, scheduler, steps=1, seed=1)
            save_checkpoint(save_dir, 1, model, optimizer, scheduler, {"consumed_samples": 2}, CONFIG)
            torch.save(_full_state(model, optimizer), case / "expected.pt")
            _train(model, optimizer, scheduler, steps=1, seed=2)
            if fault in PRUNE_FAULTS:
                torch.save(_full_state(model, optimizer), case / "expected.pt")
            iteration = 1 if fault == "resave_between_renames" else 2
            pid = os.fork()  # safe: this process runs CPU-only (see _cpu_env)
            if pid == 0:
                try:
                    _install_fault(fault)
                    saver = native.AsyncSaver() if mode == "async" else None
                    save_checkpoint(save_dir, iteration, model, optimizer, scheduler, {"consumed_samples": 4},
                                    CONFIG, keep_last=1 if fault in PRUNE_FAULTS else None, background=saver)
                    if saver is not None:
                        saver.wait()
                finally:
                    os._exit(1)  # reached only if the fault did not fire
            _, status = os.waitpid(pid, 0)
            (case / "status").write_text(str(status))


@pytest.fixture(scope="module")
def faulted_saves(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One worker process runs every fault (one interpreter start instead of one per fault)."""
    workdir = tmp_path_factory.mktemp("faults")
    result = subprocess.run(
        [sys.executable, __file__, "fault", str(workdir)],
        env=_cpu_env(), capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return workdir


def _killed_case(faulted_saves: Path, fault: str, mode: str) -> Path:
    case = faulted_saves / f"{fault}-{mode}"
    status = int((case / "status").read_text())
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"child wait status {status}"
    return case


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fault", FAULTS)
def test_kill_during_save_keeps_previous_checkpoint(faulted_saves: Path, fault: str, mode: str) -> None:
    case = _killed_case(faulted_saves, fault, mode)
    save_dir = case / "ckpt"
    assert _read_latest(save_dir) == "1"
    model, optimizer, scheduler = _setup(seed=3)
    assert load_checkpoint(save_dir, model, optimizer, scheduler) == {"consumed_samples": 2, "iteration": 1}
    _assert_same(torch.load(case / "expected.pt", weights_only=True), _full_state(model, optimizer))
    save_checkpoint(save_dir, 2, model, optimizer, scheduler, {"consumed_samples": 4}, CONFIG)
    assert _read_latest(save_dir) == "2"
    assert sorted(p.name for p in save_dir.iterdir()) == ["iter_0000001", "iter_0000002", LATEST_FILE]
    assert load_checkpoint(save_dir, model, iteration=1)["consumed_samples"] == 2


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fault", PRUNE_FAULTS)
def test_kill_during_prune_leaves_latest_loadable(faulted_saves: Path, fault: str, mode: str) -> None:
    case = _killed_case(faulted_saves, fault, mode)
    save_dir = case / "ckpt"
    assert _read_latest(save_dir) == "2"
    model, optimizer, scheduler = _setup(seed=3)
    assert load_checkpoint(save_dir, model, optimizer, scheduler) == {"consumed_samples": 4, "iteration": 2}
    _assert_same(torch.load(case / "expected.pt", weights_only=True), _full_state(model, optimizer))
    for name in {p.name for p in save_dir.glob("iter_*")} - {"iter_0000002"}:
        assert name == "iter_0000001" and native.verify_checkpoint(save_dir / name)  # complete or gone
    save_checkpoint(save_dir, 3, model, optimizer, scheduler, {"consumed_samples": 6}, CONFIG, keep_last=1)
    assert sorted(p.name for p in save_dir.iterdir()) == ["iter_0000003", LATEST_FILE]


# ---- FSDP2 on 2 processes <-> 1 process -------------------------------------------------------


def _fsdp_worker(rank: int, world_size: int, port: int, workdir: Path) -> None:
    """Save an FSDP2 run to workdir/fsdp, and load workdir/single into a fresh FSDP2 model."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    mesh = init_device_mesh("cpu", (world_size,))

    def sharded(seed: int) -> tuple[Qwen3ForCausalLM, torch.optim.AdamW, Any]:
        model, _, _ = _setup(seed)
        for layer in model.model.layers.values():
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
        return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))

    model, optimizer, scheduler = sharded(seed=0)
    _train(model, optimizer, scheduler, steps=2, seed=10 + rank)
    save_checkpoint(workdir / "fsdp", 2, model, optimizer, scheduler, {"consumed_samples": 8}, CONFIG)
    state = _full_state(model, optimizer)
    if rank == 0:
        torch.save({**state, "scheduler": scheduler.state_dict()}, workdir / "fsdp_expected.pt")

    model, optimizer, scheduler = sharded(seed=1)
    train_state = load_checkpoint(workdir / "single", model, optimizer, scheduler)
    state = _full_state(model, optimizer)
    if rank == 0:
        torch.save(
            {**state, "scheduler": scheduler.state_dict(), "train_state": train_state}, workdir / "single_loaded.pt"
        )
    dist.barrier()
    dist.destroy_process_group()


def _cpu_env() -> dict[str, str]:
    """Environment of CPU-only worker processes (also on machines with accelerators)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "QWEN3_PRETRAIN_DEVICE": "cpu", "CUDA_VISIBLE_DEVICES": ""}


def test_fsdp2_two_processes_and_single_process_load_each_other(tmp_path: Path) -> None:
    model, optimizer, scheduler = _setup(seed=0)
    _train(model, optimizer, scheduler, steps=2, seed=7)
    save_checkpoint(tmp_path / "single", 2, model, optimizer, scheduler, {"consumed_samples": 4}, CONFIG)
    single_expected = {**_full_state(model, optimizer), "scheduler": scheduler.state_dict()}

    port = free_port()
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, "fsdp", str(rank), "2", str(port), str(tmp_path)],
            env=_cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(2)
    ]
    outputs = [worker.communicate(timeout=180)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], "\n".join(outputs)

    loaded = torch.load(tmp_path / "single_loaded.pt", weights_only=True)
    assert loaded.pop("train_state") == {"consumed_samples": 4, "iteration": 2}
    _assert_same(single_expected, loaded, "1 process -> FSDP2")

    fsdp_expected = torch.load(tmp_path / "fsdp_expected.pt", weights_only=True)
    model, optimizer, scheduler = _setup(seed=1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    with pytest.warns(UserWarning, match="saved by 2 processes and is loaded by 1: RNG states are not restored"):
        train_state = load_checkpoint(tmp_path / "fsdp", model, optimizer, scheduler)
    assert train_state == {"consumed_samples": 8, "iteration": 2}
    fsdp_loaded = {**_full_state(model, optimizer), "scheduler": scheduler.state_dict()}
    _assert_same(fsdp_expected, fsdp_loaded, "FSDP2 -> 1 process")


def _main(argv: list[str]) -> None:
    """Subprocess entry: `fault WORKDIR` or `fsdp RANK WORLD_SIZE PORT WORKDIR`."""
    if argv[0] == "fault":
        _fault_worker(Path(argv[1]))
    else:
        _fsdp_worker(int(argv[1]), int(argv[2]), int(argv[3]), Path(argv[4]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo + FSDP2 may abort at interpreter exit after correct results (DESIGN.md)


if __name__ == "__main__":
    _main(sys.argv[1:])
