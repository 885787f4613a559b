"""Peak memory of `qwen3-pretrain convert` on a real-size model: HF -> mcore (TP=8 by default) and back.

Writes random bf16 weights for a preset (default qwen3-1.7b, 3.44 GB) as HF safetensors, then runs each
conversion in a fresh process and reports its peak RSS (the kernel's high-water mark from wait4) next
to the model size, split into anonymous memory and file-backed (memory-mapped) pages as sampled from
/proc every 20 ms. Prints a table and writes JSON.

    python benchmarks/convert_memory.py [--preset qwen3-1.7b] [--tp 8] [--pp 1] [--workdir DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from qwen3_pretrain.checkpoint.hf import save_hf_state_dict
from qwen3_pretrain.checkpoint.mcore import hf_tensor_shapes
from qwen3_pretrain.config.model import Qwen3Config, get_preset


def random_weights(config: Qwen3Config, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named random tensors, one at a time."""
    gen = torch.Generator().manual_seed(0)
    for name, shape in hf_tensor_shapes(config).items():
        yield name, torch.empty(shape, dtype=dtype).normal_(std=0.02, generator=gen)


def _status_kb(pid: int) -> dict[str, int]:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0])
    return fields


def run_measured(argv: list[str]) -> dict[str, float]:
    """Run `qwen3-pretrain convert argv` in a new process; wall time and peak memory in GB."""
    code = "import sys; from qwen3_pretrain.cli import main; sys.exit(main(sys.argv[1:]))"
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, "convert", *argv], stderr=subprocess.DEVNULL)
    peaks = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                for key, value in _status_kb(proc.pid).items():
                    if key in peaks:
                        peaks[key] = max(peaks[key], value)
            except (FileNotFoundError, ProcessLookupError):
                return
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"convert {' '.join(argv)} failed with status {proc.returncode}")
    return {
        "wall_s": time.perf_counter() - start,
        "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9,
        "peak_anon_gb": peaks["RssAnon"] * 1024 / 1e9,
        "peak_file_gb": peaks["RssFile"] * 1024 / 1e9,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="qwen3-1.7b")
    parser.add_argument("--tp", type=int, default=8)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None, help="where the checkpoints go (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    config = get_preset(args.preset)
    config.torch_dtype = "bfloat16"
    model_gb = config.num_parameters() * 2 / 1e9
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        hf, mg, back = Path(tmp) / "hf", Path(tmp) / "mg", Path(tmp) / "back"
        t = time.perf_counter()
        save_hf_state_dict(random_weights(config, torch.bfloat16), hf, config=config)
        elapsed = time.perf_counter() - t
        print(f"wrote random {args.preset} weights ({model_gb:.2f} GB) in {elapsed:.0f} s", file=sys.stderr)
        rows = {
            f"hf -> mg TP={args.tp} PP={args.pp}": run_measured([
                "--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", str(hf), "--save-dir", str(mg),
                "--target-tensor-parallel-size", str(args.tp), "--target-pipeline-parallel-size", str(args.pp),
            ]),
            f"mg TP={args.tp} PP={args.pp} -> hf": run_measured([
                "--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", str(mg), "--save-dir", str(back),
            ]),
        }
    print(f"\n{args.preset}: {config.num_parameters():,} parameters, bf16 model size {model_gb:.2f} GB\n")
    print(f"{'conversion':<24} {'wall s':>7} {'peak RSS GB':>12} {'x model':>8} {'anon GB':>8} {'mmap GB':>8}")
    for name, r in rows.items():
        print(f"{name:<24} {r['wall_s']:7.1f} {r['peak_rss_gb']:12.2f} {r['peak_rss_gb'] / model_gb:8.2f} "
              f"{r['peak_anon_gb']:8.2f} {r['peak_file_gb']:8.2f}")
    machine = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "memory_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9,
               "torch": torch.__version__}
    result = {"preset": args.preset, "parameters": config.num_parameters(), "model_gb": model_gb, "machine": machine,
              "runs": rows}
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
