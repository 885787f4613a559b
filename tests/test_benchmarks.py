"""benchmarks/train_throughput.py end to end on CPU with qwen3-tiny in fp32 (each variant is a fresh process,
so bf16 is left to the manual runs to keep this file short): the report's fields and arithmetic, that
ours and HF transformers train the same model on the same data (equal losses), and the profile of one
more step (--profile). benchmarks/gpu_1p7b.sh end to end with BENCH_CPU=1. No timing asserts."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

from qwen3_pretrain.config.model import get_preset
from qwen3_pretrain.data.mock import MockGPTDataset

ROOT = Path(__file__).resolve().parents[1]
SEQ, MBS, ACCUM, ITERS, WARMUP = 32, 2, 2, 2, 1
CATEGORIES = ["matmul", "attention", "optimizer", "other"]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, Path]:
    folder = tmp_path_factory.mktemp("bench")
    out, profile = folder / "result.json", folder / "profile"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "QWEN3_PRETRAIN_DEVICE": "cpu"}
    command = [
        sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--model", "qwen3-tiny",
        "--seq-length", str(SEQ), "--micro-batch-size", str(MBS), "--accumulation", str(ACCUM),
        "--iters", str(ITERS), "--warmup", str(WARMUP), "--dtype", "fp32", "--matmul-size", "128", "--threads", "1",
        "--profile", str(profile), "--json", str(out),
    ]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text()), proc.stdout, profile


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """benchmarks/train_throughput.py as a module (benchmarks/ is no package)."""
    spec = importlib.util.spec_from_file_location("train_throughput", ROOT / "benchmarks" / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_gpu_script(out: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """benchmarks/gpu_1p7b.sh in its CPU mode with this interpreter, results in `out`."""
    env = {**os.environ, "BENCH_CPU": "1", "PYTHON": sys.executable, "OUT": str(out), "WITH_HF": "0", "PACK": "0",
           "FP8_RUNS": "none", "TORCHTITAN": "0", "LONG_SEQ": "none", "MOE_LAYERS": "none", **env}
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_1p7b.sh")], env=env, capture_output=True,
                          text=True, timeout=300, check=False)


def test_report_has_machine_config_and_every_variant(report) -> None:
    data, stdout, _ = report
    assert {"date", "command", "machine", "config", "peak_tflops", "results", "ratios"} <= data.keys()
    machine = data["machine"]
    assert machine["device_type"] == "cpu" and machine["device_name"] and machine["torch"] and machine["cpu_count"] >= 1
    assert data["config"]["flops_per_token"] == get_preset("qwen3-tiny").flops_per_token(SEQ)
    assert list(data["peak_tflops"]) == ["fp32"] and data["peak_tflops"]["fp32"] > 0
    assert 1 <= data["matmul_size"]["fp32"] <= 128
    assert [(r["impl"], r["dtype"]) for r in data["results"]] == [("ours", "fp32"), ("hf", "fp32")]
    assert "ours/hf tokens/s fp32" in stdout


def test_throughput_arithmetic(report) -> None:
    data, _, _ = report
    flops = data["config"]["flops_per_token"]
    for r in data["results"]:
        assert "error" not in r, r
        assert r["tokens_per_s"] == pytest.approx(ITERS * ACCUM * MBS * SEQ / r["seconds"])
        assert r["tflops"] == pytest.approx(r["tokens_per_s"] * flops / 1e12)
        assert r["mfu"] == pytest.approx(r["tflops"] / data["peak_tflops"][r["dtype"]])
        assert r["peak_memory_gb"] >= 0 and len(r["losses"]) == ITERS + WARMUP
    by = {(r["impl"], r["dtype"]): r for r in data["results"]}
    ratio = by["ours", "fp32"]["tokens_per_s"] / by["hf", "fp32"]["tokens_per_s"]
    assert data["ratios"] == {"fp32": pytest.approx(ratio)}


def test_ours_and_hf_train_the_same_model_on_the_same_data(report) -> None:
    data, _, _ = report
    by = {(r["impl"], r["dtype"]): r["losses"] for r in data["results"]}
    assert by["ours", "fp32"] == pytest.approx(by["hf", "fp32"], rel=1e-5)  # same weights, batches and updates
    random_tokens_loss = math.log(get_preset("qwen3-tiny").vocab_size)
    assert by["ours", "fp32"][0] == pytest.approx(random_tokens_loss, abs=0.1)


def test_profile_of_one_more_step(report) -> None:
    data, stdout, folder = report
    by = {r["impl"]: r for r in data["results"]}
    assert "profile" not in by["hf"]
    profile = by["ours"]["profile"]
    assert "error" not in profile, profile
    assert profile["table"] == str(folder / "profile_ours_fp32.txt")
    table = Path(profile["table"]).read_text()
    assert "Self CPU" in table and "aten::mm" in table
    assert sorted(folder.iterdir()) == [folder / "profile_ours_fp32.txt"]  # no tmp file left
    assert profile["time"] == "cpu" and profile["total_ms"] > 0
    assert profile["of_timed_step"] == pytest.approx(profile["total_ms"] / by["ours"]["ms_per_iter"])
    shares = profile["shares"]
    assert list(shares) == CATEGORIES and all(0 <= v <= 1 for v in shares.values())
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares["matmul"] > 0 and shares["optimizer"] > 0  # a training step: matmuls and an AdamW update
    assert "ours  fp32  profile: " in stdout and f"matmul {100 * shares['matmul']:.1f}%" in stdout


def test_profiled_step_reads_the_mock_samples_after_the_timed_ones(bench: ModuleType) -> None:
    args = bench.build_parser().parse_args(["--model", "qwen3-tiny", "--seq-length", "16", "--micro-batch-size", "2",
                                            "--accumulation", "3", "--iters", "2", "--warmup", "1", "--profile", "p"])
    timed = bench.num_micro_batches(args) * 2
    assert timed == 18  # 3 steps of 3 micro batches of 2: the .bin/.idx dataset as without --profile
    mock = MockGPTDataset(timed + 6, 16, get_preset("qwen3-tiny").vocab_size, seed=bench.SEED)
    batches = bench.profiled_step_batches(args, torch.device("cpu"))
    assert len(batches) == 3
    for i, batch in enumerate(batches):
        samples = [mock[timed + 2 * i + j] for j in range(2)]
        assert batch.keys() == samples[0].keys()
        for key, value in batch.items():
            assert torch.equal(value, torch.stack([sample[key] for sample in samples]))


def test_op_category_names_cpu_ops_and_cuda_kernels(bench: ModuleType) -> None:
    op_category = bench.op_category
    names = {
        "matmul": ["aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_mm", "nvjet_tst_128x192_64x4_2x1_v_bz_TNT",
                   "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_cublas",
                   "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_nn_align8>"],
        "attention": ["aten::_scaled_dot_product_flash_attention_for_cpu", "fmha_cutlassF_bf16_aligned_64x128_rf_sm80",
                      "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits>",
                      "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3"],
        "optimizer": ["aten::_fused_adamw_", "aten::_foreach_norm", "Optimizer.step#AdamW.step",
                      "void at::native::multi_tensor_apply_kernel<TensorListMetadata<1>, LpNormFunctor<float>>"],
        "other": ["aten::mul", "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "Memcpy HtoD (Pinned -> Device)"],
    }
    assert {category: [op_category(name) for name in group] for category, group in names.items()} == {
        category: [category] * len(group) for category, group in names.items()}


def test_cuda_shares_count_each_kernel_once(bench: ModuleType) -> None:
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    rows = [  # (key, device type, user annotation, self device time in us)
        ("aten::mm", cpu, False, 50.0), ("nvjet_tst_128x192_64x4_2x1_v_bz_TNT", cuda, False, 50.0),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>", cuda, False, 30.0),
        ("ProfilerStep#1", cuda, True, 400.0), ("Memcpy HtoD (Pinned -> Device)", cuda, False, 20.0),
    ]
    events = [SimpleNamespace(key=key, device_type=kind, is_user_annotation=note, self_device_time_total=us)
              for key, kind, note, us in rows]
    total, shares = bench.self_time_shares(events, "self_device_time_total", device_only=True)
    assert total == 100.0
    assert shares == {"matmul": 0.5, "attention": 0.3, "optimizer": 0.0, "other": 0.2}
    with pytest.raises(RuntimeError, match="no self_device_time_total"):
        bench.self_time_shares(events[:1], "self_device_time_total", device_only=True)


def test_gpu_script_on_cpu_compares_micro_batches_at_equal_samples_per_step(tmp_path: Path) -> None:
    configs = ["1:none:eager", "2:none:eager:unfused"]
    proc = run_gpu_script(tmp_path, ITERS="1", WARMUP="0", CONFIGS=" ".join(configs), LONG_SEQ="128", MOE_LAYERS="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["samples_per_step"] == 2 and summary["best"] in configs
    rows = summary["configs"]
    assert [(row["config"], row["accumulation"]) for row in rows] == list(zip(configs, (2, 1), strict=True))
    for index, (row, attention) in enumerate(zip(rows, ("auto", "unfused"), strict=True), start=1):
        ours = row["ours"]
        assert row["hf"] is None and ours["tokens_per_s"] > 0 and len(ours["losses"]) == 1
        report = json.loads((tmp_path / row["report"]).read_text())["config"]
        assert report["micro_batch_size"] * report["accumulation"] == 2 and report["attention_backend"] == attention
        shares = ours["profile"]["shares"]
        assert list(shares) == CATEGORIES and sum(shares.values()) == pytest.approx(1.0) and shares["matmul"] > 0
        assert (tmp_path / f"profile_config_{index}" / "profile_ours_bf16.txt").is_file()
        assert f"{100 * shares['matmul']:6.1f}%" in proc.stdout
    assert "matmul    attn   optim   other    busy" in proc.stdout
    for name, model, layers, seq in (("long_seq", "qwen3-tiny", 2, 128), ("moe", "qwen3-moe-bench", 1, 64)):
        report = json.loads((tmp_path / f"{name}.json").read_text())
        assert report["config"]["model"] == model and report["config"]["num_layers"] == layers
        assert report["config"]["seq_length"] == seq and report["results"][0]["tokens_per_s"] > 0


def test_gpu_script_on_cpu_puts_ours_bf16_fp8_and_torchtitan_side_by_side_in_three_files(tmp_path: Path) -> None:
    proc = run_gpu_script(tmp_path, ITERS="1", WARMUP="0", CONFIGS="1:none:eager 2:none:eager", SAVE_PRESET="none",
                          FP8_RUNS="hybrid:tensorwise", TORCHTITAN="1", PACK="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["details.tar.gz", "gpu_1p7b.log", "summary.json"]
    with tarfile.open(tmp_path / "details.tar.gz") as packed:
        names = set(packed.getnames())
    assert {"config_1.json", "config_2.json", "fp8_hybrid_tensorwise.json",
            "profile_fp8_hybrid_tensorwise/profile_ours_bf16.txt"} <= names
    summary = json.loads((tmp_path / "summary.json").read_text())
    runs = {row["run"]: row for row in summary["side_by_side"]}
    assert list(runs) == [f"ours bf16 {summary['best']}", "ours fp8 hybrid tensorwise", "torchtitan bf16"]
    assert runs[f"ours bf16 {summary['best']}"]["x_ours_bf16"] == 1.0
    fp8 = runs["ours fp8 hybrid tensorwise"]
    assert fp8["error"] is None and fp8["tokens_per_s"] > 0
    assert sum(fp8["profile"]["shares"].values()) == pytest.approx(1)
    titan = runs["torchtitan bf16"]
    if importlib.util.find_spec("torchtitan") is None:  # the bench extra is not a test dependency
        assert "torchtitan skipped: it does not import here" in proc.stdout and titan["error"]
    else:
        assert titan["error"] is None and titan["tokens_per_s"] > 0 and "torchtitan.json" in names
        assert fp8["x_torchtitan"] == pytest.approx(fp8["tokens_per_s"] / titan["tokens_per_s"])
    assert "Side by side at the best bf16 configuration's settings" in proc.stdout


@pytest.mark.parametrize(("env", "message"), [
    ({"CONFIGS": "1:none:eager 3:none:eager"},
     "CONFIGS entry 3:none:eager: micro batch 3 does not divide SAMPLES_PER_STEP=4"),
    ({"CONFIGS": "1:none:eager:fa3"},
     "CONFIGS entry 1:none:eager:fa3: the fourth field must be auto, flash, fused, efficient"),
    ({"CONFIGS": "1:none:eager", "FP8_RUNS": "hybrid:delayed"},
     "FP8_RUNS entry hybrid:delayed: use FORMAT:RECIPE with FORMAT e4m3|hybrid and RECIPE tensorwise|rowwise"),
])
def test_gpu_script_rejects_a_bad_configuration_before_any_run(tmp_path: Path, env: dict[str, str],
                                                                message: str) -> None:
    proc = run_gpu_script(tmp_path / "out", SAMPLES_PER_STEP="4", **env)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "out").exists()  # checked before any run
