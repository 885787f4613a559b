"""LR schedule and loss scaler against megatron-core's own classes; param groups; skip and clipping."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron.core.optimizer import grad_scaler as megatron_scaler
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler as MegatronScheduler

from qwen3_pretrain.config import TrainConfig
from qwen3_pretrain.distributed.clip import clip_grad_norm_
from qwen3_pretrain.model import Qwen3ForCausalLM, get_preset
from qwen3_pretrain.train.optim import (
    LossScaler,
    OptimizerParamScheduler,
    build_scheduler,
    param_groups,
    step_unless_nonfinite,
)

GBS = 64

# (style, wsd style, init lr, warmup samples, decay samples, wsd decay samples)
SCHEDULES = [
    ("cosine", None, 0.0, 0.01 * 2000 * GBS, 2000 * GBS, None),  # the MindSpeed recipe: float warmup
    ("cosine", None, 1e-7, 5 * GBS, 40 * GBS, None),
    ("linear", None, 0.0, 3 * GBS, 40 * GBS, None),
    ("constant", None, 0.0, 3 * GBS, 40 * GBS, None),
    ("constant", None, 0.0, 0, 40 * GBS, None),
    ("inverse-square-root", None, 0.0, 4 * GBS, 40 * GBS, None),
    *[("WSD", style, 0.0, 2 * GBS, 40 * GBS, 10 * GBS) for style in ("exponential", "linear", "cosine", "minus_sqrt")],
]


def _holder() -> SimpleNamespace:
    return SimpleNamespace(param_groups=[{"lr": None}, {"lr": None}])


@pytest.mark.parametrize("style,wsd_style,init_lr,warmup,decay,wsd_decay", SCHEDULES)
def test_schedule_equals_megatron(style: str, wsd_style: str | None, init_lr: float, warmup: float, decay: int,
                                  wsd_decay: int | None) -> None:
    ours_opt, theirs_opt = _holder(), _holder()
    ours = OptimizerParamScheduler(ours_opt, init_lr, 1.25e-6, 1.25e-7, warmup, decay, style, wsd_decay,
                                   wsd_style or "exponential")
    theirs = MegatronScheduler(
        theirs_opt, init_lr=init_lr, max_lr=1.25e-6, min_lr=1.25e-7, lr_warmup_steps=warmup, lr_decay_steps=decay,
        lr_decay_style=style, start_wd=0.1, end_wd=0.1, wd_incr_steps=decay, wd_incr_style="constant",
        wsd_decay_steps=wsd_decay, lr_wsd_decay_style=wsd_style,
    )
    iterations = decay // GBS + 5  # run past the end of the decay
    for _ in range(iterations):
        assert ours_opt.param_groups[0]["lr"] == theirs_opt.param_groups[0]["lr"]
        assert ours_opt.param_groups[1]["lr"] == theirs_opt.param_groups[0]["lr"]
        ours.step(GBS)
        theirs.step(GBS)


def test_schedule_state_round_trip() -> None:
    opt = _holder()
    first = OptimizerParamScheduler(opt, 0.0, 1e-3, 1e-4, 64, 640, "cosine")
    for _ in range(7):
        first.step(GBS)
    second = OptimizerParamScheduler(_holder(), 0.0, 1e-3, 1e-4, 64, 640, "cosine")
    second.load_state_dict(first.state_dict())
    assert second.num_steps == 7 * GBS
    assert second.optimizer.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def _recipe_config(**flags: object) -> TrainConfig:
    values = {"train_iters": 2000, "global_batch_size": GBS, "lr": 1.25e-6, "min_lr": 1.25e-7,
              "lr_decay_style": "cosine", "lr_warmup_fraction": 0.01, **flags}
    config = TrainConfig.from_flat(values)
    config.resolved = SimpleNamespace(train_iters=config.training.train_iters or 10, global_batch_size=GBS)
    return config


@pytest.mark.parametrize(
    "flags,warmup,decay",
    [
        ({}, 1280.0, 2000 * GBS),  # warmup fraction of the decay samples: 20 iterations
        ({"lr_warmup_fraction": None, "lr_warmup_iters": 30, "lr_decay_iters": 1500}, 30 * GBS, 1500 * GBS),
        ({"train_iters": None, "train_samples": 64_000, "lr_warmup_fraction": None, "lr_warmup_samples": 640},
         640, 64_000),
    ],
)
def test_build_scheduler_lengths(flags: dict, warmup: float, decay: int) -> None:
    scheduler = build_scheduler(_holder(), _recipe_config(**flags))
    assert (scheduler.warmup_steps, scheduler.decay_steps) == (warmup, decay)


def test_param_groups_follow_megatron() -> None:
    with torch.device("meta"):
        model = Qwen3ForCausalLM(dataclasses.replace(get_preset("qwen3-tiny"), torch_dtype="float32"))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert "model.embed_tokens.weight" in decay_names and "lm_head.weight" not in decay_names  # tied: once
    assert "model.layers.0.self_attn.q_proj.weight" in decay_names
    assert all(n.endswith("norm.weight") for n in no_decay_names)
    assert {"model.norm.weight", "model.layers.1.self_attn.k_norm.weight"} <= no_decay_names
    assert len(decay_names) + len(no_decay_names) == len(list(model.parameters()))


@contextlib.contextmanager
def _megatron_scaler_on_cpu() -> Iterator[None]:
    """megatron-core creates its scaler tensors on 'cuda'; build them on the CPU instead."""
    original = torch.tensor

    def cpu_tensor(*args: object, **kwargs: object) -> torch.Tensor:
        kwargs.pop("device", None)
        return original(*args, **kwargs)

    megatron_scaler.torch.tensor = cpu_tensor
    try:
        yield
    finally:
        megatron_scaler.torch.tensor = original


def test_dynamic_loss_scaler_equals_megatron() -> None:
    with _megatron_scaler_on_cpu():
        theirs = megatron_scaler.DynamicGradScaler(
            initial_scale=2.0**16, min_scale=4.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=3, hysteresis=2
        )
    ours = LossScaler(2.0**16, torch.device("cpu"), min_scale=4.0, growth_interval=3, hysteresis=2)
    pattern = [1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1] + [1] * 30 + [0] * 7
    for overflow in pattern:
        ours.update(torch.tensor(float(overflow)))
        theirs.update(bool(overflow))
        assert float(ours.scale) == float(theirs.scale)
    assert float(ours.scale) > 4.0 and bool(LossScaler(4.0, torch.device("cpu"), min_scale=4.0).at_minimum())


def _adamw(fused: bool) -> tuple[torch.nn.Parameter, torch.optim.AdamW]:
    param = torch.nn.Parameter(torch.arange(6, dtype=torch.float32))
    optimizer = torch.optim.AdamW([param], lr=0.1, fused=fused) if fused else torch.optim.AdamW([param], lr=0.1)
    return param, optimizer


@pytest.mark.parametrize("fused", [True, False])
def test_step_unless_nonfinite(fused: bool) -> None:
    param, optimizer = _adamw(fused)
    param.grad = torch.ones(6)
    step_unless_nonfinite(optimizer, torch.tensor(0.0))
    after_first = param.detach().clone()
    state = {k: v.clone() for k, v in optimizer.state[param].items()}
    assert not torch.equal(after_first, torch.arange(6, dtype=torch.float32))
    param.grad = torch.full((6,), float("nan"))
    step_unless_nonfinite(optimizer, torch.tensor(1.0))
    assert torch.equal(param.detach(), after_first)
    assert all(torch.equal(optimizer.state[param][k], v) for k, v in state.items())


def test_clip_grad_norm_equals_torch() -> None:
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, ref, strict=True):
        a.grad = torch.randn_like(a) * 3
        b.grad = a.grad.clone()
    norm = clip_grad_norm_([torch.nn.ParameterList(ours)], 1.0)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    assert torch.equal(norm, ref_norm) and norm > 1.0
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, ref, strict=True))
    unclipped = [torch.nn.Parameter(torch.ones(2))]
    unclipped[0].grad = torch.full((2,), 10.0)
    assert clip_grad_norm_([torch.nn.ParameterList(unclipped)], 0.0) == pytest.approx(200**0.5)
    assert torch.equal(unclipped[0].grad, torch.full((2,), 10.0))
