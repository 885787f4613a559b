"""mcore checkpoints against megatron-core's own GPTModel (local spec, CPU, one-process gloo group).

- what we write loads into GPTModel with no missing/unexpected keys and gives transformers' logits;
- what megatron-core holds, saved in Megatron's layout (with optimizer, RNG, Megatron enums in args),
  converts to HF with megatron-core's logits.
PP is simulated in one process by chaining stage models (pre_process / post_process), which keeps
the layer-numbers-restart-per-stage layout Megatron saves.

Qwen3-MoE: megatron-core's MoELayer (local spec, allgather dispatcher) with SequentialMLP experts runs as it
is; its legacy GroupedMLP needs the `grouped_gemm` package (CUDA only), so those tests stand in a pure-torch
`gmm` (a loop over experts) for `grouped_gemm.ops.gmm` and mark the experts bf16 (GroupedMLP asserts
config.bf16) while computing in fp32. EP > 1 needs an expert-parallel group of several processes, so EP
files are checked in tests/test_mcore_moe.py (round trips and the local-to-global expert numbering).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import random
import signal
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

pytest.importorskip("megatron.core")

from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer import OptimizerConfig
from megatron.core.rerun_state_machine import RerunMode
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.moe import grouped_gemm_util, moe_utils
from megatron.core.transformer.moe.experts import GroupedMLP
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from qwen3_pretrain.checkpoint.convert import main as convert_main
from qwen3_pretrain.checkpoint.hf import save_hf_state_dict
from qwen3_pretrain.checkpoint.mcore import MODEL_FILE, TRACKER_FILE, load_pt
from qwen3_pretrain.config.model import Qwen3Config, Qwen3MoeConfig

from distributed_helpers import free_port

SEQ = 12


def tiny_config(tied: bool) -> Qwen3Config:
    """GQA with 2 query heads per group and head_dim (8) != hidden / heads (4); non-default theta."""
    return Qwen3Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=4, head_dim=8, max_position_embeddings=64, rope_theta=10_000.0,
        tie_word_embeddings=tied, torch_dtype="float32",
    )


@pytest.fixture(scope="module")
def megatron_cpu():
    """One-process gloo group, TP = PP = 1, and the CPU patches megatron-core's forward needs: two for the
    dense model, and for MoE routing `moe_utils.te_general_gemm`, never defined without Transformer Engine."""
    port = free_port()
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    saved = torch.cuda.current_device, tracker.fork
    torch.cuda.current_device = lambda: "cpu"
    tracker.fork = lambda *a, **k: contextlib.nullcontext()
    had_gemm = hasattr(moe_utils, "te_general_gemm")
    if not had_gemm:
        moe_utils.te_general_gemm = None
    yield
    torch.cuda.current_device, tracker.fork = saved
    if not had_gemm:
        del moe_utils.te_general_gemm
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def megatron_stage(
    config: Qwen3Config, layers: int, first: bool, last: bool, offset: int = 0, grouped: bool = False
) -> GPTModel:
    """One pipeline stage of the Qwen3 (or Qwen3-MoE: global layers offset.. of it) model as megatron-core
    builds it (local spec; MoE: allgather dispatcher, the router mapped from norm_topk_prob, no aux loss)."""
    moe: dict = {}
    spec = get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    if isinstance(config, Qwen3MoeConfig):
        moe = {
            "num_moe_experts": config.num_experts, "moe_router_topk": config.num_experts_per_tok,
            "moe_ffn_hidden_size": config.moe_intermediate_size, "moe_router_pre_softmax": not config.norm_topk_prob,
            "moe_token_dispatcher_type": "allgather", "moe_aux_loss_coeff": 0.0, "moe_grouped_gemm": grouped,
        }
        moe_spec = get_gpt_layer_local_spec(
            num_experts=config.num_experts, moe_grouped_gemm=grouped, qk_layernorm=True, normalization="RMSNorm"
        )
        layer_specs = [moe_spec if config.is_moe_layer(offset + i) else spec for i in range(layers)]
        spec = TransformerBlockSubmodules(layer_specs=layer_specs, layer_norm=WrappedTorchNorm)
    mc = TransformerConfig(
        num_layers=layers, hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_key_value_heads, ffn_hidden_size=config.intermediate_size,
        kv_channels=config.head_dim, qk_layernorm=True, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, layernorm_epsilon=config.rms_norm_eps,
        use_cpu_initialization=True, params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0,
        bias_activation_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False, **moe,
    )
    model = GPTModel(
        mc, spec,
        vocab_size=config.vocab_size, max_sequence_length=config.max_position_embeddings,
        position_embedding_type="rope", rotary_base=int(config.rope_theta),
        share_embeddings_and_output_weights=config.tie_word_embeddings, pre_process=first, post_process=last,
    )
    bf16_flagged = copy.copy(mc)
    bf16_flagged.bf16 = True  # GroupedMLP asserts it; the experts still compute in the inputs' dtype (fp32)
    for module in model.modules():
        if isinstance(module, GroupedMLP):
            module.config = bf16_flagged
    return model.eval()


def build_stages(config: Qwen3Config, stage_layers: list[int], grouped: bool = False) -> list[GPTModel]:
    n = len(stage_layers)
    return [
        megatron_stage(config, layers, p == 0, p == n - 1, sum(stage_layers[:p]), grouped)
        for p, layers in enumerate(stage_layers)
    ]


def megatron_logits(stages: list[GPTModel], ids: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(ids.shape[1]).unsqueeze(0)  # [1, s]
    mask = torch.triu(torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool), 1)[None, None]  # True = masked
    hidden = None
    with torch.no_grad():
        for stage in stages:
            if hidden is not None:
                stage.set_input_tensor(hidden)
            hidden = stage(ids, positions, mask)
    return hidden  # [b, s, vocab] from the last stage


def randomize_norms(module: torch.nn.Module) -> None:
    """Norm weights start at 1; make them distinct so a swapped or missing norm changes the logits."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "norm" in name:
                param.copy_(torch.rand(param.shape, generator=gen) + 0.5)


def hf_model(config: Qwen3Config) -> transformers.Qwen3ForCausalLM:
    hf_config = transformers.Qwen3Config(**config.to_hf_dict())
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM._from_config(hf_config, attn_implementation="eager").float().eval()
    randomize_norms(model)
    return model


def hf_moe_model(config: Qwen3MoeConfig) -> transformers.Qwen3MoeForCausalLM:
    """transformers' Qwen3-MoE with distinct norms and a router sharp enough that routing differences show."""
    hf_config = transformers.Qwen3MoeConfig(**config.to_hf_dict())
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM._from_config(hf_config, attn_implementation="eager").float().eval()
    randomize_norms(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0.0, 0.5)
    return model


def convert(*argv: str | Path | int) -> None:
    assert convert_main([str(a) for a in argv]) == 0


def load_into_stages(stages: list[GPTModel], checkpoint: Path, pp: int) -> None:
    """strict load_state_dict of every stage file, plus an explicit key-set comparison."""
    for p, stage in enumerate(stages):
        rank_dir = "mp_rank_00" if pp == 1 else f"mp_rank_00_{p:03d}"
        state = load_pt(checkpoint / "iter_0000001" / rank_dir / MODEL_FILE)["model"]
        expected = {k for k in stage.state_dict() if not k.endswith("_extra_state")}
        assert set(state) == expected
        result = stage.load_state_dict(state, strict=True)
        assert not result.missing_keys and not result.unexpected_keys


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("stage_layers", [[3], [1, 2]])
def test_megatron_loads_our_checkpoint_with_transformers_logits(megatron_cpu, tmp_path, tied, stage_layers) -> None:
    config = tiny_config(tied)
    reference = hf_model(config)
    save_hf_state_dict(reference.state_dict(), tmp_path / "hf", config=config)
    pp = len(stage_layers)
    convert("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", tmp_path / "hf",
            "--save-dir", tmp_path / "mg", "--target-pipeline-parallel-size", pp,
            "--num-layer-list", ",".join(map(str, stage_layers)))
    stages = build_stages(config, stage_layers)
    load_into_stages(stages, tmp_path / "mg", pp)
    ids = torch.randint(0, config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(ids).logits
    torch.testing.assert_close(megatron_logits(stages, ids), expected, rtol=1e-5, atol=1e-5)


def test_plain_qkv_concatenation_is_detected(megatron_cpu, tmp_path) -> None:
    """The logits comparison above is sensitive to the q/k/v grouping: a plain cat([q, k, v]) fails it."""
    config = tiny_config(True)
    reference = hf_model(config)
    stage = megatron_stage(config, config.num_hidden_layers, True, True)
    save_hf_state_dict(reference.state_dict(), tmp_path / "hf", config=config)
    convert("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", tmp_path / "hf",
            "--save-dir", tmp_path / "mg")
    state = load_pt(tmp_path / "mg" / "iter_0000001" / "mp_rank_00" / MODEL_FILE)["model"]
    hf_state = reference.state_dict()
    for i in range(config.num_hidden_layers):
        attn = f"model.layers.{i}.self_attn."
        state[f"decoder.layers.{i}.self_attention.linear_qkv.weight"] = torch.cat(
            [hf_state[attn + "q_proj.weight"], hf_state[attn + "k_proj.weight"], hf_state[attn + "v_proj.weight"]]
        )
    stage.load_state_dict(state, strict=True)
    ids = torch.randint(0, config.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(ids).logits
    assert not torch.allclose(megatron_logits([stage], ids), expected, rtol=1e-3, atol=1e-3)


def megatron_training_args(config: Qwen3Config, pp: int) -> argparse.Namespace:
    """args as Megatron training stores them, including Megatron enums and a torch dtype (and Megatron's MoE
    args, router semantics as moe_router_pre_softmax only, MoE layers as a moe_layer_freq pattern)."""
    args = argparse.Namespace(
        num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
        ffn_hidden_size=config.intermediate_size, num_attention_heads=config.num_attention_heads,
        group_query_attention=True, num_query_groups=config.num_key_value_heads, kv_channels=config.head_dim,
        qk_layernorm=True, padded_vocab_size=config.vocab_size, vocab_size=None,
        max_position_embeddings=config.max_position_embeddings, position_embedding_type="rope",
        rotary_base=int(config.rope_theta), norm_epsilon=config.rms_norm_eps, normalization="RMSNorm",
        swiglu=True, untie_embeddings_and_output_weights=not config.tie_word_embeddings,
        tensor_model_parallel_size=1, pipeline_model_parallel_size=pp, params_dtype=torch.float32,
        model_type=ModelType.encoder_or_decoder, attention_backend=AttnBackend.auto, save=Path("/ckpt"),
        exit_signal=signal.SIGTERM,
    )
    if isinstance(config, Qwen3MoeConfig):
        args.num_experts, args.moe_router_topk = config.num_experts, config.num_experts_per_tok
        args.moe_ffn_hidden_size, args.moe_router_pre_softmax = config.moe_intermediate_size, not config.norm_topk_prob
        args.moe_layer_freq = [int(config.is_moe_layer(i)) for i in range(config.num_hidden_layers)]
        args.moe_aux_loss_coeff, args.moe_grouped_gemm, args.expert_model_parallel_size = 0.001, False, 1
    return args


def save_like_megatron(stages: list[GPTModel], config: Qwen3Config, directory: Path, iteration: int) -> None:
    """model_optim_rng.pt per stage with everything a Megatron training save holds."""
    pp = len(stages)
    for p, stage in enumerate(stages):
        optimizer = torch.optim.Adam(stage.parameters())
        for param in stage.parameters():
            param.grad = torch.zeros_like(param)
        optimizer.step()
        checkpoint = {
            "args": megatron_training_args(config, pp),
            "checkpoint_version": 3.0,
            "iteration": iteration,
            "model": stage.state_dict(),  # includes Megatron's `_extra_state` entries
            "optimizer": {"optimizer": optimizer.state_dict(), "fp32_from_fp16_params": [],
                          "config": OptimizerConfig(lr=1e-4, weight_decay=0.1)},
            "opt_param_scheduler": {"max_lr": 1e-4, "num_steps": iteration},
            "rng_state": [{
                "random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
                "torch_rng_state": torch.get_rng_state(), "rng_tracker_states": {},
            }],
            "rerun_state_machine": {"mode": RerunMode.DISABLED},
            "num_floating_point_operations_so_far": 0,
        }
        rank_dir = directory / f"iter_{iteration:07d}" / ("mp_rank_00" if pp == 1 else f"mp_rank_00_{p:03d}")
        rank_dir.mkdir(parents=True)
        torch.save(checkpoint, rank_dir / MODEL_FILE)
    (directory / TRACKER_FILE).write_text(str(iteration))


@pytest.mark.parametrize("tied,stage_layers", [(True, [1, 2]), (False, [3])])
def test_megatron_saved_checkpoint_converts_to_hf_with_megatron_logits(
    megatron_cpu, tmp_path, tied, stage_layers
) -> None:
    config = tiny_config(tied)
    torch.manual_seed(3)
    stages = build_stages(config, stage_layers)
    for stage in stages:
        randomize_norms(stage)
    if tied and len(stages) > 1:  # Megatron keeps the last stage's output layer equal to the embedding
        with torch.no_grad():
            stages[-1].output_layer.weight.copy_(stages[0].embedding.word_embeddings.weight)
    save_like_megatron(stages, config, tmp_path / "mg", iteration=7)
    rank_dir = "mp_rank_00" if len(stages) == 1 else "mp_rank_00_000"
    loaded = load_pt(tmp_path / "mg" / "iter_0000007" / rank_dir / MODEL_FILE)
    assert loaded["args"].model_type.value == ModelType.encoder_or_decoder.value  # stand-ins, megatron not needed
    assert loaded["args"].exit_signal == signal.SIGTERM and loaded["optimizer"]["config"].lr == 1e-4
    convert("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", tmp_path / "mg",
            "--save-dir", tmp_path / "hf")

    converted = Qwen3Config.from_pretrained(tmp_path / "hf")
    assert converted == config
    model = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids = torch.randint(0, config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(logits, megatron_logits(stages, ids), rtol=1e-5, atol=1e-5)


# ---- Qwen3-MoE ----------------------------------------------------------------------------------------------


def tiny_moe_config(norm_topk_prob: bool) -> Qwen3MoeConfig:
    """4 experts, top-2, layer 1 dense (mlp_only_layers), GQA with head_dim (8) != hidden / heads (4)."""
    return Qwen3MoeConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=4, head_dim=8, max_position_embeddings=64, rope_theta=10_000.0,
        tie_word_embeddings=False, torch_dtype="float32", num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=16, norm_topk_prob=norm_topk_prob, mlp_only_layers=[1],
    )


@pytest.fixture
def reference_gmm(monkeypatch):
    """grouped_gemm's `gmm` (absent on CPU) as a loop: rows [n, k] sorted by expert (`batch_sizes` each) @ [E, k, m]."""

    def gmm(rows: torch.Tensor, weights: torch.Tensor, batch_sizes: torch.Tensor, trans_b: bool = False):
        assert not trans_b
        return torch.cat([x @ w for x, w in zip(rows.split(batch_sizes.tolist()), weights, strict=True)])

    monkeypatch.setattr(grouped_gemm_util, "grouped_gemm_is_available", lambda: True)
    monkeypatch.setattr(grouped_gemm_util, "ops", types.SimpleNamespace(gmm=gmm))


@pytest.mark.parametrize(
    "norm_topk_prob,grouped,stage_layers",
    [(True, False, [3]), (False, False, [1, 2]), (True, True, [2, 1]), (False, True, [3])],
)
def test_megatron_moe_loads_our_checkpoint_with_transformers_logits(
    megatron_cpu, reference_gmm, tmp_path, norm_topk_prob, grouped, stage_layers
) -> None:
    config = tiny_moe_config(norm_topk_prob)
    reference = hf_moe_model(config)
    reference.save_pretrained(tmp_path / "hf")  # per-expert names on disk
    pp = len(stage_layers)
    convert("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", tmp_path / "hf",
            "--save-dir", tmp_path / "mg", "--model-type-hf", "qwen3-moe", "--target-pipeline-parallel-size", pp,
            "--num-layer-list", ",".join(map(str, stage_layers)), *(["--moe-grouped-gemm"] if grouped else []))
    stages = build_stages(config, stage_layers, grouped)
    assert sum(isinstance(m, GroupedMLP) for s in stages for m in s.modules()) == (2 if grouped else 0)
    load_into_stages(stages, tmp_path / "mg", pp)
    ids = torch.randint(0, config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(ids).logits
    torch.testing.assert_close(megatron_logits(stages, ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pre_softmax,stage_layers", [(True, [3]), (False, [1, 2])])
def test_megatron_saved_moe_checkpoint_converts_to_hf_with_megatron_logits(
    megatron_cpu, tmp_path, pre_softmax, stage_layers
) -> None:
    """Megatron's args say the router semantics only as moe_router_pre_softmax; the HF config gets the equivalent
    norm_topk_prob, and the dense layer from moe_layer_freq."""
    config = tiny_moe_config(norm_topk_prob=not pre_softmax)
    torch.manual_seed(3)
    stages = build_stages(config, stage_layers)
    for stage in stages:
        randomize_norms(stage)
        with torch.no_grad():
            for name, param in stage.named_parameters():
                if name.endswith("mlp.router.weight"):
                    param.normal_(0.0, 0.5)
    save_like_megatron(stages, config, tmp_path / "mg", iteration=7)
    convert("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", tmp_path / "mg",
            "--save-dir", tmp_path / "hf")

    assert Qwen3Config.from_pretrained(tmp_path / "hf") == config
    model = transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids = torch.randint(0, config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(logits, megatron_logits(stages, ids), rtol=1e-5, atol=1e-5)
