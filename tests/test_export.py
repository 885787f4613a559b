"""`qwen3-pretrain export`: native checkpoint -> HF directory that transformers loads with our logits."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from qwen3_pretrain.checkpoint.export import export_native_to_hf, load_native_model_state
from qwen3_pretrain.checkpoint.hf import load_pretrained
from qwen3_pretrain.checkpoint.native import CheckpointError, save_checkpoint
from qwen3_pretrain.cli import main as cli_main
from qwen3_pretrain.config.model import Qwen3Config, get_preset
from qwen3_pretrain.model.qwen3 import Qwen3ForCausalLM

from checkpoint_helpers import fake_tokenizer_dir, trained_native_checkpoint

transformers.logging.set_verbosity_error()
logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.mark.parametrize("tied", [True, False])
def test_export_loads_in_transformers_with_our_logits(tmp_path: Path, tied: bool) -> None:
    tokenizer = fake_tokenizer_dir(tmp_path)
    model, save_dir = trained_native_checkpoint(tmp_path, tied, tokenizer)
    out = export_native_to_hf(save_dir, tmp_path / "hf", dtype=torch.float32)

    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"
    ]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (tokenizer / name).read_bytes()
    with safe_open(out / "model.safetensors", framework="pt") as handle:
        assert ("lm_head.weight" in handle.keys()) is not tied  # noqa: SIM118  (safe_open has no __contains__)
    reference = transformers.Qwen3ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.allclose(reference(input_ids=ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_default_dtype_is_the_config_dtype_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tokenizer = fake_tokenizer_dir(tmp_path)
    model, save_dir = trained_native_checkpoint(tmp_path, tied=True)
    out = tmp_path / "hf"
    args = ["export", "--load", str(save_dir), "--save-dir", str(out), "--tokenizer-dir", str(tokenizer)]
    assert cli_main(args) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    exported = load_pretrained(out)
    for name, tensor in exported.state_dict().items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, model.state_dict()[name].bfloat16()), name

    assert cli_main(args) == 1
    assert "exists and is not empty; choose a new directory or pass --overwrite" in capsys.readouterr().err
    assert cli_main([*args, "--overwrite", "--dtype", "float32"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_load_native_model_state(tmp_path: Path) -> None:
    model, save_dir = trained_native_checkpoint(tmp_path, tied=True)
    config, state = load_native_model_state(save_dir)
    assert config == model.config
    assert state.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor), name


def test_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(get_preset("qwen3-tiny"))
    save_checkpoint(tmp_path / "no_model", 1, model, None, None, {}, {"train": {}})
    with pytest.raises(CheckpointError, match="has no 'model' section with Qwen3Config fields"):
        export_native_to_hf(tmp_path / "no_model", tmp_path / "out", tokenizer_dir=fake_tokenizer_dir(tmp_path))

    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() + 1)  # config still says tied
    save_checkpoint(tmp_path / "untied", 1, model, None, None, {}, {"model": dataclasses.asdict(model.config)})
    with pytest.raises(CheckpointError, match=r"ties word embeddings but lm_head.weight differs"):
        export_native_to_hf(tmp_path / "untied", tmp_path / "out")

    wrong = {"model": dataclasses.asdict(Qwen3Config(**{**dataclasses.asdict(model.config), "hidden_size": 32}))}
    save_checkpoint(tmp_path / "wrong", 1, Qwen3ForCausalLM(get_preset("qwen3-tiny")), None, None, {}, wrong)
    with pytest.raises(CheckpointError, match="does not match the Qwen3 model of its saved config"):
        export_native_to_hf(tmp_path / "wrong", tmp_path / "out")
    assert "the export has no tokenizer files (pass --tokenizer-dir)" in capsys.readouterr().err

    with pytest.raises(CheckpointError, match="holds none of the tokenizer files"):
        export_native_to_hf(tmp_path / "wrong", tmp_path / "out", tokenizer_dir=tmp_path)
    assert cli_main(["export", "--load", str(tmp_path / "missing"), "--save-dir", str(tmp_path / "out")]) == 1
    assert "does not exist; check --load" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
