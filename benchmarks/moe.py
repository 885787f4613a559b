"""Qwen3-MoE on one device: the grouped expert computation against per-expert loops, and a training step of our
model against transformers' `Qwen3MoeForCausalLM`, same config, weights, tokens and dtype.

Experts (forward + backward of the expert part of one MoE layer, for fixed routing of `--micro-batch-size x
--seq-length` tokens): "grouped" is ours (`GroupedExperts`: sort by expert, `kernels.grouped_linear`, combine);
"grouped, torch._grouped_mm" is the same with torch's grouped matmul forced (on CPU torch's own fallback);
"padded bmm" pads every expert's rows to the largest group and runs one batched matmul; "per-expert loop (HF)"
is transformers' `Qwen3MoeExperts` (a one-hot mask, then per expert: gather, matmuls, index_add).

Training step: forward + backward (no optimizer) of the whole model with the load-balancing loss, ours (the
chunked LM-head loss a loss-only forward takes) and HF's (labels, `output_router_logits=True`). Both start
from the same weights; the table shows each one's first loss (HF's includes its aux loss term).

    PYTHONPATH=src python benchmarks/moe.py [--model qwen3-moe-bench] [--seq-length 512] [--micro-batch-size 1]
        [--iters 3] [--warmup 1] [--threads 1] [--json OUT]
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from train_throughput import machine_info, write_json_atomic  # benchmarks/ is the script's directory

from qwen3_pretrain.config.model import Qwen3MoeConfig, get_preset
from qwen3_pretrain.model import Qwen3ForCausalLM, kernels
from qwen3_pretrain.model.kernels import KernelOptions
from qwen3_pretrain.model.moe import GroupedExperts, Routing, sort_by_expert

transformers.logging.set_verbosity_error()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen3-moe-bench", help="a Qwen3-MoE preset")
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="write the results here (atomically)")
    return parser.parse_args(argv)


def seconds_per_call(step: Callable[[], Any], iters: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - start) / iters


def padded_bmm_experts(x: torch.Tensor, routing: Routing, experts: GroupedExperts) -> torch.Tensor:
    """Every expert's rows padded to the largest group, one bmm per projection."""
    top_k = routing.experts.shape[1]
    order, counts = sort_by_expert(routing.experts, experts.gate_up_proj.shape[0])
    group = torch.repeat_interleave(torch.arange(counts.numel()), counts)  # [T k]: expert of each sorted row
    slot = torch.arange(order.numel()) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)  # [T k]
    padded = x.new_zeros(counts.numel(), int(counts.max()), x.shape[1]).index_put((group, slot), x[order // top_k])
    gate, up = torch.bmm(padded, experts.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)  # [E, max, f] each
    rows = torch.bmm(F.silu(gate) * up, experts.down_proj.transpose(1, 2))[group, slot]  # [T k, h] sorted
    by_token = rows.new_empty(rows.shape).index_copy(0, order, rows).view(*routing.weights.shape, -1)  # [T, k, h]
    return (by_token * routing.weights.unsqueeze(-1)).sum(dim=1)  # [T, h]


def bench_experts(config: Qwen3MoeConfig, tokens: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    experts = GroupedExperts(config.num_experts, config.hidden_size, config.moe_intermediate_size, KernelOptions())
    hf = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts(
        transformers.Qwen3MoeConfig(**config.to_hf_dict())
    )
    hf.load_state_dict(experts.state_dict())
    x = torch.randn(tokens, config.hidden_size, requires_grad=True)
    logits = torch.randn(tokens, config.num_experts)
    weights, chosen = logits.softmax(-1).topk(config.num_experts_per_tok, dim=-1)
    routing = Routing(logits.softmax(-1), chosen, (weights / weights.sum(-1, keepdim=True)).requires_grad_())
    variants: dict[str, Callable[[], torch.Tensor]] = {
        "grouped (ours)": lambda: experts(x, routing),
        "grouped, torch._grouped_mm": lambda: experts(x, routing),
        "padded bmm": lambda: padded_bmm_experts(x, routing, experts),
        "per-expert loop (HF)": lambda: hf(x, routing.experts, routing.weights),
    }
    reference = experts(x, routing).detach()
    results = []
    for name, run in variants.items():
        forced = name.endswith("_grouped_mm")
        original = kernels._torch_grouped_mm_applies
        if forced:
            kernels._torch_grouped_mm_applies = lambda x, w: True  # type: ignore[assignment]
        try:
            seconds = seconds_per_call(lambda run=run: run().square().sum().backward(), args.iters, args.warmup)
            error = (run().detach() - reference).abs().max().item()
        finally:
            kernels._torch_grouped_mm_applies = original  # type: ignore[assignment]
        results.append({"variant": name, "ms": seconds * 1000, "tokens_per_s": tokens / seconds, "max_abs_diff": error})
        print(f"experts {name}: {seconds * 1000:.1f} ms", file=sys.stderr, flush=True)
    return results


def bench_training(config: Qwen3MoeConfig, args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    ours = Qwen3ForCausalLM(config)
    hf = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**config.to_hf_dict()))
    hf.load_state_dict(ours.state_dict())
    ids = torch.randint(0, config.vocab_size, (args.micro_batch_size, args.seq_length))
    labels = torch.cat((ids[:, 1:], torch.full_like(ids[:, :1], -100)), dim=1)  # ours: aligned; HF shifts itself
    losses: dict[str, float] = {}

    def ours_step() -> None:
        loss = ours(ids, labels, return_logits=False).loss
        loss.backward()
        losses.setdefault("ours", loss.item())
        ours.zero_grad(set_to_none=True)

    def hf_step() -> None:
        loss = hf(input_ids=ids, labels=ids, output_router_logits=True, use_cache=False).loss
        loss.backward()
        losses.setdefault("hf", loss.item())
        hf.zero_grad(set_to_none=True)

    tokens = args.micro_batch_size * args.seq_length
    results = []
    for name, step in (("ours", ours_step), ("hf", hf_step)):
        seconds = seconds_per_call(step, args.iters, args.warmup)
        results.append({"impl": name, "ms_per_iter": seconds * 1000, "tokens_per_s": tokens / seconds,
                        "first_loss": losses[name]})
        print(f"training {name}: {seconds * 1000:.1f} ms per iteration", file=sys.stderr, flush=True)
    return results


def format_table(report: dict[str, Any]) -> str:
    m, c = report["machine"], report["config"]
    lines = [
        f"device: {m['device_name']}, torch {m['torch']}, transformers {m['transformers']}, "
        f"{m['torch_threads']} torch threads",
        f"model {c['model']}: {c['num_parameters'] / 1e6:.1f}M params ({c['active_parameters'] / 1e6:.1f}M active), "
        f"{c['num_experts']} experts top-{c['top_k']}, moe ffn {c['moe_ffn']}, fp32, {c['tokens']} tokens per step",
        "",
        f"{'experts (forward + backward)':<30} {'ms':>9} {'tokens/s':>10} {'vs loop':>8} {'max |diff|':>11}",
    ]
    loop = next(r["ms"] for r in report["experts"] if r["variant"].startswith("per-expert"))
    for r in report["experts"]:
        lines.append(f"{r['variant']:<30} {r['ms']:9.1f} {r['tokens_per_s']:10.0f} {loop / r['ms']:7.2f}x "
                     f"{r['max_abs_diff']:11.2e}")
    lines += ["", f"{'training step (fwd + bwd)':<30} {'ms/iter':>9} {'tokens/s':>10} {'first loss':>11}"]
    for r in report["training"]:
        lines.append(f"{r['impl']:<30} {r['ms_per_iter']:9.1f} {r['tokens_per_s']:10.1f} {r['first_loss']:11.4f}")
    lines.append(f"ours/hf tokens/s: {report['ours_over_hf']:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = get_preset(args.model)
    if not isinstance(config, Qwen3MoeConfig):
        raise SystemExit(f"--model {args.model} is not a Qwen3-MoE preset")
    config.torch_dtype = "float32"
    tokens = args.micro_batch_size * args.seq_length
    training = bench_training(config, args)
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": machine_info(),
        "config": {
            "model": args.model, "num_parameters": config.num_parameters(),
            "active_parameters": config.num_parameters(active=True), "num_experts": config.num_experts,
            "top_k": config.num_experts_per_tok, "moe_ffn": config.moe_intermediate_size, "tokens": tokens,
            "seq_length": args.seq_length, "micro_batch_size": args.micro_batch_size, "iters": args.iters,
            "warmup": args.warmup,
        },
        "experts": bench_experts(config, tokens, args),
        "training": training,
        "ours_over_hf": training[0]["tokens_per_s"] / training[1]["tokens_per_s"],
    }
    print(format_table(report), flush=True)
    if args.json:
        write_json_atomic(args.json, report)
        print(f"wrote {args.json}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
