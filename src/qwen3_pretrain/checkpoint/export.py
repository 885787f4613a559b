"""`qwen3-pretrain export`: a native checkpoint -> an HF directory (safetensors + config.json + tokenizer).

The checkpoint is read in one process whatever layout wrote it. The output directory is built
under a temporary name next to it and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from qwen3_pretrain.checkpoint.hf import save_pretrained
from qwen3_pretrain.checkpoint.native import (
    CheckpointError,
    load_model_config,
    load_model_tensors,
    replace_directory,
    resolve_checkpoint_dir,
)
from qwen3_pretrain.config.model import ConfigError, Qwen3Config, Qwen3MoeConfig
from qwen3_pretrain.model.qwen3 import EMBED_KEY, LM_HEAD_KEY, Qwen3ForCausalLM

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
)
TOKENIZER_CONFIG_KEYS = ("tokenizer_name_or_path", "tokenizer-name-or-path")  # field / flag spelling
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def qwen3_config_from_saved(config: dict[str, Any], source: Path) -> Qwen3Config:
    """The Qwen3Config (a Qwen3MoeConfig when the section has MoE fields) recorded in a saved run configuration
    (its `model` section)."""
    model = config.get("model")
    if not isinstance(model, dict):
        raise CheckpointError(
            f"{source} has no 'model' section with Qwen3Config fields (hidden_size, num_hidden_layers, ...); "
            "the checkpoint was not written by qwen3-pretrain train"
        )
    kind = Qwen3MoeConfig if "num_experts" in model else Qwen3Config
    names = {field.name for field in dataclasses.fields(kind)}
    try:
        return kind(**{key: value for key, value in model.items() if key in names})
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{source}: the saved model configuration is invalid ({exc})") from exc


def open_native_checkpoint(
    load_dir: str | os.PathLike[str], iteration: int | None = None
) -> tuple[Path, dict[str, Any], Qwen3Config]:
    """(iteration directory, saved run configuration, model config) of a native checkpoint; reads no weights."""
    checkpoint = resolve_checkpoint_dir(load_dir, iteration)
    saved_config = load_model_config(checkpoint)
    return checkpoint, saved_config, qwen3_config_from_saved(saved_config, checkpoint)


def load_native_model_state(
    load_dir: str | os.PathLike[str], iteration: int | None = None
) -> tuple[Qwen3Config, dict[str, torch.Tensor]]:
    """The model config and full weights (HF names, saved dtype) of a native checkpoint, in one process."""
    checkpoint, _, config = open_native_checkpoint(load_dir, iteration)
    return config, load_model_tensors(checkpoint)


def load_native_model(checkpoint: Path, config: Qwen3Config) -> Qwen3ForCausalLM:
    """A Qwen3ForCausalLM holding the weights (saved dtype) of the native iteration directory `checkpoint`."""
    return _model_from_state(config, load_model_tensors(checkpoint), checkpoint)


def _model_from_state(config: Qwen3Config, state: dict[str, torch.Tensor], source: Path) -> Qwen3ForCausalLM:
    """A Qwen3ForCausalLM holding `state`'s tensors (no copies); refuses mismatched names or shapes."""
    if config.tie_word_embeddings and LM_HEAD_KEY in state and not torch.equal(state[LM_HEAD_KEY], state[EMBED_KEY]):
        raise CheckpointError(
            f"{source}: the config ties word embeddings but {LM_HEAD_KEY} differs from {EMBED_KEY} "
            "(the tie was lost during training); the checkpoint cannot be exported as a tied model"
        )
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{source} does not match the Qwen3 model of its saved config: {exc}") from exc
    model.tie_weights()
    return model


def tokenizer_files(directory: Path | None) -> list[Path]:
    """The tokenizer files (`TOKENIZER_FILES`) present in `directory`; none for None."""
    return [directory / name for name in TOKENIZER_FILES if directory is not None and (directory / name).is_file()]


def tokenizer_source(
    tokenizer_dir: str | os.PathLike[str] | None, saved_config: dict[str, Any], flag: str = "--tokenizer-dir"
) -> Path | None:
    """The directory to copy tokenizer files from: `tokenizer_dir` (given as `flag`), else the path
    recorded in the run config; None, with a warning naming `flag`, when neither has tokenizer files."""
    if tokenizer_dir is not None:
        path = Path(tokenizer_dir)
        if not tokenizer_files(path):
            raise CheckpointError(f"{flag} {path} holds none of the tokenizer files {TOKENIZER_FILES}")
        return path
    recorded = _find_key(saved_config, TOKENIZER_CONFIG_KEYS)
    if recorded and tokenizer_files(Path(recorded)):
        return Path(recorded)
    where = (
        f"the recorded tokenizer {recorded!r} is not a local tokenizer directory"
        if recorded
        else "no tokenizer is recorded"
    )
    print(f"warning: {where}; the export has no tokenizer files (pass {flag})", file=sys.stderr)
    return None


def _find_key(tree: Any, keys: tuple[str, ...]) -> str | None:
    """The first string value stored under one of `keys` anywhere in nested dicts."""
    if isinstance(tree, dict):
        for key in keys:
            if isinstance(tree.get(key), str):
                return tree[key]
        for value in tree.values():
            found = _find_key(value, keys)
            if found:
                return found
    return None


def export_native_to_hf(
    load_dir: str | os.PathLike[str],
    save_dir: str | os.PathLike[str],
    tokenizer_dir: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | None = None,
    iteration: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the native checkpoint at `load_dir` as an HF Qwen3 directory `save_dir`; returns it.

    dtype None means the model config's `torch_dtype` (bfloat16 for Qwen3 presets and HF models).
    Tokenizer files come from `tokenizer_dir`, else from the tokenizer path in the saved run config.
    An existing non-empty `save_dir` is replaced only with `overwrite`.
    """
    save_dir = Path(save_dir)
    if save_dir.exists() and not overwrite and (not save_dir.is_dir() or any(save_dir.iterdir())):
        raise CheckpointError(
            f"--save-dir {save_dir} exists and is not empty; choose a new directory or pass --overwrite"
        )
    checkpoint, saved_config, config = open_native_checkpoint(load_dir, iteration)
    tokenizer = tokenizer_source(tokenizer_dir, saved_config)
    print(f"reading {checkpoint}", flush=True)
    model = load_native_model(checkpoint, config)
    dtype = getattr(torch, config.torch_dtype) if dtype is None else dtype

    staging = save_dir.with_name(f".{save_dir.name}.incomplete")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        print(f"writing {str(dtype).removeprefix('torch.')} safetensors to {save_dir}", flush=True)
        save_pretrained(model, staging, dtype=dtype)
        copied = tokenizer_files(tokenizer)
        for file in copied:
            shutil.copy2(file, staging / file.name)
        if copied:
            print(f"copied tokenizer files from {tokenizer}: {', '.join(f.name for f in copied)}", flush=True)
        save_dir.parent.mkdir(parents=True, exist_ok=True)
        replace_directory(staging, save_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"exported {checkpoint} to {save_dir}", flush=True)
    return save_dir


def main(argv: list[str]) -> int:
    """CLI: `qwen3-pretrain export --load CKPT --save-dir HF_DIR [--tokenizer-dir DIR] ...`."""
    parser = argparse.ArgumentParser(prog="qwen3-pretrain export", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--load", required=True, help="native checkpoint: a --save directory or one iter_NNNNNNN directory"
    )
    parser.add_argument("--save-dir", required=True, help="HF directory to write (must be new or empty)")
    parser.add_argument(
        "--tokenizer-dir", help="copy tokenizer files from here (default: the run's --tokenizer-name-or-path)"
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="weight dtype (default: the model config's torch_dtype)"
    )
    parser.add_argument("--iteration", type=int, help="export this iteration instead of the latest one")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --save-dir")
    args = parser.parse_args(argv)
    try:
        export_native_to_hf(
            args.load, args.save_dir, args.tokenizer_dir,
            dtype=DTYPES[args.dtype] if args.dtype else None, iteration=args.iteration, overwrite=args.overwrite,
        )
    except CheckpointError as exc:
        print(f"qwen3-pretrain export: error: {exc}", file=sys.stderr)
        return 1
    return 0
