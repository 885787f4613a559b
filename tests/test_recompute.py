"""Activation checkpointing: identical loss and gradients, names kept, and the intended ops (and blocks,
by --recompute-method) recomputed."""

from __future__ import annotations

import collections
import copy
import dataclasses
import re
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qwen3_pretrain.config.model import ConfigError, get_preset
from qwen3_pretrain.distributed.recompute import apply_activation_checkpointing
from qwen3_pretrain.model.qwen3 import Qwen3ForCausalLM

SDPA_FORWARD_OPS = {
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops that actually execute (ops answered from a selective-checkpoint cache do not)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def reference() -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    return Qwen3ForCausalLM(get_preset("qwen3-tiny"))


def _loss_grads_and_backward_ops(
    model: Qwen3ForCausalLM,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], collections.Counter[str]]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=generator)
    labels = torch.randint(0, model.config.vocab_size, (2, 16), generator=generator)
    loss = model(input_ids, labels=labels).loss
    with OpCounter() as counter:
        loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}, counter.counts


@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_recompute_gives_identical_loss_and_grads(reference: Qwen3ForCausalLM, granularity: str) -> None:
    loss, grads, plain_ops = _loss_grads_and_backward_ops(copy.deepcopy(reference))
    model = copy.deepcopy(reference)
    apply_activation_checkpointing(model, granularity)  # type: ignore[arg-type]
    assert list(model.state_dict()) == list(reference.state_dict())  # HF names unchanged
    recomputed_loss, recomputed_grads, ops = _loss_grads_and_backward_ops(model)

    assert torch.equal(recomputed_loss, loss)
    assert recomputed_grads.keys() == grads.keys()
    for name, grad in grads.items():
        assert torch.equal(recomputed_grads[name], grad), name

    layers = model.config.num_hidden_layers
    attention_recomputed = sum(ops[name] for name in SDPA_FORWARD_OPS)
    assert sum(plain_ops[name] for name in SDPA_FORWARD_OPS) == 0
    assert attention_recomputed == layers  # both granularities recompute the attention core
    assert ops["silu"] == layers and ops["rsqrt"] == 4 * layers  # MLP activation and all four norms per block
    if granularity == "full":
        # q, k, v, o, gate, up run again; recomputation stops early before down_proj, whose output backward never needs
        assert ops["mm"] == plain_ops["mm"] + 6 * layers
    else:
        assert ops["mm"] == plain_ops["mm"]  # projection outputs were kept


def test_rejects_unknown_granularity_and_double_application(reference: Qwen3ForCausalLM) -> None:
    model = copy.deepcopy(reference)
    with pytest.raises(ValueError, match="--recompute-granularity 'block'"):
        apply_activation_checkpointing(model, "block")  # type: ignore[arg-type]
    apply_activation_checkpointing(model, "full")
    with pytest.raises(RuntimeError, match="already applied"):
        apply_activation_checkpointing(model, "selective")


@pytest.mark.parametrize(
    ("method", "num_layers", "units"),
    [
        ("uniform", 2, [("0", "1"), ("2",)]),  # groups of 2, the last one shorter
        ("uniform", 1, [("0",), ("1",), ("2",)]),
        ("block", 2, [("0",), ("1",)]),  # block 2 of 3 keeps the activations of layer 2
        ("block", 5, [("0",), ("1",), ("2",)]),
        (None, None, [("0",), ("1",), ("2",)]),
    ],
)
def test_recompute_method_checkpoints_the_chosen_blocks(
    method: str | None, num_layers: int | None, units: list[tuple[str, ...]]
) -> None:
    torch.manual_seed(0)
    reference = Qwen3ForCausalLM(dataclasses.replace(get_preset("qwen3-tiny"), num_hidden_layers=3))
    loss, grads, plain_ops = _loss_grads_and_backward_ops(copy.deepcopy(reference))
    model = copy.deepcopy(reference)
    apply_activation_checkpointing(model, "full", method, num_layers)
    decoder = model.model
    grouped = list(getattr(decoder, "recompute_units", ()))
    single = [(name,) for name, block in decoder.layers.items() if hasattr(block, "recompute_granularity")]
    assert (grouped or single) == units and not (grouped and single)
    assert list(model.state_dict()) == list(reference.state_dict())
    recomputed_loss, recomputed_grads, ops = _loss_grads_and_backward_ops(model)

    assert torch.equal(recomputed_loss, loss)
    for name, grad in grads.items():
        assert torch.equal(recomputed_grads[name], grad), name
    recomputed = sum(len(unit) for unit in units)
    assert sum(ops[name] for name in SDPA_FORWARD_OPS) == recomputed and ops["silu"] == recomputed
    # 6 projections per block; in a group, each block's down_proj but the last feeds the next block
    assert ops["mm"] == plain_ops["mm"] + 6 * recomputed + sum(len(unit) - 1 for unit in units)


@pytest.mark.parametrize(
    ("granularity", "method", "num_layers", "message"),
    [
        ("selective", "block", 1, "--recompute-method and --recompute-num-layers do not apply to "
                                  "--recompute-granularity selective"),
        ("selective", None, 2, "do not apply to --recompute-granularity selective"),
        ("full", "uniform", None, "--recompute-method uniform needs --recompute-num-layers N >= 1"),
        ("full", None, 2, "--recompute-num-layers needs --recompute-method uniform or block"),
        ("full", "block", 0, "needs --recompute-num-layers N >= 1 (uniform: layers per checkpointed group; "),
    ],
)
def test_rejects_a_method_that_does_not_apply(
    reference: Qwen3ForCausalLM, granularity: str, method: str | None, num_layers: int | None, message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        apply_activation_checkpointing(copy.deepcopy(reference), granularity, method, num_layers)  # type: ignore[arg-type]


def test_groups_are_applied_once(reference: Qwen3ForCausalLM) -> None:
    model = copy.deepcopy(reference)
    apply_activation_checkpointing(model, "full", "uniform", 2)
    with pytest.raises(RuntimeError, match="already applied to RecomputeGroupsQwen3Model"):
        apply_activation_checkpointing(model, "full")
