"""Verified checkpoints: every native save ends with a manifest (size + CRC-32 of each file); loads check it by
default and name each damaged file, `qwen3-pretrain checkpoint verify` checks it on demand, and saves without
a manifest (older ones) still load, with a warning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from qwen3_pretrain.checkpoint.export import qwen3_config_from_saved
from qwen3_pretrain.checkpoint.native import (
    MANIFEST_FILE,
    CheckpointError,
    load_checkpoint,
    load_model_config,
    load_model_tensors,
    verify_checkpoint,
)
from qwen3_pretrain.cli import main as cli_main
from qwen3_pretrain.config import parse_train_args
from qwen3_pretrain.model.qwen3 import Qwen3ForCausalLM
from qwen3_pretrain.train.trainer import run_training

from checkpoint_helpers import trained_native_checkpoint
from train_helpers import tiny_flags, write_tiny_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

SHARD = "__0_0.distcp"


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """A trained tiny native checkpoint's save directory (iteration 1)."""
    return trained_native_checkpoint(tmp_path, tied=True)[1]


def _fresh_model(save_dir: Path) -> Qwen3ForCausalLM:
    return Qwen3ForCausalLM(qwen3_config_from_saved(load_model_config(save_dir), save_dir))


def _verify_cli(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli_main(["checkpoint", "verify", str(path)])
    return code, capsys.readouterr().out


def test_every_file_is_in_the_manifest(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    iteration = saved / "iter_0000001"
    manifest = json.loads((iteration / MANIFEST_FILE).read_text())
    on_disk = {p.relative_to(iteration).as_posix() for p in iteration.rglob("*") if p.is_file()} - {MANIFEST_FILE}
    assert set(manifest["files"]) == on_disk
    assert {".metadata", SHARD, "train_state.pt", "config.yaml", "rng/rank_00000.pt"} <= on_disk
    for name, entry in manifest["files"].items():
        data = (iteration / name).read_bytes()
        assert entry == {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}, name
    assert verify_checkpoint(iteration)
    code, out = _verify_cli(saved, capsys)
    assert code == 0 and out.startswith(f"{iteration}: OK (5 files,"), out


def test_a_flipped_byte_is_named_by_load_and_verify(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shard = saved / "iter_0000001" / SHARD
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    damaged = rf"is damaged: 1 of its files differ from manifest.json:\n  {shard}: crc32 [0-9a-f]{{8}}, the manifest"
    with pytest.raises(CheckpointError, match=damaged):
        load_checkpoint(saved, _fresh_model(saved))
    with pytest.raises(CheckpointError, match=damaged):
        load_model_tensors(saved)
    code, out = _verify_cli(saved, capsys)
    assert code == 1 and f"iter_0000001: DAMAGED\n  {shard}: crc32" in out, out


def test_truncated_and_missing_files_are_named(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    iteration, model = saved / "iter_0000001", _fresh_model(saved)
    rng = iteration / "rng" / "rank_00000.pt"
    rng.write_bytes(rng.read_bytes()[:-7])
    (iteration / "config.yaml").unlink()
    with pytest.raises(CheckpointError, match="2 of its files differ") as damaged:
        load_checkpoint(saved, model, load_rng=False)
    assert f"{rng}: {rng.stat().st_size} bytes, the manifest says {rng.stat().st_size + 7} (truncated" in str(
        damaged.value
    )
    assert f"{iteration / 'config.yaml'}: No such file or directory" in str(damaged.value)
    code, out = _verify_cli(iteration, capsys)
    assert code == 1 and "(truncated or rewritten)" in out and "config.yaml: No such file" in out, out


def test_a_save_without_manifest_loads_with_a_warning(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    iteration = saved / "iter_0000001"
    (iteration / MANIFEST_FILE).unlink()
    with pytest.warns(UserWarning, match=f"{iteration} has no manifest.json .*loaded without being verified"):
        load_checkpoint(saved, _fresh_model(saved))
    code, out = _verify_cli(saved, capsys)
    assert code == 0 and f"{iteration}: no manifest" in out, out


def test_a_damaged_manifest_is_refused_unless_verification_is_off(saved: Path) -> None:
    manifest = saved / "iter_0000001" / MANIFEST_FILE
    manifest.write_text(manifest.read_text()[:-10])
    model = _fresh_model(saved)
    with pytest.raises(CheckpointError, match=rf"{manifest} is damaged"):
        load_checkpoint(saved, model)
    assert load_checkpoint(saved, model, verify=False)["iteration"] == 1


def test_no_verify_checkpoint_flag_reaches_the_load(tmp_path: Path) -> None:
    """`train --no-verify-checkpoint` resumes from a checkpoint whose manifest disagrees with its files."""
    dataset = write_tiny_dataset(tmp_path / "tiny_text_document")
    run_training(parse_train_args(tiny_flags(dataset, train_iters=3, save=tmp_path / "ck")))
    manifest_path = tmp_path / "ck" / "iter_0000003" / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["train_state.pt"]["crc32"] = "00000000"
    manifest_path.write_text(json.dumps(manifest))
    resume = tiny_flags(dataset, train_iters=4, load=tmp_path / "ck")
    with pytest.raises(CheckpointError, match=r"train_state.pt: crc32 [0-9a-f]{8}, the manifest says 00000000"):
        run_training(parse_train_args(resume))
    assert run_training(parse_train_args([*resume, "--no-verify-checkpoint"])).iterations == [4]


def test_checksum_benchmark_reports_every_step(tmp_path: Path) -> None:
    """benchmarks/checkpoint_checksum.py end to end on qwen3-tiny (its fields, not its timings)."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "result.json"
    command = [sys.executable, str(root / "benchmarks" / "checkpoint_checksum.py"), "--preset", "qwen3-tiny",
               "--dtype", "fp32", "--workdir", str(tmp_path), "--json", str(out)]
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "QWEN3_PRETRAIN_DEVICE": "cpu"}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert {"date", "command", "machine", "config", "bytes", "seconds", "ratio_to_dcp_save"} <= report.keys()
    assert report["ratio_to_dcp_save"]["dcp.save (baseline)"] == 1.0 and len(report["seconds"]) == 5
    assert "crc32 of its files" in proc.stdout and list(tmp_path.iterdir()) == [out]
