"""`qwen3-pretrain convert`: HF safetensors <-> Megatron/MindSpeed mcore checkpoints, with MindSpeed's flags.

    qwen3-pretrain convert --load-model-type hf --save-model-type mg \\
        --target-tensor-parallel-size 8 --target-pipeline-parallel-size 1 \\
        --load-dir ./model_from_hf/qwen3_1.7b --save-dir ./model_weights/qwen3_1.7b_mcore

mg -> mg re-splits an mcore checkpoint to another TP/PP layout.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from qwen3_pretrain.checkpoint.hf import HFCheckpointError, iter_hf_tensors, save_hf_state_dict
from qwen3_pretrain.checkpoint.mcore import (
    CONVERTED_ITERATION,
    HF_CONFIG_SUBDIR,
    McoreCheckpointError,
    McoreLayout,
    check_output_dir,
    hf_tensor_shapes,
    iter_mcore_as_hf,
    staged_output_dir,
    write_mcore_checkpoint,
)
from qwen3_pretrain.model.config import ConfigError, Qwen3Config

PARAMS_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf", ".index.json")


def hf_side_files(directory: Path) -> list[Path]:
    """The files of an HF model directory other than weights: config.json, tokenizer files, ..."""
    return sorted(p for p in directory.iterdir() if p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES))


class ProgressPrinter:
    """Progress on stderr: one updating line on a terminal, else a line every 10%."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.last_decile = -1

    def __call__(self, what: str, done: int, total: int) -> None:
        elapsed = time.perf_counter() - self.start
        line = f"converting: {done}/{total} {what} ({100 * done // max(total, 1)}%, {elapsed:.0f} s)"
        if self.tty:
            print(f"\r{line}", end="\n" if done == total else "", file=sys.stderr, flush=True)
        elif 10 * done // max(total, 1) > self.last_decile:
            self.last_decile = 10 * done // max(total, 1)
            print(line, file=sys.stderr, flush=True)


def _cast(tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in tensors:
        yield name, tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def _config_source(args: argparse.Namespace) -> Path | None:
    """The directory whose config.json (and tokenizer files) describe the mcore model, if any."""
    if args.hf_cfg_dir is not None:
        if not (args.hf_cfg_dir / "config.json").is_file():
            raise ConfigError(f"--hf-cfg-dir {args.hf_cfg_dir} has no config.json; point it at the HF model directory")
        return args.hf_cfg_dir
    saved = args.load_dir / HF_CONFIG_SUBDIR
    return saved if (saved / "config.json").is_file() else None


def _hf_to_mg(args: argparse.Namespace, dtype: torch.dtype | None, progress: ProgressPrinter) -> Path:
    config = Qwen3Config.from_pretrained(args.load_dir)
    layout = McoreLayout.build(
        config, args.target_tensor_parallel_size, args.target_pipeline_parallel_size, args.num_layer_list
    )
    check_output_dir(args.save_dir)
    print(f"hf -> mg: {args.load_dir} -> {args.save_dir} (TP={layout.tp}, PP={layout.pp}, layers per stage "
          f"{list(layout.stage_layers)})", file=sys.stderr)
    tensors = iter_hf_tensors(args.load_dir, dtype, order=list(hf_tensor_shapes(config)))  # stage by stage
    return write_mcore_checkpoint(
        tensors, config, args.save_dir, layout, hf_files=hf_side_files(args.load_dir), progress=progress
    )


def _mg_to_hf(args: argparse.Namespace, dtype: torch.dtype | None, progress: ProgressPrinter) -> Path:
    source = _config_source(args)
    check_output_dir(args.save_dir)
    given = Qwen3Config.from_pretrained(source) if source is not None else None
    config, iteration, tensors = iter_mcore_as_hf(args.load_dir, given, progress)
    if dtype is not None:
        config.torch_dtype = str(dtype).removeprefix("torch.")
    print(f"mg -> hf: {args.load_dir} (iteration {iteration}) -> {args.save_dir}", file=sys.stderr)
    with staged_output_dir(args.save_dir) as staging:
        save_hf_state_dict(_cast(tensors, dtype), staging, config=config)
        for file in hf_side_files(source) if source is not None else []:
            if file.name != "config.json":
                shutil.copy2(file, staging / file.name)
    return args.save_dir


def _mg_to_mg(args: argparse.Namespace, dtype: torch.dtype | None, progress: ProgressPrinter) -> Path:
    source = _config_source(args)
    check_output_dir(args.save_dir)
    given = Qwen3Config.from_pretrained(source) if source is not None else None
    config, iteration, tensors = iter_mcore_as_hf(args.load_dir, given)
    layout = McoreLayout.build(
        config, args.target_tensor_parallel_size, args.target_pipeline_parallel_size, args.num_layer_list
    )
    print(f"mg -> mg: {args.load_dir} -> {args.save_dir} (TP={layout.tp}, PP={layout.pp})", file=sys.stderr)
    side_files = hf_side_files(source) if source is not None else []
    iteration = iteration or CONVERTED_ITERATION  # a "release" checkpoint (iteration 0) would not load in Megatron
    return write_mcore_checkpoint(
        _cast(tensors, dtype), config, args.save_dir, layout, iteration, side_files, progress
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen3-pretrain convert",
        description="Convert Qwen3 checkpoints between HF safetensors and Megatron/MindSpeed mcore (any TP/PP split).",
    )
    parser.add_argument("--load-model-type", choices=("hf", "mg"), required=True, help="format of --load-dir")
    parser.add_argument("--save-model-type", choices=("hf", "mg"), required=True, help="format to write")
    parser.add_argument("--load-dir", type=Path, required=True, help="HF model directory or mcore checkpoint directory")
    parser.add_argument("--save-dir", type=Path, required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--target-tensor-parallel-size", type=int, default=1, help="TP size of mg output (default: 1)")
    parser.add_argument("--target-pipeline-parallel-size", type=int, default=1, help="PP size of mg output (default: 1)")
    parser.add_argument("--num-layer-list", default=None, help="layers per pipeline stage of mg output, e.g. 6,8,8,6")
    parser.add_argument("--params-dtype", choices=tuple(PARAMS_DTYPES), default=None,
                        help="cast weights to this dtype (default: keep the stored dtype)")
    parser.add_argument("--model-type-hf", choices=("qwen3",), default="qwen3", help="HF architecture (dense Qwen3)")
    parser.add_argument("--hf-cfg-dir", type=Path, default=None,
                        help="mg -> hf: HF directory whose config.json and tokenizer files describe the model "
                             "(default: the hf_config/ saved in the mcore checkpoint, else the checkpoint's args)")
    ignored = parser.add_argument_group("accepted for MindSpeed compatibility and ignored")
    ignored.add_argument("--use-mcore-models", action="store_true")
    ignored.add_argument("--model-type", default=None)
    ignored.add_argument("--tokenizer-model", default=None)
    ignored.add_argument("--spec", nargs="+", default=None)
    return parser


def main(argv: list[str]) -> int:
    """Run one conversion; errors name the flag or file and exit with status 2."""
    args = build_parser().parse_args(argv)
    ignored = [flag for flag, value in (("--model-type", args.model_type), ("--tokenizer-model", args.tokenizer_model),
                                        ("--spec", args.spec)) if value is not None]
    if ignored:
        print(f"note: {', '.join(ignored)} not needed for Qwen3; ignored", file=sys.stderr)
    dtype = PARAMS_DTYPES[args.params_dtype] if args.params_dtype else None
    steps = {("hf", "mg"): _hf_to_mg, ("mg", "hf"): _mg_to_hf, ("mg", "mg"): _mg_to_mg}
    step = steps.get((args.load_model_type, args.save_model_type))
    if step is None:
        print("convert: error: --load-model-type hf with --save-model-type hf has nothing to convert", file=sys.stderr)
        return 2
    progress = ProgressPrinter()
    try:
        out = step(args, dtype, progress)
    except (McoreCheckpointError, HFCheckpointError, ConfigError) as exc:
        print(f"convert: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} in {time.perf_counter() - progress.start:.1f} s", file=sys.stderr)
    return 0
