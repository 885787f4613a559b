"""AdamW on fp32 master weights, Megatron's LR schedule, global-norm clipping and the fp16 loss scaler.

The parameters the optimizer sees are always fp32 (FSDP2 keeps fp32 shards and casts to bf16/fp16
for compute; a single process computes under autocast), so AdamW's weights and both moments are
fp32. A non-finite gradient norm skips the update on the device (fused AdamW's `found_inf`), so a
training step needs no host synchronisation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from qwen3_pretrain.config import TrainConfig, schedule_steps


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Megatron's groups: weight decay on matrices (embeddings included), none on norms (1-D) and biases."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():  # a tied parameter appears once
        if not param.requires_grad:
            continue
        if param.dtype != torch.float32:
            raise TypeError(f"parameter {name} is {param.dtype}: master weights must be float32")
        (no_decay if param.ndim == 1 or name.endswith(".bias") else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW (fused where the device has the kernel, which also gives the sync-free skip)."""
    opt = config.optimizer
    groups = param_groups(model, opt.weight_decay)
    betas = (opt.adam_beta1, opt.adam_beta2)
    try:
        return torch.optim.AdamW(groups, lr=opt.peak_lr, betas=betas, eps=opt.adam_eps, fused=True)
    except RuntimeError:  # no fused kernel for this device type
        return torch.optim.AdamW(groups, lr=opt.peak_lr, betas=betas, eps=opt.adam_eps)


def step_unless_nonfinite(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """Apply the update unless `found_inf` (0-dim float32, 1.0 = skip) is set.

    Fused AdamW skips on the device (weights, moments and step counts stay unchanged); other
    optimizers read the flag on the host.
    """
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = found_inf  # type: ignore[attr-defined]  # read by the fused kernel; not in torch's stubs
        optimizer.step()
    elif not bool(found_inf):
        optimizer.step()


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def scale_grads_(parameters: list[nn.Parameter], factor: torch.Tensor) -> None:
    """Multiply every gradient (the local shards) by the device scalar `factor`."""
    grads = [_local(p.grad) for p in parameters if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, factor)


class OptimizerParamScheduler:
    """Megatron's learning-rate schedule, counted in samples: call `step(global_batch_size)` after
    every applied update. Linear warmup from `init_lr`, then constant | linear | cosine |
    inverse-square-root | WSD decay to `min_lr` at `decay_steps`, `min_lr` after that."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        init_lr: float,
        max_lr: float,
        min_lr: float,
        warmup_steps: float,
        decay_steps: int,
        decay_style: str,
        wsd_decay_steps: int | None = None,
        wsd_decay_style: str = "exponential",
    ) -> None:
        if not 0.0 <= min_lr <= max_lr or init_lr > max_lr:
            raise ValueError(f"need 0 <= min_lr ({min_lr}) <= max_lr ({max_lr}) and init_lr ({init_lr}) <= max_lr")
        if decay_steps <= 0 or warmup_steps >= decay_steps:
            raise ValueError(f"need 0 <= warmup steps ({warmup_steps}) < decay steps ({decay_steps})")
        if decay_style == "WSD" and wsd_decay_steps is None:
            raise ValueError("the WSD decay style needs wsd_decay_steps")
        self.optimizer = optimizer
        self.init_lr, self.max_lr, self.min_lr = init_lr, float(max_lr), min_lr
        self.warmup_steps, self.decay_steps, self.decay_style = warmup_steps, decay_steps, decay_style
        self.wsd_decay_steps, self.wsd_decay_style = wsd_decay_steps or 0, wsd_decay_style  # > 0 with WSD
        self.num_steps = 0
        self.step(0)

    def get_lr(self) -> float:
        """The learning rate after `num_steps` samples (Megatron's formula, term for term)."""
        n, max_lr, min_lr = self.num_steps, self.max_lr, self.min_lr
        if self.warmup_steps > 0 and n <= self.warmup_steps:
            return self.init_lr + (max_lr - self.init_lr) * float(n) / float(self.warmup_steps)
        if self.decay_style == "constant":
            return max_lr
        if n > self.decay_steps:
            return min_lr
        if self.decay_style == "inverse-square-root":
            warmup = max(self.warmup_steps, 1)
            return max(min_lr, max_lr * warmup**0.5 / max(n, 1) ** 0.5)
        ratio = float(n - self.warmup_steps) / float(self.decay_steps - self.warmup_steps)
        if self.decay_style == "linear":
            coeff = 1.0 - ratio
        elif self.decay_style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        elif self.decay_style == "WSD":
            coeff = self._wsd_coeff(n)
        else:
            raise ValueError(f"unknown LR decay style {self.decay_style!r}")
        return min_lr + coeff * (max_lr - min_lr)

    def _wsd_coeff(self, n: int) -> float:
        anneal_start = self.decay_steps - self.wsd_decay_steps
        if n <= anneal_start:
            return 1.0
        ratio = float(n - anneal_start) / float(self.wsd_decay_steps)
        if self.wsd_decay_style == "linear":
            return 1.0 - ratio
        if self.wsd_decay_style == "cosine":
            return 0.5 * (math.cos(math.pi * ratio) + 1.0)
        if self.wsd_decay_style == "exponential":
            return 2.0 * math.pow(0.5, ratio) - 1.0
        if self.wsd_decay_style == "minus_sqrt":
            return 1.0 - math.sqrt(ratio)
        raise ValueError(f"unknown WSD decay style {self.wsd_decay_style!r}")

    def step(self, increment: int) -> None:
        """Advance by `increment` samples and set every param group's lr."""
        self.num_steps += increment
        lr = self.get_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_steps": self.num_steps, "max_lr": self.max_lr, "min_lr": self.min_lr,
            "lr_warmup_steps": self.warmup_steps, "lr_decay_steps": self.decay_steps,
            "lr_decay_style": self.decay_style,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position in the schedule; the shape of the schedule comes from the current flags
        (Megatron's --override-opt-param-scheduler behaviour)."""
        self.num_steps = int(state["num_steps"])
        self.step(0)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> OptimizerParamScheduler:
    """The schedule of `config` (lengths in samples, as Megatron's training.py derives them)."""
    resolved = config.require_resolved()
    steps = schedule_steps(config, resolved.train_iters, resolved.global_batch_size)
    opt = config.optimizer
    return OptimizerParamScheduler(
        optimizer, init_lr=opt.lr_warmup_init, max_lr=opt.peak_lr, min_lr=opt.min_lr,
        warmup_steps=steps.warmup, decay_steps=steps.decay, decay_style=opt.lr_decay_style,
        wsd_decay_steps=steps.wsd_decay, wsd_decay_style=opt.lr_wsd_decay_style,
    )


class LossScaler:
    """fp16 loss scale on the device (Megatron's DynamicGradScaler, or a constant one): `update`
    takes the device flag of an overflow and never synchronises with the host."""

    def __init__(
        self,
        initial_scale: float,
        device: torch.device,
        dynamic: bool = True,
        min_scale: float = 1.0,
        growth_interval: int = 1000,
        hysteresis: int = 2,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
    ) -> None:
        if dynamic and not 0 < min_scale <= initial_scale:
            raise ValueError(f"need 0 < min loss scale ({min_scale}) <= initial loss scale ({initial_scale})")
        self.dynamic = dynamic
        self.min_scale, self.growth_interval, self.hysteresis = min_scale, growth_interval, hysteresis
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.scale = torch.tensor(float(initial_scale), dtype=torch.float32, device=device)
        self._growth_tracker = torch.zeros((), dtype=torch.int64, device=device)
        self._hysteresis_tracker = torch.full((), hysteresis, dtype=torch.int64, device=device)

    def update(self, found_inf: torch.Tensor) -> None:
        """Back off after `hysteresis` overflows, grow after `growth_interval` clean steps."""
        if not self.dynamic:
            return
        inf = found_inf > 0
        growth = torch.where(inf, 0, self._growth_tracker + 1)
        hysteresis = torch.where(inf, self._hysteresis_tracker - 1, self._hysteresis_tracker)
        backed_off = torch.clamp(self.scale * self.backoff_factor, min=self.min_scale)
        scale = torch.where(inf & (hysteresis <= 0), backed_off, self.scale)
        grow = ~inf & (growth == self.growth_interval)
        self._growth_tracker = torch.where(grow, 0, growth)
        self._hysteresis_tracker = torch.where(grow, self.hysteresis, hysteresis)
        self.scale = torch.where(grow, scale * self.growth_factor, scale)

    def at_minimum(self) -> torch.Tensor:
        """Device bool: the scale cannot back off any further."""
        return self.scale <= self.min_scale

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "scale": self.scale.cpu(), "growth_tracker": self._growth_tracker.cpu(),
            "hysteresis_tracker": self._hysteresis_tracker.cpu(),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        device = self.scale.device
        self.scale = state["scale"].to(device)
        self._growth_tracker = state["growth_tracker"].to(device)
        self._hysteresis_tracker = state["hysteresis_tracker"].to(device)


def build_loss_scaler(config: TrainConfig, device: torch.device) -> LossScaler | None:
    """The fp16 loss scaler (None without --fp16)."""
    prec = config.precision
    if not prec.fp16:
        return None
    if prec.loss_scale is not None:
        return LossScaler(prec.loss_scale, device, dynamic=False)
    return LossScaler(
        prec.initial_loss_scale, device, min_scale=prec.min_loss_scale,
        growth_interval=prec.loss_scale_window, hysteresis=prec.hysteresis,
    )
