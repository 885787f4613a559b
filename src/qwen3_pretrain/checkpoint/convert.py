"""`qwen3-pretrain convert`: HF safetensors <-> Megatron/MindSpeed mcore checkpoints, with MindSpeed's flags.

    qwen3-pretrain convert --load-model-type hf --save-model-type mg \\
        --target-tensor-parallel-size 8 --target-pipeline-parallel-size 1 \\
        --load-dir ./model_from_hf/qwen3_1.7b --save-dir ./model_weights/qwen3_1.7b_mcore

mg -> mg re-splits an mcore checkpoint to another TP/PP layout. `--load-model-type native` reads a
checkpoint of `qwen3-pretrain train --save` (the --save directory, or one iter_NNNNNNN directory) and
writes it as hf or mg; its model config comes from the run configuration saved with it.

Qwen3-MoE (config.json's model_type qwen3_moe; MindSpeed's `--model-type-hf qwen3-moe` checks it) adds
`--target-expert-parallel-size` (experts split over EP ranks, mp_rank_TT[_PPP]_EEE files) and
`--moe-grouped-gemm` (the legacy grouped-GEMM expert tensors instead of sequential local experts) for mg
output; mg input's layout is read from its files.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from qwen3_pretrain.checkpoint.export import (
    load_native_model,
    open_native_checkpoint,
    tokenizer_files,
    tokenizer_source,
)
from qwen3_pretrain.checkpoint.hf import HFCheckpointError, iter_hf_tensors, save_hf_state_dict
from qwen3_pretrain.checkpoint.loader import detect_format
from qwen3_pretrain.checkpoint.mcore import (
    check_output_dir,
    hf_tensor_shapes,
    iter_mcore_as_hf,
    staged_output_dir,
    write_mcore_checkpoint,
)
from qwen3_pretrain.checkpoint.mcore_format import (
    CONVERTED_ITERATION,
    HF_CONFIG_SUBDIR,
    McoreCheckpointError,
    McoreLayout,
)
from qwen3_pretrain.checkpoint.native import CheckpointError
from qwen3_pretrain.config.model import ConfigError, Qwen3Config, Qwen3MoeConfig

PARAMS_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf", ".index.json")
_SHAPE_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "tie_word_embeddings",
)
_MOE_SHAPE_FIELDS = ("num_experts", "moe_intermediate_size", "decoder_sparse_step", "mlp_only_layers")
HF_MODEL_TYPES = {"qwen3": Qwen3Config, "qwen3-moe": Qwen3MoeConfig}  # --model-type-hf (MindSpeed's names)


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


def _reported(tensors: dict[str, torch.Tensor], progress: ProgressPrinter) -> Iterator[tuple[str, torch.Tensor]]:
    """`tensors`' items, reporting each one once it has been consumed."""
    for done, item in enumerate(tensors.items(), 1):
        yield item
        progress("tensors", done, len(tensors))


def _config_source(args: argparse.Namespace) -> Path | None:
    """The directory whose config.json (and tokenizer files) describe the mcore model, if any."""
    if args.hf_cfg_dir is not None:
        if not (args.hf_cfg_dir / "config.json").is_file():
            raise ConfigError(f"--hf-cfg-dir {args.hf_cfg_dir} has no config.json; point it at the HF model directory")
        return args.hf_cfg_dir
    saved = args.load_dir / HF_CONFIG_SUBDIR
    return saved if (saved / "config.json").is_file() else None


def _target_layout(args: argparse.Namespace, config: Qwen3Config) -> McoreLayout:
    """The mg output's split from --target-tensor/pipeline/expert-parallel-size, --num-layer-list and
    --moe-grouped-gemm."""
    tp = args.target_tensor_parallel_size
    if args.expert_tensor_parallel_size not in (None, tp):
        raise ConfigError(
            f"--expert-tensor-parallel-size {args.expert_tensor_parallel_size} differs from "
            f"--target-tensor-parallel-size {tp}; only experts split like the dense layers are supported "
            "(leave --expert-tensor-parallel-size out)"
        )
    return McoreLayout.build(
        config, tp, args.target_pipeline_parallel_size, args.num_layer_list, args.target_expert_parallel_size,
        args.moe_grouped_gemm,
    )


def _describe(layout: McoreLayout) -> str:
    kind = "grouped-GEMM" if layout.grouped else "sequential"
    experts = f", EP={layout.ep}, {kind} experts" if layout.ep > 1 or layout.grouped else ""
    return f"TP={layout.tp}, PP={layout.pp}{experts}, layers per stage {list(layout.stage_layers)}"


def _read_hf_config(args: argparse.Namespace, directory: Path) -> Qwen3Config:
    """`directory`'s config.json, checked against --model-type-hf when given (else its model_type decides)."""
    config = Qwen3Config.from_pretrained(directory)
    expected = HF_MODEL_TYPES.get(args.model_type_hf) if args.model_type_hf is not None else None
    if expected is not None and type(config) is not expected:
        raise ConfigError(
            f"--model-type-hf {args.model_type_hf} but {directory / 'config.json'} describes a {config.MODEL_TYPE} "
            f"model; pass --model-type-hf {next(k for k, v in HF_MODEL_TYPES.items() if v is type(config))} "
            "or leave it out"
        )
    return config


def _hf_to_mg(args: argparse.Namespace, dtype: torch.dtype | None, progress: ProgressPrinter) -> Path:
    config = _read_hf_config(args, args.load_dir)
    layout = _target_layout(args, config)
    check_output_dir(args.save_dir)
    print(f"hf -> mg: {args.load_dir} -> {args.save_dir} ({_describe(layout)})", file=sys.stderr)
    tensors = iter_hf_tensors(args.load_dir, dtype, order=list(hf_tensor_shapes(config)))  # stage by stage
    return write_mcore_checkpoint(
        tensors, config, args.save_dir, layout, hf_files=hf_side_files(args.load_dir), progress=progress
    )


def _write_hf(
    tensors: Iterable[tuple[str, torch.Tensor]], config: Qwen3Config, dtype: torch.dtype | None, save_dir: Path,
    side_files: Iterable[Path],
) -> Path:
    """Safetensors (cast to `dtype` if given) + config.json from `config` + `side_files` but any config.json,
    appearing at `save_dir` only when complete."""
    if dtype is not None:
        config = dataclasses.replace(config, torch_dtype=str(dtype).removeprefix("torch."))
    with staged_output_dir(save_dir) as staging:
        save_hf_state_dict(_cast(tensors, dtype), staging, config=config)
        for file in side_files:
            if file.name != "config.json":
                shutil.copy2(file, staging / file.name)
    return save_dir


def _mg_to_hf(args: argparse.Namespace, dtype: torch.dtype | None, progress: ProgressPrinter) -> Path:
    source = _config_source(args)
    check_output_dir(args.save_dir)
    given = _read_hf_config(args, source) if source is not None else None
    config, iteration, tensors = iter_mcore_as_hf(args.load_dir, given, progress)
    print(f"mg -> hf: {args.load_dir} (iteration {iteration}) -> {args.save_dir}", file=sys.stderr)
    return _write_hf(tensors, config, dtype, args.save_dir, hf_side_files(source) if source is not None else [])


def _mg_to_mg(args: argparse.Namespace, dtype: torch.dtype | None, progress: ProgressPrinter) -> Path:
    source = _config_source(args)
    check_output_dir(args.save_dir)
    given = _read_hf_config(args, source) if source is not None else None
    config, iteration, tensors = iter_mcore_as_hf(args.load_dir, given)
    layout = _target_layout(args, config)
    print(f"mg -> mg: {args.load_dir} -> {args.save_dir} ({_describe(layout)})", file=sys.stderr)
    side_files = hf_side_files(source) if source is not None else []
    iteration = iteration or CONVERTED_ITERATION  # a "release" checkpoint (iteration 0) would not load in Megatron
    return write_mcore_checkpoint(
        _cast(tensors, dtype), config, args.save_dir, layout, iteration, side_files, progress
    )


def _open_native(args: argparse.Namespace) -> tuple[Path, dict[str, Any], Qwen3Config]:
    """(iteration directory, saved run configuration, model config) of the native checkpoint --load-dir."""
    if not args.load_dir.is_dir():
        raise CheckpointError(
            f"--load-dir {args.load_dir} does not exist; pass the --save directory of a qwen3-pretrain train run "
            "or one of its iter_NNNNNNN directories"
        )
    found = detect_format(args.load_dir)
    if found in ("hf", "mcore"):
        raise CheckpointError(
            f"--load-dir {args.load_dir} is an {found} checkpoint, not a native one; "
            f"pass --load-model-type {'mg' if found == 'mcore' else 'hf'}"
        )
    return open_native_checkpoint(args.load_dir)


def _native_side_files(args: argparse.Namespace, saved_config: dict[str, Any], config: Qwen3Config) -> list[Path]:
    """Files to ship with a native checkpoint's weights: --hf-cfg-dir's non-weight files, else the run's
    tokenizer files. config.json is written from the checkpoint; one in --hf-cfg-dir must match its shapes."""
    if args.hf_cfg_dir is None:
        return tokenizer_files(tokenizer_source(None, saved_config, flag="--hf-cfg-dir"))
    if not args.hf_cfg_dir.is_dir():
        raise ConfigError(f"--hf-cfg-dir {args.hf_cfg_dir} does not exist; point it at the HF model directory")
    if (args.hf_cfg_dir / "config.json").is_file():
        given = Qwen3Config.from_pretrained(args.hf_cfg_dir)
        fields = ("MODEL_TYPE", *_SHAPE_FIELDS, *(_MOE_SHAPE_FIELDS if isinstance(config, Qwen3MoeConfig) else ()))
        differ = [
            f"{n} {getattr(given, n, None)} != {getattr(config, n)}"
            for n in fields
            if getattr(given, n, None) != getattr(config, n)
        ]
        if differ:
            raise ConfigError(
                f"--hf-cfg-dir {args.hf_cfg_dir / 'config.json'} describes another model than the checkpoint "
                f"({', '.join(differ)}); point it at this model's HF directory or leave it out"
            )
    return [file for file in hf_side_files(args.hf_cfg_dir) if file.name != "config.json"]


def _prepare_native(args: argparse.Namespace) -> tuple[Path, Qwen3Config, list[Path]]:
    """(iteration directory, model config, files to ship) of --load-dir, after checking --save-dir is free."""
    checkpoint, saved_config, config = _open_native(args)
    side_files = _native_side_files(args, saved_config, config)
    check_output_dir(args.save_dir)
    return checkpoint, config, side_files


def _native_to_hf(args: argparse.Namespace, dtype: torch.dtype | None, progress: ProgressPrinter) -> Path:
    checkpoint, config, side_files = _prepare_native(args)
    print(f"native -> hf: {checkpoint} -> {args.save_dir}", file=sys.stderr)
    tensors = load_native_model(checkpoint, config).hf_state_dict()
    config = dataclasses.replace(config, torch_dtype=str(next(iter(tensors.values())).dtype).removeprefix("torch."))
    return _write_hf(_reported(tensors, progress), config, dtype, args.save_dir, side_files)


def _native_to_mg(args: argparse.Namespace, dtype: torch.dtype | None, progress: ProgressPrinter) -> Path:
    checkpoint, config, side_files = _prepare_native(args)
    layout = _target_layout(args, config)
    print(f"native -> mg: {checkpoint} -> {args.save_dir} ({_describe(layout)})", file=sys.stderr)
    tensors = load_native_model(checkpoint, config).hf_state_dict()
    return write_mcore_checkpoint(
        _cast(tensors.items(), dtype), config, args.save_dir, layout, hf_files=side_files, progress=progress,
        write_config=True,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen3-pretrain convert",
        description="Convert Qwen3 and Qwen3-MoE checkpoints between HF safetensors and Megatron/MindSpeed mcore "
                    "(any TP/PP/EP split); "
                    "also write a qwen3-pretrain train checkpoint (native) as either.",
    )
    parser.add_argument("--load-model-type", choices=("hf", "mg", "native"), required=True,
                        help="format of --load-dir (native: a checkpoint written by qwen3-pretrain train --save)")
    parser.add_argument("--save-model-type", choices=("hf", "mg"), required=True, help="format to write")
    parser.add_argument("--load-dir", type=Path, required=True,
                        help="HF model directory, mcore checkpoint directory, or native checkpoint (a train --save "
                             "directory: its latest iteration; or one iter_NNNNNNN directory)")
    parser.add_argument("--save-dir", type=Path, required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--target-tensor-parallel-size", type=int, default=1, help="TP size of mg output (default: 1)")
    parser.add_argument(
        "--target-pipeline-parallel-size", type=int, default=1, help="PP size of mg output (default: 1)"
    )
    parser.add_argument("--num-layer-list", default=None, help="layers per pipeline stage of mg output, e.g. 6,8,8,6")
    parser.add_argument("--target-expert-parallel-size", type=int, default=1,
                        help="EP size of mg output for a MoE model: experts split over EP ranks (default: 1)")
    parser.add_argument("--expert-tensor-parallel-size", type=int, default=None,
                        help="TP size of the experts in mg output; only the default (= --target-tensor-parallel-size)")
    parser.add_argument("--moe-grouped-gemm", action="store_true",
                        help="mg output of a MoE model in the legacy grouped-GEMM expert layout "
                             "(mlp.experts.weight1/weight2) instead of sequential local experts; mg input's layout "
                             "is read from its files")
    parser.add_argument("--params-dtype", choices=tuple(PARAMS_DTYPES), default=None,
                        help="cast weights to this dtype (default: keep the stored dtype)")
    parser.add_argument("--model-type-hf", choices=tuple(HF_MODEL_TYPES), default=None,
                        help="HF architecture, checked against config.json's model_type (default: what config.json "
                             "says): qwen3 (dense) or qwen3-moe")
    parser.add_argument("--hf-cfg-dir", type=Path, default=None,
                        help="mg -> hf: HF directory whose config.json and tokenizer files describe the model "
                             "(default: the hf_config/ saved in the mcore checkpoint, else the checkpoint's args); "
                             "native -> hf/mg: copy its tokenizer files, its config.json must match the checkpoint "
                             "(default: the tokenizer recorded in the run's saved configuration)")
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
    steps = {
        ("hf", "mg"): _hf_to_mg, ("mg", "hf"): _mg_to_hf, ("mg", "mg"): _mg_to_mg,
        ("native", "hf"): _native_to_hf, ("native", "mg"): _native_to_mg,
    }
    step = steps.get((args.load_model_type, args.save_model_type))
    if step is None:
        print("convert: error: --load-model-type hf with --save-model-type hf has nothing to convert", file=sys.stderr)
        return 2
    progress = ProgressPrinter()
    try:
        out = step(args, dtype, progress)
    except (McoreCheckpointError, HFCheckpointError, CheckpointError, ConfigError) as exc:
        print(f"convert: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} in {time.perf_counter() - progress.start:.1f} s", file=sys.stderr)
    return 0
