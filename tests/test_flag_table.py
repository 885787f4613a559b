"""Every Megatron-LM / MindSpeed flag has exactly one treatment in `train`: implemented, taken by the launcher,
accepted without effect (speed-only / Qwen3-fixed) or refused with a reason; docs/flags.md lists them all."""

from __future__ import annotations

from pathlib import Path

import pytest

from qwen3_pretrain.config import ConfigError, load_recipe, parse_train_args
from qwen3_pretrain.config.flag_table import (
    LAUNCHER_FLAG_NAMES,
    QWEN3_FIXED,
    REASONS,
    REFUSED,
    SPEED_ONLY,
    accepted_table_flags,
    treatment,
)
from qwen3_pretrain.config.flags import flag_treatment, flags_markdown, read_upstream_flags
from qwen3_pretrain.config.train import FIELDS

from train_helpers import tiny_flags

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM = read_upstream_flags(ROOT / "tests" / "data" / "upstream_flags.tsv")
DATA = "/nonexistent/prefix"  # parse_train_args runs the pure checks only: no file is opened


def test_the_upstream_list_is_the_parsers_flags() -> None:
    sources = {source for _, source, _ in UPSTREAM}
    assert sources == {"megatron-lm", "mindspeed", "mindspeed-llm"}
    assert len(UPSTREAM) > 1300 and len({flag for flag, _, _ in UPSTREAM}) == len(UPSTREAM)
    flags = {flag for flag, _, _ in UPSTREAM}
    assert {"--tensor-model-parallel-size", "--use-flash-attn", "--moe-router-topk", "--use-ascend-coc"} <= flags


def test_every_upstream_flag_has_a_treatment() -> None:
    missing = [flag for flag, _, _ in UPSTREAM if flag_treatment(flag) is None]
    assert missing == []


def test_each_flag_has_exactly_one_treatment() -> None:
    schema = {"--" + name.replace("_", "-") for name in FIELDS}
    table = set(accepted_table_flags())
    assert not schema & table, "a flag is both a schema field and in the flag table"
    speed = [f.split()[0] for entries in SPEED_ONLY.values() for f in entries]
    assert len(speed) == len(set(speed)) and not set(speed) & set(QWEN3_FIXED)
    assert set(SPEED_ONLY) | set(REFUSED) <= set(REASONS)
    refused = [entry for entries in REFUSED.values() for entry in entries]
    for flag in table:  # an accepted flag is never also a refused name or under a refused prefix ("...-")
        assert not any(flag == e or (e.endswith("-") and flag.startswith(e)) for e in refused), flag


def test_docs_list_every_flag_and_are_up_to_date() -> None:
    text = (ROOT / "docs" / "flags.md").read_text()
    assert text == flags_markdown(UPSTREAM), "docs/flags.md is stale: run python scripts/flags_doc.py"
    assert all(f"`{flag}`" in text for flag, _, _ in UPSTREAM)
    assert "Unknown" not in text


def test_speed_only_flags_are_accepted_with_their_values_and_listed() -> None:
    flags = [*tiny_flags(DATA), "--use-flash-attn", "--transformer-impl", "local", "--spec", "a.b", "layer_spec",
             "--distributed-backend=nccl", "--use-ascend-coc", "--ckpt-fully-parallel-save", "--normalization",
             "RMSNorm"]
    config = parse_train_args(flags, world_size=1)
    assert config.ignored == ["--use-flash-attn", "--transformer-impl", "--spec", "--distributed-backend",
                              "--use-ascend-coc", "--ckpt-fully-parallel-save", "--normalization"]
    assert config.parallel.tensor_model_parallel_size == 1  # the values were consumed, nothing else changed


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--moe-expert-capacity-factor", "1.0"], r"--moe-expert-capacity-factor is not supported by qwen3-pretrain: "
                                                  r"Qwen3-MoE is dropless"),
        (["--moe-z-loss-coeff", "0.001"], r"--moe-z-loss-coeff is not supported by qwen3-pretrain: not part of"),
        (["--moe-shared-expert-intermediate-size", "64"], r"Qwen3-MoE has no shared experts"),
        (["--fp8-amax-history-len", "1024"], r"--fp8-amax-history-len is not supported by qwen3-pretrain: an FP8"),
        (["--add-qkv-bias"], r"--add-qkv-bias is not supported by qwen3-pretrain: configures an architecture"),
        (["--normalization", "LayerNorm"], r"--normalization LayerNorm is not supported: Qwen3 uses RMSNorm"),
        (["--transformer-impl"], r"--transformer-impl expects 1 value"),
        (["--context-parallel-size", "2"], r"not divisible by .* x --context-parallel-size 2"),
        (["--model-type-hf", "llama2"], r"--model-type-hf llama2: qwen3-pretrain trains qwen3"),
        (["--mock-data"], r"give only one of --data-path and --mock-data"),
        (["--ckpt-format", "torch_dist"], r"--ckpt-format torch_dist: Megatron's distributed-checkpoint layout"),
    ],
)
def test_refused_flags_name_the_flag_and_the_reason(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_train_args([*tiny_flags(DATA), *flags], world_size=1)


def test_recipes_take_the_same_table(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("use-flash-attn: true\nnormalization: RMSNorm\nseq-length: 32\n")
    values, ignored = load_recipe(recipe)
    assert values == {"seq_length": 32} and ignored == ["--use-flash-attn", "--normalization"]
    recipe.write_text("moe-z-loss-coeff: 0.001\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml: --moe-z-loss-coeff is not supported"):
        load_recipe(recipe)


def test_launcher_flags_in_both_spellings() -> None:
    for flag in LAUNCHER_FLAG_NAMES:
        underscored = flag.replace("-", "_").replace("__", "--")
        found, same = treatment(flag), treatment(underscored)
        assert found is not None and same is not None and found.kind == same.kind == "launcher"
