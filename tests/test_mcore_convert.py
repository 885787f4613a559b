"""HF <-> mcore conversion: bit-identical round trips over TP/PP layouts, the exact layout on disk,
packing known answers, virtual-pipeline and legacy files, the CLI flags, and bad input."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest
import torch

from qwen3_pretrain.checkpoint import convert as convert_module
from qwen3_pretrain.checkpoint import mcore_format
from qwen3_pretrain.checkpoint.hf import load_hf_state_dict, save_hf_state_dict
from qwen3_pretrain.checkpoint.mcore import (
    MODEL_FILE,
    TRACKER_FILE,
    McoreCheckpointError,
    McoreLayout,
    is_mcore_checkpoint,
    iter_mcore_as_hf,
    load_pt,
    write_mcore_checkpoint,
)
from qwen3_pretrain.config.model import ConfigError, Qwen3Config

from checkpoint_helpers import assert_fails_cleanly, assert_identical, convert, hf_names_and_shapes

ITER = "iter_0000001"


def tiny_config(tied: bool = True, vocab: int = 90) -> Qwen3Config:
    """4 layers, GQA (2 q heads per group), head_dim 8 != hidden / heads = 4; vocab 90 is padded at TP 4."""
    return Qwen3Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, head_dim=8, max_position_embeddings=128, rope_theta=5e5, rms_norm_eps=1e-5,
        tie_word_embeddings=tied, torch_dtype="float32",
    )


def random_hf_state(config: Qwen3Config, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) for name, shape in hf_names_and_shapes(config).items()}


def write_hf(directory: Path, config: Qwen3Config, seed: int = 0) -> dict[str, torch.Tensor]:
    state = random_hf_state(config, seed)
    save_hf_state_dict(state, directory, config=config)
    (directory / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    return state


def hf_to_mg(src: Path, dst: Path, tp: int = 1, pp: int = 1, *extra: str) -> None:
    assert convert("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", src, "--save-dir", dst,
                   "--target-tensor-parallel-size", tp, "--target-pipeline-parallel-size", pp, *extra) == 0


def mg_to_hf(src: Path, dst: Path, *extra: str) -> None:
    assert convert(
        "--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", src, "--save-dir", dst, *extra
    ) == 0


def resave(file: Path, obj: dict, **kwargs) -> None:
    """torch.save over a file that `load_pt` memory-mapped: write a new inode, never truncate the mapped one."""
    torch.save(obj, file.with_suffix(".new"), **kwargs)
    file.with_suffix(".new").replace(file)


def expected_stage_keys(stage_layers: list[int], stage: int, tied: bool) -> list[str]:
    layer = [
        "input_layernorm.weight", "self_attention.linear_qkv.weight", "self_attention.q_layernorm.weight",
        "self_attention.k_layernorm.weight", "self_attention.linear_proj.weight", "pre_mlp_layernorm.weight",
        "mlp.linear_fc1.weight", "mlp.linear_fc2.weight",
    ]
    keys = ["embedding.word_embeddings.weight"] if stage == 0 else []
    keys += [f"decoder.layers.{i}.{s}" for i in range(stage_layers[stage]) for s in layer]
    if stage == len(stage_layers) - 1:
        keys.append("decoder.final_layernorm.weight")
        if not tied or len(stage_layers) > 1:
            keys.append("output_layer.weight")
    return keys


def check_layout_on_disk(root: Path, config: Qwen3Config, tp: int, stage_layers: list[int]) -> None:
    """Directory names, tracker, .pt entries, args, key names and TP-local shapes Megatron expects."""
    pp = len(stage_layers)
    assert (root / TRACKER_FILE).read_text() == "1"
    names = {f"mp_rank_{t:02d}" if pp == 1 else f"mp_rank_{t:02d}_{p:03d}" for t in range(tp) for p in range(pp)}
    assert {p.name for p in (root / ITER).iterdir()} == names
    c = config
    vocab = -(-c.vocab_size // tp) * tp
    shapes = {
        "embedding.word_embeddings.weight": (vocab // tp, c.hidden_size),
        "output_layer.weight": (vocab // tp, c.hidden_size),
        "self_attention.linear_qkv.weight": (
            (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim // tp, c.hidden_size
        ),
        "self_attention.linear_proj.weight": (c.hidden_size, c.num_attention_heads * c.head_dim // tp),
        "mlp.linear_fc1.weight": (2 * c.intermediate_size // tp, c.hidden_size),
        "mlp.linear_fc2.weight": (c.hidden_size, c.intermediate_size // tp),
        "q_layernorm.weight": (c.head_dim,), "k_layernorm.weight": (c.head_dim,), "layernorm.weight": (c.hidden_size,),
    }
    for t in range(tp):
        for p in range(pp):
            file = root / ITER / (f"mp_rank_{t:02d}" if pp == 1 else f"mp_rank_{t:02d}_{p:03d}") / MODEL_FILE
            # Megatron allowlists argparse.Namespace itself; nothing else may be needed
            with torch.serialization.safe_globals([argparse.Namespace]):
                saved = torch.load(file, weights_only=True)
            assert set(saved) == {"args", "checkpoint_version", "iteration", "model"}
            assert saved["checkpoint_version"] == 3.0 and saved["iteration"] == 1
            args = saved["args"]
            assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (tp, pp)
            assert (args.num_layers, args.hidden_size, args.ffn_hidden_size) == (
                c.num_hidden_layers, c.hidden_size, c.intermediate_size
            )
            assert (args.num_attention_heads, args.num_query_groups, args.kv_channels) == (
                c.num_attention_heads, c.num_key_value_heads, c.head_dim
            )
            assert args.group_query_attention and args.qk_layernorm and args.swiglu and not args.add_bias_linear
            assert args.padded_vocab_size == vocab
            assert args.untie_embeddings_and_output_weights == (not c.tie_word_embeddings)
            assert (args.rotary_base, args.norm_epsilon) == (c.rope_theta, c.rms_norm_eps)
            assert (args.position_embedding_type, args.normalization) == ("rope", "RMSNorm")
            assert list(saved["model"]) == expected_stage_keys(stage_layers, p, c.tie_word_embeddings)
            for key, tensor in saved["model"].items():
                shape = next(s for suffix, s in shapes.items() if key.endswith(suffix))
                assert tuple(tensor.shape) == shape, key


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("stage_layers", [[4], [2, 2], [1, 3]], ids=["pp1", "pp2", "pp2-uneven"])
def test_hf_mg_hf_is_bit_identical(tmp_path, tied, tp, stage_layers) -> None:
    config = tiny_config(tied)
    original = write_hf(tmp_path / "hf", config)
    extra = ["--num-layer-list", ",".join(map(str, stage_layers))] if stage_layers == [1, 3] else []
    hf_to_mg(tmp_path / "hf", tmp_path / "mg", tp, len(stage_layers), *extra)
    check_layout_on_disk(tmp_path / "mg", config, tp, stage_layers)
    mg_to_hf(tmp_path / "mg", tmp_path / "back")
    assert_identical(load_hf_state_dict(tmp_path / "back"), original)
    assert Qwen3Config.from_pretrained(tmp_path / "back") == config
    assert (tmp_path / "back" / "tokenizer.json").read_text() == '{"fake": "tokenizer"}'


def test_hf_to_mg_writes_each_stage_before_reading_the_next(tmp_path, monkeypatch) -> None:
    """HF files hold layers in name order (0, 1, 10, 11, 2, ...); the converter reads them stage by stage,
    so it holds at most one stage's shards: stage 0's files exist before any stage-1 tensor is read."""
    config = dataclasses.replace(tiny_config(tied=False), num_hidden_layers=12)
    write_hf(tmp_path / "hf", config)
    files_when_read: dict[str, int] = {}
    read = convert_module.iter_hf_tensors

    def recording(*args, **kwargs):
        for name, tensor in read(*args, **kwargs):
            files_when_read[name] = len(list(tmp_path.glob(f".mg.incomplete-*/{ITER}/*/{MODEL_FILE}")))
            yield name, tensor

    monkeypatch.setattr(convert_module, "iter_hf_tensors", recording)
    hf_to_mg(tmp_path / "hf", tmp_path / "mg", tp=2, pp=2)
    stage1 = {n for n in files_when_read if re.match(r"model\.layers\.([6-9]|1[01])\.|model\.norm\.|lm_head\.", n)}
    assert len(stage1) == 6 * 11 + 2 and {files_when_read[n] for n in stage1} == {2}
    assert {files_when_read[n] for n in set(files_when_read) - stage1} == {0}


def test_packing_known_answer_tp2() -> None:
    """Rank r of linear_qkv holds its query groups, each [its q heads | k head | v head]; fc1 [gate_r | up_r]."""
    c = tiny_config()
    d, h, qpg = c.head_dim, c.hidden_size, c.num_attention_heads // c.num_key_value_heads
    q = torch.arange(c.num_attention_heads * d, dtype=torch.float32)[:, None].expand(-1, h)  # row id = head * d + i
    k, v = 1000 + q[: c.num_key_value_heads * d], 2000 + q[: c.num_key_value_heads * d]
    spec = next(s for s in mcore_format.PARAMS if s.mcore == "self_attention.linear_qkv.weight")
    shards = mcore_format.split_param(spec, [q, k, v], c, tp=2)
    for rank, shard in enumerate(shards):
        rows = []
        for g in range(rank * 2, rank * 2 + 2):  # 4 groups, 2 per rank
            rows += [head * d + i for head in range(g * qpg, (g + 1) * qpg) for i in range(d)]
            rows += [1000 + g * d + i for i in range(d)] + [2000 + g * d + i for i in range(d)]
        assert shard[:, 0].tolist() == rows
    gate = torch.arange(c.intermediate_size, dtype=torch.float32)[:, None].expand(-1, h)
    spec = next(s for s in mcore_format.PARAMS if s.mcore == "mlp.linear_fc1.weight")
    shards = mcore_format.split_param(spec, [gate, 100 + gate], c, tp=2)
    half = c.intermediate_size // 2
    assert shards[1][:, 0].tolist() == list(range(half, 2 * half)) + [100 + i for i in range(half, 2 * half)]
    assert all(s.untyped_storage().nbytes() == s.nbytes for s in shards)  # torch.save must not write the full tensor


def test_vocab_padding_repeats_last_row(tmp_path) -> None:
    config = tiny_config(tied=False, vocab=90)
    original = write_hf(tmp_path / "hf", config)
    hf_to_mg(tmp_path / "hf", tmp_path / "mg", tp=4)
    last = load_pt(tmp_path / "mg" / ITER / "mp_rank_03" / MODEL_FILE)["model"]
    assert last["embedding.word_embeddings.weight"].shape[0] == 23  # 92 / 4
    for key, hf_key in (
        ("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
        ("output_layer.weight", "lm_head.weight"),
    ):
        assert torch.equal(last[key][-2:], original[hf_key][-1:].expand(2, -1))
        assert torch.equal(last[key][:-2], original[hf_key][69:])


def test_mg_to_mg_resplit_keeps_weights_and_iteration(tmp_path) -> None:
    config = tiny_config(tied=True)
    original = write_hf(tmp_path / "hf", config)
    hf_to_mg(tmp_path / "hf", tmp_path / "tp2pp2", tp=2, pp=2)
    assert convert("--load-model-type", "mg", "--save-model-type", "mg", "--load-dir", tmp_path / "tp2pp2",
                   "--save-dir", tmp_path / "tp4", "--target-tensor-parallel-size", 4) == 0
    check_layout_on_disk(tmp_path / "tp4", config, 4, [4])
    mg_to_hf(tmp_path / "tp4", tmp_path / "back")
    assert_identical(load_hf_state_dict(tmp_path / "back"), original)


def test_iter_mcore_as_hf_for_the_trainer(tmp_path) -> None:
    config = tiny_config(tied=False)
    original = random_hf_state(config)
    layout = McoreLayout.build(config, tp=2, pp=2, num_layer_list="3,1")
    write_mcore_checkpoint(original.items(), config, tmp_path / "mg", layout, iteration=5)
    assert is_mcore_checkpoint(tmp_path / "mg") and is_mcore_checkpoint(tmp_path / "mg" / "iter_0000005")
    assert not is_mcore_checkpoint(tmp_path) and not is_mcore_checkpoint(tmp_path / "absent")
    got_config, iteration, tensors = iter_mcore_as_hf(tmp_path / "mg")
    assert got_config == config and iteration == 5
    streamed = list(tensors)
    names = [n for n, _ in streamed]
    assert names[0] == "model.embed_tokens.weight" and names[-2:] == ["model.norm.weight", "lm_head.weight"]
    assert_identical(dict(streamed), original)


def test_virtual_pipeline_chunks_are_merged_in_megatron_order(tmp_path) -> None:
    """PP 2 x VPP 2: chunk (v, p) holds layer v * 2 + p, saved as model{v} in mp_rank_00_{p:03d}."""
    config = tiny_config(tied=False)
    original = random_hf_state(config)
    write_mcore_checkpoint(original.items(), config, tmp_path / "flat", McoreLayout.build(config, 1, 1))
    flat = load_pt(tmp_path / "flat" / ITER / "mp_rank_00" / MODEL_FILE)
    for p in range(2):
        saved = {"args": flat["args"], "checkpoint_version": 3.0, "iteration": 1}
        for v in range(2):
            layer = v * 2 + p
            chunk = {k.replace(f"decoder.layers.{layer}.", "decoder.layers.0."): t
                     for k, t in flat["model"].items() if k.startswith(f"decoder.layers.{layer}.")}
            if (v, p) == (0, 0):
                chunk["embedding.word_embeddings.weight"] = flat["model"]["embedding.word_embeddings.weight"]
            if (v, p) == (1, 1):
                chunk["decoder.final_layernorm.weight"] = flat["model"]["decoder.final_layernorm.weight"]
                chunk["output_layer.weight"] = flat["model"]["output_layer.weight"]
            chunk["decoder.layers.0.mlp.linear_fc1._extra_state"] = None
            saved[f"model{v}"] = chunk
        (tmp_path / "vpp" / ITER / f"mp_rank_00_{p:03d}").mkdir(parents=True)
        torch.save(saved, tmp_path / "vpp" / ITER / f"mp_rank_00_{p:03d}" / MODEL_FILE)
    (tmp_path / "vpp" / TRACKER_FILE).write_text("1")
    mg_to_hf(tmp_path / "vpp", tmp_path / "back")
    assert_identical(load_hf_state_dict(tmp_path / "back"), original)


def test_legacy_non_zip_pt_files_load(tmp_path) -> None:
    config = tiny_config()
    original = write_hf(tmp_path / "hf", config)
    hf_to_mg(tmp_path / "hf", tmp_path / "mg")
    file = tmp_path / "mg" / ITER / "mp_rank_00" / MODEL_FILE
    resave(file, load_pt(file), _use_new_zipfile_serialization=False)
    mg_to_hf(tmp_path / "mg", tmp_path / "back")
    assert_identical(load_hf_state_dict(tmp_path / "back"), original)


def test_mindspeed_flags_dtype_and_hf_cfg_dir(tmp_path, capsys) -> None:
    config = tiny_config(tied=True)
    original = write_hf(tmp_path / "hf", config)
    hf_to_mg(tmp_path / "hf", tmp_path / "mg", 2, 2, "--use-mcore-models", "--model-type", "GPT",
             "--params-dtype", "bf16", "--tokenizer-model", tmp_path / "hf" / "tokenizer.json",
             "--spec", "mindspeed_llm.tasks.models.spec.qwen3_spec", "layer_spec", "--model-type-hf", "qwen3")
    assert "ignored" in capsys.readouterr().err
    args = load_pt(tmp_path / "mg" / ITER / "mp_rank_00_000" / MODEL_FILE)["args"]
    assert args.params_dtype == torch.bfloat16 and args.bf16 and not args.fp16
    assert {p.name for p in (tmp_path / "mg" / "hf_config").iterdir()} == {"config.json", "tokenizer.json"}
    other = tmp_path / "other-cfg"
    other.mkdir()
    dataclasses.replace(config, max_position_embeddings=4096).save_pretrained(other)
    (other / "vocab.json").write_text("{}")
    mg_to_hf(tmp_path / "mg", tmp_path / "back", "--hf-cfg-dir", other)
    back = load_hf_state_dict(tmp_path / "back")
    assert_identical(back, {k: v.to(torch.bfloat16) for k, v in original.items()})
    restored = Qwen3Config.from_pretrained(tmp_path / "back")
    assert restored.max_position_embeddings == 4096 and restored.torch_dtype == "bfloat16"
    assert (tmp_path / "back" / "vocab.json").is_file() and not (tmp_path / "back" / "tokenizer.json").exists()


# ---- bad input: a clear error, exit status 2 and no output (not even a temporary directory) -----------


def test_error_wrong_directory(tmp_path, capsys) -> None:
    config = tiny_config()
    write_hf(tmp_path / "hf", config)
    mg = ["--load-model-type", "mg", "--save-model-type", "hf", "--save-dir", tmp_path / "out", "--load-dir"]
    assert_fails_cleanly(capsys, tmp_path, [*mg, tmp_path / "absent"], str(tmp_path / "absent"), "does not exist")
    assert_fails_cleanly(capsys, tmp_path, [*mg, tmp_path / "hf"], "is not an mcore checkpoint", TRACKER_FILE)
    hf_to_mg(tmp_path / "hf", tmp_path / "mg")
    hf = ["--load-model-type", "hf", "--save-model-type", "mg", "--save-dir", tmp_path / "out", "--load-dir"]
    assert_fails_cleanly(capsys, tmp_path, [*hf, tmp_path / "mg"], str(tmp_path / "mg" / "config.json"), "not found")


def test_error_missing_rank(tmp_path, capsys) -> None:
    write_hf(tmp_path / "hf", tiny_config())
    hf_to_mg(tmp_path / "hf", tmp_path / "mg", tp=2)
    for file in (tmp_path / "mg" / ITER / "mp_rank_01").iterdir():
        file.unlink()
    (tmp_path / "mg" / ITER / "mp_rank_01").rmdir()
    argv = ["--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", tmp_path / "mg",
            "--save-dir", tmp_path / "out"]
    missing = str(tmp_path / "mg" / ITER / "mp_rank_01" / MODEL_FILE)
    assert_fails_cleanly(capsys, tmp_path, argv, missing, "is missing", "TP=2")


def test_error_tp_not_dividing_kv_heads(tmp_path, capsys) -> None:
    write_hf(tmp_path / "hf", tiny_config())
    argv = ["--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", tmp_path / "hf", "--save-dir",
            tmp_path / "out", "--target-tensor-parallel-size", 8]
    assert_fails_cleanly(capsys, tmp_path, argv, "--target-tensor-parallel-size 8", "num_key_value_heads (4)")
    argv[-2:] = ["--target-pipeline-parallel-size", 2, "--num-layer-list", "1,2"]
    assert_fails_cleanly(capsys, tmp_path, argv, "--num-layer-list '1,2'", "sum to the model's 4 layers")


class NotAllowed:
    """A class a checkpoint could smuggle in; loading it would run its module's code."""


def test_error_class_outside_allowlist(tmp_path, capsys) -> None:
    write_hf(tmp_path / "hf", tiny_config())
    hf_to_mg(tmp_path / "hf", tmp_path / "mg")
    file = tmp_path / "mg" / ITER / "mp_rank_00" / MODEL_FILE
    saved = load_pt(file)
    saved["args"].hook = NotAllowed()
    resave(file, saved)
    argv = ["--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", tmp_path / "mg",
            "--save-dir", tmp_path / "out"]
    assert_fails_cleanly(capsys, tmp_path, argv, str(file), f"{__name__}.NotAllowed", "Re-save the file without")
    with pytest.raises(McoreCheckpointError, match="NotAllowed"):
        load_pt(file)


def test_error_midway_leaves_no_partial_output(tmp_path, capsys) -> None:
    """The last stage's file is corrupt: the first stage was already streamed, yet nothing is left behind."""
    write_hf(tmp_path / "hf", tiny_config())
    hf_to_mg(tmp_path / "hf", tmp_path / "mg", pp=2)
    last = tmp_path / "mg" / ITER / "mp_rank_00_001" / MODEL_FILE
    last.write_bytes(last.read_bytes()[:200])
    argv = ["--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", tmp_path / "mg",
            "--save-dir", tmp_path / "out"]
    assert_fails_cleanly(capsys, tmp_path, argv, str(last), "cannot be read")


def test_error_weights_do_not_match_config(tmp_path, capsys) -> None:
    config = tiny_config()
    write_hf(tmp_path / "hf", config)
    dataclasses.replace(config, intermediate_size=48).save_pretrained(tmp_path / "hf")
    argv = ["--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", tmp_path / "hf",
            "--save-dir", tmp_path / "out"]
    assert_fails_cleanly(capsys, tmp_path, argv, "model.layers.0.mlp.gate_proj.weight", "(64, 32)", "(48, 32)")


def test_error_existing_output_is_never_overwritten(tmp_path, capsys) -> None:
    write_hf(tmp_path / "hf", tiny_config())
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    argv = ["--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", tmp_path / "hf",
            "--save-dir", tmp_path / "out"]
    assert_fails_cleanly(capsys, tmp_path, argv, f"--save-dir {tmp_path / 'out'} already exists and is not empty")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_layout_validation_errors_name_the_flag() -> None:
    config = tiny_config()
    with pytest.raises(ConfigError, match="--target-pipeline-parallel-size 3 does not divide the 4 layers"):
        McoreLayout.build(config, 1, 3)
    with pytest.raises(ConfigError, match="comma-separated integers"):
        McoreLayout.build(config, 1, 2, "2;2")
