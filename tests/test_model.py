"""Qwen3ForCausalLM against transformers' Qwen3ForCausalLM, meta-device init, pipeline skips, generate."""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

import pytest
import torch
import transformers

from qwen3_pretrain.checkpoint.hf import load_pretrained, save_pretrained
from qwen3_pretrain.model import Qwen3Config, Qwen3ForCausalLM, causal_lm_loss, get_preset
from qwen3_pretrain.model.layers import RotaryEmbedding

from model_helpers import rel_err

transformers.logging.set_verbosity_error()
logging.getLogger("transformers").setLevel(logging.ERROR)

VOCAB = 96


def tiny_config(hidden: int, heads: int, kv_heads: int, head_dim: int, tied: bool) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=128, rope_theta=10_000.0, tie_word_embeddings=tied,
        torch_dtype="float32", bos_token_id=0, eos_token_id=1,
    )


# (hidden, heads, kv heads, head_dim, tied): GQA ratios 1, 2, 4; head_dim both == and != hidden / heads.
CONFIGS = {
    "mha-tied-headdim!=h/n": tiny_config(32, 4, 4, 16, True),
    "gqa2-untied": tiny_config(64, 4, 2, 16, False),
    "gqa4-untied-headdim!=h/n": tiny_config(48, 8, 2, 8, False),
    "gqa2-tied-headdim!=h/n": tiny_config(40, 4, 2, 12, True),
}


def randomized(config: Qwen3Config, seed: int = 0) -> Qwen3ForCausalLM:
    """Our model with every weight random, norms included (so a missed or misplaced norm shows)."""
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.init_weights(std=0.2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
    return model.eval()


def hf_model_from_dir(directory: Path, dtype: torch.dtype, attn: str) -> transformers.Qwen3ForCausalLM:
    return transformers.Qwen3ForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation=attn).eval()


def shifted(ids: torch.Tensor) -> torch.Tensor:
    """HF's labels=ids as our position-aligned labels."""
    return torch.cat((ids[:, 1:], torch.full_like(ids[:, :1], -100)), dim=1)  # [b, s]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp32_logits_and_loss_match_transformers(name: str, tmp_path: Path) -> None:
    check_parity_with_transformers(name, torch.float32, "eager", 1e-5, tmp_path)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16_logits_and_loss_match_transformers(name: str, cpu_bf16_kernels: str, tmp_path: Path) -> None:
    # torch's bf16 kernels are bit-identical to HF's (the same kernels), so hold 2e-3; bf16 on float32 units
    # rounds at other points (float32 attention probabilities, summation order): the 2e-2.
    tol = 2e-3 if cpu_bf16_kernels == "native" else 2e-2
    check_parity_with_transformers(name, torch.bfloat16, "sdpa", tol, tmp_path)


def check_parity_with_transformers(name: str, dtype: torch.dtype, attn: str, tol: float, tmp_path: Path) -> None:
    """Logits (default and spaced position ids) and loss of ours and HF's Qwen3 on the same saved weights."""
    config = CONFIGS[name]
    save_pretrained(randomized(config), tmp_path, dtype=dtype)
    ours = load_pretrained(tmp_path, dtype=dtype).eval()
    ref = hf_model_from_dir(tmp_path, dtype, attn)
    assert ours.model.rotary_emb.inv_freq.dtype == torch.float32

    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))
    hf_labels = ids.clone()
    hf_labels[0, 5:8] = -100
    steps = torch.arange(ids.shape[1])
    positions = torch.stack((3 * steps, steps + 5))  # [b, s]: per-row positions, spaced and shifted
    with torch.no_grad():
        expected = ref(input_ids=ids, labels=hf_labels)
        got = ours(ids, labels=shifted(hf_labels))
        expected_offset = ref(input_ids=ids, position_ids=positions).logits
        got_offset = ours(ids, position_ids=positions).logits

    assert got.logits.dtype == dtype and got.loss.dtype == torch.float32
    assert rel_err(got.logits, expected.logits) <= tol
    assert rel_err(got_offset, expected_offset) <= tol
    assert rel_err(got_offset, got.logits) > 0.1  # the spaced positions really change the output
    assert got.loss.item() == pytest.approx(expected.loss.item(), rel=tol)


def test_loss_is_mean_over_aligned_non_ignored_labels() -> None:
    logits = torch.randn(2, 3, 5)
    labels = torch.tensor([[1, -100, 4], [0, 2, -100]])
    log_probs = logits.log_softmax(-1)
    picked = [log_probs[0, 0, 1], log_probs[0, 2, 4], log_probs[1, 0, 0], log_probs[1, 1, 2]]
    assert torch.allclose(causal_lm_loss(logits, labels), -torch.stack(picked).mean())


def test_module_names_are_hf_names() -> None:
    config = CONFIGS["gqa2-untied"]
    ours = set(Qwen3ForCausalLM(config).state_dict())
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**config.to_hf_dict()))
    assert ours == set(hf.state_dict())


@pytest.mark.parametrize("tied", [True, False])
def test_meta_to_empty_tie_init(tied: bool) -> None:
    config = dataclasses.replace(get_preset("qwen3-tiny"), tie_word_embeddings=tied)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    model.to_empty(device="cpu")
    model.tie_weights()
    model.init_weights(std=0.01)

    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert sum(p.numel() for p in model.parameters()) == config.num_parameters()
    expected_inv_freq = RotaryEmbedding(config.head_dim, config.rope_theta).inv_freq
    assert torch.equal(model.model.rotary_emb.inv_freq, expected_inv_freq)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(param, torch.ones_like(param)), name
        else:
            assert param.mean().abs() < 2e-3 and 0.009 < param.std() < 0.011, name

    # The tie is real: a step on the loss moves embedding and head together.
    ids = torch.randint(0, config.vocab_size, (1, 8))
    model(ids, labels=shifted(ids)).loss.backward()
    if tied:
        assert model.lm_head.weight.grad is model.model.embed_tokens.weight.grad
    else:
        assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_tie_is_lost_by_to_empty_without_tie_weights() -> None:
    with torch.device("meta"):
        model = Qwen3ForCausalLM(get_preset("qwen3-tiny"))
    model.to_empty(device="cpu")
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # why tie_weights() is required


def test_load_state_dict_accepts_hf_dict_without_tied_head() -> None:
    source = randomized(CONFIGS["mha-tied-headdim!=h/n"], seed=3)
    target = Qwen3ForCausalLM(CONFIGS["mha-tied-headdim!=h/n"])
    target.load_state_dict(source.hf_state_dict())
    assert "lm_head.weight" not in source.hf_state_dict()
    assert torch.equal(target.lm_head.weight, source.model.embed_tokens.weight)
    untied = Qwen3ForCausalLM(CONFIGS["gqa2-untied"])
    without_head = {k: v for k, v in untied.state_dict().items() if k != "lm_head.weight"}
    with pytest.raises(RuntimeError, match=r"Missing key.*lm_head\.weight"):
        untied.load_state_dict(without_head)


def test_pipeline_style_split_composes_to_full_forward() -> None:
    model = randomized(CONFIGS["gqa2-untied"], seed=4)
    first, last = copy.deepcopy(model), copy.deepcopy(model)
    first.model.norm, first.lm_head = None, None
    del first.model.layers["1"]
    last.model.embed_tokens = None
    del last.model.layers["0"]
    assert "model.layers.1.mlp.up_proj.weight" in last.state_dict()  # names survive the split

    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        hidden = first(ids)
        assert hidden.shape == (2, 9, model.config.hidden_size)
        assert torch.equal(last(hidden).logits, model(ids).logits)


def test_generate_greedy_equals_manual_argmax() -> None:
    model = randomized(CONFIGS["gqa4-untied-headdim!=h/n"], seed=5)
    prompt = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(6))
    tokens = prompt
    with torch.no_grad():
        for _ in range(5):
            next_token = model(tokens).logits[:, -1].argmax(-1, keepdim=True)  # [b, 1]
            tokens = torch.cat((tokens, next_token), dim=1)
    assert torch.equal(model.generate(prompt, max_new_tokens=5), tokens)
    # top_k=1 sampling is greedy whatever the temperature.
    sampled = model.generate(prompt, 5, temperature=2.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, tokens)


def test_generate_sampling_is_seeded_and_stops_at_eos() -> None:
    model = randomized(CONFIGS["gqa2-untied"], seed=7)
    prompt = torch.randint(0, VOCAB, (1, 3))
    runs = [model.generate(prompt, 6, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(9))
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1]) and runs[0].shape == (1, 9)
    greedy = model.generate(prompt, 6)
    eos = int(greedy[0, 4])  # the second generated token
    stopped = model.generate(prompt, 6, eos_token_id=eos)
    first_eos = int((greedy[0, 3:] == eos).nonzero()[0]) + 3
    assert torch.equal(stopped, greedy[:, : first_eos + 1])
