"""FP8 training (`--fp8-format` / `--fp8-recipe`, torchao float8 emulated on CPU): which linears convert, the flags
and their refusals, a short run's loss against bf16, and FSDP2 (float8 all-gather) with checkpoints that keep
plain fp32 weights."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from qwen3_pretrain.checkpoint.native import read_dcp_metadata
from qwen3_pretrain.config import ConfigError, get_preset, parse_train_args
from qwen3_pretrain.distributed.float8 import fp8_emulated
from qwen3_pretrain.distributed.mesh import ParallelEnv
from qwen3_pretrain.distributed.parallelize import parallelize_model
from qwen3_pretrain.model.qwen3 import Qwen3ForCausalLM
from qwen3_pretrain.train.preflight import prepare
from qwen3_pretrain.train.trainer import run_training

from distributed_helpers import free_port, join_gloo_group, leave_gloo_group
from train_helpers import tiny_flags, write_tiny_dataset

float8 = pytest.importorskip("torchao.float8.float8_linear")
pytestmark = pytest.mark.usefixtures("one_thread")

# Largest relative loss difference fp8 vs bf16 per iteration of the 10-iteration tiny run below. Measured on CPU
# (emulation; 20 iterations, every format x recipe): at most 0.12% (loss 6.27 -> 5.37). 1% is 8x that and still
# far below what 10 iterations of learning move the loss (about 7%), so a run whose FP8 path stops learning fails.
LOSS_RTOL = 1e-2
ITERS = 10
BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny_text_document")


def _converted(preset: str, fp8: tuple[str, str]) -> Qwen3ForCausalLM:
    with torch.device("meta"):
        model = Qwen3ForCausalLM(get_preset(preset))
    env = ParallelEnv(0, 1, torch.device("cpu"), 1, 1, 1, None, None, owns_process_group=False)
    parallelize_model(model, env, torch.bfloat16, fp8=fp8)
    return model


def _fp8_names(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, float8.Float8Linear)}


def test_only_the_blocks_linears_convert() -> None:
    model = _converted("qwen3-tiny", ("hybrid", "tensorwise"))
    expected = {f"model.layers.{i}.{name}" for i in range(2) for name in BLOCK_LINEARS}
    assert _fp8_names(model) == expected
    assert type(model.lm_head) is not float8.Float8Linear and model.lm_head.weight is model.model.embed_tokens.weight
    config = model.model.layers["0"].mlp.up_proj.config
    assert config.emulate == fp8_emulated(torch.device("cpu")) is True
    assert not config.enable_fsdp_float8_all_gather  # one process: no FSDP


def test_the_moe_router_and_experts_stay() -> None:
    model = _converted("qwen3-moe-tiny", ("e4m3", "tensorwise"))
    names = _fp8_names(model)
    assert {n for n in names if ".mlp." in n} == {"model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
                                                  "model.layers.1.mlp.down_proj"}  # the dense layer's MLP only
    assert not any(n.endswith("mlp.gate") for n in names)
    assert {f"model.layers.{i}.self_attn.q_proj" for i in range(3)} <= names


@pytest.mark.parametrize(
    ("fmt", "recipe", "grad_dtype", "granularity"),
    [
        ("hybrid", "tensorwise", torch.float8_e5m2, "TENSORWISE"),
        ("e4m3", "tensorwise", torch.float8_e4m3fn, "TENSORWISE"),
        ("hybrid", "rowwise", torch.float8_e5m2, "AXISWISE"),
        ("e4m3", "rowwise", torch.float8_e4m3fn, "AXISWISE"),
    ],
)
def test_formats_and_recipes_map_to_torchao_casts(fmt: str, recipe: str, grad_dtype: torch.dtype,
                                                  granularity: str) -> None:
    config = _converted("qwen3-tiny", (fmt, recipe)).model.layers["1"].self_attn.o_proj.config
    casts = (config.cast_config_input, config.cast_config_weight, config.cast_config_grad_output)
    assert [c.target_dtype for c in casts] == [torch.float8_e4m3fn, torch.float8_e4m3fn, grad_dtype]
    assert {c.scaling_granularity.name for c in casts} == {granularity}
    assert config.round_scales_to_power_of_2 == (recipe == "rowwise")


def test_flags_parse_with_tensorwise_by_default(data: str) -> None:
    assert parse_train_args(tiny_flags(data, bf16=True)).precision.fp8 is None
    assert parse_train_args(tiny_flags(data, bf16=True, fp8_format="hybrid")).precision.fp8 == ("hybrid", "tensorwise")
    config = parse_train_args(tiny_flags(data, bf16=True, fp8_format="e4m3", fp8_recipe="rowwise"))
    assert config.precision.fp8 == ("e4m3", "rowwise")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"fp8_format": "hybrid"}, r"--fp8-format needs --bf16 \(this run is fp32\)"),
        ({"fp8_format": "hybrid", "fp16": True}, r"--fp8-format needs --bf16 \(this run is fp16\)"),
        ({"fp8_format": "e5m2", "bf16": True}, r"--fp8-format 'e5m2': use one of e4m3, hybrid"),
        ({"fp8_format": "e4m3", "fp8_recipe": "delayed", "bf16": True}, r"delayed scaling .* is not implemented"),
        ({"fp8_format": "e4m3", "fp8_recipe": "mxfp8", "bf16": True}, r"MXFP8 .* is not implemented"),
        ({"fp8_format": "e4m3", "fp8_recipe": "blockwise", "bf16": True}, r"blockwise scaling .* not implemented"),
        ({"fp8_format": "e4m3", "fp8_recipe": "rowwyse", "bf16": True}, r"'rowwyse': use one of tensorwise, rowwise"),
        ({"fp8_recipe": "rowwise", "bf16": True}, r"--fp8-recipe rowwise needs --fp8-format"),
    ],
)
def test_unsupported_fp8_settings_are_refused(data: str, flags: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_train_args(tiny_flags(data, **flags))


def test_tensor_parallel_with_fp8_is_refused(data: str) -> None:
    flags = tiny_flags(data, bf16=True, fp8_format="hybrid", tensor_model_parallel_size=2)
    with pytest.raises(ConfigError, match=r"--fp8-format with --tensor-model-parallel-size > 1 is not implemented"):
        parse_train_args(flags, world_size=2)


def test_missing_torchao_says_how_to_install(data: str, monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "torchao" else find_spec(name, *args))
    with pytest.raises(ConfigError, match=r"--fp8-format needs torchao .* pip install torchao"):
        prepare(tiny_flags(data, bf16=True, fp8_format="hybrid"))


def _assert_near_bf16(losses: list[float], bf16: list[float], what: str) -> None:
    assert len(losses) == len(bf16) == ITERS
    assert losses != bf16, f"{what}: bit-identical to bf16, so no FP8 cast ran"
    for i, (a, b) in enumerate(zip(losses, bf16, strict=True)):
        assert abs(a - b) <= LOSS_RTOL * b, f"{what}, iteration {i + 1}: {a} vs bf16 {b}"


@pytest.fixture(scope="module")
def bf16_losses(data: str) -> list[float]:
    return run_training(parse_train_args(tiny_flags(data, bf16=True, train_iters=ITERS))).losses


@pytest.mark.parametrize(("fmt", "recipe"), [("hybrid", "tensorwise"), ("e4m3", "rowwise")])
def test_a_short_fp8_run_stays_near_bf16(data: str, bf16_losses: list[float], fmt: str, recipe: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    flags = tiny_flags(data, bf16=True, train_iters=ITERS, fp8_format=fmt, fp8_recipe=recipe)
    _assert_near_bf16(run_training(parse_train_args(flags)).losses, bf16_losses, f"{fmt} {recipe}")
    summary = f"bf16 + FP8 block linears ({fmt}, {recipe}, emulated: this device has no FP8 matmuls)"
    assert summary in capsys.readouterr().out


def _two_rank_worker(rank: int, port: int, data: str, out: str) -> None:
    """Two ranks: FSDP2 with float8 all-gather (train and save, then resume the saved checkpoint with FP8), and
    pipeline and context parallel runs with FP8."""
    join_gloo_group(rank, 2, port)
    save = Path(out).parent / "ckpt"
    fp8 = {"bf16": True, "train_iters": ITERS, "fp8_format": "hybrid"}
    losses = {
        "trained": run_training(parse_train_args(tiny_flags(data, **fp8, save=save, save_interval=ITERS // 2),
                                                 world_size=2)).losses,
        "resumed": run_training(parse_train_args(tiny_flags(data, **fp8, load=save / "iter_0000005"),
                                                 world_size=2)).losses,
        "pipeline 2": run_training(parse_train_args(tiny_flags(data, **fp8, pipeline_model_parallel_size=2),
                                                    world_size=2)).losses,
        "context parallel 2": run_training(parse_train_args(tiny_flags(data, **fp8, context_parallel_size=2),
                                                            world_size=2)).losses,
    }
    if rank == 1:  # the last rank: a pipeline's loss lives there
        Path(out).write_text(json.dumps(losses))
    leave_gloo_group()


def test_two_ranks_fsdp_float8_all_gather_saves_fp32_and_resumes_pipeline_and_cp_train(
        data: str, bf16_losses: list[float], tmp_path: Path) -> None:
    out = tmp_path / "losses.json"
    mp.spawn(_two_rank_worker, args=(free_port(), data, str(out)), nprocs=2, join=True)
    losses = json.loads(out.read_text())
    _assert_near_bf16(losses["trained"], bf16_losses, "FSDP2 x 2, float8 all-gather")
    _assert_near_bf16(losses["pipeline 2"], bf16_losses, "pipeline parallel 2")
    _assert_near_bf16(losses["context parallel 2"], bf16_losses, "context parallel 2")
    assert losses["resumed"] == pytest.approx(losses["trained"][ITERS // 2:], rel=1e-6)
    metadata = read_dcp_metadata(tmp_path / "ckpt" / "iter_0000005")  # its allowlist refuses foreign classes
    model = {k: v for k, v in metadata.state_dict_metadata.items() if k.startswith("model.")}
    assert {f"model.model.layers.{i}.{name}.weight" for i in range(2) for name in BLOCK_LINEARS} <= set(model)
    assert {v.properties.dtype for v in model.values()} == {torch.float32}  # fp32 master weights, as without FP8
    assert not any("scale" in key or "_tensor" in key for key in metadata.state_dict_metadata)
