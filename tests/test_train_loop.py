"""The training loop against a straightforward reference loop; log line, JSONL and TensorBoard; skipped
non-finite iterations; SIGTERM; exact resume. One process, fp32, the qwen3-tiny model."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from qwen3_pretrain.config import TrainConfig, parse_train_args
from qwen3_pretrain.data.gpt_dataset import build_gpt_datasets
from qwen3_pretrain.model import Qwen3ForCausalLM, kernels
from qwen3_pretrain.train import trainer
from qwen3_pretrain.train.preflight import prepare
from qwen3_pretrain.train.trainer import TrainingError, TrainResult, build_model_parts, run_training

from train_helpers import (
    BETAS,
    CLIP,
    EOD,
    EPS,
    GBS,
    ITERS,
    LR,
    MBS,
    MIN_LR,
    SEQ,
    WARMUP_ITERS,
    WD,
    tiny_flags,
    write_tiny_dataset,
)


def reference_lr(applied_updates: int) -> float:
    """Megatron's warmup + cosine, in samples: the lr of an update after `applied_updates` applied ones."""
    samples, warmup, decay = applied_updates * GBS, WARMUP_ITERS * GBS, ITERS * GBS
    if samples <= warmup:
        return LR * samples / warmup
    ratio = (samples - warmup) / (decay - warmup)
    return MIN_LR + 0.5 * (math.cos(math.pi * ratio) + 1.0) * (LR - MIN_LR)


def reference_losses(config: TrainConfig, skip: frozenset[int] = frozenset(),
                     initial: Qwen3ForCausalLM | None = None) -> list[float]:
    """Our model + torch AdamW + the LR formula: one global batch per step, loss = sum over loss tokens /
    their count, global-norm clipping; updates in `skip` (0-based iterations) are not applied. The
    weights start from `initial` (a copy) or the seeded init."""
    data = config.data
    torch.manual_seed(config.training.seed)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config.require_resolved().model_config)
    model.to_empty(device="cpu")
    model.tie_weights()
    model.init_weights()
    if initial is not None:
        model.load_state_dict(initial.state_dict())
    matrices = [p for p in model.parameters() if p.ndim > 1]
    vectors = [p for p in model.parameters() if p.ndim == 1]
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": WD}, {"params": vectors, "weight_decay": 0.0}],
        lr=LR,
        betas=BETAS,
        eps=EPS,
    )
    train, _, _ = build_gpt_datasets(data.data_path, data.split, SEQ, config.training.seed, (ITERS * GBS, GBS, GBS),
                                     cache_dir=data.data_cache_path, eod_token_id=EOD, eod_mask_loss=True)
    losses, applied = [], 0
    for k in range(ITERS):
        samples = [train[i] for i in range(k * GBS, (k + 1) * GBS)]
        tokens = torch.stack([s["tokens"] for s in samples])  # [GBS, SEQ]
        mask = torch.stack([s["loss_mask"] for s in samples])  # [GBS, SEQ]
        labels = torch.stack([s["labels"] for s in samples]).masked_fill(mask == 0, -100)  # [GBS, SEQ]
        logits = model(tokens).logits  # [GBS, SEQ, vocab]
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / mask.sum()
        losses.append(loss.item())
        if k not in skip:
            for group in optimizer.param_groups:
                group["lr"] = reference_lr(applied)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            optimizer.step()
            applied += 1
        optimizer.zero_grad()
    return losses


def assert_close(ours: list[float], reference: list[float], rel: float = 1e-6) -> None:
    assert len(ours) == len(reference)
    for i, (a, b) in enumerate(zip(ours, reference, strict=True)):
        assert abs(a - b) <= rel * abs(b), f"iteration {i + 1}: {a} vs reference {b}"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny_text_document")


@pytest.fixture(scope="module")
def baseline(dataset: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainConfig, TrainResult, str, Path]:
    """One run saving at iteration 3 and 6, with JSONL and TensorBoard; (config, result, stdout, save dir)."""
    out = tmp_path_factory.mktemp("run")
    config = parse_train_args(tiny_flags(dataset, save=out / "ckpt", save_interval=3, tensorboard_dir=out / "tb"))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        result = run_training(config)
    return config, result, stdout.getvalue(), out / "ckpt"


def test_equals_reference_loop(baseline: tuple[TrainConfig, TrainResult, str, Path]) -> None:
    config, result, _, _ = baseline
    assert result.iterations == list(range(1, ITERS + 1)) and not any(result.skipped)
    assert_close(result.losses, reference_losses(config))
    assert result.learning_rates == pytest.approx([reference_lr(k) for k in range(ITERS)], rel=1e-12)
    assert result.losses[-1] < result.losses[0]


LINE = re.compile(
    r"^ \[\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\]"
    r" iteration (?P<iteration> {0,7}\d{1,8})/(?P<train_iters> {0,7}\d{1,8}) \|"
    r" consumed samples: (?P<consumed_samples> {0,11}\d{1,12}) \|"
    r" elapsed time per iteration \(ms\): (?P<elapsed_ms_per_iteration>\d+\.\d) \|"
    r" learning rate: (?P<lr>\d\.\d{6}E[+-]\d{2}) \|"
    r" global batch size: (?P<global_batch_size> {0,4}\d{1,5}) \|"
    r" lm loss: (?P<lm_loss>\d\.\d{6}E[+-]\d{2}) \|"
    r" loss scale: (?P<loss_scale>\d+\.\d) \|"
    r" grad norm: (?P<grad_norm>\d+\.\d{3}) \|"
    r" number of skipped iterations: (?P<skipped_iterations> {0,2}\d{1,3}) \|"
    r" number of nan iterations: (?P<nan_iterations> {0,2}\d{1,3}) \|"
    r" tokens per second per device: (?P<tokens_per_sec_per_device>\d+\.\d) \|"
    r" TFLOP/s per device: (?P<tflops_per_device>\d+\.\d{2}) \|"
    r" mem peak/est \(GiB\): \d+\.\d{2}/\d+\.\d{2} \|$"  # tests/test_observability.py checks the numbers
)
FORMATS = {"elapsed_ms_per_iteration": "{:.1f}", "lr": "{:.6E}", "lm_loss": "{:.6E}", "loss_scale": "{:.1f}",
           "grad_norm": "{:.3f}", "tokens_per_sec_per_device": "{:.1f}", "tflops_per_device": "{:.2f}"}


def test_log_line_jsonl_and_tensorboard(baseline: tuple[TrainConfig, TrainResult, str, Path]) -> None:
    _, result, stdout, save_dir = baseline
    matches = [LINE.match(line) for line in stdout.splitlines() if line.startswith(" [")]
    assert len(matches) == ITERS // 2 and all(matches), stdout
    records = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "lm_loss" in r]
    assert [r["iteration"] for r in train_records] == [2, 4, 6]
    for match, record in zip(matches, train_records, strict=True):
        fields = match.groupdict()
        assert int(fields["train_iters"]) == ITERS and int(fields["global_batch_size"]) == GBS
        for key in ("iteration", "consumed_samples", "skipped_iterations", "nan_iterations"):
            assert int(fields[key]) == record[key]
        for key, fmt in FORMATS.items():
            assert fields[key] == fmt.format(record[key]), key
        i = record["iteration"]
        assert record["lm_loss"] == pytest.approx(sum(result.losses[i - 2 : i]) / 2, rel=1e-12)
        assert record["grad_norm"] == pytest.approx(result.grad_norms[i - 1], rel=1e-12)
    validation = [r for r in records if "val_loss" in r]
    assert [r["iteration"] for r in validation] == [ITERS]
    assert validation[0]["val_ppl"] == pytest.approx(math.exp(validation[0]["val_loss"]))
    assert "validation loss at iteration 6 on validation set | lm loss value: " in stdout

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(save_dir.parent / "tb"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("lm loss")}  # each iteration's own loss (Megatron's)
    assert logged == pytest.approx(dict(zip(result.iterations, result.losses, strict=True)), rel=1e-6)


def test_resume_is_exact(baseline: tuple[TrainConfig, TrainResult, str, Path], dataset: str, tmp_path: Path) -> None:
    _, full, _, save_dir = baseline
    resumed = run_training(parse_train_args(tiny_flags(dataset, load=save_dir / "iter_0000003", save=tmp_path / "ck")))
    assert resumed.iterations == [4, 5, 6]
    assert resumed.losses == full.losses[3:]
    assert resumed.learning_rates == full.learning_rates[3:]


def _loss_with(monkeypatch: pytest.MonkeyPatch, poison: Any) -> None:
    """Replace the loop's token loss by one that `poison(call number, loss)` may change."""
    real = trainer.token_loss_sum
    calls = {"n": 0}

    def patched(*args: Any) -> torch.Tensor:
        calls["n"] += 1
        return poison(calls["n"], real(*args))

    monkeypatch.setattr(trainer, "token_loss_sum", patched)


def test_nonfinite_iteration_is_skipped(dataset: str, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    micro_batches = GBS // MBS
    _loss_with(monkeypatch, lambda n, loss: loss * float("nan") if n == micro_batches + 1 else loss)
    config = parse_train_args(tiny_flags(dataset, log_interval=1))
    result = run_training(config)
    assert result.skipped == [False, True, False, False, False, False]
    assert math.isnan(result.losses[1]) and math.isnan(result.grad_norms[1])
    reference = reference_losses(config, skip=frozenset({1}))
    assert_close(result.losses[:1] + result.losses[2:], reference[:1] + reference[2:])
    assert result.learning_rates[2] == pytest.approx(reference_lr(1), rel=1e-12)  # the skip did not advance it
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(" [")]
    assert "number of skipped iterations:   1 | number of nan iterations:   1 |" in lines[1]
    assert "number of skipped iterations:   0 |" in lines[2]


def test_stops_after_nonfinite_iterations_in_a_row(dataset: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _loss_with(monkeypatch, lambda n, loss: loss * float("inf"))
    config = parse_train_args(tiny_flags(dataset, log_interval=1, stop_after_nonfinite_iters=2))
    with pytest.raises(TrainingError, match=r"last 2 iterations .*--stop-after-nonfinite-iters 2"):
        run_training(config)


def test_sigterm_finishes_the_step_saves_and_returns(baseline: tuple[TrainConfig, TrainResult, str, Path],
                                                     dataset: str, monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    micro_batches = GBS // MBS

    def send_sigterm(n: int, loss: torch.Tensor) -> torch.Tensor:
        if n == micro_batches + 2:  # in the middle of iteration 2
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    _loss_with(monkeypatch, send_sigterm)
    result = run_training(parse_train_args(tiny_flags(dataset, save=tmp_path / "ck", save_interval=100)))
    assert result.stopped_by_signal and result.final_iteration == 2
    assert result.losses == baseline[1].losses[:2]
    assert [p.name for p in result.checkpoints] == ["iter_0000002"]
    assert (tmp_path / "ck" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


RECOMPUTE_CASES: dict[str, tuple[dict[str, Any], list[str]]] = {  # flags, classes of the decoder and its blocks
    "full": ({"recompute_granularity": "full"},
             ["Qwen3Model", "RecomputeFullDecoderLayer", "RecomputeFullDecoderLayer"]),
    "selective": ({"recompute_granularity": "selective"},
                  ["Qwen3Model", "RecomputeSelectiveDecoderLayer", "RecomputeSelectiveDecoderLayer"]),
    "uniform 2": ({"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 2},
                  ["RecomputeGroupsQwen3Model", "DecoderLayer", "DecoderLayer"]),  # both layers in one group
    "block 1": ({"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 1},
                ["Qwen3Model", "RecomputeFullDecoderLayer", "DecoderLayer"]),
}


@pytest.mark.parametrize("case", RECOMPUTE_CASES)
def test_recompute_gives_the_same_losses(baseline: tuple[TrainConfig, TrainResult, str, Path], dataset: str,
                                         case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    flags, classes = RECOMPUTE_CASES[case]
    parts: list[torch.nn.Module] = []

    def build_and_keep(*args: Any) -> tuple[list[torch.nn.Module], frozenset[str]]:
        built = build_model_parts(*args)
        parts.extend(built[0])
        return built

    monkeypatch.setattr(trainer, "build_model_parts", build_and_keep)
    result = run_training(parse_train_args(tiny_flags(dataset, **flags)))
    (model,) = parts
    assert [type(m).__name__ for m in (model.model, *model.model.layers.values())] == classes
    assert_close(result.losses, baseline[1].losses, rel=1e-6)
    assert_close(result.grad_norms, baseline[1].grad_norms, rel=1e-6)


def test_fp16_loss_scale_backs_off_without_stopping(dataset: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Overflows at a too-large loss scale skip updates and halve the scale; they are not failures."""
    flags = tiny_flags(dataset, fp16=True, initial_loss_scale=2.0**24, hysteresis=1, log_interval=1,
                       stop_after_nonfinite_iters=2)
    result = run_training(parse_train_args(flags))
    first_applied = result.skipped.index(False)
    assert first_applied >= 2 and not any(result.skipped[first_applied:])
    assert all(math.isfinite(loss) for loss in result.losses)
    scales = [float(re.search(r"loss scale: (\S+) \|", line).group(1))
              for line in capsys.readouterr().out.splitlines() if line.startswith(" [")]
    assert scales[:first_applied] == [2.0 ** (23 - i) for i in range(first_applied)]
    assert scales[first_applied:] == [scales[first_applied - 1]] * (ITERS - first_applied)


def test_load_initial_weights_from_hf_and_mcore(dataset: str, tmp_path: Path) -> None:
    """--load of an HF directory (shape from its config.json) and of a TP-2 mcore checkpoint of the
    same weights both start training from those weights."""
    from qwen3_pretrain.checkpoint.hf import iter_hf_tensors, save_pretrained
    from qwen3_pretrain.checkpoint.mcore import McoreLayout, write_mcore_checkpoint
    from qwen3_pretrain.model import get_preset

    torch.manual_seed(123)
    weights = Qwen3ForCausalLM(dataclasses.replace(get_preset("qwen3-tiny"), torch_dtype="float32"))
    save_pretrained(weights, tmp_path / "hf")
    layout = McoreLayout(tp=2, stage_layers=(weights.config.num_hidden_layers,))
    write_mcore_checkpoint(iter_hf_tensors(tmp_path / "hf"), weights.config, tmp_path / "mcore", layout)
    config = prepare(tiny_flags(dataset, model=None, load=tmp_path / "hf"))
    assert config.resolved.load_format == "hf"
    reference = reference_losses(config, initial=weights)
    assert_close(run_training(config).losses, reference)
    mcore = prepare(tiny_flags(dataset, model=None, load=tmp_path / "mcore"))
    assert mcore.resolved.load_format == "mcore"
    assert_close(run_training(mcore).losses, reference)


def test_attention_backend_flag_selects_the_kernels_and_trains_alike(
    dataset: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    selected: list[str] = []  # the attention backend of each attention call's KernelOptions
    attention = kernels.attention
    monkeypatch.setattr(kernels, "attention",
                        lambda *args, **kwargs: selected.append(args[-1].attention) or attention(*args, **kwargs))
    auto = run_training(parse_train_args(tiny_flags(dataset)))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        unfused = run_training(parse_train_args(tiny_flags(dataset, attention_backend="unfused")))
    assert list(dict.fromkeys(selected)) == ["auto", "unfused"] and "attention unfused" in stdout.getvalue()
    assert unfused.losses == pytest.approx(auto.losses, rel=1e-5)  # math instead of flash attention


def test_bf16_training_on_either_cpu_bf16_kernel_path(dataset: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """--bf16 trains the same with torch's CPU bf16 kernels and on float32 units, and says which it uses."""
    runs: dict[bool, TrainResult] = {}
    for via_float32 in (False, True):
        monkeypatch.setattr(kernels, "cpu_has_fast_bf16_matmul", lambda fast=not via_float32: fast)
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            runs[via_float32] = run_training(parse_train_args(tiny_flags(dataset, bf16=True, log_interval=1)))
        assert ("float32 matmuls of bf16-rounded operands" in stdout.getvalue()) == via_float32
    native, via = runs[False], runs[True]
    assert all(map(math.isfinite, via.losses)) and via.losses[-1] < via.losses[0]
    assert via.losses == pytest.approx(native.losses, rel=2e-2)
    assert via.grad_norms == pytest.approx(native.grad_norms, rel=5e-2)


def test_keep_last_checkpoints_and_distributed_timeout_reach_the_run(
    dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    timeouts: list[float] = []
    init_parallel = trainer.init_parallel

    def recording_init(tp: int, pp: int, timeout_minutes: float, **sizes: int) -> Any:  # sizes: cp, ep, ...
        timeouts.append(timeout_minutes)
        return init_parallel(tp, pp, timeout_minutes=timeout_minutes, **sizes)

    monkeypatch.setattr(trainer, "init_parallel", recording_init)
    flags = tiny_flags(dataset, save=tmp_path / "ck", save_interval=2, keep_last_checkpoints=2,
                       distributed_timeout_minutes=7)
    run_training(parse_train_args(flags))
    assert timeouts == [7]
    assert sorted(p.name for p in (tmp_path / "ck").glob("iter_*")) == ["iter_0000004", "iter_0000006"]
