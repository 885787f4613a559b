"""`qwen3-pretrain convert --load-model-type native`: a train checkpoint -> HF or mcore, bit-identical, and bad
input."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from qwen3_pretrain.checkpoint.hf import load_hf_state_dict, load_pretrained, save_hf_state_dict
from qwen3_pretrain.checkpoint.mcore import HF_CONFIG_SUBDIR, MODEL_FILE, load_pt
from qwen3_pretrain.checkpoint.native import LATEST_FILE, save_checkpoint
from qwen3_pretrain.config.model import Qwen3Config, get_preset
from qwen3_pretrain.model.qwen3 import Qwen3ForCausalLM

from checkpoint_helpers import (
    assert_fails_cleanly,
    assert_identical,
    convert,
    fake_tokenizer_dir,
    trained_native_checkpoint,
)

transformers.logging.set_verbosity_error()
logging.getLogger("transformers").setLevel(logging.ERROR)

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json"]  # those fake_tokenizer_dir has


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Qwen3ForCausalLM, Path]:
    """A tiny Qwen3 after one AdamW step, saved natively at iteration 1 with a tokenizer recorded in its run config."""
    root = tmp_path_factory.mktemp("native")
    return trained_native_checkpoint(root, request.param, fake_tokenizer_dir(root))


def native_to(kind: str, src: Path, dst: Path, *extra: str | Path) -> None:
    assert convert(
        "--load-model-type", "native", "--save-model-type", kind, "--load-dir", src, "--save-dir", dst, *extra
    ) == 0


def test_native_to_hf_is_bit_identical_and_loads(trained, tmp_path) -> None:
    model, ckpt = trained
    native_to("hf", ckpt, tmp_path / "hf")
    out = tmp_path / "hf"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", *TOKENIZER_FILES]
    assert_identical(load_hf_state_dict(out), model.hf_state_dict())  # no lm_head.weight when tied
    assert Qwen3Config.from_pretrained(out) == dataclasses.replace(model.config, torch_dtype="float32")
    ours = load_pretrained(out)
    assert_identical(ours.state_dict(), model.state_dict())
    reference = transformers.Qwen3ForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    with torch.no_grad():
        assert torch.allclose(reference(input_ids=ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_native_to_mg_tp2_pp2_to_hf_is_bit_identical(trained, tmp_path) -> None:
    model, ckpt = trained
    native_to("mg", ckpt, tmp_path / "mg", "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2")
    iter_dir = tmp_path / "mg" / "iter_0000001"
    expected_dirs = [f"mp_rank_{t:02d}_{p:03d}" for t in range(2) for p in range(2)]
    assert sorted(p.name for p in iter_dir.iterdir()) == expected_dirs
    args = load_pt(iter_dir / "mp_rank_01_001" / MODEL_FILE)["args"]
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (2, 2)
    assert args.untie_embeddings_and_output_weights is not model.config.tie_word_embeddings
    hf_config = tmp_path / "mg" / HF_CONFIG_SUBDIR
    assert sorted(p.name for p in hf_config.iterdir()) == ["config.json", *TOKENIZER_FILES]

    assert convert("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", tmp_path / "mg",
                   "--save-dir", tmp_path / "back") == 0
    assert_identical(load_hf_state_dict(tmp_path / "back"), model.hf_state_dict())
    assert Qwen3Config.from_pretrained(tmp_path / "back") == dataclasses.replace(model.config, torch_dtype="float32")
    tokenizer_json = ckpt.parent / "tokenizer" / "tokenizer.json"
    assert (tmp_path / "back" / "tokenizer.json").read_bytes() == tokenizer_json.read_bytes()


def test_iteration_dir_params_dtype_and_hf_cfg_dir(trained, tmp_path, capsys) -> None:
    model, ckpt = trained
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    dataclasses.replace(model.config, max_position_embeddings=64).save_pretrained(cfg)  # shapes agree
    (cfg / "vocab.json").write_text("{}")
    native_to("hf", ckpt / "iter_0000001", tmp_path / "hf", "--params-dtype", "bf16", "--hf-cfg-dir", cfg)
    assert "converting: " in capsys.readouterr().err  # progress lines
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors", "vocab.json"]
    expected = {k: v.bfloat16() for k, v in model.hf_state_dict().items()}
    assert_identical(load_hf_state_dict(tmp_path / "hf"), expected)
    written = Qwen3Config.from_pretrained(tmp_path / "hf")
    assert written == dataclasses.replace(model.config, torch_dtype="bfloat16")  # the checkpoint's config wins

    native_to("mg", ckpt, tmp_path / "mg", "--params-dtype", "bf16", "--hf-cfg-dir", cfg)
    assert load_pt(tmp_path / "mg" / "iter_0000001" / "mp_rank_00" / MODEL_FILE)["args"].bf16
    assert sorted(p.name for p in (tmp_path / "mg" / HF_CONFIG_SUBDIR).iterdir()) == ["config.json", "vocab.json"]


# ---- bad input: a clear error naming the path, exit status 2 and nothing left behind ---------------------


def native_argv(src: Path, dst: Path, kind: str = "hf") -> list:
    return ["--load-model-type", "native", "--save-model-type", kind, "--load-dir", src, "--save-dir", dst]


def test_error_not_a_native_checkpoint(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert_fails_cleanly(capsys, tmp_path, native_argv(tmp_path / "absent", out),
                         f"--load-dir {tmp_path / 'absent'} does not exist", "pass the --save directory")
    (tmp_path / "empty").mkdir()
    assert_fails_cleanly(capsys, tmp_path, native_argv(tmp_path / "empty", out),
                         f"{tmp_path / 'empty'} has no {LATEST_FILE}", "pass a --save directory of a finished save")
    config = dataclasses.replace(get_preset("qwen3-tiny"), vocab_size=64)
    save_hf_state_dict({"model.norm.weight": torch.ones(64)}, tmp_path / "hf", config=config)
    assert_fails_cleanly(capsys, tmp_path, native_argv(tmp_path / "hf", out),
                         f"--load-dir {tmp_path / 'hf'} is an hf checkpoint, not a native one", "--load-model-type hf")


def test_error_incomplete_or_foreign_checkpoints(trained, tmp_path, capsys) -> None:
    _, ckpt = trained
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    out = tmp_path / "out"
    (copy / LATEST_FILE).write_text("7\n")
    assert_fails_cleanly(capsys, tmp_path, native_argv(copy, out), f"{copy / 'iter_0000007'} does not exist",
                         "native checkpoints there: ['iter_0000001']")
    (copy / LATEST_FILE).write_text("1\n")
    native_to("mg", copy, tmp_path / "mg")
    assert_fails_cleanly(capsys, tmp_path, native_argv(tmp_path / "mg", out),
                         "is an mcore checkpoint, not a native one", "--load-model-type mg")
    (copy / "iter_0000001" / "config.yaml").write_text("train: {}\n")
    assert_fails_cleanly(
        capsys, tmp_path, native_argv(copy, out, "mg"), "has no 'model' section with Qwen3Config fields"
    )


def test_error_lost_tie_mismatched_cfg_dir_and_busy_output(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(get_preset("qwen3-tiny"))
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() + 1)  # the config still says tied
    save_checkpoint(tmp_path / "untied", 1, model, None, None, {}, {"model": dataclasses.asdict(model.config)})
    out = tmp_path / "out"
    assert_fails_cleanly(capsys, tmp_path, native_argv(tmp_path / "untied", out, "mg"),
                         str(tmp_path / "untied"), "ties word embeddings but lm_head.weight differs")

    cfg = tmp_path / "cfg"
    dataclasses.replace(model.config, hidden_size=32).save_pretrained(cfg)
    assert_fails_cleanly(capsys, tmp_path, [*native_argv(tmp_path / "untied", out), "--hf-cfg-dir", cfg],
                         f"--hf-cfg-dir {cfg / 'config.json'} describes another model", "hidden_size 32 != 64")

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_fails_cleanly(capsys, tmp_path, native_argv(tmp_path / "untied", out), f"--save-dir {out} already exists")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
