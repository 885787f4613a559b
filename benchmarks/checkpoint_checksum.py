"""What the checkpoint manifest costs: checksumming a real-size save next to the save itself, in one run.

Builds a model of a preset (default qwen3-1.7b in bf16: 3.44 GB of weights, random values) and measures:
a plain DCP save of its weights (`dcp.save`, the baseline), the CRC-32 (what the manifest uses) and
blake2b of the files that save wrote (read back right after the save, as `save_checkpoint` does), the
whole `save_checkpoint` (DCP + train state + manifest) and the load-time check (`verify_checkpoint`).
Prints a table and writes JSON with the ratios to the DCP save time.

    python benchmarks/checkpoint_checksum.py [--preset qwen3-1.7b] [--dtype bf16|fp32] [--workdir DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from qwen3_pretrain.checkpoint.native import file_checksum, iteration_dir_name, save_checkpoint, verify_checkpoint
from qwen3_pretrain.config.model import get_preset
from qwen3_pretrain.model.qwen3 import Qwen3ForCausalLM

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def cpu_model() -> str:
    """The CPU's model name as `lscpu` reports it."""
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name:")), "?")


def random_model(preset: str, dtype: torch.dtype) -> Qwen3ForCausalLM:
    """The preset's model with random weights of `dtype`, allocated once (no float32 copy first)."""
    with torch.device("meta"):
        model = Qwen3ForCausalLM(get_preset(preset)).to(dtype)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(std=0.02, generator=generator)
    model.tie_weights()
    return model


def blake2b_of(path: Path) -> str:
    digest = hashlib.blake2b()
    with open(path, "rb", buffering=0) as handle:
        while chunk := handle.read(16 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def timed(action: Callable[[], Any]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def measure(preset: str, dtype: str, workdir: Path) -> dict[str, Any]:
    model = random_model(preset, DTYPES[dtype])
    plain, native = workdir / "dcp", workdir / "native"
    dcp_s = timed(lambda: dcp.save(get_model_state_dict(model), checkpoint_id=plain))
    files = sorted(p for p in plain.iterdir() if p.is_file())
    size = sum(p.stat().st_size for p in files)
    crc_s = timed(lambda: [file_checksum(p) for p in files])
    blake_s = timed(lambda: [blake2b_of(p) for p in files])
    save_s = timed(lambda: save_checkpoint(native, 1, model, None, None, {}, {"preset": preset}))
    verify_s = timed(lambda: verify_checkpoint(native / iteration_dir_name(1)))
    rows = {
        "dcp.save (baseline)": dcp_s, "crc32 of its files": crc_s, "blake2b of its files": blake_s,
        "save_checkpoint (DCP + manifest)": save_s, "verify_checkpoint (load-time check)": verify_s,
    }
    return {
        "bytes": size, "files": len(files),
        "seconds": rows,
        "gb_per_s": {name: size / seconds / 1e9 for name, seconds in rows.items()},
        "ratio_to_dcp_save": {name: seconds / dcp_s for name, seconds in rows.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="qwen3-1.7b", help="model preset (default qwen3-1.7b)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weight dtype (default bf16)")
    parser.add_argument("--workdir", type=Path, help="write the checkpoints here (default: a temporary directory)")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="torch.distributed is .*in a single process")
    workdir = Path(tempfile.mkdtemp(dir=args.workdir, prefix="checksum-bench-"))
    try:
        result = measure(args.preset, args.dtype, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "config": {"preset": args.preset, "dtype": args.dtype},
        **result,
    }
    print(f"{args.preset} {args.dtype}: {result['files']} files, {result['bytes'] / 1e9:.2f} GB "
          f"({report['machine']['cpu']}, {report['machine']['cpu_count']} CPUs)")
    print(f"{'step':<38} {'seconds':>8} {'GB/s':>7} {'x dcp.save':>10}")
    for name, seconds in result["seconds"].items():
        print(f"{name:<38} {seconds:>8.2f} {result['gb_per_s'][name]:>7.2f} {result['ratio_to_dcp_save'][name]:>10.3f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
