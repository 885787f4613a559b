"""`qwen3-pretrain checkpoint verify DIR...`: check native checkpoints against their manifests.

DIR is a `--save` directory (each of its iterations is checked) or one iteration directory. Each line
says OK, DAMAGED (then one line per damaged file) or "no manifest" (a save older than manifests: only
its DCP metadata is checked). The DCP metadata is always read with the safe reader, so a crafted
`.metadata` is reported, not run. Exit status: 0 when nothing is damaged, 1 otherwise, 2 when a DIR
holds no native checkpoint.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from qwen3_pretrain.checkpoint.native import (
    ITER_DIR_PATTERN,
    MANIFEST_FILE,
    CheckpointError,
    damaged_files,
    is_native_checkpoint_dir,
    read_dcp_metadata,
    read_manifest,
)


def iteration_dirs(path: Path) -> list[Path]:
    """`path` itself when it is one iteration directory, else the iteration directories in it."""
    if ITER_DIR_PATTERN.match(path.name) or is_native_checkpoint_dir(path) or (path / MANIFEST_FILE).is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_dir() and ITER_DIR_PATTERN.match(p.name)) if path.is_dir() else []


def check(checkpoint: Path) -> tuple[str, list[str]]:
    """The verdict on one iteration directory ("OK ...", "DAMAGED" or "no manifest ...") and its problems."""
    start = time.perf_counter()
    try:
        files = read_manifest(checkpoint)
        problems = [] if files is None else damaged_files(checkpoint, files, sorted(files))
        if not problems:
            read_dcp_metadata(checkpoint)
    except CheckpointError as exc:
        return "DAMAGED", [str(exc)]
    if problems:
        return "DAMAGED", problems
    if files is None:
        return "no manifest (saved before qwen3-pretrain wrote one): files not verified, DCP metadata readable", []
    size = sum(entry["size"] for entry in files.values())
    return f"OK ({len(files)} files, {size / 1e6:,.1f} MB, {time.perf_counter() - start:.1f} s)", []


def main(argv: list[str]) -> int:
    """Run `qwen3-pretrain checkpoint ...`; returns the exit status."""
    parser = argparse.ArgumentParser(prog="qwen3-pretrain checkpoint", description=__doc__.split("\n\n")[0])
    actions = parser.add_subparsers(dest="action", required=True)
    verify = actions.add_parser("verify", help="check every file of native checkpoints against their manifest")
    verify.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="a --save directory or one iter_N directory")
    args = parser.parse_args(argv)
    status = 0
    for directory in args.dirs:
        checkpoints = iteration_dirs(directory)
        if not checkpoints:
            print(f"{directory}: holds no native checkpoint (no iter_NNNNNNN directories)")
            status = max(status, 2)
        for checkpoint in checkpoints:
            verdict, problems = check(checkpoint)
            print(f"{checkpoint}: {verdict}")
            for problem in problems:
                print(f"  {problem}")
            if problems:
                status = max(status, 1)
    return status
