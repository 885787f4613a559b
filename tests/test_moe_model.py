"""Qwen3-MoE: config in transformers' form, presets' sizes, the MoE MLP equal to transformers' Qwen3MoeForCausalLM
(logits, aux loss, gradients), every load-balancing mode against a hand-written loss, the grouped expert kernels
(loop, torch._grouped_mm path, a fake torch_npu) against a per-expert loop, and HF checkpoints both ways."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open

from qwen3_pretrain.checkpoint.hf import load_pretrained, save_pretrained
from qwen3_pretrain.model import (
    ConfigError,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    aux_loss,
    get_preset,
    kernels,
    moe_layers,
    set_aux_loss_scale,
)
from qwen3_pretrain.model.kernels import KernelOptions
from qwen3_pretrain.model.layers import DecoderLayer, RotaryEmbedding
from qwen3_pretrain.model.moe import GroupedExperts, MoEMLP, Router, load_balancing_loss

from model_helpers import per_expert_loop

transformers.logging.set_verbosity_error()
logging.getLogger("transformers").setLevel(logging.ERROR)
pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 96


def tiny(**overrides: Any) -> Qwen3MoeConfig:
    """A 3-layer MoE model small enough for exact fp32 comparisons."""
    values: dict[str, Any] = {
        "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 64,
        "rope_theta": 10_000.0, "num_experts": 6, "num_experts_per_tok": 2, "moe_intermediate_size": 12,
        "torch_dtype": "float32", "bos_token_id": 0, "eos_token_id": 1,
    }
    return Qwen3MoeConfig(**(values | overrides))


PARITY_CONFIGS = {
    "mlp-only-layer-1,norm-topk": {"mlp_only_layers": [1], "norm_topk_prob": True},
    "sparse-step-2,no-norm": {"decoder_sparse_step": 2, "norm_topk_prob": False},
    "all-moe,norm-topk,top-3": {"norm_topk_prob": True, "num_experts_per_tok": 3},
}


def hf_moe(config: Qwen3MoeConfig) -> transformers.Qwen3MoeForCausalLM:
    return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**config.to_hf_dict())).eval()


def pair(config: Qwen3MoeConfig, seed: int = 0) -> tuple[Qwen3ForCausalLM, transformers.Qwen3MoeForCausalLM]:
    """Ours and transformers' model with the same random weights (norms too, so a swap cannot hide)."""
    torch.manual_seed(seed)
    ours = Qwen3ForCausalLM(config)
    with torch.no_grad():
        for param in ours.parameters():
            param.normal_(0.0, 0.2)
    ref = hf_moe(config)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def megatron_aux(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """Hand-written Switch loss of one layer over all tokens: E * sum_e (assignments_e / (k T)) * mean prob_e."""
    tokens, num_experts = probs.shape
    chosen = probs.topk(top_k, dim=-1).indices
    total = probs.new_zeros(())
    for e in range(num_experts):
        f = (chosen == e).sum() / (top_k * tokens)
        total = total + f * probs[:, e].mean()
    return num_experts * total


# ---- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "total", "active"), [
    ("qwen3-30b-a3b", 30.5e9, 3.3e9),
    ("qwen3-235b-a22b", 235e9, 22e9),
])
def test_presets_have_the_published_total_and_active_sizes(name: str, total: float, active: float) -> None:
    config = get_preset(name)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    counted = sum(p.numel() for p in model.parameters())
    assert counted == config.num_parameters()
    assert abs(counted / total - 1) < 0.01
    experts = [p.numel() for n, p in model.named_parameters() if ".experts." in n]
    per_token_experts = sum(experts) * config.num_experts_per_tok // config.num_experts
    assert config.num_parameters(active=True) == counted - sum(experts) + per_token_experts
    assert abs(config.num_parameters(active=True) / active - 1) < 0.02
    head = config.vocab_size * config.hidden_size  # untied: the lookup is no matmul, the LM head is
    assert config.flops_per_token(0) == 6 * (config.num_parameters(active=True) - head)  # active, not total


@pytest.mark.parametrize("overrides", [{"mlp_only_layers": [0, 5]}, {"decoder_sparse_step": 3},
                                       {"decoder_sparse_step": 2, "mlp_only_layers": [3]}, {"num_experts": 0}])
def test_moe_layers_follow_transformers_rule(overrides: dict[str, Any]) -> None:
    config = tiny(num_hidden_layers=6, **overrides)
    ref = hf_moe(config)
    ours = Qwen3ForCausalLM(config)
    for i in range(6):
        hf_sparse = type(ref.model.layers[i].mlp).__name__ == "Qwen3MoeSparseMoeBlock"
        assert isinstance(ours.model.layers[str(i)].mlp, MoEMLP) == hf_sparse == config.is_moe_layer(i)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


def test_config_reads_published_and_transformers_written_forms(tmp_path: Path) -> None:
    published = get_preset("qwen3-30b-a3b").to_hf_dict()
    published = {k: v for k, v in published.items() if k not in ("rope_parameters", "dtype")}  # rope_theta, torch_dtype
    assert published["num_experts"] == 128 and published["model_type"] == "qwen3_moe"
    assert Qwen3Config.from_hf_dict(published) == get_preset("qwen3-30b-a3b")

    config = tiny(mlp_only_layers=[1], norm_topk_prob=True, router_aux_loss_coef=0.02)
    transformers.Qwen3MoeConfig(**config.to_hf_dict()).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "num_local_experts" in written and "num_experts" not in written and "rope_theta" not in written
    loaded = Qwen3Config.from_pretrained(tmp_path)
    assert isinstance(loaded, Qwen3MoeConfig) and loaded == config

    config.save_pretrained(tmp_path)
    ref = transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(ref, transformers.Qwen3MoeConfig)
    for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                 "router_aux_loss_coef", "decoder_sparse_step", "mlp_only_layers", "head_dim"):
        assert getattr(ref, name) == getattr(config, name), name
    assert "moe_router_load_balancing_type" not in json.loads((tmp_path / "config.json").read_text())


def test_absent_fields_take_transformers_moe_defaults() -> None:
    config = Qwen3Config.from_hf_dict({"model_type": "qwen3_moe"})
    ref = transformers.Qwen3MoeConfig()
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "max_position_embeddings", "tie_word_embeddings", "num_experts", "num_experts_per_tok",
                 "moe_intermediate_size", "norm_topk_prob", "router_aux_loss_coef", "decoder_sparse_step",
                 "mlp_only_layers"):
        assert getattr(config, name) == getattr(ref, name), name
    assert config.head_dim == ref.hidden_size // ref.num_attention_heads


@pytest.mark.parametrize(("field", "value"), [
    ("num_experts_per_tok", 7), ("num_experts", -1), ("moe_intermediate_size", 0), ("decoder_sparse_step", 0),
    ("mlp_only_layers", [3]), ("router_aux_loss_coef", -0.1), ("moe_router_load_balancing_type", "sinkhorn"),
])
def test_impossible_moe_values_are_rejected_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=field):
        dataclasses.replace(tiny(), **{field: value})


# ---- parity with transformers ---------------------------------------------------------------------


@pytest.mark.parametrize("overrides", list(PARITY_CONFIGS.values()), ids=list(PARITY_CONFIGS))
def test_logits_and_hf_aux_loss_equal_transformers(overrides: dict[str, Any]) -> None:
    config = tiny(**overrides)
    ours, ref = pair(config)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = ours(ids).logits
        expected = ref(input_ids=ids, output_router_logits=True)
    torch.testing.assert_close(logits, expected.logits, rtol=0, atol=1e-5)
    # HF's aux loss pools all MoE layers' loads and probabilities (f summing to k): rebuilt from our RouterStats.
    stats = [layer.stats for layer in moe_layers(ours).values()]
    assert len(stats) == len(expected.router_logits) == sum(map(config.is_moe_layer, range(3)))
    tokens = ids.numel()
    load = sum(s.tokens_per_expert for s in stats) / (len(stats) * tokens)  # [E], sums to k
    probs = sum(s.mean_probs for s in stats) / len(stats)  # [E]
    torch.testing.assert_close(config.num_experts * (load * probs).sum(), expected.aux_loss, rtol=0, atol=1e-5)
    for stat, logits_of_layer in zip(stats, expected.router_logits, strict=True):
        hf_probs = logits_of_layer.float().softmax(-1)
        torch.testing.assert_close(stat.load_balancing_loss, megatron_aux(hf_probs, config.num_experts_per_tok))


@pytest.mark.parametrize("overrides", list(PARITY_CONFIGS.values()), ids=list(PARITY_CONFIGS))
@pytest.mark.parametrize("mode", ["none", "aux_loss"])
def test_gradients_equal_transformers_with_the_load_balancing_loss(overrides: dict[str, Any], mode: str) -> None:
    config = tiny(router_aux_loss_coef=0.3, moe_router_load_balancing_type=mode, **overrides)
    ours, ref = pair(config, seed=2)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
    labels = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(4))
    F.cross_entropy(ours(ids).logits.flatten(0, 1), labels.flatten()).backward()
    out = ref(input_ids=ids, output_router_logits=True)
    loss = F.cross_entropy(out.logits.flatten(0, 1), labels.flatten())
    if mode == "aux_loss":  # ours adds it by itself: coef x the per-layer Switch loss, summed over layers
        aux = 0.3 * sum(megatron_aux(lg.float().softmax(-1), config.num_experts_per_tok) for lg in out.router_logits)
        torch.testing.assert_close(aux_loss(ours), aux.detach())
        loss = loss + aux
    loss.backward()
    theirs = dict(ref.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, theirs[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    assert any(".gate." in n and p.grad.abs().sum() > 0 for n, p in ours.named_parameters())


# ---- load-balancing modes -------------------------------------------------------------------------


def routed(seed: int = 0, b: int = 3, s: int = 7, e: int = 5, k: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Router probabilities [b, s, E] (skewed, with grad) and the top-k experts they choose [b, s, k]."""
    logits = torch.randn(b, s, e, generator=torch.Generator().manual_seed(seed)) * 2
    logits[..., 0] += 1.0
    probs = logits.softmax(-1).requires_grad_()
    return probs, probs.detach().topk(k, dim=-1).indices


def counts_of(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per sequence [b, E], counted by hand."""
    return torch.tensor([[float((seq == e).sum()) for e in range(num_experts)] for seq in experts])


def test_aux_loss_is_switch_loss_over_the_micro_batch() -> None:
    probs, experts = routed()
    b, s, e = probs.shape
    expected = megatron_aux(probs.reshape(b * s, e), 2)
    torch.testing.assert_close(load_balancing_loss(probs, counts_of(experts, e), "aux_loss", 2), expected)


def test_seq_aux_loss_averages_the_per_sequence_losses() -> None:
    probs, experts = routed()
    e = probs.shape[-1]
    expected = torch.stack([megatron_aux(probs[i], 2) for i in range(probs.shape[0])]).mean()
    got = load_balancing_loss(probs, counts_of(experts, e), "seq_aux_loss", 2)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, load_balancing_loss(probs, counts_of(experts, e), "aux_loss", 2))


def test_global_aux_loss_takes_the_loads_of_the_global_batch() -> None:
    probs, experts = routed()
    b, s, e = probs.shape
    _, other_experts = routed(seed=5)  # the rest of the global batch (another rank or micro batch)
    global_load = counts_of(experts, e).sum(0) + counts_of(other_experts, e).sum(0)
    got = load_balancing_loss(probs, counts_of(experts, e), "global_aux_loss", 2, global_load)
    f = global_load / (2 * 2 * b * s)
    expected = e * sum(f[i] * probs[..., i].mean() for i in range(e))
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(  # without global loads: the micro batch's, i.e. aux_loss
        load_balancing_loss(probs, counts_of(experts, e), "global_aux_loss", 2),
        load_balancing_loss(probs, counts_of(experts, e), "aux_loss", 2),
    )


@pytest.mark.parametrize("mode", ["aux_loss", "seq_aux_loss", "global_aux_loss", "none"])
def test_each_mode_adds_its_gradient_to_the_router(mode: str) -> None:
    config = tiny(moe_router_load_balancing_type=mode, router_aux_loss_coef=0.5)
    torch.manual_seed(0)
    layer = MoEMLP(config, KernelOptions())
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(0.0, 0.3)
    x = torch.randn(2, 9, config.hidden_size, generator=torch.Generator().manual_seed(1))
    loads: list[torch.Tensor] = []
    elsewhere = torch.arange(config.num_experts, dtype=torch.float32) * 3  # loads the other ranks report

    def global_load(local: torch.Tensor) -> torch.Tensor:
        loads.append(local)
        return local + elsewhere

    layer.global_expert_load = global_load
    set_aux_loss_scale(layer, 0.25)
    layer(x).square().sum().backward()
    got = layer.gate.weight.grad.clone()

    layer.zero_grad()
    layer.aux_loss_coef = 0.0  # the same forward without the attached loss, plus the hand-written loss
    out = layer(x)
    probs = (x.reshape(-1, config.hidden_size) @ layer.gate.weight.T).softmax(-1)  # [T, E]
    k, e = config.num_experts_per_tok, config.num_experts
    chosen = probs.detach().topk(k, dim=-1).indices
    if mode == "aux_loss":
        expected_loss = megatron_aux(probs, k)
    elif mode == "seq_aux_loss":
        expected_loss = (megatron_aux(probs[:9], k) + megatron_aux(probs[9:], k)) / 2
    elif mode == "global_aux_loss":
        load = torch.stack([(chosen == i).sum() for i in range(e)]).float() + elsewhere
        expected_loss = e * (load / load.sum() * probs.mean(0)).sum()
        assert len(loads) == 2 and torch.equal(loads[0], torch.stack([(chosen == i).sum() for i in range(e)]).float())
    else:
        expected_loss = probs.new_zeros(())
    (out.square().sum() + 0.5 * 0.25 * expected_loss).backward()
    torch.testing.assert_close(got, layer.gate.weight.grad, rtol=1e-4, atol=1e-5)
    (without,) = torch.autograd.grad(layer(x).square().sum(), layer.gate.weight)
    assert ((got - without).abs().max() > 1e-3) == (mode != "none")  # the loss's share is far above the tolerance
    torch.testing.assert_close(layer.stats.load_balancing_loss, expected_loss.detach(), rtol=1e-6, atol=1e-7)


def test_activation_recompute_keeps_the_load_balancing_gradient() -> None:
    config = tiny(router_aux_loss_coef=0.5)
    torch.manual_seed(0)
    layer = DecoderLayer(config, KernelOptions(), index=0)
    x = torch.randn(2, 7, config.hidden_size, generator=torch.Generator().manual_seed(1))
    cos, sin = RotaryEmbedding(config.head_dim, 10_000.0)(torch.arange(7)[None], torch.float32)
    layer(x, cos, sin).square().sum().backward()
    plain = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    torch.utils.checkpoint.checkpoint(layer, x, cos, sin, use_reentrant=False).square().sum().backward()
    for name, param in layer.named_parameters():
        torch.testing.assert_close(param.grad, plain[name], rtol=1e-5, atol=1e-7, msg=name)


# ---- the grouped expert computation ---------------------------------------------------------------


def experts_and_routing(
    dtype: torch.dtype = torch.float32, tokens: int = 23
) -> tuple[GroupedExperts, torch.Tensor, Router]:
    torch.manual_seed(0)
    experts = GroupedExperts(6, 16, 12, KernelOptions())
    experts.reset_parameters(0.3)
    router = Router(16, 6, 2, norm_topk_prob=True)
    x = torch.randn(tokens, 16, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_()
    return experts.to(dtype), x, router.to(dtype)


def check_against_loop(
    experts: GroupedExperts, x: torch.Tensor, router: Router, move: tuple[int, int] | None = None
) -> None:
    """Ours == the loop, values and gradients; `move` = (a, b) reroutes expert a's tokens to b (a gets none)."""
    routing = router(x)
    if move is not None:
        routing = routing._replace(experts=routing.experts.masked_fill(routing.experts == move[0], move[1]))
    got = experts(x, routing)
    params = [x, experts.gate_up_proj, experts.down_proj, router.weight]
    grads = torch.autograd.grad(got.square().sum(), params, retain_graph=True)  # the routing serves both
    expected = per_expert_loop(x, routing.experts, routing.weights, experts.gate_up_proj, experts.down_proj)
    want = torch.autograd.grad(expected.square().sum(), params)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(grads, want, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_grouped_experts_equal_a_per_expert_loop() -> None:
    experts, x, router = experts_and_routing()
    routing = router(x)
    assert routing.experts.unique().numel() == 6  # every expert has tokens, and
    check_against_loop(experts, x, router)
    check_against_loop(experts, x, router, move=(3, 5))  # expert 3 gets no token: an empty group


def test_torch_grouped_mm_path_equals_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA branch (torch._grouped_mm, which also runs on CPU) gives the fallback's numbers."""
    calls: list[Any] = []
    grouped_mm = torch._grouped_mm

    def recording(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(kwargs["offs"])
        return grouped_mm(*args, **kwargs)

    monkeypatch.setattr(kernels, "_torch_grouped_mm_applies", lambda x, w: True)
    monkeypatch.setattr(torch, "_grouped_mm", recording)
    experts, x, router = experts_and_routing()
    check_against_loop(experts, x, router)
    assert calls and all(offs.dtype == torch.int32 and int(offs[-1]) == 23 * 2 for offs in calls)


def test_torch_grouped_mm_is_used_only_for_bf16_on_cuda_sm80_up(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda", 0)
    weight = types.SimpleNamespace(device=cuda, shape=(4, 768, 2048))
    x = types.SimpleNamespace(device=cuda, dtype=torch.bfloat16, shape=(100, 2048))
    monkeypatch.setattr(kernels, "compute_dtype", lambda t: t.dtype)
    for capability, expected in (((9, 0), True), ((8, 0), True), ((7, 5), False)):
        monkeypatch.setattr(kernels, "_cuda_capability", lambda index, c=capability: c)
        assert kernels._torch_grouped_mm_applies(x, weight) is expected  # type: ignore[arg-type]
    weight.shape = (4, 12, 2048)  # rows of 24 bytes: not a 16-byte multiple
    assert not kernels._torch_grouped_mm_applies(x, weight)  # type: ignore[arg-type]
    weight.shape, x.dtype = (4, 768, 2048), torch.float32
    assert not kernels._torch_grouped_mm_applies(x, weight)  # type: ignore[arg-type]
    assert not kernels._torch_grouped_mm_applies(torch.zeros(2, dtype=torch.bfloat16), torch.zeros(1, 2, 2))


def test_bf16_experts_on_float32_units_equal_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "cpu_has_fast_bf16_matmul", lambda: False)
    experts, x, router = experts_and_routing(torch.bfloat16)
    routing = router(x)
    got = experts(x, routing)
    assert got.dtype == torch.bfloat16
    expected = per_expert_loop(x.float(), routing.experts, routing.weights.float(), experts.gate_up_proj.float(),
                               experts.down_proj.float())
    assert ((got.float() - expected).abs().max() / expected.abs().max()) < 2e-2


class FakeTorchNpu(types.ModuleType):
    """`npu_grouped_matmul` from its documented semantics (single x and y, per-group weights [k, n], group_list
    the cumulative group ends): group_type 0 splits the rows of x, group_type 2 the contraction dimension."""

    def __init__(self) -> None:
        super().__init__("torch_npu")
        self.calls: list[dict[str, Any]] = []

    def npu_grouped_matmul(self, x: list[torch.Tensor], weight: list[torch.Tensor], **kw: Any) -> list[torch.Tensor]:
        self.calls.append(kw)
        assert len(x) == 1 and kw["split_item"] == 3 and kw["group_list_type"] == 0
        ends = kw["group_list"].tolist()
        starts = [0, *ends[:-1]]
        if kw["group_type"] == 0:  # y[rows of g] = x[rows of g] @ weight[g]
            assert len(weight) == len(ends)
            return [torch.cat([x[0][a:b] @ w for a, b, w in zip(starts, ends, weight, strict=True)])]
        assert kw["group_type"] == 2 and len(weight) == 1  # y[g] = x[:, cols of g] @ weight[rows of g]
        return [torch.stack([x[0][:, a:b] @ weight[0][a:b] for a, b in zip(starts, ends, strict=True)])]


def test_npu_grouped_matmul_forward_and_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTorchNpu()
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    experts, x, router = experts_and_routing()
    experts.kernels = KernelOptions(backend="npu")
    monkeypatch.setattr(kernels, "swiglu", lambda gate, up, options=None: F.silu(gate) * up)  # only gmm is faked
    check_against_loop(experts, x, router)
    assert [c["group_type"] for c in fake.calls] == [0, 0, 0, 2, 0, 2]  # 2 forward; per backward: x, then weights


def test_moe_decoder_layer_compiles_without_graph_breaks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Router, dispatch, combine and the attached loss trace whole (bf16 with the grouped-mm kernel, as on GPUs)."""
    monkeypatch.setattr(kernels, "_torch_grouped_mm_applies", lambda x, w: True)
    config = tiny(moe_intermediate_size=16)  # 16-byte rows, as _grouped_mm needs
    torch.manual_seed(0)
    layer = DecoderLayer(config, KernelOptions(), index=0).bfloat16()
    assert isinstance(layer.mlp, MoEMLP)
    x = torch.randn(2, 7, config.hidden_size, dtype=torch.bfloat16).requires_grad_()
    cos, sin = RotaryEmbedding(config.head_dim, 10_000.0)(torch.arange(7)[None], torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    out = compiled(x, cos, sin)
    torch.testing.assert_close(out, layer(x, cos, sin), rtol=0, atol=0)
    out.sum().backward()
    assert layer.mlp.stats is not None and layer.mlp.gate.weight.grad is not None


# ---- HF checkpoints -------------------------------------------------------------------------------


def test_our_save_loads_into_transformers_with_per_expert_names(tmp_path: Path) -> None:
    config = tiny(mlp_only_layers=[1], norm_topk_prob=True)
    ours, _ = pair(config)
    save_pretrained(ours, tmp_path, max_shard_bytes=40_000)  # several shards
    names: set[str] = set()
    for path in tmp_path.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            names |= set(handle.keys())
    assert "model.layers.0.mlp.experts.5.up_proj.weight" in names and "model.layers.2.mlp.gate.weight" in names
    assert "model.layers.1.mlp.gate_proj.weight" in names and not any("gate_up_proj" in n for n in names)
    ref = transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ref(input_ids=ids).logits, ours(ids).logits, rtol=0, atol=1e-5)


def test_transformers_save_loads_into_ours(tmp_path: Path) -> None:
    config = tiny(decoder_sparse_step=2, norm_topk_prob=False)
    _, ref = pair(config, seed=1)
    ref.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path, dtype=torch.float32).eval()
    assert isinstance(ours.config, Qwen3MoeConfig) and ours.config.decoder_sparse_step == 2
    theirs = ref.state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(input_ids=ids).logits, rtol=0, atol=1e-5)
    save_pretrained(ours, tmp_path / "again")  # and back: the same tensors by name
    again = load_pretrained(tmp_path / "again", dtype=torch.float32)
    for name, tensor in again.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name
