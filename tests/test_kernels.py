"""model/kernels.py: the reference path equals HF transformers' Qwen3 math, the npu backend calls torch_npu's
fused kernels with the right layouts (a fake torch_npu records the calls), and a decoder block compiles
without graph breaks. The kernel choice is a `KernelOptions` passed to each call."""

from __future__ import annotations

import math
import sys
import types
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen3 import modeling_qwen3 as hf

from qwen3_pretrain.model import Qwen3Config, kernels
from qwen3_pretrain.model.kernels import KernelOptions
from qwen3_pretrain.model.layers import DecoderLayer, RotaryEmbedding

from model_helpers import rel_err

B, S, HEADS, KV_HEADS, D = 2, 11, 4, 2, 16
NPU, TORCH = KernelOptions(backend="npu"), KernelOptions(backend="torch")


pytestmark = pytest.mark.usefixtures("one_thread")


def _config() -> Qwen3Config:
    return Qwen3Config(
        vocab_size=64, hidden_size=48, intermediate_size=40, num_hidden_layers=1, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, head_dim=D, max_position_embeddings=64, rope_theta=10_000.0,
        tie_word_embeddings=False, torch_dtype="float32", bos_token_id=0, eos_token_id=1,
    )


def _randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _cos_sin(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.stack((torch.arange(S), torch.arange(S) * 3 + 2))  # [b, s]
    return RotaryEmbedding(D, 10_000.0)(positions, dtype)  # [b, s, d] each


# ---- the reference path is HF's math ---------------------------------------------------------------


def test_cpu_process_uses_the_reference_backend() -> None:
    assert KernelOptions().backend_for(torch.device("cpu")) == "torch"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_is_hf_rms_norm(dtype: torch.dtype) -> None:
    x = _randn(B, S, 48, dtype=dtype) * 3
    norm = hf.Qwen3RMSNorm(48, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * _randn(48, seed=1))
        assert torch.equal(kernels.rms_norm(x, norm.weight, 1e-6), norm(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_is_hf_rotary(dtype: torch.dtype) -> None:
    q, k = _randn(B, S, HEADS, D, dtype=dtype), _randn(B, S, KV_HEADS, D, dtype=dtype, seed=1)
    cos, sin = _cos_sin(dtype)
    hf_q, hf_k = hf.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # HF: [b, heads, s, d]
    assert torch.equal(kernels.apply_rotary(q, cos, sin), hf_q.transpose(1, 2))
    assert torch.equal(kernels.apply_rotary(k, cos, sin), hf_k.transpose(1, 2))


def test_swiglu_is_hf_mlp_activation() -> None:
    gate, up = _randn(B, S, 40), _randn(B, S, 40, seed=1)
    act = hf.ACT2FN["silu"]
    assert torch.equal(kernels.swiglu(gate, up), act(gate) * up)


@pytest.mark.parametrize("kv_heads", [HEADS, KV_HEADS, 1])
def test_attention_is_hf_causal_gqa_attention(kv_heads: int) -> None:
    q = _randn(B, S, HEADS, D)
    k, v = _randn(B, S, kv_heads, D, seed=1), _randn(B, S, kv_heads, D, seed=2)
    module = types.SimpleNamespace(num_key_value_groups=HEADS // kv_heads, training=False)
    causal = torch.full((S, S), float("-inf")).triu(1)  # [s, s] additive mask
    expected, _ = hf.eager_attention_forward(
        module, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal, scaling=D**-0.5
    )  # [b, s, heads, d]
    got = kernels.attention(q, k, v, scale=D**-0.5)
    assert got.shape == (B, S, HEADS, D)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    # Causal: the first position sees only itself.
    torch.testing.assert_close(got[:, 0], v[:, 0].repeat_interleave(HEADS // kv_heads, dim=1), rtol=1e-6, atol=1e-6)


# ---- --attention-backend: the SDPA kernel order ---------------------------------------------------

# The CPU kernel each choice runs: flash first (and cuDNN / memory-efficient, which CPUs lack, fall
# back to it), or the math reference alone.
CPU_SDPA_KERNEL = {
    "auto": "aten::_scaled_dot_product_flash_attention_for_cpu",
    "flash": "aten::_scaled_dot_product_flash_attention_for_cpu",
    "fused": "aten::_scaled_dot_product_flash_attention_for_cpu",
    "efficient": "aten::_scaled_dot_product_flash_attention_for_cpu",
    "unfused": "aten::_scaled_dot_product_attention_math",
}


def _attention_ops(fn: Any) -> set[str]:
    """The names of the aten SDPA ops `fn()` runs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")}


@pytest.mark.parametrize("name", list(kernels.ATTENTION_BACKENDS))
def test_attention_backend_orders_the_sdpa_kernels(name: str) -> None:
    q = _randn(B, S, HEADS, D).requires_grad_()
    k, v = _randn(B, S, KV_HEADS, D, seed=1), _randn(B, S, KV_HEADS, D, seed=2)
    expected = kernels.attention(q, k, v, scale=D**-0.5)
    (expected_grad,) = torch.autograd.grad(expected.sum(), q)
    options = KernelOptions(attention=name)
    got = kernels.attention(q, k, v, D**-0.5, options)
    assert _attention_ops(lambda: kernels.attention(q, k, v, D**-0.5, options)) == {CPU_SDPA_KERNEL[name]}
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), q)[0], expected_grad, rtol=1e-5, atol=1e-6)


def test_attention_backend_compiles_without_graph_breaks() -> None:
    q = _randn(B, S, HEADS, D)
    k, v = _randn(B, S, KV_HEADS, D, seed=1), _randn(B, S, KV_HEADS, D, seed=2)
    unfused = KernelOptions(attention="unfused")
    torch._dynamo.reset()
    compiled = torch.compile(lambda *t: kernels.attention(*t, D**-0.5, unfused), backend="aot_eager", fullgraph=True)
    assert _attention_ops(lambda: compiled(q, k, v)) == {CPU_SDPA_KERNEL["unfused"]}
    torch.testing.assert_close(compiled(q, k, v), kernels.attention(q, k, v, D**-0.5, unfused), rtol=0, atol=0)


def test_unknown_attention_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown attention backend 'fa3'; use one of auto, flash, fused"):
        KernelOptions(attention="fa3")


# ---- bf16 on float32 units (CPUs without fast bf16 matmuls) ----------------------------------------


def _saved_dtypes(fn: Any) -> tuple[Any, list[torch.dtype]]:
    """fn()'s result and the dtypes of the tensors autograd saved for its backward."""
    saved: list[torch.dtype] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        return fn(), saved


def _cpu_bf16_via_float32(monkeypatch: pytest.MonkeyPatch, via_float32: bool) -> None:
    """Pretend the CPU lacks (True) or has (False) fast bf16 matmuls."""
    monkeypatch.setattr(kernels, "cpu_has_fast_bf16_matmul", lambda: not via_float32)


def test_bf16_via_float32_applies_to_cpu_bf16_only(monkeypatch: pytest.MonkeyPatch) -> None:
    _cpu_bf16_via_float32(monkeypatch, True)
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert kernels.bf16_via_float32(cpu, torch.bfloat16)
    assert not kernels.bf16_via_float32(cpu, torch.float32) and not kernels.bf16_via_float32(cpu, torch.float16)
    assert not kernels.bf16_via_float32(meta, torch.bfloat16)
    _cpu_bf16_via_float32(monkeypatch, False)
    assert not kernels.bf16_via_float32(cpu, torch.bfloat16)


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "bf16-tensors"])
def test_linear_bf16_via_float32_is_a_float32_matmul_of_bf16_operands(
    monkeypatch: pytest.MonkeyPatch, autocast: bool
) -> None:
    dtype = torch.float32 if autocast else torch.bfloat16  # the tensors' own dtype
    x, w = _randn(B, S, 48, dtype=dtype).requires_grad_(), _randn(24, 48, dtype=dtype, seed=1).requires_grad_()

    def run(via_float32: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.dtype]]:
        _cpu_bf16_via_float32(monkeypatch, via_float32)
        x.grad = w.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, saved = _saved_dtypes(lambda: kernels.linear(x, w))
        out.float().pow(2).sum().backward()
        return out.detach(), x.grad.clone(), w.grad.clone(), saved

    out, grad_x, grad_w, saved = run(True)
    rounded = (x.detach().bfloat16().float() @ w.detach().bfloat16().float().T).bfloat16()  # [b, s, 24]
    assert out.dtype == torch.bfloat16 and torch.equal(out, rounded)
    assert set(saved) == {torch.bfloat16}  # backward keeps bf16 operands, as a bf16 kernel would
    assert grad_x.dtype == grad_w.dtype == dtype
    native_out, native_grad_x, native_grad_w, _ = run(False)
    for got, native in ((out, native_out), (grad_x, native_grad_x), (grad_w, native_grad_w)):
        assert rel_err(got, native) <= 1e-2


def test_linear_leaves_float32_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    _cpu_bf16_via_float32(monkeypatch, True)
    x, w = _randn(B, S, 48), _randn(24, 48, seed=1)
    assert torch.equal(kernels.linear(x, w), F.linear(x, w))


@pytest.mark.parametrize("kv_heads", [HEADS, KV_HEADS])
def test_attention_bf16_via_float32_is_float32_attention_of_bf16_inputs(
    monkeypatch: pytest.MonkeyPatch, kv_heads: int
) -> None:
    q = _randn(B, S, HEADS, D, dtype=torch.bfloat16)
    k = _randn(B, S, kv_heads, D, dtype=torch.bfloat16, seed=1)
    v = _randn(B, S, kv_heads, D, dtype=torch.bfloat16, seed=2)
    _cpu_bf16_via_float32(monkeypatch, True)
    got = kernels.attention(q, k, v, scale=D**-0.5)
    expected = kernels.attention(q.float(), k.float(), v.float(), scale=D**-0.5).bfloat16()
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)
    _cpu_bf16_via_float32(monkeypatch, False)
    native = kernels.attention(q, k, v, scale=D**-0.5)
    assert native.dtype == torch.bfloat16 and rel_err(got, native) <= 1e-2


# ---- the npu backend, with a fake torch_npu ---------------------------------------------------------


class FakeTorchNpu(types.ModuleType):
    """Implements the four torch_npu kernels from their documented semantics and records every call."""

    def __init__(self) -> None:
        super().__init__("torch_npu")
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def npu_rms_norm(
        self, x: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-6
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.append(("npu_rms_norm", (x, gamma), {"epsilon": epsilon}))
        assert gamma.dtype == x.dtype, "npu_rms_norm needs gamma in x's dtype"
        rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + epsilon)
        return gamma * (x.float() * rstd).to(x.dtype), rstd

    def npu_rotary_mul(self, x: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
        self.calls.append(("npu_rotary_mul", (x, r1, r2), {}))
        x1, x2 = torch.chunk(x, 2, -1)
        return r1 * x + r2 * torch.cat((-x2, x1), dim=-1)

    def npu_swiglu(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        self.calls.append(("npu_swiglu", (x,), {"dim": dim}))
        a, b = torch.chunk(x, 2, dim=dim)
        return a * torch.sigmoid(a) * b

    def npu_fusion_attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        head_num: int,
        input_layout: str,
        **kwargs: Any,
    ) -> tuple[Any, ...]:
        self.calls.append(("npu_fusion_attention", (query, key, value, head_num, input_layout), kwargs))
        assert input_layout == "BSND" and kwargs["sparse_mode"] in (0, 2)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [b, n, s, d]
        groups = head_num // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        s = q.shape[2]
        mask = kwargs["atten_mask"]  # sparse_mode 0: the explicit [b, 1, s, s] mask
        if kwargs["sparse_mode"] == 2:  # the 2048 x 2048 causal mask's top-left corner
            mask = mask[:s, :s]
        scores = (q @ k.transpose(-1, -2) * kwargs["scale"]).masked_fill(mask, float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2)  # [b, s, n, d]
        return out, None, None, None, 0, 0, 0

    def names(self) -> list[str]:
        return [name for name, _, _ in self.calls]


@pytest.fixture
def fake_npu(monkeypatch: pytest.MonkeyPatch) -> FakeTorchNpu:
    """(The fake) torch_npu, which the kernels import when their options pick the npu backend (`NPU`)."""
    fake = FakeTorchNpu()
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    return fake


def test_kernel_backend_follows_the_device() -> None:
    npu_device = types.SimpleNamespace(type="npu")  # stands in for torch.device("npu"), which needs torch_npu
    assert KernelOptions().backend_for(torch.device("cuda")) == "torch"
    assert KernelOptions().backend_for(npu_device) == "npu"
    assert TORCH.backend_for(npu_device) == "torch" and NPU.backend_for(torch.device("cpu")) == "npu"
    with pytest.raises(ValueError, match="unknown kernel backend 'triton'; use one of torch, npu"):
        KernelOptions(backend="triton")  # type: ignore[arg-type]


def test_npu_kernels_get_documented_layouts(fake_npu: FakeTorchNpu) -> None:
    x, weight = _randn(B, S, 48, dtype=torch.bfloat16), 1 + _randn(48, seed=1)  # fp32 weight, bf16 input
    out = kernels.rms_norm(x, weight, 1e-5, NPU)
    (_, (got_x, gamma), kwargs), = fake_npu.calls
    assert got_x is x and gamma.dtype == torch.bfloat16 and kwargs == {"epsilon": 1e-5} and out.dtype == torch.bfloat16

    q = _randn(B, S, HEADS, D)
    cos, sin = _cos_sin(torch.float32)
    expected = q * cos[:, :, None] + kernels.rotate_half(q) * sin[:, :, None]  # tables [b, s, 1, d]
    torch.testing.assert_close(kernels.apply_rotary(q, cos, sin, NPU), expected)
    _, (_, r1, r2), _ = fake_npu.calls[-1]
    assert r1.shape == r2.shape == (B, S, 1, D)  # BSND input takes BS1D tables

    gate, up = _randn(B, S, 40), _randn(B, S, 40, seed=2)
    torch.testing.assert_close(kernels.swiglu(gate, up, NPU), F.silu(gate) * up)
    _, (packed,), kwargs = fake_npu.calls[-1]
    assert torch.equal(packed, torch.cat((gate, up), -1)) and kwargs == {"dim": -1}

    k, v = _randn(B, S, KV_HEADS, D, seed=3), _randn(B, S, KV_HEADS, D, seed=4)
    got = kernels.attention(q, k, v, 0.25, NPU)
    _, (got_q, got_k, got_v, head_num, layout), kwargs = fake_npu.calls[-1]
    assert got_q is q and got_k is k and got_v is v and head_num == HEADS and layout == "BSND"
    mask = kwargs.pop("atten_mask")
    assert kwargs == {"scale": 0.25, "keep_prob": 1.0, "sparse_mode": 2}
    assert mask.dtype == torch.bool and torch.equal(mask, torch.ones(2048, 2048, dtype=torch.bool).triu(1))
    torch.testing.assert_close(got, kernels.attention(q, k, v, 0.25, TORCH), rtol=1e-5, atol=1e-6)


def test_decoder_layer_runs_every_npu_kernel_and_matches_reference(fake_npu: FakeTorchNpu) -> None:
    torch.manual_seed(0)
    layer = DecoderLayer(_config(), NPU)
    reference_layer = DecoderLayer(_config(), TORCH)
    reference_layer.load_state_dict(layer.state_dict())
    x = _randn(B, S, 48, seed=5)
    cos, sin = _cos_sin(torch.float32)
    with torch.no_grad():
        on_npu = layer(x, cos, sin)
        reference = reference_layer(x, cos, sin)
    assert fake_npu.names() == [
        "npu_rms_norm", "npu_rms_norm", "npu_rms_norm",  # input_layernorm, q_norm, k_norm
        "npu_rotary_mul", "npu_rotary_mul", "npu_fusion_attention",
        "npu_rms_norm", "npu_swiglu",  # post_attention_layernorm, MLP
    ]
    torch.testing.assert_close(on_npu, reference, rtol=1e-5, atol=1e-5)


def test_npu_document_mask_is_an_explicit_mask(fake_npu: FakeTorchNpu) -> None:
    q, k, v = _randn(B, S, HEADS, D), _randn(B, S, KV_HEADS, D, seed=1), _randn(B, S, KV_HEADS, D, seed=2)
    ids = torch.tensor([[0] * 5 + [1] * 6, [0] * 2 + [1] * 4 + [2] * 5])  # [b, s]: documents of each sample
    got = kernels.attention(q, k, v, 0.25, NPU, document_ids=ids)
    (_, _, kwargs), = fake_npu.calls
    assert kwargs["sparse_mode"] == 0 and torch.equal(kwargs["atten_mask"], ~kernels.document_causal_mask(ids))
    torch.testing.assert_close(got, kernels.attention(q, k, v, 0.25, TORCH, document_ids=ids), rtol=1e-5, atol=1e-6)


def test_npu_causal_mask_is_built_once_per_device(fake_npu: FakeTorchNpu) -> None:
    q = _randn(1, 4, 2, 8)
    kernels.attention(q, q, q, 1.0, NPU)
    kernels.attention(q, q, q, 1.0, NPU)
    first, second = (kwargs["atten_mask"] for name, _, kwargs in fake_npu.calls)
    assert first is second


# ---- torch.compile --------------------------------------------------------------------------------


def test_decoder_layer_compiles_without_graph_breaks() -> None:
    torch.manual_seed(0)
    layer = DecoderLayer(_config(), KernelOptions())
    x = _randn(B, S, 48, seed=5).requires_grad_()
    cos, sin = _cos_sin(torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="eager", fullgraph=True)  # fullgraph: any graph break raises
    out = compiled(x, cos, sin)
    torch.testing.assert_close(out, layer(x, cos, sin), rtol=0, atol=0)
    out.sum().backward()
    assert x.grad is not None and math.isfinite(float(x.grad.sum()))
