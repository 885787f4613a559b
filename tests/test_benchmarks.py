"""benchmarks/train_throughput.py end to end on CPU with qwen3-tiny in fp32 (each variant is a fresh process,
so bf16 is left to the manual runs to keep this file short): the report's fields and arithmetic, and that
ours and HF transformers train the same model on the same data (equal losses). No timing asserts."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwen3_pretrain.model.config import get_preset

ROOT = Path(__file__).resolve().parents[1]
SEQ, MBS, ACCUM, ITERS, WARMUP = 32, 2, 2, 2, 1


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench") / "result.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "QWEN3_PRETRAIN_DEVICE": "cpu"}
    command = [
        sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--model", "qwen3-tiny",
        "--seq-length", str(SEQ), "--micro-batch-size", str(MBS), "--accumulation", str(ACCUM), "--iters", str(ITERS), "--warmup", str(WARMUP),
        "--dtype", "fp32", "--matmul-size", "128", "--threads", "1", "--json", str(out),
    ]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text()), proc.stdout


def test_report_has_machine_config_and_every_variant(report) -> None:
    data, stdout = report
    assert {"date", "command", "machine", "config", "peak_tflops", "results", "ratios"} <= data.keys()
    machine = data["machine"]
    assert machine["device_type"] == "cpu" and machine["device_name"] and machine["torch"] and machine["cpu_count"] >= 1
    assert data["config"]["flops_per_token"] == get_preset("qwen3-tiny").flops_per_token(SEQ)
    assert list(data["peak_tflops"]) == ["fp32"] and data["peak_tflops"]["fp32"] > 0
    assert 1 <= data["matmul_size"]["fp32"] <= 128
    assert [(r["impl"], r["dtype"]) for r in data["results"]] == [("ours", "fp32"), ("hf", "fp32")]
    assert "ours/hf tokens/s fp32" in stdout


def test_throughput_arithmetic(report) -> None:
    data, _ = report
    flops = data["config"]["flops_per_token"]
    for r in data["results"]:
        assert "error" not in r, r
        assert r["tokens_per_s"] == pytest.approx(ITERS * ACCUM * MBS * SEQ / r["seconds"])
        assert r["tflops"] == pytest.approx(r["tokens_per_s"] * flops / 1e12)
        assert r["mfu"] == pytest.approx(r["tflops"] / data["peak_tflops"][r["dtype"]])
        assert r["peak_memory_gb"] >= 0 and len(r["losses"]) == ITERS + WARMUP
    by = {(r["impl"], r["dtype"]): r for r in data["results"]}
    assert data["ratios"] == {"fp32": pytest.approx(by["ours", "fp32"]["tokens_per_s"] / by["hf", "fp32"]["tokens_per_s"])}


def test_ours_and_hf_train_the_same_model_on_the_same_data(report) -> None:
    data, _ = report
    by = {(r["impl"], r["dtype"]): r["losses"] for r in data["results"]}
    assert by["ours", "fp32"] == pytest.approx(by["hf", "fp32"], rel=1e-5)  # same weights, batches and updates
    assert by["ours", "fp32"][0] == pytest.approx(math.log(get_preset("qwen3-tiny").vocab_size), abs=0.1)  # random tokens
