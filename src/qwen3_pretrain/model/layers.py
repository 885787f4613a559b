"""Qwen3 building blocks with HF transformers' numerics: RMSNorm, rotary embedding, attention, MLP.

No parallel code here. Head counts are inferred from projection widths (`view(b, s, -1, head_dim)`),
so tensor parallelism can shard heads from outside without touching these modules. The math of the
projections, norms, RoPE, SwiGLU and attention goes through `model.kernels`; the blocks that call a kernel
with a choice keep the model's `KernelOptions` and pass them on. `DecoderLayer.forward` compiles with
`torch.compile(fullgraph=True)` (no graph breaks).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from qwen3_pretrain.config.model import Qwen3Config, Qwen3MoeConfig
from qwen3_pretrain.model import kernels as ops
from qwen3_pretrain.model.kernels import KernelOptions
from qwen3_pretrain.model.moe import MoEMLP


class Linear(nn.Linear):
    """A bias-free `nn.Linear` (same parameter, name and TP sharding rules) whose matmul is `kernels.linear`."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight)


class RMSNorm(nn.Module):
    """x / rms(x) computed in float32, cast back to the input dtype, then scaled by `weight`."""

    def __init__(self, dim: int, eps: float, kernels: KernelOptions) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps, self.kernels)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class RotaryEmbedding(nn.Module):
    """NeoX-style RoPE tables: inv_freq[i] = theta^(-2i/d), kept as a float32 non-persistent buffer."""

    inv_freq: torch.Tensor

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.register_buffer("inv_freq", self._compute_inv_freq(), persistent=False)

    def _compute_inv_freq(self) -> torch.Tensor:
        """Computed on CPU in float32 so every device gets bit-identical frequencies."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim
        return 1.0 / (self.theta**exponents)

    def reset_parameters(self) -> None:
        """Recompute inv_freq in float32 on its current device (needed after `to_empty` or a dtype cast)."""
        self.inv_freq = self._compute_inv_freq().to(self.inv_freq.device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [b, s, head_dim] (b may be 1) in `dtype`, from float32 angles."""
        inv_freq = self.inv_freq.to(device=position_ids.device, dtype=torch.float32)
        freqs = position_ids[..., None].float() * inv_freq  # [b, s, head_dim / 2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [b, s, head_dim]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}"


class Attention(nn.Module):
    """Causal grouped-query attention with per-head RMSNorm on q and k before RoPE.

    With `document_ids` [b, s] (equal ids = same document) a token attends only within its own document.
    `core_attention` (default `kernels.attention`) is the hook through which context parallelism, applied from
    outside, swaps in an attention over the sequence shards of all ranks (same signature).
    """

    def __init__(self, config: Qwen3Config, kernels: KernelOptions) -> None:
        super().__init__()
        d, h = config.head_dim, config.hidden_size
        self.head_dim = d
        self.kernels = kernels
        self.core_attention: Callable[..., torch.Tensor] = ops.attention
        self.q_proj = Linear(h, config.num_attention_heads * d)
        self.k_proj = Linear(h, config.num_key_value_heads * d)
        self.v_proj = Linear(h, config.num_key_value_heads * d)
        self.o_proj = Linear(config.num_attention_heads * d, h)
        self.q_norm = RMSNorm(d, config.rms_norm_eps, kernels)
        self.k_norm = RMSNorm(d, config.rms_norm_eps, kernels)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, document_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, s, -1, self.head_dim))  # [b, s, heads, head_dim]
        k = self.k_norm(self.k_proj(x).view(b, s, -1, self.head_dim))  # [b, s, kv_heads, head_dim]
        v = self.v_proj(x).view(b, s, -1, self.head_dim)  # [b, s, kv_heads, head_dim]
        q, k = ops.apply_rotary(q, cos, sin, self.kernels), ops.apply_rotary(k, cos, sin, self.kernels)
        out = self.core_attention(q, k, v, self.head_dim**-0.5, self.kernels, document_ids=document_ids)  # [b,s,h,d]
        return self.o_proj(out.reshape(b, s, -1))  # [b, s, heads * head_dim] -> [b, s, hidden]


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: Qwen3Config, kernels: KernelOptions) -> None:
        super().__init__()
        self.kernels = kernels
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x), self.kernels))


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(x)).

    Layer `index` of a Qwen3-MoE config whose `is_moe_layer(index)` holds gets the mixture-of-experts `MoEMLP`.
    """

    def __init__(self, config: Qwen3Config, kernels: KernelOptions, index: int = 0) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels)
        self.self_attn = Attention(config, kernels)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels)
        self.mlp: MLP | MoEMLP
        if isinstance(config, Qwen3MoeConfig) and config.is_moe_layer(index):
            self.mlp = MoEMLP(config, kernels)
        else:
            self.mlp = MLP(config, kernels)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, document_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        # document_ids positional: the sequence-parallel plan prepares self_attn's inputs by position
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, document_ids)
        return x + self.mlp(self.post_attention_layernorm(x))
