"""Context-parallel training equals one process, and checkpoints move between CP sizes.

Per-iteration loss and gradient norm of CP 2 and CP 4 with each algorithm (ring `megatron_cp_algo`, Ulysses
`ulysses_cp_algo`; with and without `--reset-attention-mask --reset-position-ids`), CP 2 x TP 2 (sequence
parallel), CP 2 x DP 2 and CP 2 x PP 2 equal a single process within 1e-5 relative: fp32 qwen3-tiny (4 heads,
2 KV heads: Ulysses at CP 4 replicates KV heads), loss masked at document ends so CP ranks hold different token
counts. A checkpoint saved at CP 2 resumes in one process and one saved in one process resumes at CP 2, with
the losses of the uninterrupted run. Two multi-process launches (2 and 4 ranks) run all cases.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch.multiprocessing as mp

from qwen3_pretrain.config import ConfigError, parse_train_args
from qwen3_pretrain.train.preflight import preflight
from qwen3_pretrain.train.trainer import TrainResult, run_training

from distributed_helpers import free_port, join_gloo_group, leave_gloo_group
from train_helpers import tiny_flags, write_tiny_dataset

pytestmark = pytest.mark.usefixtures("one_thread")
ITERS, SAVE_AT = 4, 2
RING, ULYSSES = {"context_parallel_algo": "megatron_cp_algo"}, {"context_parallel_algo": "ulysses_cp_algo"}
DOCUMENTS = {"reset_attention_mask": True, "reset_position_ids": True}
CASES: dict[int, dict[str, dict[str, Any]]] = {
    2: {
        "CP 2 ring": {"context_parallel_size": 2, **RING},
        "CP 2 ulysses": {"context_parallel_size": 2, **ULYSSES},
        "CP 2 ring, documents": {"context_parallel_size": 2, **RING, **DOCUMENTS},
        "CP 2 ulysses, documents": {"context_parallel_size": 2, **ULYSSES, **DOCUMENTS},
    },
    4: {
        "CP 4 ring": {"context_parallel_size": 4, **RING},
        "CP 4 ulysses, documents": {"context_parallel_size": 4, **ULYSSES, **DOCUMENTS},
        "CP 2 x TP 2, sequence parallel": {"context_parallel_size": 2, "tensor_model_parallel_size": 2,
                                           "sequence_parallel": True, **RING},
        "CP 2 x DP 2": {"context_parallel_size": 2, **ULYSSES},
        "CP 2 x PP 2, documents": {"context_parallel_size": 2, "pipeline_model_parallel_size": 2, **RING, **DOCUMENTS},
    },
}


def _flags(data: str, **overrides: Any) -> list[str]:
    return tiny_flags(data, train_iters=ITERS, log_interval=1, **overrides)


def _summary(result: TrainResult) -> dict[str, Any]:
    return {"iterations": result.iterations, "losses": result.losses, "grad_norms": result.grad_norms}


def _run(flags: list[str], world: int | None = None) -> dict[str, Any]:
    return _summary(run_training(parse_train_args(flags, world_size=world)))


def _worker(rank: int, world: int, port: int, data: str, ckpt: str, out: str) -> None:
    """One rank: every case of this world size; with 2 ranks also the CP 2 save and the CP 1 -> CP 2 resume."""
    join_gloo_group(rank, world, port)
    results = {name: _run(_flags(data, **flags), world) for name, flags in CASES[world].items()}
    if world == 2:
        _run(_flags(data, save=Path(ckpt) / "cp2", save_interval=SAVE_AT, **CASES[2]["CP 2 ring"]), world)
        resumed = _flags(data, load=Path(ckpt) / "cp1" / f"iter_{SAVE_AT:07d}", **CASES[2]["CP 2 ulysses"])
        results["CP 1 -> CP 2"] = _run(resumed, world)
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    leave_gloo_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Single-process references and the results of every CP layout."""
    root = tmp_path_factory.mktemp("cp_layouts")
    data = write_tiny_dataset(root / "tiny_text_document")
    ckpt = root / "ckpt"
    results = {"one process": _run(_flags(data, save=ckpt / "cp1", save_interval=SAVE_AT)),
               "one process, documents": _run(_flags(data, **DOCUMENTS))}
    for world in (2, 4):
        out = root / f"world{world}.json"
        mp.spawn(_worker, args=(world, free_port(), data, str(ckpt), str(out)), nprocs=world, join=True)
        results.update(json.loads(out.read_text()))
    results["CP 2 -> one process"] = _run(_flags(data, load=ckpt / "cp2" / f"iter_{SAVE_AT:07d}"))
    return results


def _assert_close(ours: list[float], reference: list[float], what: str) -> None:
    assert len(ours) == len(reference) > 0, what
    for i, (a, b) in enumerate(zip(ours, reference, strict=True)):
        assert abs(a - b) <= 1e-5 * abs(b), f"{what}, value {i + 1}: {a} vs one process {b}"


@pytest.mark.parametrize("name", [*CASES[2], *CASES[4]])
def test_context_parallel_layout_equals_one_process(runs: dict[str, Any], name: str) -> None:
    reference = runs["one process, documents" if "documents" in name else "one process"]
    assert runs[name]["iterations"] == list(range(1, ITERS + 1))
    for key in ("losses", "grad_norms"):
        _assert_close(runs[name][key], reference[key], f"{name}: {key}")


def test_document_masking_changes_the_reference(runs: dict[str, Any]) -> None:
    # otherwise the "documents" cases would not test document masking under CP
    assert runs["one process"]["losses"][-1] != runs["one process, documents"]["losses"][-1]


@pytest.mark.parametrize("name", ["CP 2 -> one process", "CP 1 -> CP 2"])
def test_checkpoint_resumes_at_another_cp_size(runs: dict[str, Any], name: str) -> None:
    ours, reference = runs[name], runs["one process"]
    assert ours["iterations"] == list(range(SAVE_AT + 1, ITERS + 1))
    for key in ("losses", "grad_norms"):
        _assert_close(ours[key], reference[key][SAVE_AT:], f"{name}: {key}")


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        ({"context_parallel_size": 2, "context_parallel_algo": "hybrid_cp_algo"}, 2,
         r"--context-parallel-algo hybrid_cp_algo: MindSpeed's hybrid"),
        ({"context_parallel_size": 4, "seq_length": 36}, 4, r"cuts --seq-length into 8 equal chunks"),
        ({"context_parallel_size": 2, "compile": True}, 2, r"--compile traces each block whole"),
        ({"context_parallel_size": 8, **ULYSSES, "seq_length": 64}, 8, r"ulysses_cp_algo gives each .* 4 attention"),
    ],
)
def test_invalid_context_parallel_settings_name_the_flag(
    tmp_path: Path, overrides: dict[str, Any], world: int, message: str
) -> None:
    data = write_tiny_dataset(tmp_path / "tiny_text_document", documents=20)
    with pytest.raises(ConfigError, match=message):
        preflight(parse_train_args(_flags(data, **overrides), world_size=world), world)
