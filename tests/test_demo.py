"""`qwen3-pretrain demo --quick`: the whole pipeline runs and leaves every artefact."""

from __future__ import annotations

import json

from qwen3_pretrain.checkpoint.hf import load_pretrained
from qwen3_pretrain.demo import DemoPaths, run_demo


def test_quick_demo_runs_every_stage(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("QWEN3_PRETRAIN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    summary = run_demo(out, "quick")
    paths = DemoPaths(out)
    assert summary["last_loss"] < summary["first_loss"]
    assert (paths.data_prefix.parent / "stdlib_text_document.bin").stat().st_size > 0
    records = [json.loads(line) for line in (paths.checkpoints / "metrics.jsonl").read_text().splitlines()]
    assert any("lm_loss" in record for record in records)
    assert (paths.checkpoints / "metrics.png").stat().st_size > 0
    model = load_pretrained(paths.hf_model)
    assert model.config.vocab_size == 151936
