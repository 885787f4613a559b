"""Every parallel layout trains like one process, and checkpoints move between layouts.

Per-iteration loss and gradient norm (and the final validation loss) of pipeline parallel (1F1B,
GPipe, interleaved 1F1B, uneven `--num-layer-list`, untied embeddings, HF weights loaded into the
stages), tensor parallel (with and without sequence parallel) and their 4-process combinations equal a single
process within 1e-5 relative over 5 iterations: fp32, a 4-layer qwen3-tiny, loss tokens masked at
document ends so micro batches count different numbers of tokens. A checkpoint saved at TP=2
resumes at PP=2 and in one process, and a PP=2 checkpoint (with its copy of the tied embedding) in
one process, with the losses of the uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from qwen3_pretrain.checkpoint.hf import save_pretrained
from qwen3_pretrain.config import parse_train_args
from qwen3_pretrain.config.model import get_preset
from qwen3_pretrain.model.qwen3 import Qwen3ForCausalLM
from qwen3_pretrain.train.trainer import TrainResult, run_training

from distributed_helpers import free_port, join_gloo_group, leave_gloo_group
from train_helpers import tiny_flags, write_tiny_dataset

pytestmark = pytest.mark.usefixtures("one_thread")
ITERS, SAVE_AT = 5, 3
UNTIED = {"untie_embeddings_and_output_weights": True}
TWO_PROCESS_CASES: dict[str, dict[str, Any]] = {
    "PP 2, 1F1B": {"pipeline_model_parallel_size": 2},
    "PP 2, GPipe, layers 1+3": {
        "pipeline_model_parallel_size": 2, "pipeline_schedule": "gpipe", "num_layer_list": "1,3"
    },
    "PP 2, interleaved 1F1B": {"pipeline_model_parallel_size": 2, "num_layers_per_virtual_pipeline_stage": 1},
    "PP 2, untied": {"pipeline_model_parallel_size": 2, **UNTIED},
    "TP 2": {"tensor_model_parallel_size": 2},
    "TP 2, sequence parallel": {"tensor_model_parallel_size": 2, "sequence_parallel": True},
}
FOUR_PROCESS_CASES: dict[str, dict[str, Any]] = {
    "DP 2 x TP 2": {"tensor_model_parallel_size": 2},
    "PP 2 x DP 2": {"pipeline_model_parallel_size": 2},
    "PP 2 x TP 2, sequence parallel": {"pipeline_model_parallel_size": 2, "tensor_model_parallel_size": 2,
                                        "sequence_parallel": True},
}


def _flags(data: str, **overrides: Any) -> list[str]:
    return tiny_flags(data, num_layers=4, train_iters=ITERS, log_interval=1, eval_interval=1000, eval_iters=1,
                      **overrides)


def _summary(result: TrainResult) -> dict[str, Any]:
    return {"iterations": result.iterations, "losses": result.losses, "grad_norms": result.grad_norms,
            "validation": [loss for _, loss in result.validation]}


def _worker(rank: int, world: int, port: int, data: str, ckpt: str, out: str) -> None:
    """One rank: run every case of this world size (and, with 2 ranks, the checkpoint moves); rank 0 writes results."""
    join_gloo_group(rank, world, port)
    cases = TWO_PROCESS_CASES if world == 2 else FOUR_PROCESS_CASES
    results = {name: _summary(run_training(parse_train_args(_flags(data, **flags), world_size=world)))
               for name, flags in cases.items()}
    if world == 2:
        for name, flags in (("TP 2", TWO_PROCESS_CASES["TP 2"]), ("PP 2", TWO_PROCESS_CASES["PP 2, 1F1B"])):
            save = Path(ckpt) / name.replace(" ", "")
            run_training(parse_train_args(_flags(data, save=save, save_interval=SAVE_AT, **flags), world_size=world))
        resumed = _flags(data, load=Path(ckpt) / "TP2" / f"iter_{SAVE_AT:07d}", **TWO_PROCESS_CASES["PP 2, 1F1B"])
        results["TP 2 -> PP 2"] = _summary(run_training(parse_train_args(resumed, world_size=world)))
    from_hf = _flags(
        data, load=Path(ckpt) / "hf", pipeline_model_parallel_size=2, tensor_model_parallel_size=world // 2
    )
    results[f"PP 2 x TP {world // 2}, from HF"] = _summary(run_training(parse_train_args(from_hf, world_size=world)))
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    leave_gloo_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Single-process references (tied and untied) and the results of every multi-process layout."""
    root = tmp_path_factory.mktemp("layouts")
    data = write_tiny_dataset(root / "tiny_text_document")
    torch.manual_seed(3)
    hf_dir = root / "ckpt" / "hf"
    save_pretrained(Qwen3ForCausalLM(dataclasses.replace(get_preset("qwen3-tiny"), num_hidden_layers=4)), hf_dir)
    results = {"one process": _summary(run_training(parse_train_args(_flags(data)))),
               "one process, untied": _summary(run_training(parse_train_args(_flags(data, **UNTIED)))),
               "one process, from HF": _summary(run_training(parse_train_args(_flags(data, load=hf_dir))))}
    for world in (2, 4):
        out = root / f"world{world}.json"
        mp.spawn(_worker, args=(world, free_port(), data, str(root / "ckpt"), str(out)), nprocs=world, join=True)
        results.update(json.loads(out.read_text()))
    for name in ("TP2", "PP2"):  # the moves into one process
        resumed = _flags(data, load=root / "ckpt" / name / f"iter_{SAVE_AT:07d}")
        results[f"{name[:2]} 2 -> one process"] = _summary(run_training(parse_train_args(resumed)))
    return results


def _assert_close(ours: list[float], reference: list[float], what: str) -> None:
    assert len(ours) == len(reference) > 0, what
    for i, (a, b) in enumerate(zip(ours, reference, strict=True)):
        assert abs(a - b) <= 1e-5 * abs(b), f"{what}, value {i + 1}: {a} vs one process {b}"


@pytest.mark.parametrize(
    "name", [*TWO_PROCESS_CASES, *FOUR_PROCESS_CASES, "PP 2 x TP 1, from HF", "PP 2 x TP 2, from HF"]
)
def test_layout_equals_one_process(runs: dict[str, Any], name: str) -> None:
    ours = runs[name]
    variant = next((v for v in ("untied", "from HF") if v in name), None)
    reference = runs["one process" + (f", {variant}" if variant else "")]
    assert ours["iterations"] == list(range(1, ITERS + 1))
    for key in ("losses", "grad_norms", "validation"):
        _assert_close(ours[key], reference[key], f"{name}: {key}")


@pytest.mark.parametrize("name", ["TP 2 -> PP 2", "TP 2 -> one process", "PP 2 -> one process"])
def test_checkpoint_resumes_in_another_layout(runs: dict[str, Any], name: str) -> None:
    ours, reference = runs[name], runs["one process"]
    assert ours["iterations"] == list(range(SAVE_AT + 1, ITERS + 1))
    for key in ("losses", "grad_norms"):
        _assert_close(ours[key], reference[key][SAVE_AT:], f"{name}: {key}")
