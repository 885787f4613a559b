"""TrainConfig: YAML recipe + Megatron/MindSpeed flags, ignored flags, and errors that name the flag to
change, raised before any process group starts."""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
from pathlib import Path

import pytest
import torch.distributed as dist

from qwen3_pretrain.cli import main
from qwen3_pretrain.config import ATTENTION_BACKENDS, ConfigError, TrainConfig
from qwen3_pretrain.distributed import device
from qwen3_pretrain.model import get_preset, kernels
from qwen3_pretrain.train.preflight import prepare

from train_helpers import tiny_flags, write_tiny_dataset

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "qwen3_1.7b_4k.yaml"
QWEN3_1_7B_PARAMS = 1_720_574_976

# The seed user's MindSpeed-LLM script for Qwen3-1.7B (TP 8), data/tokenizer/checkpoint paths aside.
MINDSPEED_ARGS = """
    --use-mcore-models --spec mindspeed_llm.tasks.models.spec.qwen3_spec layer_spec
    --kv-channels 128 --qk-layernorm --tensor-model-parallel-size 8 --pipeline-model-parallel-size 1
    --sequence-parallel --num-layers 28 --hidden-size 2048 --use-rotary-position-embeddings
    --num-attention-heads 16 --ffn-hidden-size 6144 --max-position-embeddings 40960 --seq-length 4096
    --make-vocab-size-divisible-by 1 --padded-vocab-size 151936 --rotary-base 1000000
    --micro-batch-size 1 --global-batch-size 64 --disable-bias-linear --swiglu --train-iters 2000
    --tokenizer-type PretrainedFromHF --normalization RMSNorm --position-embedding-type rope
    --norm-epsilon 1e-6 --hidden-dropout 0 --attention-dropout 0 --no-gradient-accumulation-fusion
    --attention-softmax-in-fp32 --exit-on-missing-checkpoint --no-masked-softmax-fusion
    --group-query-attention --num-query-groups 8 --seed 42 --bf16 --min-lr 1.25e-7 --weight-decay 1e-1
    --lr-warmup-fraction 0.01 --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95 --initial-loss-scale 4096
    --init-method-std 0.01 --lr 1.25e-6 --lr-decay-style cosine --no-load-optim --no-load-rng
    --use-flash-attn --use-fused-rmsnorm --use-fused-swiglu --use-fused-rotary-pos-emb
    --use-distributed-optimizer --overlap-grad-reduce --split 100,0,0 --log-interval 1
    --save-interval 2000 --eval-interval 2000 --eval-iters 0 --distributed-backend nccl
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny_text_document", documents=20)


def _expected_1_7b() -> object:
    return dataclasses.replace(
        get_preset("qwen3-1.7b"), initializer_range=0.01, max_position_embeddings=40960, torch_dtype="bfloat16"
    )


def test_mindspeed_script_flags(data: str) -> None:
    config = prepare([*shlex.split(MINDSPEED_ARGS), "--data-path", data, "--device-memory", "64GB"], world_size=8)
    r = config.resolved
    assert r.model_config == _expected_1_7b() and r.model_config.num_parameters() == QWEN3_1_7B_PARAMS
    assert (r.dp_size, r.num_microbatches, r.global_batch_size, r.train_iters) == (1, 64, 64, 2000)
    assert config.parallel.sequence_parallel and config.precision.bf16
    assert config.optimizer.lr_decay_style == "cosine" and config.checkpoint.no_load_optim
    assert config.ignored[:3] == ["--use-mcore-models", "--spec", "--qk-layernorm"]
    ignored = {"--use-flash-attn", "--distributed-backend", "--overlap-grad-reduce", "--hidden-dropout"}
    assert ignored <= set(config.ignored)


def test_recipe_for_8_devices(data: str) -> None:
    config = prepare(["--config", str(RECIPE), "--data-path", data, "--device-memory", "32GB"], world_size=8)
    r = config.resolved
    assert r.model_config == _expected_1_7b()
    assert (r.dp_size, r.num_microbatches, r.global_batch_size, r.train_iters) == (8, 8, 64, 2000)
    opt = config.optimizer
    assert (opt.lr, opt.min_lr, opt.lr_warmup_fraction, opt.weight_decay, opt.clip_grad) == (
        1.25e-6, 1.25e-7, 0.01, 0.1, 1.0
    )
    assert (opt.adam_beta1, opt.adam_beta2, config.training.seed, config.data.seq_length) == (0.9, 0.95, 42, 4096)
    assert (config.data.split, config.logging.log_interval, config.checkpoint.save_interval) == ("100,0,0", 1, 2000)


def test_flags_override_the_recipe(data: str, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: qwen3-tiny\nseq_length: 64\nlr: 1e-3\ntrain-iters: 5\nuse-flash-attn: true\n")
    config = prepare(["--config", str(recipe), "--data-path", data, "--lr", "2e-3", "--swiglu"], world_size=1)
    assert (config.optimizer.lr, config.data.seq_length, config.training.train_iters) == (2e-3, 64, 5)
    assert config.ignored == ["--use-flash-attn", "--swiglu"]
    again = TrainConfig.from_flat(config.to_flat())
    assert [getattr(again, s) for s in ("model", "data", "optimizer")] == [config.model, config.data, config.optimizer]


def test_shape_from_flags_pads_the_tokenizer_vocabulary(data: str, qwen3_tokenizer_dir: Path) -> None:
    flags = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
             "--seq-length", "32", "--lr", "1e-3", "--train-iters", "2", "--data-path", data,
             "--tokenizer-name-or-path", str(qwen3_tokenizer_dir)]
    cfg = prepare(flags, world_size=2).resolved.model_config
    assert (cfg.vocab_size, cfg.num_key_value_heads, cfg.head_dim, cfg.max_position_embeddings) == (151680, 4, 16, 32)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 1e6


BAD = [
    ({"global_batch_size": 10, "micro_batch_size": 4}, 2,
     "--global-batch-size 10 is not divisible by --micro-batch-size 4 x data-parallel size 2"),
    ({"data_path": None}, 1, "--data-path is required"),
    ({"data_path": "/nonexistent/corpus_text_document"}, 1, "--data-path /nonexistent/corpus_text_document: "),
    ({"seq_length": 1024}, 1, "--seq-length 1024 exceeds the model's max position embeddings 512"),
    ({"lr_decay_styl": "cosine"}, 1, "unknown flag --lr-decay-styl. Did you mean --lr-decay-style?"),
    ({"micro_batch": 2}, 1, "unknown flag --micro-batch. Did you mean --micro-batch-size?"),
    ({"load": "/nonexistent/checkpoint"}, 1, "--load /nonexistent/checkpoint does not exist"),
    ({"tensor_model_parallel_size": 8}, 8,
     "--tensor-model-parallel-size 8 does not divide the model's num_attention_heads"),
    ({"tensor_model_parallel_size": 2}, 3, "world size 3 is not divisible by --tensor-model-parallel-size 2"),
    ({"tensor_model_parallel_size": 4}, 4,
     "--tensor-model-parallel-size 4 does not divide the model's num_key_value_heads"),
    ({"tensor_model_parallel_size": 2, "padded_vocab_size": 511}, 2,
     "--tensor-model-parallel-size 2 does not divide the model's vocab_size (511)"),
    ({"pipeline_model_parallel_size": 3}, 3, "the model's 2 layers do not split evenly into 3 pipeline stages"),
    ({"pipeline_model_parallel_size": 2}, 3,
     "world size 3 is not divisible by --tensor-model-parallel-size 1 x --pipeline"),
    ({"pipeline_model_parallel_size": 2, "num_layer_list": "1,2"}, 2, "--num-layer-list 1,2 must give 2 positive"),
    ({"pipeline_model_parallel_size": 2, "num_layer_list": "1,x"}, 2, "--num-layer-list '1,x' must be comma-separated"),
    ({"pipeline_model_parallel_size": 2, "global_batch_size": 2}, 2,
     "the 1f1b pipeline schedule needs the number of micro batches per step (1 = global batch"),
    ({"num_layers": 4, "pipeline_model_parallel_size": 2, "num_layers_per_virtual_pipeline_stage": 1,
      "pipeline_schedule": "gpipe"}, 2, "--pipeline-schedule gpipe cannot run virtual stages"),
    ({"num_layers": 4, "pipeline_model_parallel_size": 2, "num_layers_per_virtual_pipeline_stage": 1,
      "global_batch_size": 6}, 2, "to be a multiple of --pipeline-model-parallel-size 2"),
    ({"device_memory": "1MB"}, 1, "this layout needs about 0.50 GiB per device"),
    ({"bf16": True, "fp16": True}, 1, "--bf16 and --fp16 are exclusive"),
    ({"lr": None}, 1, "--lr is required"),
    ({"train_iters": None}, 1, "give exactly one of --train-iters and --train-samples"),
    ({"lr_decay_style": "step"}, 1, "--lr-decay-style 'step': use one of constant, linear, cosine"),
    ({"normalization": "LayerNorm"}, 1, "--normalization LayerNorm is not supported: Qwen3 uses RMSNorm"),
    ({"model": None, "num_layers": 2}, 1, "pass --model PRESET, --load an HF directory, or --hidden-size, "),
    ({"lr_warmup_iters": 6}, 1, "the LR warmup (48 samples) is not shorter than the decay (48 samples)"),
    ({"micro_batch_size": 0}, 1, "--micro-batch-size must be > 0"),
    ({"attention_backend": "fa3"}, 1, "--attention-backend 'fa3': use one of auto, flash, fused, efficient, unfused"),
    ({"recompute_granularity": "selective", "recompute_method": "block", "recompute_num_layers": 1}, 1,
     "--recompute-method and --recompute-num-layers do not apply to --recompute-granularity selective"),
    ({"recompute_granularity": "full", "recompute_method": "block"}, 1,
     "--recompute-method block needs --recompute-num-layers N >= 1"),
    ({"recompute_granularity": "full", "recompute_num_layers": 2}, 1,
     "--recompute-num-layers needs --recompute-method uniform or block"),
    ({"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 0}, 1,
     "--recompute-num-layers must be > 0"),
    ({"recompute_granularity": "full", "recompute_method": "blocks", "recompute_num_layers": 1}, 1,
     "--recompute-method 'blocks': use one of uniform, block"),
]


@pytest.mark.parametrize("change,world,message", BAD, ids=[m.split(":")[0][:40] for _, _, m in BAD])
def test_bad_config_names_the_flag(data: str, change: dict, world: int, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        prepare(tiny_flags(data, **change), world_size=world)
    assert message in str(caught.value)
    assert not dist.is_initialized()


def test_pipeline_layout_and_memory_check_override(data: str) -> None:
    flags = tiny_flags(data, num_layers=4, pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=1,
                       device_memory="1MB", skip_memory_check=True)
    pipeline = prepare(flags, world_size=4).resolved.pipeline
    assert (pipeline.stage_layers, pipeline.virtual_stages, pipeline.schedule) == ([1, 1, 1, 1], 2, "interleaved_1f1b")
    flags = tiny_flags(data, num_layers=4, pipeline_model_parallel_size=2, num_layer_list="3,1")
    pipeline = prepare(flags, world_size=2).resolved.pipeline
    assert (pipeline.stage_layers, pipeline.virtual_stages, pipeline.schedule) == ([3, 1], 1, "1f1b")
    assert prepare(tiny_flags(data), world_size=1).resolved.pipeline is None


def test_attention_backend_choices_are_the_kernels_and_do_not_apply_on_npu(
    data: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert tuple(kernels.ATTENTION_BACKENDS) == ATTENTION_BACKENDS
    assert prepare(tiny_flags(data, attention_backend="fused")).parallel.attention_backend == "fused"
    monkeypatch.setattr(device, "device_type", lambda: "npu")  # (no NPU to size: skip the memory check)
    assert prepare(tiny_flags(data, skip_memory_check=True)).resolved.notes == []
    notes = prepare(tiny_flags(data, attention_backend="flash", skip_memory_check=True)).resolved.notes
    assert notes == ["--attention-backend flash (Ascend NPUs use npu_fusion_attention)"]


def test_recompute_method_applies_to_full_granularity_only(data: str) -> None:
    flags = {"recompute_method": "block", "recompute_num_layers": 1}
    config = prepare(tiny_flags(data, recompute_granularity="full", **flags))
    assert (config.parallel.recompute_method, config.parallel.recompute_num_layers) == ("block", 1)
    assert config.ignored == [] and config.resolved.notes == []
    notes = prepare(tiny_flags(data, **flags)).resolved.notes  # Megatron ignores them without a granularity
    assert notes == ["--recompute-method --recompute-num-layers (no --recompute-granularity)"]


def test_tokenizer_larger_than_the_model(data: str, qwen3_tokenizer_dir: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"has 151669 tokens but the model's vocabulary is 512; raise --padded-vocab-size"
    ):
        prepare(tiny_flags(data, tokenizer_name_or_path=qwen3_tokenizer_dir), world_size=1)


def test_load_of_an_unknown_format(data: str, tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ConfigError, match=r"--load .* is none of the known checkpoint formats"):
        prepare(tiny_flags(data, load=tmp_path), world_size=1)
    fresh = tmp_path / "fresh"  # Megatron's `--load DIR --save DIR` before the first save: start from scratch
    assert prepare(tiny_flags(data, load=fresh, save=fresh), world_size=1).resolved.load_format is None


def test_recipe_errors_name_the_file(data: str, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("seq-lenght: 64\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml: unknown setting 'seq-lenght'. Did you mean --seq-length\?"):
        prepare(["--config", str(recipe), *tiny_flags(data)], world_size=1)
    recipe.write_text("tensor-model-parallel-size: two\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml: --tensor-model-parallel-size: expected int, got 'two'"):
        prepare(["--config", str(recipe), *tiny_flags(data)], world_size=1)


def test_cli_fails_before_launching(
    data: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_launch(*args: object, **kwargs: object) -> None:
        raise AssertionError("torchrun must not start for an invalid configuration")

    monkeypatch.setattr(subprocess, "Popen", no_launch)
    flags = tiny_flags(data, global_batch_size=6, micro_batch_size=2)
    assert main(["train", "--nproc-per-node", "2", *flags]) == 2
    expected = "--global-batch-size 6 is not divisible by --micro-batch-size 2 x data-parallel size 2"
    assert expected in capsys.readouterr().err
    assert not dist.is_initialized()
    assert main(["train", "--help"]) == 0
    assert "--lr-warmup-fraction" in capsys.readouterr().out


def test_layout_rules_name_flags_of_the_schema() -> None:
    from qwen3_pretrain.config import layout
    from qwen3_pretrain.config.train import known_flags

    names = (layout.TP_FLAG, layout.PP_FLAG, layout.NUM_LAYER_LIST_FLAG, layout.VIRTUAL_FLAG,
             layout.SEQUENCE_PARALLEL_FLAG)
    assert all(name in known_flags() for name in names)
