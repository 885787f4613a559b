"""`qwen3-pretrain plot`: metrics.jsonl -> curves (exact series) -> a PNG."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from qwen3_pretrain.cli import main as cli_main
from qwen3_pretrain.train.plot import MetricsError, collect_series, plot_metrics, read_records


def _train_record(iteration: int, loss: float, **extra: float) -> dict[str, float]:
    return {
        "iteration": iteration, "consumed_samples": 8 * iteration, "lm_loss": loss, "lr": 1e-3 * iteration,
        "grad_norm": 1.0 / iteration, "elapsed_ms": 100.0, "tokens_per_sec_per_device": 1000.0 + iteration,
        "tflops_per_device": 0.5, **extra,
    }


def _write(path: Path, records: list[dict[str, float]], tail: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def _synthetic_run(run_dir: Path) -> list[dict[str, float]]:
    records = [
        _train_record(1, 9.0, mfu=0.1),
        _train_record(2, 8.0),
        _train_record(3, 7.5),  # the run died here and resumed from iteration 2
        _train_record(3, 7.0, mfu=0.2),
        {"iteration": 3, "val_loss": 7.2, "val_ppl": 1339.4},
        _train_record(4, 6.5),
    ]
    _write(run_dir / "metrics.jsonl", records, tail='{"iteration": 5, "lm_lo')
    return records


def test_series_dedup_resumed_iterations_and_tolerate_missing_keys(tmp_path: Path) -> None:
    records = _synthetic_run(tmp_path)
    series = collect_series(read_records(tmp_path / "metrics.jsonl"))
    assert len(read_records(tmp_path / "metrics.jsonl")) == len(records)  # the partial last line is skipped
    assert series["lm_loss"] == ([1, 2, 3, 4], [9.0, 8.0, 7.0, 6.5])
    assert series["val_loss"] == ([3], [7.2])
    assert series["mfu"] == ([1, 3], [0.1, 0.2])
    assert series["lr"] == ([1, 2, 3, 4], [1e-3, 2e-3, 3e-3, 4e-3])


def test_plot_writes_png_via_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _synthetic_run(tmp_path)
    assert cli_main(["plot", str(tmp_path)]) == 0
    png = tmp_path / "metrics.png"
    assert capsys.readouterr().out.strip() == f"wrote {png}"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(png)
    assert image.shape[:2] == (800, 1200)
    assert float(np.std(image[..., :3])) > 0.05  # axes, curves and text, not a blank canvas
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_plot_with_only_loss_keys(tmp_path: Path) -> None:
    _write(tmp_path / "metrics.jsonl", [{"iteration": i, "lm_loss": 10.0 - i} for i in range(1, 4)])
    out = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "sub" / "curves.png")
    assert out == tmp_path / "sub" / "curves.png" and out.stat().st_size > 10_000


def test_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(MetricsError, match=r"metrics.jsonl not found: pass the run directory"):
        plot_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(MetricsError, match="has no lm_loss or val_loss records yet"):
        plot_metrics(tmp_path)
    tail = "not json\n" + json.dumps(_train_record(2, 8.0)) + "\n"
    _write(tmp_path / "metrics.jsonl", [_train_record(1, 9.0)], tail=tail)
    with pytest.raises(MetricsError, match=r"metrics.jsonl:2 is not valid JSON"):
        plot_metrics(tmp_path)
    _write(tmp_path / "metrics.jsonl", [{"lm_loss": 1.0}])
    with pytest.raises(MetricsError, match=r"metrics.jsonl:1 is not a JSON object with an integer 'iteration'"):
        plot_metrics(tmp_path)
    assert cli_main(["plot", str(tmp_path / "nowhere")]) == 1
    assert "qwen3-pretrain plot: error:" in capsys.readouterr().err
