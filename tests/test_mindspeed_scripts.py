"""MindSpeed-LLM users' scripts run with only the program name changed: our own copies of the structure and flag
sets of its Qwen3 data, conversion and (every dense size's and the 30B-A3B MoE one's) pretraining scripts, shrunk,
run end to end."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen3_pretrain.checkpoint.hf import iter_hf_tensors, save_pretrained
from qwen3_pretrain.checkpoint.mcore import MODEL_FILE, iter_mcore_as_hf, load_pt
from qwen3_pretrain.config import Qwen3MoeConfig, get_preset
from qwen3_pretrain.data.indexed import IndexedDataset
from qwen3_pretrain.demo_corpus import write_corpus_parquet
from qwen3_pretrain.model import Qwen3ForCausalLM

from distributed_helpers import free_port

SCRIPTS = Path(__file__).resolve().parent / "mindspeed_scripts"
MOE_PRETRAIN = SCRIPTS / "pretrain_qwen3_30b_a3b_4K_ptd.sh"
PRETRAIN = sorted(set(SCRIPTS.glob("pretrain_qwen3_*_4K_ptd*.sh")) - {MOE_PRETRAIN})
PROGRAM = str(Path(sys.executable).with_name("qwen3-pretrain"))
LINE = re.compile(r"iteration +(\d+)/ +3 \| consumed samples: +\d+ .* lm loss: (\S+) \|")
# The scripts' shrunk model: 4 layers x 64 hidden, GQA 4/2 heads of 16, the real Qwen3 vocabulary.
SHAPE = {"num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 151936, "max_position_embeddings": 32768}


def _run(script: Path, env: dict[str, str], timeout: int = 600) -> str:
    done = subprocess.run(["bash", str(script)], env={**os.environ, "OMP_NUM_THREADS": "1",
                                                      "QWEN3_PRETRAIN_DEVICE": "cpu", "QWEN3_PRETRAIN": PROGRAM, **env},
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{script.name} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, qwen3_tokenizer_dir: Path) -> dict[str, Path]:
    """The seed user's steps: preprocess an Alpaca-style parquet, HF weights (tied and untied) of the scripts'
    shape, converted to mcore and back."""
    root = tmp_path_factory.mktemp("mindspeed")
    write_corpus_parquet(root / "train.parquet", 60)
    out = _run(SCRIPTS / "data_convert_qwen3_pretrain.sh", {
        "INPUT_PARQUET": str(root / "train.parquet"), "TOKENIZER_PATH": str(qwen3_tokenizer_dir),
        "DATASET_DIR": str(root / "dataset"),
    })
    assert "enwiki_text_document" in out and len(IndexedDataset(str(root / "dataset" / "enwiki_text_document"))) == 60
    paths = {"data": root / "dataset" / "enwiki_text_document", "tokenizer": qwen3_tokenizer_dir}
    for tied in (True, False):
        config = dataclasses.replace(get_preset("qwen3-tiny"), **SHAPE, tie_word_embeddings=tied)
        torch.manual_seed(0)
        hf = root / f"hf_{'tied' if tied else 'untied'}"
        save_pretrained(Qwen3ForCausalLM(config), hf, dtype=torch.bfloat16)
        shutil.copy(qwen3_tokenizer_dir / "tokenizer.json", hf)
        paths[f"hf_{tied}"] = hf
    mcore, back = root / "mcore", root / "hf_back"
    env = {"HF_DIR": str(paths["hf_False"]), "MCORE_DIR": str(mcore), "HF_OUT_DIR": str(back)}
    _run(SCRIPTS / "ckpt_convert_qwen3_hf2mcore.sh", env)
    assert (mcore / "iter_0000001" / "mp_rank_00_001" / "model_optim_rng.pt").is_file()
    _run(SCRIPTS / "ckpt_convert_qwen3_mcore2hf.sh", env)
    original, converted = dict(iter_hf_tensors(paths["hf_False"])), dict(iter_hf_tensors(back))
    assert converted.keys() == original.keys() and all(torch.equal(converted[n], original[n]) for n in original)
    return paths


def test_every_dense_size_has_a_script() -> None:
    sizes = {re.match(r"pretrain_qwen3_(\w+?)_4K", p.name).group(1) for p in PRETRAIN}  # type: ignore[union-attr]
    assert sizes == {"0point6b", "1point7b", "4b", "8b", "14b", "32b"} and len(PRETRAIN) == 9


@pytest.mark.parametrize("script", PRETRAIN, ids=[p.stem for p in PRETRAIN])
def test_mindspeed_pretrain_script_runs_unchanged(script: Path, workspace: dict[str, Path], tmp_path: Path) -> None:
    untied = "--untie-embeddings-and-output-weights" in script.read_text()
    save = tmp_path / "save"
    out = _run(script, {
        "CKPT_LOAD_DIR": str(workspace[f"hf_{not untied}"]), "CKPT_SAVE_DIR": str(save),
        "DATA_PATH": str(workspace["data"]), "TOKENIZER_PATH": str(workspace["tokenizer"]),
        "MASTER_PORT": str(free_port()),
    })
    iterations = [(int(i), float(loss)) for i, loss in LINE.findall(out)]
    assert [i for i, _ in iterations] == [1, 2, 3], out[-3000:]
    assert all(loss == loss and 5.0 < loss < 20.0 for _, loss in iterations)  # finite, near ln(151936) = 11.9
    assert "successfully saved checkpoint from iteration       3" in out
    config, iteration, tensors = iter_mcore_as_hf(save)  # --ckpt-format torch: Megatron's files are there too
    assert iteration == 3 and config.num_hidden_layers == 4 and config.tie_word_embeddings is not untied
    assert all(t.dtype == torch.bfloat16 for _, t in tensors)


def test_mindspeed_moe_pretrain_script_runs_unchanged(workspace: dict[str, Path], tmp_path: Path) -> None:
    """The 30B-A3B script's flags (alltoall_seq dispatcher, --moe-layer-freq -1, --first-k-dense-replace -1,
    --norm-topk-prob, ...) at PP 2 x EP 2 from HF Qwen3-MoE weights of its shape."""
    moe = {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True}
    config = Qwen3MoeConfig(**(SHAPE | moe), tie_word_embeddings=False)
    torch.manual_seed(0)
    save_pretrained(Qwen3ForCausalLM(config), tmp_path / "hf", dtype=torch.bfloat16)
    shutil.copy(workspace["tokenizer"] / "tokenizer.json", tmp_path / "hf")
    out = _run(MOE_PRETRAIN, {
        "CKPT_LOAD_DIR": str(tmp_path / "hf"), "CKPT_SAVE_DIR": str(tmp_path / "save"),
        "DATA_PATH": str(workspace["data"]), "TOKENIZER_PATH": str(workspace["tokenizer"]),
        "MASTER_PORT": str(free_port()),
    })
    assert "TP 1 x PP 2 x DP 2 (EP 2: experts split over 2 of the DP ranks)" in out
    iterations = [(int(i), float(loss)) for i, loss in LINE.findall(out)]
    assert [i for i, _ in iterations] == [1, 2, 3], out[-3000:]
    assert all(loss == loss and 5.0 < loss < 20.0 for _, loss in iterations)
    balancing = [float(v) for v in re.findall(r"\| load_balancing_loss: (\S+) \| loss scale", out)]
    assert len(balancing) == 3 and all(0.9 < v < 2.0 for v in balancing)  # E sum f P: 1 when balanced, at most k
    assert "successfully saved checkpoint from iteration       3" in out
    saved, iteration, _ = iter_mcore_as_hf(tmp_path / "save")
    assert isinstance(saved, Qwen3MoeConfig) and iteration == 3 and saved.num_experts == 8
    # Megatron's files of this run's layout: PP 2 x EP 2 rank directories, experts grouped (--moe-grouped-gemm)
    iteration_dir = tmp_path / "save" / "iter_0000003"
    assert sorted(d.name for d in iteration_dir.glob("mp_rank_*")) == [
        "mp_rank_00_000_000", "mp_rank_00_000_001", "mp_rank_00_001_000", "mp_rank_00_001_001"]
    keys = load_pt(iteration_dir / "mp_rank_00_000_001" / MODEL_FILE)["model"].keys()
    assert "decoder.layers.0.mlp.experts.weight1" in keys and not any("local_experts" in k for k in keys)
