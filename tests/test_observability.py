"""Observability flags: Weights & Biases (an offline run read back from its .wandb file), the torch profiler
window (a Chrome trace and the top-operators table), the measured peak memory beside the planner's estimate
(log line, JSONL, TensorBoard) and --tensorboard-log-interval. One tiny fp32 run with all of them on."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from qwen3_pretrain.cli import main
from qwen3_pretrain.config import ConfigError, TrainConfig, parse_train_args
from qwen3_pretrain.distributed.planner import GIB
from qwen3_pretrain.train.preflight import memory_estimate, prepare
from qwen3_pretrain.train.trainer import TrainResult, run_training

from train_helpers import ITERS, tiny_flags, write_tiny_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

TB_INTERVAL = 2
MEMORY = re.compile(r" mem peak/est \(GiB\): (?P<peak>\d+\.\d{2})/(?P<estimate>\d+\.\d{2}) \|$")


@dataclass
class Run:
    config: TrainConfig
    result: TrainResult
    stdout: str
    out: Path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny_text_document")


@pytest.fixture(scope="module")
def run(dataset: str, tmp_path_factory: pytest.TempPathFactory, monkeypatch_module: pytest.MonkeyPatch) -> Run:
    """Log every iteration; TensorBoard every 2nd with memory; W&B offline; profile iterations 3-4."""
    monkeypatch_module.delenv("WANDB_MODE", raising=False)
    out = tmp_path_factory.mktemp("run")
    config = parse_train_args(tiny_flags(
        dataset, log_interval=1, run_dir=out / "run", tensorboard_dir=out / "tb", tensorboard_log_interval=TB_INTERVAL,
        log_memory_to_tensorboard=True, wandb_project="qwen3-test", wandb_exp_name="tiny", wandb_save_dir=out / "wandb",
        profile=True, profile_step_start=2, profile_step_end=4,
    ))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        result = run_training(config)
    return Run(config, result, stdout.getvalue(), out)


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def wandb_history(path: Path) -> dict[int, dict[str, Any]]:
    """{step: {key: value}} of the history records in a `.wandb` file.

    The file is W&B's transaction log: a 7-byte header (":W&B", magic 0xBEE1, version 0), then LevelDB-log
    records in 32 KiB blocks (crc32c u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last; a block tail
    shorter than a header is padding), each record a `wandb.proto` `Record` message.
    """
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    history: dict[int, dict[str, Any]] = {}
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # a record still being written
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind not in (1, 4):
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        pending = b""
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(record.history.step.num, {}).update(items)
    return history


def test_wandb_offline_run_holds_the_losses(run: Run) -> None:
    files = list((run.out / "wandb").glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    deadline = time.monotonic() + 60  # W&B's service process may still be writing the log on a busy machine
    while not (history := wandb_history(files[0])) and time.monotonic() < deadline:
        time.sleep(0.5)
    logged = {step: values["lm loss"] for step, values in history.items() if "lm loss" in values}
    assert sorted(logged) == list(range(TB_INTERVAL, ITERS + 1, TB_INTERVAL))
    for step, loss in logged.items():
        assert loss == pytest.approx(run.result.losses[step - 1], rel=1e-12)
    assert history[ITERS]["lm loss validation"] == pytest.approx(run.result.validation[-1][1], rel=1e-12)
    assert history[ITERS]["mem-estimate-bytes"] == int(memory_estimate(run.config).total)


def test_missing_wandb_is_a_config_error(dataset: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=re.escape("pip install qwen3-pretrain[wandb]")):
        prepare(tiny_flags(dataset, wandb_project="p"))


def test_profile_writes_a_chrome_trace_and_prints_the_table(run: Run) -> None:
    folder = run.out / "tb" / "profile"
    assert sorted(p.name for p in folder.iterdir()) == ["rank0_iters3-4.pt.trace.json", "rank0_iters3-4.txt"]
    trace = json.loads((folder / "rank0_iters3-4.pt.trace.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert "aten::mm" in names or "aten::addmm" in names
    table = (folder / "rank0_iters3-4.txt").read_text()
    assert "Self CPU time total" in table
    assert f"profile of rank 0, iterations 3-4 (trace: {folder / 'rank0_iters3-4.pt.trace.json'}):" in run.stdout
    assert table.strip() in run.stdout


def test_memory_on_the_log_line_in_jsonl_and_tensorboard(run: Run) -> None:
    lines = [line for line in run.stdout.splitlines() if line.startswith(" [") and " iteration " in line]
    records = [json.loads(r) for r in (run.out / "run" / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "lm_loss" in r]
    assert len(lines) == len(records) == ITERS
    estimate = int(memory_estimate(run.config).total)
    for line, record in zip(lines, records, strict=True):
        match = MEMORY.search(line)
        assert match, line
        assert " TFLOP/s per device: " in line[: match.start()]  # after the existing fields
        assert record["mem_estimate_bytes"] == estimate and record["mem_peak_bytes"] > 0
        assert match["peak"] == f"{record['mem_peak_bytes'] / GIB:.2f}"
        assert match["estimate"] == f"{estimate / GIB:.2f}"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run.out / "tb"))
    events.Reload()
    peaks = {e.step: e.value for e in events.Scalars("mem-max-allocated-bytes")}
    assert peaks == pytest.approx({r["iteration"]: r["mem_peak_bytes"] for r in records}, rel=1e-6)
    losses = {e.step: e.value for e in events.Scalars("lm loss")}  # each iteration's own loss, every 2nd
    assert losses == pytest.approx({i: run.result.losses[i - 1] for i in range(2, ITERS + 1, 2)}, rel=1e-6)


def test_two_processes_profile_the_chosen_rank_and_log_from_the_last(
    dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    flags = tiny_flags(dataset, train_iters=3, log_interval=1, eval_iters=0, run_dir=tmp_path / "run",
                       wandb_project="qwen3-test", profile=True, profile_step_start=1, profile_step_end=2)
    assert main(["train", "--nproc-per-node", "2", *flags, "--profile-ranks", "1"]) == 0
    out = capfd.readouterr().out
    assert sorted(p.name for p in (tmp_path / "run" / "profile").iterdir()) == [
        "rank1_iters2-2.pt.trace.json", "rank1_iters2-2.txt"
    ]
    assert "profile of rank 1, iterations 2-2" in out and "profile of rank 0" not in out
    assert len(list((tmp_path / "run" / "wandb").glob("wandb/offline-run-*/run-*.wandb"))) == 1
    records = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3] and all(r["mem_peak_bytes"] > 0 for r in records)


@pytest.mark.parametrize(("extra", "message"), [
    (["--profile-step-start", "4", "--profile-step-end", "4"], "--profile-step-end 4 must be larger"),
    (["--profile-step-start", str(ITERS)], f"--profile-step-start {ITERS} is not below the run's {ITERS} iterations"),
    (["--profile-step-start", "1", "--profile-ranks", "0", "1"], "--profile-ranks 0 1: give ranks 0..0"),
    (["--profile-ranks", "first"], "--profile-ranks: expected int, got 'first'"),
])
def test_profile_flag_errors(dataset: str, extra: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_train_args([*tiny_flags(dataset, profile=True), *extra])


def test_profile_ranks_are_integers_and_megatron_profiler_switch_is_accepted(dataset: str) -> None:
    config = parse_train_args([*tiny_flags(dataset, profile=True, profile_step_start=1), "--profile-ranks", "-1", "0",
                               "--use-pytorch-profiler"], world_size=2)
    assert config.logging.profile_ranks == [-1, 0]
    assert "--use-pytorch-profiler" in config.ignored
    assert parse_train_args(tiny_flags(dataset)).logging.profile_ranks == [0]
