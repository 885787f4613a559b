"""Nothing read from a checkpoint runs code: a crafted DCP `.metadata` (whose pickle would run a shell command)
is refused by every entry point that reads native checkpoints, naming the file and the reason, and torch files
(train state, RNG states) only ever load with `weights_only=True`."""

from __future__ import annotations

import json
import os
import pickle
import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from qwen3_pretrain.checkpoint import native
from qwen3_pretrain.checkpoint.loader import open_checkpoint
from qwen3_pretrain.checkpoint.native import (
    DCP_METADATA_FILE,
    MANIFEST_FILE,
    CheckpointError,
    file_checksum,
    load_checkpoint,
    load_model_tensors,
)
from qwen3_pretrain.cli import main as cli_main
from qwen3_pretrain.config import ConfigError, parse_train_args
from qwen3_pretrain.model.qwen3 import Qwen3ForCausalLM
from qwen3_pretrain.train.preflight import prepare
from qwen3_pretrain.train.trainer import run_training

from checkpoint_helpers import trained_native_checkpoint
from train_helpers import tiny_flags, write_tiny_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


class RunsCode:
    """Unpickles as `os.system("touch MARKER")`: what a crafted checkpoint file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _rewrite(iteration: Path, name: str, data: bytes) -> None:
    """Replace `iteration/name` and its manifest entry, as someone crafting the checkpoint would."""
    (iteration / name).write_bytes(data)
    manifest = json.loads((iteration / MANIFEST_FILE).read_text())
    manifest["files"][name] = {"size": len(data), "crc32": file_checksum(iteration / name)}
    (iteration / MANIFEST_FILE).write_text(json.dumps(manifest))


def _crafted_metadata(iteration: Path, marker: Path) -> bytes:
    """The checkpoint's real DCP metadata with a code-running object in it (pickle as DCP writes it)."""
    with open(iteration / DCP_METADATA_FILE, "rb") as handle:
        metadata = pickle.load(handle)  # our own file, written by the fixture
    metadata.planner_data = {"payload": RunsCode(marker)}
    return pickle.dumps(metadata)


@pytest.fixture
def crafted(tmp_path: Path) -> tuple[Path, Path]:
    """(save dir, marker): a trained tiny checkpoint whose .metadata would create `marker` when unpickled."""
    _, save_dir = trained_native_checkpoint(tmp_path, tied=True)
    iteration = save_dir / "iter_0000001"
    marker = tmp_path / "pwned"
    _rewrite(iteration, DCP_METADATA_FILE, _crafted_metadata(iteration, marker))
    return save_dir, marker


def _assert_refused(message: str, save_dir: Path, marker: Path) -> None:
    assert f"{save_dir / 'iter_0000001' / DCP_METADATA_FILE} was refused" in message, message
    assert "posix.system" in message and "could run arbitrary code" in message, message
    assert not marker.exists()


def test_the_crafted_metadata_is_live(tmp_path: Path) -> None:
    """Guards the tests below: plain unpickling (what DCP itself does) runs the payload."""
    _, save_dir = trained_native_checkpoint(tmp_path, tied=True)
    marker = tmp_path / "ran"
    pickle.loads(_crafted_metadata(save_dir / "iter_0000001", marker))
    assert marker.exists()


def test_train_load_refuses_it_before_any_process_starts(crafted: tuple[Path, Path], tmp_path: Path) -> None:
    save_dir, marker = crafted
    flags = tiny_flags(write_tiny_dataset(tmp_path / "tiny_text_document"), load=save_dir)
    with pytest.raises(ConfigError) as refused:
        prepare(flags)
    _assert_refused(str(refused.value), save_dir, marker)
    with pytest.raises(ConfigError) as refused:
        run_training(parse_train_args(flags))
    _assert_refused(str(refused.value), save_dir, marker)


def test_loaders_refuse_it(crafted: tuple[Path, Path]) -> None:
    """Also when the file changes after `open_checkpoint` checked it: DCP gets the metadata from the safe reader."""
    save_dir, marker = crafted
    model = Qwen3ForCausalLM(_tiny_config(save_dir))
    for load in (lambda: load_checkpoint(save_dir, model), lambda: load_model_tensors(save_dir)):
        with pytest.raises(CheckpointError) as refused:
            load()
        _assert_refused(str(refused.value), save_dir, marker)
    with pytest.raises(CheckpointError) as refused:
        open_checkpoint(save_dir)
    _assert_refused(str(refused.value), save_dir, marker)


def _tiny_config(save_dir: Path) -> Any:
    from qwen3_pretrain.checkpoint.export import qwen3_config_from_saved

    return qwen3_config_from_saved(native.load_model_config(save_dir), save_dir)


def test_export_and_convert_refuse_it(
    crafted: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_dir, marker = crafted
    assert cli_main(["export", "--load", str(save_dir), "--save-dir", str(tmp_path / "hf")]) == 1
    _assert_refused(capsys.readouterr().err, save_dir, marker)
    argv = ["convert", "--load-model-type", "native", "--save-model-type", "hf", "--load-dir", str(save_dir),
            "--save-dir", str(tmp_path / "hf2")]
    assert cli_main(argv) == 2
    _assert_refused(capsys.readouterr().err, save_dir, marker)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf2").exists()


def test_checkpoint_verify_reports_it(crafted: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    save_dir, marker = crafted
    assert cli_main(["checkpoint", "verify", str(save_dir)]) == 1
    out = capsys.readouterr().out
    assert "iter_0000001: DAMAGED" in out
    _assert_refused(out, save_dir, marker)


@pytest.mark.parametrize("name", [native.TRAIN_STATE_FILE, "rng/rank_00000.pt"])
def test_torch_files_load_weights_only(tmp_path: Path, name: str) -> None:
    _, save_dir = trained_native_checkpoint(tmp_path, tied=True)
    iteration, marker = save_dir / "iter_0000001", tmp_path / "pwned"
    real = torch.load(iteration / name, weights_only=True)
    crafted = tmp_path / "crafted.pt"
    torch.save({**real, "payload": RunsCode(marker)}, crafted)
    _rewrite(iteration, name, crafted.read_bytes())
    model = Qwen3ForCausalLM(_tiny_config(save_dir))
    with pytest.raises(CheckpointError, match=rf"{name}.*(Weights only load failed|weights_only)"):
        load_checkpoint(save_dir, model)
    assert not marker.exists()


def test_data_files_named_outside_the_checkpoint_are_refused(tmp_path: Path) -> None:
    _, save_dir = trained_native_checkpoint(tmp_path, tied=True)
    iteration = save_dir / "iter_0000001"
    with open(iteration / DCP_METADATA_FILE, "rb") as handle:
        metadata = pickle.load(handle)  # our own file
    for info in metadata.storage_data.values():
        info.relative_path = "../../outside.distcp"
    shutil.copy(iteration / "__0_0.distcp", tmp_path / "outside.distcp")
    _rewrite(iteration, DCP_METADATA_FILE, pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match="names a data file outside its checkpoint"):
        load_model_tensors(save_dir)
