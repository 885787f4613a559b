"""`qwen3-pretrain plot RUN_DIR`: loss, learning rate, gradient norm and throughput curves to a PNG.

Reads `<RUN_DIR>/metrics.jsonl`: one JSON object per logged iteration (iteration, lm_loss, lr,
grad_norm, tokens_per_sec_per_device, tflops_per_device, optional mfu, ...) and per evaluation
(iteration, val_loss, val_ppl). Missing keys are tolerated; when a resumed run logged an iteration
again, its last record wins. A partly written final line (a run still writing) is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.lines import Line2D

METRICS_FILE = "metrics.jsonl"
DEFAULT_OUTPUT = "metrics.png"

Series = tuple[list[int], list[float]]

# (title, left-axis series (key, label), right-axis series (key, label))
PANELS: tuple[tuple[str, tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]], ...] = (
    ("loss", (("lm_loss", "train lm loss"), ("val_loss", "validation loss")), ()),
    ("learning rate", (("lr", "learning rate"),), ()),
    ("gradient norm", (("grad_norm", "grad norm"),), ()),
    ("throughput per device", (("tokens_per_sec_per_device", "tokens/s"),), (("tflops_per_device", "TFLOP/s"),)),
)


class MetricsError(ValueError):
    """The metrics file is missing, empty or malformed; the message names the file and line."""


def metrics_path(run_dir: str | os.PathLike[str]) -> Path:
    """`<run_dir>/metrics.jsonl`, or `run_dir` itself when it is a file."""
    path = Path(run_dir)
    return path if path.is_file() else path / METRICS_FILE


def read_records(path: Path) -> list[dict[str, object]]:
    """The JSON objects of a metrics.jsonl file, in file order."""
    if not path.is_file():
        raise MetricsError(f"{path} not found: pass the run directory the trainer wrote {METRICS_FILE} into")
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                print(f"warning: {path}:{number} is incomplete (still being written?); skipped", file=sys.stderr)
                continue
            raise MetricsError(f"{path}:{number} is not valid JSON ({exc})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("iteration"), int):
            raise MetricsError(f"{path}:{number} is not a JSON object with an integer 'iteration'")
        records.append(record)
    return records


def collect_series(records: list[dict[str, object]]) -> dict[str, Series]:
    """metric name -> (iterations ascending, values); the last record of an iteration wins."""
    by_key: dict[str, dict[int, float]] = {}
    for record in records:
        iteration = record["iteration"]
        assert isinstance(iteration, int), "read_records checks that every record has an integer iteration"
        for key, value in record.items():
            if key != "iteration" and isinstance(value, (int, float)) and not isinstance(value, bool):
                by_key.setdefault(key, {})[iteration] = float(value)
    return {key: (sorted(points), [points[i] for i in sorted(points)]) for key, points in by_key.items()}


def plot_metrics(run_dir: str | os.PathLike[str], output: str | os.PathLike[str] | None = None) -> Path:
    """Draw the curves of `run_dir` to `output` (default `<dir of metrics.jsonl>/metrics.png`)."""
    from matplotlib.figure import Figure  # Agg rendering without pyplot's global state

    source = metrics_path(run_dir)
    series = collect_series(read_records(source))
    if "lm_loss" not in series and "val_loss" not in series:
        raise MetricsError(f"{source} has no lm_loss or val_loss records yet; plot after the first logged iteration")
    output = source.parent / DEFAULT_OUTPUT if output is None else Path(output)

    figure = Figure(figsize=(12, 8), dpi=100, layout="constrained")
    figure.suptitle(str(source.parent))
    for axes, (title, left, right) in zip(figure.subplots(2, 2).flat, PANELS, strict=True):
        axes.set_title(title)
        axes.set_xlabel("iteration")
        drawn = _draw(axes, left, series)
        if any(key in series for key, _ in right):
            drawn += _draw(axes.twinx(), right, series, color_offset=len(left))
        if drawn:
            axes.legend(drawn, [line.get_label() for line in drawn], loc="best")
        else:
            axes.text(0.5, 0.5, "not logged", ha="center", va="center", transform=axes.transAxes)
        if title.startswith("throughput") and "mfu" in series:
            axes.set_title(f"{title} (last MFU {series['mfu'][1][-1]:.3g})")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    figure.savefig(tmp, format="png")
    os.replace(tmp, output)
    return output


def _draw(
    axes: Axes, specs: tuple[tuple[str, str], ...], series: dict[str, Series], color_offset: int = 0
) -> list[Line2D]:
    """Plot the present series of `specs` on `axes` (evaluations with markers); returns the lines."""
    lines = []
    for index, (key, label) in enumerate(specs):
        if key not in series:
            continue
        iterations, values = series[key]
        style = "o-" if key.startswith("val_") or len(values) == 1 else "-"
        (line,) = axes.plot(iterations, values, style, label=label, color=f"C{index + color_offset}", markersize=3)
        lines.append(line)
        if len(specs) == 1:
            axes.set_ylabel(label)
    return lines


def main(argv: list[str]) -> int:
    """CLI: `qwen3-pretrain plot RUN_DIR [--output PNG]`."""
    parser = argparse.ArgumentParser(prog="qwen3-pretrain plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help=f"directory holding {METRICS_FILE} (or the file itself)")
    parser.add_argument("--output", help=f"PNG to write (default: {DEFAULT_OUTPUT} next to {METRICS_FILE})")
    args = parser.parse_args(argv)
    try:
        path = plot_metrics(args.run_dir, args.output)
    except MetricsError as exc:
        print(f"qwen3-pretrain plot: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0
