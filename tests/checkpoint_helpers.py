"""Shared pieces of the checkpoint tests: a trained tiny native checkpoint, a fake tokenizer directory, and
the `convert` CLI with its assertions."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from qwen3_pretrain.checkpoint.convert import main as convert_main
from qwen3_pretrain.checkpoint.native import save_checkpoint
from qwen3_pretrain.config.model import Qwen3Config, Qwen3MoeConfig, get_preset
from qwen3_pretrain.model.qwen3 import Qwen3ForCausalLM


def fake_tokenizer_dir(tmp_path: Path) -> Path:
    """`tmp_path/tokenizer`: placeholder tokenizer.json and tokenizer_config.json, and a README.md (not a tokenizer
    file)."""
    directory = tmp_path / "tokenizer"
    directory.mkdir()
    (directory / "tokenizer.json").write_text('{"version": "1.0", "model": {}}')
    (directory / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    (directory / "README.md").write_text("not a tokenizer file")
    return directory


def trained_native_checkpoint(
    tmp_path: Path, tied: bool, tokenizer: Path | None = None
) -> tuple[Qwen3ForCausalLM, Path]:
    """A tiny Qwen3 after one AdamW step (so the tie and every tensor matter), saved natively."""
    torch.manual_seed(0)
    config = dataclasses.replace(get_preset("qwen3-tiny"), tie_word_embeddings=tied)
    model = Qwen3ForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, config.vocab_size, (2, 9))  # [b, s + 1]
    model(tokens[:, :-1], labels=tokens[:, 1:]).loss.backward()
    optimizer.step()
    run_config = {"model": dataclasses.asdict(config), "flags": {"tokenizer-name-or-path": str(tokenizer)}}
    save_dir = tmp_path / "ckpt"
    save_checkpoint(save_dir, 1, model, optimizer, None, {}, run_config)
    return model.eval(), save_dir


def convert(*argv: str | Path | int) -> int:
    """`qwen3-pretrain convert` with these arguments (stringified); its exit status."""
    return convert_main([str(a) for a in argv])


def assert_identical(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


def assert_fails_cleanly(capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list, *fragments: str) -> None:
    """`convert(*argv)` exits 2 with every fragment in its stderr, and leaves nothing new in `tmp_path`."""
    before = set(tmp_path.iterdir())
    assert convert(*argv) == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, err
    assert set(tmp_path.iterdir()) == before


def hf_names_and_shapes(c: Qwen3Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of an HF Qwen3 / Qwen3-MoE checkpoint of config `c` with its shape, written out independently
    of the code under test (mcore_format.py's key table, the model's state dict)."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    h, f = c.hidden_size, c.intermediate_size
    shapes = {"model.embed_tokens.weight": (c.vocab_size, h), "model.norm.weight": (h,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, h)
    moe = isinstance(c, Qwen3MoeConfig)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "self_attn.q_norm.weight": (c.head_dim,), p + "self_attn.k_norm.weight": (c.head_dim,),
        }
        if not moe or i in c.mlp_only_layers:
            shapes |= {p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f)}
            continue
        m = c.moe_intermediate_size
        shapes[p + "mlp.gate.weight"] = (c.num_experts, h)
        for e in range(c.num_experts):
            x = f"{p}mlp.experts.{e}."
            shapes |= {x + "gate_proj.weight": (m, h), x + "up_proj.weight": (m, h), x + "down_proj.weight": (h, m)}
    return shapes
