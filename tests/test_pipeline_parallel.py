"""Pipeline parallelism: stage splitting, and 1F1B / GPipe / interleaved 1F1B on 2 gloo processes vs one process.

One `torchrun` launch runs every schedule (this file is the worker script); the parent compares
both ranks' results with a single-process run of the same model and batches.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from qwen3_pretrain.config.layout import stage_layer_counts, virtual_pipeline_stages
from qwen3_pretrain.config.model import get_preset
from qwen3_pretrain.distributed.clip import clip_grad_norm_
from qwen3_pretrain.distributed.pipeline import (
    MicroBatchShape,
    PipelineStageModule,
    build_pipeline_schedule,
    split_into_stages,
)
from qwen3_pretrain.model.qwen3 import Qwen3ForCausalLM

from distributed_helpers import exit_after, run_as_torchrun

PP = 2
LAYERS = 4
STEPS = 3
BATCH, SEQ = 4, 16
MICROBATCHES = 4  # one sequence each, with different numbers of counted tokens
MICRO_BATCH = MicroBatchShape(BATCH // MICROBATCHES, SEQ, torch.float32)


@dataclasses.dataclass(frozen=True)
class Case:
    schedule: str
    virtual_stages: int = 1
    num_layer_list: list[int] | None = None


CASES = {
    "1f1b_uneven_layers": Case("1f1b", num_layer_list=[1, 3]),
    "gpipe": Case("gpipe"),
    "interleaved_1f1b": Case("interleaved_1f1b", virtual_stages=2),
}


def _model() -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    return Qwen3ForCausalLM(dataclasses.replace(get_preset("qwen3-tiny"), num_hidden_layers=LAYERS))


def _batches(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab_size, (STEPS, BATCH, SEQ), generator=generator)
    labels = torch.randint(0, vocab_size, (STEPS, BATCH, SEQ), generator=generator)
    labels[:, 0, :11] = -100  # micro batch 0 counts 5 tokens, the others 16
    labels[:, 2, -3:] = -100
    return input_ids, labels


def _record(losses: list[torch.Tensor], norms: list[torch.Tensor], modules: list[torch.nn.Module]) -> dict[str, Any]:
    return {
        "losses": torch.stack(losses),
        "grad_norms": torch.stack(norms),
        "weights": {name: p.detach().clone() for module in modules for name, p in module.named_parameters()},
    }


def _train_single_process() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The reference: plain model, whole batch, mean over all tokens; also the first step's gradients."""
    model = _model()
    input_ids, labels = _batches(model.config.vocab_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses, norms, grads = [], [], {}
    for step in range(STEPS):
        loss = model(input_ids[step], labels=labels[step]).loss
        loss.backward()
        losses.append(loss.detach())
        if step == 0:
            grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        norms.append(clip_grad_norm_([model], max_norm=1.0))
        optimizer.step()
        optimizer.zero_grad()
    return _record(losses, norms, [model]), grads


# ---- worker (run by torchrun) ------------------------------------------------------------------


def _worker(out_dir: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from qwen3_pretrain.distributed.pipeline import (
        broadcast_tied_embedding,
        sync_tied_embedding_grads,
        tied_embedding_group,
    )

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (PP,), mesh_dim_names=("pp",))
    rank = dist.get_rank()
    for name, case in CASES.items():
        model = _model()
        stages = split_into_stages(model, rank, PP, case.num_layer_list, case.virtual_stages)
        del model
        tied_group = tied_embedding_group(stages, mesh)
        if stages[-1].holds_tied_head_copy():  # as after materialising a meta model: the copy is garbage
            torch.nn.init.zeros_(stages[-1].lm_head.weight)
        broadcast_tied_embedding(stages, tied_group)
        pipeline = build_pipeline_schedule(stages, mesh, MICROBATCHES, MICRO_BATCH, schedule=case.schedule)
        optimizer = torch.optim.SGD([p for stage in stages for p in stage.parameters()], lr=0.5)
        input_ids, labels = _batches(stages[0].config.vocab_size)
        losses, norms, grads = [], [], {}
        for step in range(STEPS):
            losses.append(pipeline.step(input_ids[step], labels[step]))
            sync_tied_embedding_grads(stages, tied_group)
            if step == 0:
                grads = {n: p.grad.clone() for stage in stages for n, p in stage.named_parameters()}
            norms.append(clip_grad_norm_(stages, max_norm=1.0, pp=mesh))
            optimizer.step()
            optimizer.zero_grad()
        torch.save({**_record(losses, norms, stages), "grads": grads}, out_dir / f"{name}_rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


# ---- distributed tests -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pp_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("pipeline-parallel")
    run_as_torchrun(__file__, PP, out_dir)
    return out_dir


@pytest.fixture(scope="module")
def reference() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    return _train_single_process()


def _assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-5) -> None:
    error = float((actual - expected).norm() / expected.norm())
    assert error <= rtol, f"{what}: relative error {error:.2e} > {rtol:.0e}"


def _reference_name(name: str) -> str:
    """The last stage's lm_head is a copy of the tied embedding, which the single model lists once."""
    return "model.embed_tokens.weight" if name == "lm_head.weight" else name


@pytest.mark.parametrize("name", list(CASES))
def test_pipeline_matches_single_process(
    pp_results: Path, reference: tuple[dict[str, Any], dict[str, torch.Tensor]], name: str
) -> None:
    expected, expected_grads = reference
    ranks = [torch.load(pp_results / f"{name}_rank{r}.pt", weights_only=True) for r in range(PP)]
    seen: set[str] = set()
    for rank, result in enumerate(ranks):
        for param, grad in result["grads"].items():
            _assert_close_relative(grad, expected_grads[_reference_name(param)], f"{name} rank {rank}: grad of {param}")
        for param, weight in result["weights"].items():
            _assert_close_relative(weight, expected["weights"][_reference_name(param)], f"{name} rank {rank}: {param}")
        seen |= {_reference_name(param) for param in result["grads"]}
        torch.testing.assert_close(result["losses"], expected["losses"], rtol=1e-5, atol=0)
        torch.testing.assert_close(result["grad_norms"], expected["grad_norms"], rtol=1e-5, atol=0)
    assert seen == set(expected_grads)
    # The tied embedding (first stage) and its lm_head copy (last stage) are still bit-identical.
    assert torch.equal(ranks[0]["weights"]["model.embed_tokens.weight"], ranks[PP - 1]["weights"]["lm_head.weight"])
    assert bool((expected["grad_norms"] > 1.0).all())  # clipping was active in every step


def test_micro_batch_means_would_not_give_the_global_mean() -> None:
    """The batches make a per-micro-batch mean loss detectably wrong, so the parity test checks the scaling."""
    model = _model()
    input_ids, labels = _batches(model.config.vocab_size)
    with torch.no_grad():
        global_mean = model(input_ids[0], labels=labels[0]).loss
        micro_means = [model(input_ids[0][i : i + 1], labels=labels[0][i : i + 1]).loss for i in range(MICROBATCHES)]
    assert abs(float(torch.stack(micro_means).mean() / global_mean) - 1) > 1e-3


# ---- splitting and validation (one process) ----------------------------------------------------


def test_stage_layer_counts() -> None:
    assert stage_layer_counts(28, 4) == [7, 7, 7, 7]
    assert stage_layer_counts(8, 2, virtual_stages=2) == [2, 2, 2, 2]
    assert stage_layer_counts(4, 2, num_layer_list=[1, 3]) == [1, 3]
    assert virtual_pipeline_stages(28, 2, num_layers_per_virtual_stage=7) == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"num_layers": 28, "pp_size": 3},
            r"28 layers do not split evenly into 3 pipeline stages \(--pipeline-model-parallel-size 3",
        ),
        ({"num_layers": 4, "pp_size": 0}, "--pipeline-model-parallel-size must be >= 1"),
        (
            {"num_layers": 4, "pp_size": 2, "num_layer_list": [1, 2]},
            "--num-layer-list 1,2 must give 2 positive layer counts",
        ),
        ({"num_layers": 4, "pp_size": 2, "num_layer_list": [0, 4]}, "--num-layer-list 0,4 must give 2 positive"),
        (
            {"num_layers": 4, "pp_size": 1, "virtual_stages": 2},
            "--num-layers-per-virtual-pipeline-stage .* needs --pipeline-model-parallel-size >= 2",
        ),
    ],
)
def test_invalid_pipeline_layouts_name_the_flag(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        stage_layer_counts(**kwargs)


def test_invalid_virtual_stage_size_names_the_flag() -> None:
    message = "--num-layers-per-virtual-pipeline-stage 3 x --pipeline-model-parallel-size 2"
    with pytest.raises(ValueError, match=message):
        virtual_pipeline_stages(28, 2, num_layers_per_virtual_stage=3)


def test_split_keeps_names_and_chains_to_the_same_loss() -> None:
    model = _model()
    stages = {rank: split_into_stages(model, rank, PP, virtual_stages=2) for rank in range(PP)}
    layers = {rank: [sorted(stage.model.layers) for stage in rank_stages] for rank, rank_stages in stages.items()}
    assert layers == {0: [["0"], ["2"]], 1: [["1"], ["3"]]}  # rank r holds stages r, r + PP; global names kept
    in_order = [stages[0][0], stages[1][0], stages[0][1], stages[1][1]]
    assert [s.model.embed_tokens is not None for s in in_order] == [True, False, False, False]
    assert [s.model.norm is not None and s.lm_head is not None for s in in_order] == [False, False, False, True]

    names = [name for stage in in_order for name in stage.state_dict()]
    assert sorted(names) == sorted(model.state_dict())  # every tensor once, incl. lm_head.weight
    embedding, head = in_order[0].model.embed_tokens.weight, in_order[-1].lm_head.weight
    assert head is not embedding and torch.equal(head, embedding)  # the last stage's own copy, initialised equal
    assert in_order[-1].holds_tied_head_copy()

    input_ids, labels = _batches(model.config.vocab_size)
    in_order[-1].labels.append(labels[0])  # the last stage reads its micro batch's labels from this queue
    hidden = input_ids[0]
    with torch.no_grad():
        for stage in in_order:
            hidden = stage(hidden)  # [b, s, hidden], then the summed token loss
        expected = model(input_ids[0], labels[0], return_logits=False, loss_reduction="sum").loss
        torch.testing.assert_close(hidden, expected, rtol=0, atol=0)
    assert not in_order[-1].labels
    with pytest.raises(RuntimeError, match="the last pipeline stage has no labels for this micro batch"):
        in_order[-1](torch.zeros(1, SEQ, model.config.hidden_size))


def test_one_stage_keeps_the_tie() -> None:
    (stage,) = split_into_stages(_model(), 0, 1)
    assert isinstance(stage, PipelineStageModule) and not stage.holds_tied_head_copy()
    assert stage.lm_head.weight is stage.model.embed_tokens.weight


def test_invalid_schedules_are_refused_before_any_communication() -> None:
    stages = split_into_stages(_model(), 0, PP, virtual_stages=2)
    unsupported = "pipeline schedule 'zb' is not supported; use one of 1f1b, gpipe, interleaved_1f1b"
    with pytest.raises(ValueError, match=unsupported):
        build_pipeline_schedule(stages[:1], None, MICROBATCHES, MICRO_BATCH, schedule="zb")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="interleaved_1f1b needs virtual stages"):
        build_pipeline_schedule(stages[:1], None, MICROBATCHES, MICRO_BATCH, schedule="interleaved_1f1b")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'1f1b' got 2 stage"):
        build_pipeline_schedule(stages, None, MICROBATCHES, MICRO_BATCH, schedule="1f1b")  # type: ignore[arg-type]


if __name__ == "__main__":
    exit_after(_worker, sys.argv[1])
