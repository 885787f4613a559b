"""Qwen3-MoE <-> mcore: bit-identical round trips over (TP, PP, EP) and both expert layouts, the exact files and
keys Megatron expects (mp_rank_TT[_PPP][_EEE], local expert numbering), the args, the loader entry points
(HF-MoE and mcore-MoE into a model) and native -> hf/mg. megatron-core's own MoE model is in
tests/test_mcore_megatron.py."""

from __future__ import annotations

import contextlib
import dataclasses
import io
from pathlib import Path

import pytest
import torch

from qwen3_pretrain.checkpoint.export import export_native_to_hf
from qwen3_pretrain.checkpoint.hf import load_hf_state_dict, save_hf_state_dict, save_pretrained
from qwen3_pretrain.checkpoint.loader import HFSource, McoreSource, open_checkpoint
from qwen3_pretrain.checkpoint.mcore import (
    HF_CONFIG_SUBDIR,
    MODEL_FILE,
    McoreLayout,
    add_mcore_rank_files,
    iter_mcore_as_hf,
    load_pt,
)
from qwen3_pretrain.checkpoint.native import save_checkpoint
from qwen3_pretrain.config import parse_train_args
from qwen3_pretrain.config.model import ConfigError, Qwen3Config, Qwen3MoeConfig
from qwen3_pretrain.model.qwen3 import Qwen3ForCausalLM
from qwen3_pretrain.train.trainer import run_training

from checkpoint_helpers import assert_fails_cleanly, assert_identical, convert, hf_names_and_shapes

ITER = "iter_0000001"
EXPERTS = 4


def moe_config(tied: bool = False) -> Qwen3MoeConfig:
    """4 layers, layer 1 dense (mlp_only_layers); 4 experts top-2; vocab 90 is padded at TP 4."""
    return Qwen3MoeConfig(
        vocab_size=90, hidden_size=16, intermediate_size=24, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, rope_theta=5e5, tie_word_embeddings=tied,
        torch_dtype="float32", num_experts=EXPERTS, num_experts_per_tok=2, moe_intermediate_size=8,
        norm_topk_prob=True, mlp_only_layers=[1],
    )


def write_hf(directory: Path, config: Qwen3MoeConfig) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    state = {name: torch.randn(shape, generator=gen) for name, shape in hf_names_and_shapes(config).items()}
    save_hf_state_dict(state, directory, config=config)
    return state


def hf_to_mg(src: Path, dst: Path, tp: int = 1, pp: int = 1, ep: int = 1, *extra: str | int) -> None:
    assert convert("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", src, "--save-dir", dst,
                   "--target-tensor-parallel-size", tp, "--target-pipeline-parallel-size", pp,
                   "--target-expert-parallel-size", ep, *extra) == 0


def mg_to_hf(src: Path, dst: Path, *extra: str | Path) -> None:
    assert convert("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", src, "--save-dir", dst,
                   *extra) == 0


def rank_dir(tp: int, pp: int, ep: int, pp_size: int, ep_size: int) -> str:
    """Megatron's get_checkpoint_name: mp_rank_TT, _PPP when PP > 1, _EEE when EP > 1."""
    return f"mp_rank_{tp:02d}" + (f"_{pp:03d}" if pp_size > 1 else "") + (f"_{ep:03d}" if ep_size > 1 else "")


def expected_mlp(c: Qwen3MoeConfig, tp: int, ep: int, grouped: bool, layer: int, local: int) -> dict[str, tuple]:
    """mcore MLP keys of one layer in one (TP, EP) file and their TP-local shapes."""
    h, f, m, local_experts = c.hidden_size, c.intermediate_size, c.moe_intermediate_size, c.num_experts // ep
    p = f"decoder.layers.{local}.mlp."
    if layer in c.mlp_only_layers:
        return {p + "linear_fc1.weight": (2 * f // tp, h), p + "linear_fc2.weight": (h, f // tp)}
    keys = {p + "router.weight": (c.num_experts, h)}
    if grouped:
        return keys | {p + "experts.weight1": (h, local_experts * 2 * m // tp),
                       p + "experts.weight2": (local_experts * m // tp, h)}
    for j in range(local_experts):
        x = f"{p}experts.local_experts.{j}."
        keys |= {x + "linear_fc1.weight": (2 * m // tp, h), x + "linear_fc2.weight": (h, m // tp)}
    return keys


def check_files(root: Path, c: Qwen3MoeConfig, tp: int, stage_layers: list[int], ep: int, grouped: bool) -> None:
    pp = len(stage_layers)
    names = {rank_dir(t, p, e, pp, ep) for t in range(tp) for p in range(pp) for e in range(ep)}
    assert {d.name for d in (root / ITER).iterdir()} == names
    for t, p, e in ((t, p, e) for t in range(tp) for p in range(pp) for e in range(ep)):
        saved = load_pt(root / ITER / rank_dir(t, p, e, pp, ep) / MODEL_FILE)
        args = saved["args"]
        assert (args.num_experts, args.moe_router_topk, args.moe_ffn_hidden_size) == (EXPERTS, 2, 8)
        assert (args.expert_model_parallel_size, args.moe_grouped_gemm) == (ep, grouped)
        assert args.model_type_hf == "qwen3-moe"
        assert args.moe_router_pre_softmax is False and args.moe_layer_freq == [1, 0, 1, 1]
        model = saved["model"]
        first = sum(stage_layers[:p])
        for local, layer in enumerate(range(first, first + stage_layers[p])):
            for key, shape in expected_mlp(c, tp, ep, grouped, layer, local).items():
                assert tuple(model[key].shape) == shape, key
        mlp_keys = {k for k in model if ".mlp." in k}
        assert mlp_keys == {k for local, layer in enumerate(range(first, first + stage_layers[p]))
                            for k in expected_mlp(c, tp, ep, grouped, layer, local)}
        assert ("embedding.word_embeddings.weight" in model) == (p == 0)
        assert ("output_layer.weight" in model) == (p == pp - 1 and (pp > 1 or not c.tie_word_embeddings))


@pytest.mark.parametrize(
    "tp,stage_layers,ep,grouped",
    [(1, [4], 1, False), (2, [4], 2, False), (1, [1, 3], 4, False), (1, [4], 1, True), (2, [2, 2], 2, True),
     (1, [3, 1], 4, True)],
    ids=["tp1", "tp2-ep2", "pp2-ep4", "grouped", "grouped-tp2-pp2-ep2", "grouped-pp2-ep4"],
)
def test_hf_mg_hf_is_bit_identical(tmp_path, tp, stage_layers, ep, grouped) -> None:
    config = moe_config()
    original = write_hf(tmp_path / "hf", config)
    extra = ["--num-layer-list", ",".join(map(str, stage_layers)), *(["--moe-grouped-gemm"] if grouped else [])]
    hf_to_mg(tmp_path / "hf", tmp_path / "mg", tp, len(stage_layers), ep, "--model-type-hf", "qwen3-moe", *extra)
    check_files(tmp_path / "mg", config, tp, stage_layers, ep, grouped)
    mg_to_hf(tmp_path / "mg", tmp_path / "back")
    assert_identical(load_hf_state_dict(tmp_path / "back"), original)
    assert Qwen3Config.from_pretrained(tmp_path / "back") == config


def test_experts_known_answer_tp2_ep2(tmp_path) -> None:
    """EP rank e holds global experts 2e, 2e + 1 as local 0, 1 (megatron-core: local_expert_indices_offset =
    ep_rank * num_local_experts); TP rank t their ffn rows [t F/2, (t+1) F/2): sequential fc1 = cat(gate_t, up_t),
    fc2 = down[:, t]; grouped weight1 viewed [2, H, 2F/2] holds each fc1 transposed, weight2 viewed [2, F/2, H]
    each fc2 transposed (GroupedMLP's views)."""
    config = moe_config()
    original = write_hf(tmp_path / "hf", config)
    hf_to_mg(tmp_path / "hf", tmp_path / "seq", 2, 1, 2)
    hf_to_mg(tmp_path / "hf", tmp_path / "grouped", 2, 1, 2, "--moe-grouped-gemm")
    h, half = config.hidden_size, config.moe_intermediate_size // 2
    for t, e in ((0, 1), (1, 0), (1, 1)):
        seq = load_pt(tmp_path / "seq" / ITER / f"mp_rank_{t:02d}_{e:03d}" / MODEL_FILE)["model"]
        grouped = load_pt(tmp_path / "grouped" / ITER / f"mp_rank_{t:02d}_{e:03d}" / MODEL_FILE)["model"]
        weight1 = grouped["decoder.layers.2.mlp.experts.weight1"].view(2, h, -1)  # [local, H, 2F/TP]
        weight2 = grouped["decoder.layers.2.mlp.experts.weight2"].view(2, -1, h)  # [local, F/TP, H]
        for j in range(2):
            prefix = f"model.layers.2.mlp.experts.{2 * e + j}."  # global expert of local j on EP rank e
            hf = {k: original[f"{prefix}{k}_proj.weight"] for k in ("gate", "up", "down")}
            fc1 = torch.cat([hf["gate"][t * half:(t + 1) * half], hf["up"][t * half:(t + 1) * half]])
            fc2 = hf["down"][:, t * half:(t + 1) * half]
            assert torch.equal(seq[f"decoder.layers.2.mlp.experts.local_experts.{j}.linear_fc1.weight"], fc1)
            assert torch.equal(seq[f"decoder.layers.2.mlp.experts.local_experts.{j}.linear_fc2.weight"], fc2)
            assert torch.equal(weight1[j], fc1.t()) and torch.equal(weight2[j], fc2.t())
        assert torch.equal(seq["decoder.layers.2.mlp.router.weight"], original["model.layers.2.mlp.gate.weight"])


def test_mg_to_mg_changes_expert_layout_and_ep(tmp_path) -> None:
    """grouped EP 4 PP 2 -> sequential EP 2 TP 2 -> HF: identical; the layout is read from the files."""
    config = moe_config(tied=True)
    original = write_hf(tmp_path / "hf", config)
    hf_to_mg(tmp_path / "hf", tmp_path / "a", 1, 2, 4, "--moe-grouped-gemm")
    assert convert("--load-model-type", "mg", "--save-model-type", "mg", "--load-dir", tmp_path / "a",
                   "--save-dir", tmp_path / "b", "--target-tensor-parallel-size", 2,
                   "--target-expert-parallel-size", 2) == 0
    check_files(tmp_path / "b", config, 2, [4], 2, grouped=False)
    mg_to_hf(tmp_path / "b", tmp_path / "back", "--moe-grouped-gemm")  # MindSpeed passes it; the files decide
    assert_identical(load_hf_state_dict(tmp_path / "back"), original)


def test_config_from_megatron_args(tmp_path) -> None:
    """Without hf_config/, the Qwen3MoeConfig comes from the args (MoE fields included) and the weights still
    convert; EP 2 without PP is named mp_rank_TT_EEE, which only the args tell apart from PP."""
    config = dataclasses.replace(moe_config(), norm_topk_prob=False, router_aux_loss_coef=0.01)
    original = write_hf(tmp_path / "hf", config)
    hf_to_mg(tmp_path / "hf", tmp_path / "mg", 1, 1, 2)
    for file in (tmp_path / "mg" / HF_CONFIG_SUBDIR).iterdir():
        file.unlink()
    (tmp_path / "mg" / HF_CONFIG_SUBDIR).rmdir()
    got, _, tensors = iter_mcore_as_hf(tmp_path / "mg")
    assert isinstance(got, Qwen3MoeConfig) and got == config
    assert_identical(dict(tensors), original)


def test_mindspeed_first_k_dense_replace_and_norm_topk_prob_args(tmp_path) -> None:
    """MindSpeed's args: --first-k-dense-replace 2 with moe_layer_freq 1, and its own --norm-topk-prob flag."""
    config = dataclasses.replace(moe_config(), mlp_only_layers=[0, 1])
    write_hf(tmp_path / "hf", config)
    hf_to_mg(tmp_path / "hf", tmp_path / "mg")
    file = tmp_path / "mg" / ITER / "mp_rank_00" / MODEL_FILE
    saved = load_pt(file)
    args = saved["args"]
    args.moe_layer_freq, args.first_k_dense_replace, args.norm_topk_prob = 1, 2, True
    args.moe_router_pre_softmax = True  # MindSpeed's flag wins over the megatron-core one
    torch.save(saved, file.with_suffix(".new"))
    file.with_suffix(".new").replace(file)
    got, _, _ = iter_mcore_as_hf(tmp_path / "mg")
    assert got.mlp_only_layers == [0, 1] and got.norm_topk_prob  # type: ignore[attr-defined]


def test_errors_name_the_flag(tmp_path, capsys) -> None:
    config = moe_config()
    write_hf(tmp_path / "hf", config)
    base = ["--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", tmp_path / "hf",
            "--save-dir", tmp_path / "out"]
    assert_fails_cleanly(capsys, tmp_path, [*base, "--target-expert-parallel-size", 3],
                         "--target-expert-parallel-size 3 does not divide the model's 4 experts")
    assert_fails_cleanly(capsys, tmp_path, [*base, "--model-type-hf", "qwen3"],
                         "--model-type-hf qwen3", "qwen3_moe", "--model-type-hf qwen3-moe")
    assert_fails_cleanly(capsys, tmp_path, [*base, "--target-tensor-parallel-size", 2,
                                            "--expert-tensor-parallel-size", 1], "--expert-tensor-parallel-size 1")
    dense = tmp_path / "dense"
    save_hf_state_dict({}, dense, config=Qwen3Config(vocab_size=90, hidden_size=16, intermediate_size=24,
                                                     num_hidden_layers=1, num_attention_heads=4,
                                                     num_key_value_heads=2, head_dim=8))
    with pytest.raises(ConfigError, match="need a mixture-of-experts model"):
        McoreLayout.build(Qwen3Config.from_pretrained(dense), 1, 1, ep=2)


# ---- the other entry points: open_checkpoint (train --load), native -> hf / mg, the trainer's mcore files ----


def trained_moe_model(config: Qwen3MoeConfig) -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    return Qwen3ForCausalLM(config).eval()


def assert_same_model(model: Qwen3ForCausalLM, reference: Qwen3ForCausalLM) -> None:
    assert_identical(dict(model.state_dict()), dict(reference.state_dict()))


def test_loader_hf_moe(tmp_path) -> None:
    config = moe_config()
    reference = trained_moe_model(config)
    save_pretrained(reference, tmp_path / "hf")
    source = open_checkpoint(tmp_path / "hf")
    assert isinstance(source, HFSource) and source.model_config() == config
    model = Qwen3ForCausalLM(config)
    source.load_into(model)
    assert_same_model(model, reference)


def test_loader_mcore_moe(tmp_path) -> None:
    config = moe_config(tied=True)
    reference = trained_moe_model(config)
    save_pretrained(reference, tmp_path / "hf")
    hf_to_mg(tmp_path / "hf", tmp_path / "mg", 2, 2, 2, "--moe-grouped-gemm")
    source = open_checkpoint(tmp_path / "mg")
    assert isinstance(source, McoreSource)
    got = source.model_config()
    assert isinstance(got, Qwen3MoeConfig) and got == config
    model = Qwen3ForCausalLM(config)
    source.load_into(model)
    assert_same_model(model, reference)


def test_native_moe_to_hf_and_mg(tmp_path, capsys) -> None:
    """convert --load-model-type native and `export` rebuild the Qwen3MoeConfig from the saved run config."""
    config = moe_config()
    model = trained_moe_model(config)
    save_checkpoint(tmp_path / "ckpt", 1, model, None, None, {}, {"model": dataclasses.asdict(config)})
    export_native_to_hf(tmp_path / "ckpt", tmp_path / "exported", dtype=torch.float32)
    assert Qwen3Config.from_pretrained(tmp_path / "exported") == config
    assert_identical(load_hf_state_dict(tmp_path / "exported"), model.hf_state_dict())
    native = ["--load-model-type", "native", "--load-dir", tmp_path / "ckpt"]
    assert convert(*native, "--save-model-type", "hf", "--save-dir", tmp_path / "hf") == 0
    assert Qwen3Config.from_pretrained(tmp_path / "hf") == config
    assert_identical(load_hf_state_dict(tmp_path / "hf"), model.hf_state_dict())
    dense_cfg = tmp_path / "dense-cfg"
    Qwen3Config(**{f.name: getattr(config, f.name) for f in dataclasses.fields(Qwen3Config)}).save_pretrained(dense_cfg)
    assert_fails_cleanly(capsys, tmp_path, [*native, "--save-model-type", "hf", "--save-dir", tmp_path / "x",
                                            "--hf-cfg-dir", dense_cfg], "MODEL_TYPE qwen3 != qwen3_moe")
    assert convert(*native, "--save-model-type", "mg", "--save-dir", tmp_path / "mg",
                   "--target-expert-parallel-size", 2, "--moe-grouped-gemm") == 0
    mg_to_hf(tmp_path / "mg", tmp_path / "back")
    assert_identical(load_hf_state_dict(tmp_path / "back"), model.hf_state_dict())


def test_trainer_mcore_files_from_stacked_parameters(tmp_path) -> None:
    """`add_mcore_rank_files` takes the model's own (stacked-expert) parameter names, as a native save holds."""
    config = moe_config()
    model = trained_moe_model(config)
    (tmp_path / "iter_0000003").mkdir()
    layout = McoreLayout.build(config, 1, 2, ep=2)
    add_mcore_rank_files(tmp_path / "iter_0000003", model.state_dict().items(), config, layout, 3)
    assert {d.name for d in (tmp_path / "iter_0000003").iterdir()} == {
        rank_dir(0, p, e, 2, 2) for p in range(2) for e in range(2)
    }
    _, iteration, tensors = iter_mcore_as_hf(tmp_path / "iter_0000003", config)
    assert iteration == 3
    assert_identical(dict(tensors), model.hf_state_dict())


def _train_losses(load: Path) -> list[float]:
    """Two iterations of `train --load LOAD` on mock data in this process; the logged losses."""
    flags = ["--load", str(load), "--mock-data", "--seq-length", "16", "--micro-batch-size", "1",
             "--global-batch-size", "2", "--train-iters", "2", "--lr", "1e-3", "--lr-decay-style", "constant",
             "--log-interval", "1", "--eval-iters", "0", "--seed", "3"]
    with contextlib.redirect_stdout(io.StringIO()):
        return run_training(parse_train_args(flags)).losses


def test_train_loads_hf_and_mcore_moe_checkpoints_alike(tmp_path) -> None:
    """`train --load` of an HF-MoE directory and of the same weights as mcore files (TP 2 x PP 2 x EP 2, grouped
    experts) train identically; other weights train differently (so the weights were really loaded)."""
    config = moe_config()
    save_pretrained(trained_moe_model(config), tmp_path / "hf")
    hf_to_mg(tmp_path / "hf", tmp_path / "mg", 2, 2, 2, "--moe-grouped-gemm")
    torch.manual_seed(1)
    save_pretrained(Qwen3ForCausalLM(config), tmp_path / "other")
    hf, mg, other = (_train_losses(tmp_path / name) for name in ("hf", "mg", "other"))
    assert len(hf) == 2 and hf == mg
    assert other[0] != hf[0]
