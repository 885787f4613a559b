"""TP = 2 against megatron-core's GPTModel in two gloo processes (CPU).

Each rank loads our mp_rank_0{rank} file into a TP = 2 GPTModel (strict) and the gathered logits must
equal transformers'; and a TP = 2 GPTModel's own shards, saved in Megatron's layout, must convert to
an HF model with megatron-core's logits. This checks the q/k/v group split and the per-rank
[gate | up] packing of linear_fc1, which a TP = 1 comparison cannot see.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

import torch
import torch.multiprocessing as mp

from qwen3_pretrain.checkpoint.convert import main as convert_main
from qwen3_pretrain.checkpoint.hf import save_hf_state_dict
from qwen3_pretrain.checkpoint.mcore import MODEL_FILE, TRACKER_FILE, load_pt
from qwen3_pretrain.config.model import Qwen3Config

from distributed_helpers import free_port

TP = 2
SEQ = 10


def tiny_config(tied: bool) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, head_dim=8, max_position_embeddings=64, rope_theta=10_000.0,
        tie_word_embeddings=tied, torch_dtype="float32",
    )


def token_ids(config: Qwen3Config) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(5))


def _megatron_tp_model(config: Qwen3Config):
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    mc = TransformerConfig(
        num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads, num_query_groups=config.num_key_value_heads,
        ffn_hidden_size=config.intermediate_size, kv_channels=config.head_dim, qk_layernorm=True,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        layernorm_epsilon=config.rms_norm_eps, use_cpu_initialization=True, params_dtype=torch.float32,
        hidden_dropout=0.0, attention_dropout=0.0, bias_activation_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        gradient_accumulation_fusion=False, tensor_model_parallel_size=TP,
    )
    model = GPTModel(
        mc, get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm"),
        vocab_size=config.vocab_size, max_sequence_length=config.max_position_embeddings,
        position_embedding_type="rope", rotary_base=int(config.rope_theta),
        share_embeddings_and_output_weights=config.tie_word_embeddings,
    )
    return model.eval()


def _full_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Forward and all-gather the vocab-parallel logits -> [b, s, vocab]."""
    positions = torch.arange(ids.shape[1]).unsqueeze(0)  # [1, s]
    mask = torch.triu(torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool), 1)[None, None]
    with torch.no_grad():
        local = model(ids, positions, mask).contiguous()  # [b, s, vocab / TP]
    parts = [torch.empty_like(local) for _ in range(TP)]
    torch.distributed.all_gather(parts, local)
    return torch.cat(parts, dim=-1)


def _worker(rank: int, port: int, root: Path) -> None:
    from megatron.core import parallel_state, tensor_parallel

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=TP)
    parallel_state.initialize_model_parallel(TP, 1)
    torch.cuda.current_device = lambda: "cpu"
    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    try:
        for tied in (True, False):
            config = tiny_config(tied)
            name = "tied" if tied else "untied"
            # 1) our TP = 2 checkpoint in megatron-core
            model = _megatron_tp_model(config)
            state = load_pt(root / f"ours-{name}" / "iter_0000001" / f"mp_rank_{rank:02d}" / MODEL_FILE)["model"]
            assert set(state) == {k for k in model.state_dict() if not k.endswith("_extra_state")}
            model.load_state_dict(state, strict=True)
            logits = _full_logits(model, token_ids(config))
            if rank == 0:
                torch.save(logits, root / f"ours-{name}-logits.pt")
            # 2) megatron-core's own TP = 2 shards in Megatron's layout (same seed on both ranks)
            torch.manual_seed(7)
            model = _megatron_tp_model(config)
            gen = torch.Generator().manual_seed(8)
            with torch.no_grad():
                for pname, param in model.named_parameters():
                    if "norm" in pname:
                        param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
            rank_dir = root / f"theirs-{name}" / "iter_0000003" / f"mp_rank_{rank:02d}"
            rank_dir.mkdir(parents=True)
            args = _megatron_args(config)
            torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 3, "model": model.state_dict()},
                       rank_dir / MODEL_FILE)
            logits = _full_logits(model, token_ids(config))
            if rank == 0:
                (root / f"theirs-{name}" / TRACKER_FILE).write_text("3")
                torch.save(logits, root / f"theirs-{name}-logits.pt")
        torch.distributed.barrier()
    finally:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def _megatron_args(config: Qwen3Config):
    import argparse

    return argparse.Namespace(
        num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
        ffn_hidden_size=config.intermediate_size, num_attention_heads=config.num_attention_heads,
        group_query_attention=True, num_query_groups=config.num_key_value_heads, kv_channels=config.head_dim,
        padded_vocab_size=config.vocab_size, max_position_embeddings=config.max_position_embeddings,
        rotary_base=int(config.rope_theta), norm_epsilon=config.rms_norm_eps,
        untie_embeddings_and_output_weights=not config.tie_word_embeddings,
        tensor_model_parallel_size=TP, pipeline_model_parallel_size=1, params_dtype=torch.float32,
    )


def _convert(*argv: str | Path) -> None:
    assert convert_main([str(a) for a in argv]) == 0


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.nn.Module]]:
    """Write our TP = 2 checkpoints, run both ranks once, return the directory and the HF references."""
    import transformers

    root = tmp_path_factory.mktemp("mcore-tp")
    references = {}
    for tied in (True, False):
        config = tiny_config(tied)
        name = "tied" if tied else "untied"
        torch.manual_seed(0)
        reference = transformers.Qwen3ForCausalLM._from_config(
            transformers.Qwen3Config(**config.to_hf_dict()), attn_implementation="eager"
        ).float().eval()
        with torch.no_grad():
            for pname, param in reference.named_parameters():
                if "norm" in pname:
                    param.uniform_(0.5, 1.5)
        save_hf_state_dict(reference.state_dict(), root / f"hf-{name}", config=config)
        _convert("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", root / f"hf-{name}",
                 "--save-dir", root / f"ours-{name}", "--target-tensor-parallel-size", TP)
        references[name] = reference
    port = free_port()
    mp.start_processes(_worker, args=(port, root), nprocs=TP, join=True, start_method="spawn")
    return root, references


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_megatron_tp2_loads_our_shards_with_transformers_logits(tp_run, name) -> None:
    root, references = tp_run
    config = tiny_config(name == "tied")
    with torch.no_grad():
        expected = references[name](token_ids(config)).logits
    torch.testing.assert_close(torch.load(root / f"ours-{name}-logits.pt"), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_megatron_tp2_shards_convert_to_hf_with_megatron_logits(tp_run, name) -> None:
    import transformers

    root, _ = tp_run
    _convert("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", root / f"theirs-{name}",
             "--save-dir", root / f"theirs-{name}-hf")
    model = transformers.Qwen3ForCausalLM.from_pretrained(
        root / f"theirs-{name}-hf", attn_implementation="eager"
    ).eval()
    config = tiny_config(name == "tied")
    with torch.no_grad():
        logits = model(token_ids(config)).logits
    torch.testing.assert_close(logits, torch.load(root / f"theirs-{name}-logits.pt"), rtol=1e-5, atol=1e-5)
