"""Layout planner: validation, closed-form state memory, CLI."""

from __future__ import annotations

import json
from typing import Any

import pytest

from qwen3_pretrain.config.model import get_preset
from qwen3_pretrain.distributed.planner import (
    GIB,
    RECOMPUTE_CHOICES,
    Layout,
    MemoryEstimate,
    enumerate_layouts,
    estimate_memory,
    estimate_step_time,
    main,
    parse_size,
    plan,
    validate_layout,
)


@pytest.mark.parametrize(
    ("layout", "needle"),
    [
        (
            Layout(tp=3, pp=1, dp=1, micro_batch_size=1),
            "--tensor-model-parallel-size 3 does not divide the model's num_attention_heads",
        ),
        (Layout(tp=16, pp=1, dp=1, micro_batch_size=1), "num query groups"),
        (
            Layout(tp=1, pp=3, dp=1, micro_batch_size=1),
            "28 layers do not split evenly into 3 pipeline stages (--pipeline-model-parallel-size 3",
        ),
        (Layout(tp=1, pp=1, dp=3, micro_batch_size=1), "--global-batch-size 64 is not divisible"),
        (Layout(tp=1, pp=1, dp=1, micro_batch_size=1, sequence_parallel=True), "--sequence-parallel"),
        (Layout(1, 1, 64, 1, "selective", recompute_method="block", recompute_num_layers=2),
         "--recompute-method and --recompute-num-layers do not apply to --recompute-granularity selective"),
        (Layout(1, 1, 64, 1, "full", recompute_method="uniform"), "needs --recompute-num-layers N >= 1"),
        (Layout(1, 1, 64, 1, "full", recompute_num_layers=2), "--recompute-num-layers needs --recompute-method"),
    ],
)
def test_invalid_layouts_name_the_flag(layout: Layout, needle: str) -> None:
    reason = validate_layout(get_preset("qwen3-1.7b"), layout, global_batch_size=64)
    assert reason is not None and needle in reason


def test_valid_layout_passes() -> None:
    assert validate_layout(get_preset("qwen3-1.7b"), Layout(2, 2, 2, 1, sequence_parallel=True), 64) is None


def test_state_memory_is_sixteen_bytes_per_parameter_sharded_over_dp() -> None:
    cfg = get_preset("qwen3-1.7b")
    params = cfg.num_parameters()
    for dp in (1, 2, 8):
        mem = estimate_memory(cfg, Layout(1, 1, dp, 1, shard=True), seq_length=4096)
        assert mem.gradients == pytest.approx(4 * params / dp)
        assert mem.optimizer == pytest.approx(8 * params / dp)
    replicated = estimate_memory(cfg, Layout(1, 1, 8, 1, shard=False), seq_length=4096)
    assert replicated.optimizer == pytest.approx(8 * params)


def test_activations_scale_with_tokens_and_shrink_with_tp_sp_and_recompute() -> None:
    cfg = get_preset("qwen3-1.7b")
    base = estimate_memory(cfg, Layout(1, 1, 8, 1), seq_length=4096).activations
    assert estimate_memory(cfg, Layout(1, 1, 8, 2), 4096).activations == pytest.approx(2 * base)
    assert estimate_memory(cfg, Layout(1, 1, 8, 1), 2048).activations == pytest.approx(base / 2)
    tp_sp = estimate_memory(cfg, Layout(2, 1, 4, 1, sequence_parallel=True), 4096).activations
    tp_only = estimate_memory(cfg, Layout(2, 1, 4, 1), 4096).activations
    assert base / 2 < tp_sp < tp_only < base  # the linears keep the all-gathered norm outputs
    selective = estimate_memory(cfg, Layout(1, 1, 8, 1, "selective"), 4096).activations
    full = estimate_memory(cfg, Layout(1, 1, 8, 1, "full"), 4096).activations
    assert full < selective < base


def test_recompute_method_counts_recomputed_and_kept_blocks() -> None:
    """block N keeps the activations of the other blocks; uniform N keeps one input per group of N and
    recomputes a whole group at once; both with one more forward of the blocks they recompute."""
    cfg = get_preset("qwen3-1.7b")  # 28 layers

    def estimate(pp: int = 1, **recompute: Any) -> tuple[MemoryEstimate, float]:
        layout = Layout(1, pp, 8 // pp, 1, **recompute)
        time = estimate_step_time(cfg, layout, 4096, 64, peak_tflops=280.0, link_gbps=196.0)
        return estimate_memory(cfg, layout, 4096, loss_chunk_tokens=1024), time.step_seconds

    (none, none_s), (full, full_s) = estimate(), estimate(recompute="full")
    block, block_s = estimate(recompute="full", recompute_method="block", recompute_num_layers=7)
    assert none.total > block.total > full.total and none_s < block_s < full_s
    assert block.activations == pytest.approx(none.activations * 21 / 28 + full.activations * 7 / 28)
    assert block_s - none_s == pytest.approx((full_s - none_s) / 4)  # a quarter of the blocks recomputed
    assert block.backward == none.backward < full.backward  # the kept blocks' backward frees room first
    assert estimate(recompute="full", recompute_method="block", recompute_num_layers=28) == (full, full_s)
    assert estimate(recompute="full", recompute_method="uniform", recompute_num_layers=1) == (full, full_s)
    uniform, uniform_s = estimate(recompute="full", recompute_method="uniform", recompute_num_layers=4)
    assert uniform.activations == pytest.approx(full.activations / 4) and uniform_s == full_s
    assert uniform.backward > full.backward  # four blocks rematerialised at once
    assert uniform.weights > full.weights  # ... and unsharded by FSDP2 from their recompute to their backward
    # per pipeline stage: 14 layers, block 14 recomputes all of them
    staged = estimate(pp=2, recompute="full", recompute_method="block", recompute_num_layers=14)
    assert staged == estimate(pp=2, recompute="full")


def test_peak_holds_the_loss_or_one_block_backward_not_both() -> None:
    cfg = get_preset("qwen3-1.7b")
    for recompute in RECOMPUTE_CHOICES:
        mem = estimate_memory(cfg, Layout(1, 1, 8, 1, recompute), 4096, loss_chunk_tokens=1024)
        state = mem.weights + mem.gradients + mem.optimizer
        assert mem.total == pytest.approx(state + mem.activations + max(mem.logits, mem.backward) + mem.overhead)
    full = estimate_memory(cfg, Layout(1, 1, 8, 1, "full"), 4096)
    assert full.backward > estimate_memory(cfg, Layout(1, 1, 8, 1), 4096).backward  # the recomputed block


def test_chunked_loss_holds_at_most_two_chunks_of_logits_and_only_without_tp() -> None:
    cfg = get_preset("qwen3-1.7b")
    plain = estimate_memory(cfg, Layout(1, 1, 8, 4), 4096).logits
    chunked = [estimate_memory(cfg, Layout(1, 1, 8, mbs), 4096, loss_chunk_tokens=1024).logits for mbs in (1, 4)]
    assert chunked[1] < plain / 4
    # a larger micro batch adds only its final norm and hidden-state gradient, not logits
    per_token = (4 + 2 * 2) * cfg.hidden_size + 2 * cfg.hidden_size
    assert chunked[1] - chunked[0] == pytest.approx(3 * 4096 * per_token)
    tp = Layout(2, 1, 4, 1, sequence_parallel=True)
    assert estimate_memory(cfg, tp, 4096, loss_chunk_tokens=1024).logits == estimate_memory(cfg, tp, 4096).logits


def test_compute_copies_of_the_weights() -> None:
    cfg = get_preset("qwen3-1.7b")
    params = cfg.num_parameters()
    fp32 = estimate_memory(cfg, Layout(1, 1, 1, 1), 4096, compute_dtype_bytes=4)
    assert fp32.weights == pytest.approx(4 * params)  # one process computes on the master weights
    autocast = estimate_memory(cfg, Layout(1, 1, 1, 1), 4096)
    assert autocast.weights == pytest.approx(6 * params)  # + autocast's bf16 copy of every weight
    replicated = estimate_memory(cfg, Layout(1, 1, 8, 1, shard=False), 4096)
    assert replicated.weights == pytest.approx(6 * params)
    sharded = estimate_memory(cfg, Layout(1, 1, 8, 1), 4096)
    root = cfg.vocab_size * cfg.hidden_size + cfg.hidden_size  # tied embedding + final norm
    block = (params - root) / cfg.num_hidden_layers
    assert sharded.weights == pytest.approx(4 * params / 8 + 2 * (root + 2 * block))  # + unsharded bf16 root, 2 blocks


def test_chunked_loss_weight_copy_depends_on_the_weight_it_is_given_and_the_matmul_units() -> None:
    cfg = get_preset("qwen3-1.7b")
    params, lm_head = cfg.num_parameters(), cfg.vocab_size * cfg.hidden_size
    blocks = params - lm_head - cfg.hidden_size  # tied embedding + final norm are not cast by autocast

    def estimate(layout: Layout, **kwargs: Any) -> MemoryEstimate:
        return estimate_memory(cfg, layout, 4096, loss_chunk_tokens=1024, **kwargs)

    one, fsdp = Layout(1, 1, 1, 1), Layout(1, 1, 8, 1)
    native = estimate(one)
    assert native.weights == pytest.approx(4 * params + 2 * blocks)  # the loss casts the head, not autocast
    # one process: a bf16 copy of the fp32 head, or a float32 copy of its bf16 rounding on float32 units
    assert estimate(one, bf16_float32_matmuls=True).logits - native.logits == pytest.approx(2 * lm_head)
    # FSDP2 hands the loss its bf16 unsharded head: read as is, or copied to float32 on float32 units
    assert estimate(fsdp, bf16_float32_matmuls=True).logits - estimate(fsdp).logits == pytest.approx(4 * lm_head)
    fp32 = estimate(one, compute_dtype_bytes=4)
    assert estimate(one, compute_dtype_bytes=4, bf16_float32_matmuls=True) == fp32  # no bf16 matmuls to move
    assert fp32.logits < native.logits  # fp32 reads the master weight itself


def test_pipeline_bubble_and_tp_traffic_slow_the_step() -> None:
    cfg = get_preset("qwen3-1.7b")
    pure_dp = estimate_step_time(cfg, Layout(1, 1, 8, 1), 4096, 64, 989.0, 450.0)
    with_pp = estimate_step_time(cfg, Layout(1, 8, 1, 1), 4096, 64, 989.0, 450.0)
    with_tp = estimate_step_time(cfg, Layout(8, 1, 1, 1), 4096, 64, 989.0, 450.0)
    assert pure_dp.step_seconds < with_pp.step_seconds
    assert pure_dp.step_seconds < with_tp.step_seconds
    assert pure_dp.tokens_per_second == pytest.approx(64 * 4096 / pure_dp.step_seconds)


def test_enumerate_covers_every_factorisation() -> None:
    layouts = enumerate_layouts(8, max_micro_batch=1)
    sizes = {(lay.tp, lay.pp, lay.cp, lay.dp) for lay in layouts}
    powers = (1, 2, 4, 8)
    assert sizes == {(t, p, c, 8 // (t * p * c))
                     for t in powers for p in powers for c in powers if 8 % (t * p * c) == 0}
    assert all(lay.world_size == 8 for lay in layouts)
    assert {lay.cp_algo for lay in layouts if lay.cp > 1} == {"megatron_cp_algo", "ulysses_cp_algo"}


def test_plan_puts_fitting_layouts_first() -> None:
    rows = plan(get_preset("qwen3-1.7b"), 8, 32 * GIB, 4096, 64, 280.0, 196.0)
    fits = [row.fits for row in rows]
    assert fits[0] and fits == sorted(fits, reverse=True)
    assert all(row.memory.total <= 32 * GIB for row in rows if row.fits)
    assert not any(row.fits for row in plan(get_preset("qwen3-32b"), 1, 32 * GIB, 4096, 64, 280.0, 196.0))


def test_parse_size() -> None:
    assert parse_size("32GB") == 32 * GIB
    assert parse_size("80GiB") == 80 * GIB
    assert parse_size("512m") == 512 * 2**20
    with pytest.raises(ValueError, match="--device-memory"):
        parse_size("lots")


def test_cli_prints_table_recommendation_and_json(tmp_path, capsys) -> None:
    out = tmp_path / "plan.json"
    code = main(["--model", "qwen3-1.7b", "--devices", "8", "--device-memory", "32GB", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "recommended: --tensor-model-parallel-size" in printed
    rows = json.loads(out.read_text())
    assert rows and rows[0]["fits"] and {"tp", "pp", "dp"} <= set(rows[0]["layout"])


def test_cli_rejects_unknown_device(capsys) -> None:
    assert main(["--device", "abacus"]) == 2
    assert "--device" in capsys.readouterr().err
