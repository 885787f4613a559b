"""Megatron/MindSpeed flags with a meaning in `train`: --mock-data, --train/valid/test-data-path, --exit-interval,
--exit-duration-in-mins, --exit-on-missing-checkpoint, --enable-hf2mg-convert/--model-type-hf, --ckpt-format torch,
--calculate-per-token-loss, --context-parallel-size 1."""

from __future__ import annotations

import contextlib
import dataclasses
import io
from pathlib import Path

import pytest
import torch

from qwen3_pretrain.checkpoint.hf import save_pretrained
from qwen3_pretrain.checkpoint.loader import detect_format
from qwen3_pretrain.checkpoint.mcore import McoreLayout, add_mcore_rank_files, iter_mcore_as_hf, load_pt
from qwen3_pretrain.checkpoint.native import load_model_tensors
from qwen3_pretrain.config import ConfigError, get_preset, parse_train_args
from qwen3_pretrain.model import Qwen3ForCausalLM
from qwen3_pretrain.train.preflight import prepare
from qwen3_pretrain.train.trainer import run_training

from train_helpers import ITERS, tiny_flags, write_tiny_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny_text_document")


def _quiet_run(flags: list[str]) -> tuple[object, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = run_training(parse_train_args(flags))
    return result, out.getvalue()


def test_mock_data_trains_on_random_tokens(data: str) -> None:
    result, _ = _quiet_run(tiny_flags(data, data_path=None, mock_data=True, eval_iters=0))
    assert len(result.losses) == ITERS and all(loss > 5.0 for loss in result.losses)  # ~ln(vocab 512) = 6.2


def test_per_split_data_paths_are_whole_datasets(data: str, tmp_path: Path) -> None:
    valid = write_tiny_dataset(tmp_path / "valid_text_document", documents=40, seed=1)
    flags = [*tiny_flags(data, data_path=None, split=None, train_data_path=data), "--valid-data-path", "1.0", valid]
    config = prepare(flags)
    result, out = _quiet_run(flags)
    assert len(result.losses) == ITERS and result.validation and "validation loss at" in out
    assert config.data.train_data_path == [data]
    with pytest.raises(ConfigError, match="give only one of --data-path and --train-data-path"):
        parse_train_args(tiny_flags(data, train_data_path=data))
    with pytest.raises(ConfigError, match="--valid-data-path and --test-data-path need --train-data-path"):
        parse_train_args(tiny_flags(data, valid_data_path=data))


def test_exit_interval_saves_and_stops(data: str, tmp_path: Path) -> None:
    result, out = _quiet_run(tiny_flags(data, save=tmp_path / "ck", exit_interval=2))
    assert result.final_iteration == 2 and result.exit_flag == "--exit-interval 2"
    assert (tmp_path / "ck" / "iter_0000002").is_dir() and "validation loss" not in out
    resumed, _ = _quiet_run(tiny_flags(data, load=tmp_path / "ck", save=tmp_path / "ck"))
    assert resumed.iterations[0] == 3 and resumed.final_iteration == ITERS


def test_exit_duration_stops_after_the_time(data: str, tmp_path: Path) -> None:
    result, _ = _quiet_run(tiny_flags(data, save=tmp_path / "ck", exit_duration_in_mins=1e-9))
    assert result.final_iteration == 1 and result.exit_flag == "--exit-duration-in-mins 1e-09"
    assert (tmp_path / "ck" / "iter_0000001").is_dir()


def test_exit_on_missing_checkpoint(data: str, tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    assert prepare(tiny_flags(data, load=fresh, save=fresh)).require_resolved().load_format is None
    with pytest.raises(ConfigError, match="holds no checkpoint yet and --exit-on-missing-checkpoint is set"):
        prepare(tiny_flags(data, load=fresh, save=fresh, exit_on_missing_checkpoint=True))


def test_enable_hf2mg_convert_loads_an_hf_directory(data: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    save_pretrained(Qwen3ForCausalLM(get_preset("qwen3-tiny")), tmp_path / "hf", dtype=torch.float32)
    flags = tiny_flags(data, model=None, load=tmp_path / "hf", enable_hf2mg_convert=True, model_type_hf="qwen3")
    assert prepare(flags).require_resolved().load_format == "hf"
    native = tmp_path / "native"
    _quiet_run(tiny_flags(data, save=native, train_iters=1, lr_warmup_iters=0))
    with pytest.raises(ConfigError, match=r"--enable-hf2mg-convert: --load .* is a native checkpoint"):
        prepare(tiny_flags(data, load=native, enable_hf2mg_convert=True, model_type_hf="qwen3"))
    with pytest.raises(ConfigError, match="--enable-hf2mg-convert needs --model-type-hf qwen3"):
        parse_train_args(tiny_flags(data, load=tmp_path / "hf", enable_hf2mg_convert=True))


@pytest.mark.parametrize("async_save", [False, True])
def test_ckpt_format_torch_writes_mcore_rank_files_beside_the_native_checkpoint(
    data: str, tmp_path: Path, async_save: bool
) -> None:
    save = tmp_path / "ck"
    _quiet_run(tiny_flags(data, save=save, train_iters=2, save_interval=1, lr_warmup_iters=0, ckpt_format="torch",
                          bf16=True, async_save=async_save))
    assert detect_format(save) == "native"  # resumes as native
    native = load_model_tensors(save)
    config, iteration, tensors = iter_mcore_as_hf(save)  # Megatron's reader path: tracker -> iter_N/mp_rank_00
    assert iteration == 2 and config.num_hidden_layers == get_preset("qwen3-tiny").num_hidden_layers
    got = dict(tensors)
    assert got.keys() == native.keys() - {"lm_head.weight"}
    for name, tensor in got.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, native[name].to(torch.bfloat16)), name


def test_mcore_rank_files_of_a_virtual_pipeline(tmp_path: Path) -> None:
    config = dataclasses.replace(get_preset("qwen3-tiny"), num_hidden_layers=4)
    torch.manual_seed(0)
    weights = {n: t.detach().clone() for n, t in Qwen3ForCausalLM(config).hf_state_dict().items()}
    layers = config.num_hidden_layers
    target = tmp_path / "iter_0000007"
    target.mkdir()
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("7")
    add_mcore_rank_files(target, weights.items(), config, McoreLayout(1, (layers // 4,) * 4), 7, pp_ranks=2)
    first = load_pt(target / "mp_rank_00_000" / "model_optim_rng.pt")
    assert {"model0", "model1"} <= first.keys() and "model" not in first
    assert first["args"].num_layers_per_virtual_pipeline_stage == layers // 4
    assert first["args"].pipeline_model_parallel_size == 2
    _, _, tensors = iter_mcore_as_hf(tmp_path)
    got = dict(tensors)
    assert got.keys() == weights.keys() and all(torch.equal(got[n], weights[n]) for n in got)


def test_per_token_loss_and_context_parallel_one_are_accepted(data: str) -> None:
    plain = parse_train_args(tiny_flags(data))
    flagged = parse_train_args(tiny_flags(data, calculate_per_token_loss=True, context_parallel_size=1,
                                          context_parallel_algo="megatron_cp_algo"))
    assert flagged.ignored == ["--calculate-per-token-loss"] and plain.ignored == []
    _, out = _quiet_run(tiny_flags(data, train_iters=1, lr_warmup_iters=0))
    assert "Megatron without it averages each micro batch's token mean" in out
