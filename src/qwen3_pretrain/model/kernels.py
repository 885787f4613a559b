"""The device kernels of a Qwen3 block behind one dispatch point: linear, rms_norm, apply_rotary, swiglu, attention,
and the mixture-of-experts grouped_linear.

The kernel choice is a value the model carries, not process state: a frozen `KernelOptions` given to
`Qwen3ForCausalLM(config, kernels=...)`, kept by every block that calls a kernel and passed to each call
(deep copies, such as pipeline stages, keep it). `torch.compile` traces only the branch the options and
the tensors' device pick, and guards on them. Backends (`KernelOptions.backend`):

- ``"torch"``: the reference PyTorch math with HF transformers' numerics. Attention is
  `F.scaled_dot_product_attention` with its kernels in the order `KernelOptions.attention` asks for.
- ``"npu"`` (Ascend): torch_npu's fused kernels `npu_rms_norm`, `npu_rotary_mul`, `npu_swiglu`,
  `npu_fusion_attention` and `npu_grouped_matmul`; torch_npu is imported on first use.
- None (the default): "npu" for tensors on an Ascend device, else "torch", decided at each call.

DTensor inputs (tensor parallel) always take the reference path, because the torch_npu ops have no DTensor
sharding rules.

`KernelOptions.attention` (`--attention-backend`, Megatron's names) orders the SDPA kernels of the torch
backend: "flash" (FlashAttention-2), "fused" (cuDNN), "efficient" (memory-efficient) put that kernel first
and keep torch's others as fallbacks for inputs it cannot take; "unfused" is the math reference alone;
"auto" leaves torch's own order. Ascend's npu_fusion_attention is not affected.

bf16 on a CPU without fast bf16 matmuls, a property of the hardware (`cpu_has_fast_bf16_matmul`, queried
once; tests monkeypatch it): torch sends CPU bf16 matmuls to oneDNN only where the CPU has AVX512 or AMX;
elsewhere (AVX2) its fallback gemm and the bf16 flash attention run 6-100x slower than float32. There
`linear` and `attention` compute bf16 work (bf16 operands, or autocast to bf16) as float32 matmuls of the
bf16-rounded operands and round the result to bf16: the numerics of a bf16 kernel that accumulates in
float32, at float32 speed. Backward saves the bf16 operands, so memory stays that of bf16.
`bf16_via_float32` tells other matmul code (the chunked LM-head loss) to do the same.

Document masking (`--reset-attention-mask`): `attention(..., document_ids=ids)` with ids [batch, seq] (equal
ids = same document) attends causally AND within each document only. The torch backend builds the boolean mask
[b, 1, s, s] (True = attend) for SDPA, except on CUDA where `flex_attention` with a block mask from the ids
skips the masked blocks; Ascend's npu_fusion_attention takes the same mask inverted (True = masked) in sparse
mode 0 (an explicit full mask). Without ids every backend runs plain causal attention as before.

Grouped linear (the experts of a MoE layer, `grouped_linear`): rows sorted by expert, one weight per expert
stacked [experts, out, in]. `torch._grouped_mm` on CUDA devices of compute capability >= 8.0 when the work is
bf16 (what torch 2.13 documents for it); `npu_grouped_matmul` on Ascend; elsewhere (CPU, fp32, older GPUs) one
matmul per expert over its contiguous rows through `linear` (so bf16 on float32 units applies), which measured
within 5% of torch's own CPU `_grouped_mm` and 1.4x faster than a padded `bmm` (`benchmarks/moe.py`).

Layout everywhere: q/k/v [batch, seq, heads, head_dim] ("BSND"); cos/sin [batch (or 1), seq, head_dim].
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

BACKENDS = ("torch", "npu")
# npu_fusion_attention's causal mode (sparse_mode 2, top-left aligned; equal to 3 when q and kv have the
# same length) takes this fixed [2048, 2048] boolean mask, True above the diagonal (= masked out).
_NPU_CAUSAL_SPARSE_MODE = 2
_NPU_CAUSAL_MASK_SIZE = 2048
# Its sparse mode 0 takes an explicit mask of the full [b, 1, s, s] shape (True = masked): the document mask.
_NPU_EXPLICIT_MASK_SPARSE_MODE = 0
_HAS_TRITON = importlib.util.find_spec("triton") is not None  # triton compiles flex_attention's kernels

_TORCH_SDPA_ORDER = (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                     SDPBackend.MATH)


def _first(kernel: SDPBackend) -> list[SDPBackend]:
    """`kernel`, then torch's other SDPA kernels as fallbacks."""
    return [kernel, *(k for k in _TORCH_SDPA_ORDER if k != kernel)]


# --attention-backend -> SDPA kernels in priority order (the first that takes the inputs runs); None = torch's order.
ATTENTION_BACKENDS: dict[str, list[SDPBackend] | None] = {
    "auto": None,
    "flash": _first(SDPBackend.FLASH_ATTENTION),
    "fused": _first(SDPBackend.CUDNN_ATTENTION),
    "efficient": _first(SDPBackend.EFFICIENT_ATTENTION),
    "unfused": [SDPBackend.MATH],
}


@dataclass(frozen=True)
class KernelOptions:
    """The kernels a model runs (see the module doc).

    backend: "torch", "npu", or None to pick from the tensors' device at each call.
    attention: the `--attention-backend` name ordering the torch backend's SDPA kernels (`ATTENTION_BACKENDS`).
    """

    backend: Literal["torch", "npu"] | None = None
    attention: str = "auto"

    def __post_init__(self) -> None:
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"unknown kernel backend {self.backend!r}; use one of {', '.join(BACKENDS)}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(
                f"unknown attention backend {self.attention!r}; use one of {', '.join(ATTENTION_BACKENDS)}"
            )

    def backend_for(self, device: torch.device) -> str:
        """The backend for tensors on `device`: `backend`, or when None "npu" on an Ascend device, else "torch"."""
        if self.backend is not None:
            return self.backend
        return "npu" if device.type == "npu" else "torch"


DEFAULT_KERNELS = KernelOptions()  # backend from the tensors' device, torch's SDPA order


def _npu_for(options: KernelOptions, *tensors: torch.Tensor) -> ModuleType | None:
    """torch_npu when `options` pick the npu backend for `tensors` and none is a DTensor, else None (reference path)."""
    if any(isinstance(t, DTensor) for t in tensors) or options.backend_for(tensors[0].device) != "npu":
        return None
    import torch_npu  # an import statement, not importlib: torch.compile traces it without a graph break

    return torch_npu


# ---- matmuls --------------------------------------------------------------------------------------


@torch.compiler.assume_constant_result  # torch.compile takes the answer as a constant instead of tracing it
def cpu_has_fast_bf16_matmul() -> bool:
    """Whether torch runs CPU bf16 matmuls with oneDNN (AVX512 / AMX / Arm bf16) rather than its slow fallback."""
    return _cpu_has_fast_bf16_matmul()


@functools.cache
def _cpu_has_fast_bf16_matmul() -> bool:
    """`cpu_has_fast_bf16_matmul`, asked of torch once."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else True


def bf16_via_float32(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `dtype` matmuls on `device` run as float32 matmuls of bf16-rounded operands (see the module doc)."""
    return device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_fast_bf16_matmul()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype an op on `x` computes in: autocast's for x's device when autocast is on there, else x's own."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


def _computes_bf16_via_float32(*tensors: torch.Tensor) -> bool:
    """`bf16_via_float32` for an op on plain `tensors` computing in `compute_dtype` of the first."""
    if any(isinstance(t, DTensor) for t in tensors):
        return False
    return bf16_via_float32(tensors[0].device, compute_dtype(tensors[0]))


def _float32_matmul_rounded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b of bf16 tensors with float32 units, rounded to bf16: a bf16 kernel's numerics (float32 accumulation)."""
    return torch.matmul(a.float(), b.float()).to(torch.bfloat16)


class _Bf16LinearViaFloat32(torch.autograd.Function):
    """x [..., in] @ weight [out, in].T for bf16 x and weight, each matmul (forward and both grads) in float32."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)  # bf16: the memory a bf16 kernel's backward keeps
        return _float32_matmul_rounded(x, weight.T)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = _float32_matmul_rounded(grad, weight) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            rows = grad.flatten(0, -2).T  # [out, tokens]
            grad_weight = _float32_matmul_rounded(rows, x.flatten(0, -2))  # [out, tokens] @ [tokens, in]
        return grad_x, grad_weight


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight)` without bias; CPU bf16 work on float32 units where that is faster (see the module doc)."""
    if _computes_bf16_via_float32(x, weight):
        with torch.autocast("cpu", enabled=False):  # the casts autocast would make, then no second cast
            return _Bf16LinearViaFloat32.apply(x.to(torch.bfloat16), weight.to(torch.bfloat16))
    return F.linear(x, weight)


# ---- grouped linear (mixture-of-experts) ----------------------------------------------------------


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, options: KernelOptions = DEFAULT_KERNELS
) -> torch.Tensor:
    """Rows x [n, in] sorted by group, `counts` [groups] rows each (sum n), weight [groups, out, in] -> [n, out].

    Row block g is multiplied by weight[g].T, as `linear` does for one weight; see the module doc for the kernels.
    """
    npu = _npu_for(options, x, weight)
    if npu is not None:
        return _NpuGroupedLinear.apply(npu, x, weight, counts)
    if _torch_grouped_mm_applies(x, weight):
        dtype = compute_dtype(x)
        offsets = counts.cumsum(0).to(torch.int32)  # [groups]: the end row of each group
        return torch._grouped_mm(x.to(dtype), weight.to(dtype).transpose(-2, -1), offs=offsets)
    blocks = x.split(counts.tolist())  # the host needs the sizes: one sync per call on an accelerator
    return torch.cat([linear(rows, w) for rows, w in zip(blocks, weight.unbind(0), strict=True)])


def _torch_grouped_mm_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Plain CUDA tensors computing in bf16 on a device of compute capability >= 8.0, with in and out widths of
    whole 16-byte multiples (8 bf16 values), which `_grouped_mm` requires of its operands' row strides."""
    if isinstance(x, DTensor) or isinstance(weight, DTensor) or x.device.type != "cuda":
        return False
    aligned = x.shape[-1] % 8 == 0 and weight.shape[-2] % 8 == 0
    return aligned and compute_dtype(x) == torch.bfloat16 and _cuda_capability(x.device.index) >= (8, 0)


@torch.compiler.assume_constant_result
def _cuda_capability(index: int | None) -> tuple[int, int]:
    """The compute capability of CUDA device `index` (None: the current one)."""
    return torch.cuda.get_device_capability(index)


class _NpuGroupedLinear(torch.autograd.Function):
    """`grouped_linear` with torch_npu's `npu_grouped_matmul`: one x and one y split along the rows (split_item 3),
    groups given by their cumulative row counts (group_list_type 0); the weight gradient groups the contraction
    dimension instead (group_type 2, one [groups, in, out] output)."""

    @staticmethod
    def forward(ctx: Any, npu: ModuleType, x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        group_list = counts.cumsum(0)  # [groups] int64: the end row of each group
        ctx.npu, ctx.group_list = npu, group_list
        ctx.save_for_backward(x, weight)
        per_group = [w.T for w in weight.unbind(0)]  # each [in, out]: y_g = x_g @ w_g
        return _npu_gmm(npu, x, per_group, group_list, group_type=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor | None, torch.Tensor | None, None]:
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_x = _npu_gmm(ctx.npu, grad, list(weight.unbind(0)), ctx.group_list, group_type=0)  # [n, in]
        if ctx.needs_input_grad[2]:
            per_group = _npu_gmm(ctx.npu, x.T, [grad], ctx.group_list, group_type=2)  # [groups, in, out]
            grad_weight = per_group.transpose(1, 2)  # [groups, out, in]
        return None, grad_x, grad_weight, None


def _npu_gmm(
    npu: ModuleType, x: torch.Tensor, weights: list[torch.Tensor], group_list: torch.Tensor, group_type: int
) -> torch.Tensor:
    """One `npu_grouped_matmul` call with a single x and a single output."""
    return npu.npu_grouped_matmul(
        [x], weights, group_list=group_list, split_item=3, group_type=group_type, group_list_type=0
    )[0]


# ---- RMSNorm -------------------------------------------------------------------------------------


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, options: KernelOptions = DEFAULT_KERNELS
) -> torch.Tensor:
    """weight * (x / rms(x)) over the last dim; the rms in float32, cast back to x's dtype before scaling.

    On NPU the weight is cast to x's dtype first (npu_rms_norm needs equal dtypes), so the output
    has x's dtype; the reference path returns the promoted dtype of weight and x, as HF does.
    """
    npu = _npu_for(options, x, weight)
    if npu is not None:
        return npu.npu_rms_norm(x, weight.to(x.dtype), epsilon=eps)[0]
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


# ---- rotary embedding ----------------------------------------------------------------------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension (NeoX-style RoPE)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, options: KernelOptions = DEFAULT_KERNELS
) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin for x [b, s, heads, head_dim] and cos/sin [b, s, head_dim]."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # [b, s, 1, head_dim]
    npu = _npu_for(options, x, cos, sin)
    if npu is not None:  # npu_rotary_mul's default "half" mode is rotate_half; BSND x takes BS1D / 1S1D tables
        return npu.npu_rotary_mul(x, cos.to(x.dtype), sin.to(x.dtype))
    return x * cos + rotate_half(x) * sin


# ---- SwiGLU --------------------------------------------------------------------------------------


def swiglu(gate: torch.Tensor, up: torch.Tensor, options: KernelOptions = DEFAULT_KERNELS) -> torch.Tensor:
    """silu(gate) * up."""
    npu = _npu_for(options, gate, up)
    if npu is not None:  # npu_swiglu(x) = silu(first half of x) * second half
        return npu.npu_swiglu(torch.cat((gate, up), dim=-1), dim=-1)  # [..., 2 * ffn] -> [..., ffn]
    return F.silu(gate) * up


# ---- attention -----------------------------------------------------------------------------------


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    options: KernelOptions = DEFAULT_KERNELS,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal grouped-query attention without dropout: q [b, s, heads, d], k/v [b, s, kv_heads, d] -> [b, s, heads, d].

    heads must be a multiple of kv_heads; each group of heads / kv_heads query heads shares one kv head.
    With `document_ids` [b, s] a query attends only to keys of its own document (equal ids); see the module doc.
    """
    npu = _npu_for(options, q, k, v)
    if npu is not None:
        if document_ids is None:
            masked, sparse_mode = _npu_causal_mask(q.device), _NPU_CAUSAL_SPARSE_MODE
        else:
            masked, sparse_mode = ~document_causal_mask(document_ids), _NPU_EXPLICIT_MASK_SPARSE_MODE
        return npu.npu_fusion_attention(
            q, k, v, q.shape[2], "BSND", atten_mask=masked, scale=scale, keep_prob=1.0, sparse_mode=sparse_mode,
        )[0]
    if document_ids is not None and _flex_applies(q, k, v):
        return _flex_document_attention(q, k, v, scale, document_ids)
    mask = None if document_ids is None else document_causal_mask(document_ids)
    if _computes_bf16_via_float32(q, k, v):  # bf16-rounded inputs, float32 attention, bf16 output
        with torch.autocast("cpu", enabled=False):
            q, k, v = (t.to(torch.bfloat16).float() for t in (q, k, v))
            return _sdpa(q, k, v, scale, options.attention, mask).to(torch.bfloat16)
    return _sdpa(q, k, v, scale, options.attention, mask)


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Document ids [b, s] -> boolean mask [b, 1, s, s], True where query i may attend key j: j <= i, same document."""
    s = document_ids.shape[1]
    same_document = document_ids[:, :, None] == document_ids[:, None, :]  # [b, s, s]
    causal = torch.ones(s, s, dtype=torch.bool, device=document_ids.device).tril()  # [s, s]
    return (same_document & causal).unsqueeze(1)  # [b, 1, s, s]


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, attention: str, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """GQA `F.scaled_dot_product_attention` on BSND tensors, its kernels ordered as `attention` names.

    Causal, or with `mask` [b, 1, s, s] (True = attend) instead: SDPA takes is_causal or a mask, not both.
    """
    order = ATTENTION_BACKENDS[attention]
    with contextlib.nullcontext() if order is None else sdpa_kernel(order, set_priority=True):
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # [b, (kv_)heads, s, d]
            attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=q.shape[2] != k.shape[2],
        )  # [b, heads, s, d]
    return out.transpose(1, 2)  # [b, s, heads, d]


def _flex_applies(*tensors: torch.Tensor) -> bool:
    """Whether document-masked attention on `tensors` runs `flex_attention`: plain CUDA tensors and triton present."""
    return tensors[0].device.type == "cuda" and not any(isinstance(t, DTensor) for t in tensors) and _HAS_TRITON


@functools.cache
def _compiled_flex_attention() -> Any:
    """`flex_attention` compiled once: run eagerly it would materialise the [s, s] scores."""
    return torch.compile(flex_attention, dynamic=False)


def _flex_document_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, document_ids: torch.Tensor
) -> torch.Tensor:
    """Document-causal GQA with `flex_attention` and a block mask from `document_ids` [b, s] (CUDA).

    Inputs are cast to the compute dtype first (flex_attention is no autocast op); inside a compiled block the
    outer compile fuses it, eagerly its compiled form runs.
    """
    dtype = compute_dtype(q)
    b, s = document_ids.shape

    def same_document_causal(
        batch: torch.Tensor, _head: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
    ) -> torch.Tensor:
        return (q_idx >= kv_idx) & (document_ids[batch, q_idx] == document_ids[batch, kv_idx])

    block_mask: BlockMask = create_block_mask(same_document_causal, b, None, s, s, device=q.device)
    run = flex_attention if torch.compiler.is_compiling() else _compiled_flex_attention()
    out = run(
        *(t.to(dtype).transpose(1, 2) for t in (q, k, v)),  # [b, (kv_)heads, s, d]
        block_mask=block_mask, scale=scale, enable_gqa=q.shape[2] != k.shape[2],
    )  # [b, heads, s, d]
    return out.transpose(1, 2)  # [b, s, heads, d]


@functools.cache
def _npu_causal_mask(device: torch.device) -> torch.Tensor:
    """The compressed causal mask npu_fusion_attention expects in sparse mode 2, built once per device."""
    size = _NPU_CAUSAL_MASK_SIZE
    return torch.ones(size, size, dtype=torch.bool, device=device).triu(diagonal=1)  # [2048, 2048]
