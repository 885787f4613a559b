"""torchtitan's own Qwen3 training step, timed the way `train_throughput.py` times ours (the peer to beat).

torchtitan (`pip install qwen3-pretrain[bench]`, torchtitan 0.3.0) builds its Qwen3 model from its registry
(`model_registry("1.7B")`, ...), applies its own `parallelize_qwen3` (activation checkpointing, per-block
torch.compile, FSDP2 over a one-rank mesh with MixedPrecisionPolicy bf16 params / fp32 reduce: its
single-device path), its chunked LM-head cross-entropy (`ChunkedLossWrapper`), its AdamW (`default_adamw`,
fused) and its gradient clipping, in the loop of its Trainer's `train_step`: micro batches normalised by the
step's token count, clip 1.0, one optimizer step. Data, seq, micro batch, accumulation, iterations, the
timing, the matmul peak, MFU (FLOPs per token: `Qwen3Config.flops_per_token` of our preset of the same shape,
so both sides count the same FLOPs), peak memory and the profile are `train_throughput.py`'s.

Presets of the Qwen3 family map to torchtitan's flavors; a smaller preset (qwen3-tiny, for CPU checks) is built
with torchtitan's own Qwen3 layer builder at that preset's shape.

    PYTHONPATH=src python benchmarks/torchtitan_qwen3.py [--model qwen3-1.7b] [--seq-length 4096]
        [--micro-batch-size 1] [--accumulation 8] [--iters 4] [--warmup 2] [--compile] [--recompute full|selective]
        [--attn-backend flex|varlen|flex_flash] [--profile DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
import train_throughput as bench

from qwen3_pretrain.config.model import Qwen3Config, get_preset
from qwen3_pretrain.data.mock import MockGPTDataset
from qwen3_pretrain.distributed.device import device_module, device_type, local_device

FLAVORS = {"qwen3-0.6b": "0.6B", "qwen3-1.7b": "1.7B", "qwen3-4b": "4B", "qwen3-8b": "8B", "qwen3-14b": "14B",
           "qwen3-32b": "32B"}
IMPL = "torchtitan"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen3-1.7b", help="our preset of the shape to build (default qwen3-1.7b)")
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--accumulation", type=int, default=1, help="micro batches per optimizer step")
    parser.add_argument("--iters", type=int, default=4, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    parser.add_argument("--compile", action="store_true", help="torchtitan's per-block compile (model and loss)")
    parser.add_argument("--recompute", choices=("full", "selective"), default=None,
                        help="torchtitan's activation checkpointing (FullAC / SelectiveAC)")
    parser.add_argument("--attn-backend", choices=("flex", "varlen", "flex_flash", "sdpa"), default=None,
                        help="torchtitan's attention: flex (default on accelerators: its registry's), varlen, "
                             "flex_flash, or sdpa (its causal SDPA module; the default on CPU, where flex has no "
                             "backward)")
    parser.add_argument("--matmul-size", type=int, default=None, help="largest side of the peak matmul")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="profile one more step; its op table goes to DIR/profile_torchtitan_bf16.txt")
    parser.add_argument("--json", default=None, help="write the report here (atomically)")
    parser.set_defaults(num_layers=None)  # train_throughput's checks and summary read it: the preset's own layers
    return parser


def model_config(preset: str, attn_backend: str) -> Any:
    """torchtitan's Qwen3 model config: its registry's flavor, or its layer builder at our preset's shape; with
    sdpa, every layer's inner attention is torchtitan's causal `ScaledDotProductAttention`."""
    from torchtitan.models.common.attention import ScaledDotProductAttention

    config = _registry_config(preset, "flex" if attn_backend == "sdpa" else attn_backend)
    if attn_backend == "sdpa":
        for layer in config.layers:
            layer.attention.inner_attention = ScaledDotProductAttention.Config()
    return config


def _registry_config(preset: str, attn_backend: str) -> Any:
    from torchtitan.models import qwen3 as titan

    if preset in FLAVORS:
        return titan.model_registry(FLAVORS[preset], attn_backend=attn_backend).model
    from torchtitan.models.common import Embedding, Linear
    from torchtitan.models.common.rope import CosSinRoPE

    cfg: Qwen3Config = get_preset(preset)
    if not cfg.tie_word_embeddings:
        raise SystemExit(f"--model {preset}: only tied presets outside torchtitan's flavors are built here")
    return titan.Qwen3Model.Config(
        vocab_size=cfg.vocab_size, dim=cfg.hidden_size, norm=titan._qwen3_norm(cfg.hidden_size),
        enable_weight_tying=True,
        tok_embeddings=Embedding.Config(num_embeddings=cfg.vocab_size, embedding_dim=cfg.hidden_size,
                                        param_init=titan._EMBEDDING_SKIP_INIT),
        lm_head=Linear.Config(in_features=cfg.hidden_size, out_features=cfg.vocab_size,
                              param_init=titan._LINEAR_INIT),
        layers=titan._build_qwen3_layers(
            n_layers=cfg.num_hidden_layers, dim=cfg.hidden_size, n_heads=cfg.num_attention_heads,
            n_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, hidden_dim=cfg.intermediate_size,
            attn_backend=attn_backend,
            rope=CosSinRoPE.Config(dim=cfg.head_dim, max_seq_len=cfg.max_position_embeddings, theta=cfg.rope_theta),
        ),
    )


def point_torchtitan_at_cpu() -> None:
    """torchtitan targets accelerators (its device type falls back to cuda); for CPU checks (BENCH_CPU=1) its
    modules that read the device type at import are pointed at the CPU."""
    import importlib

    for name in ("torchtitan.tools.utils", "torchtitan.distributed.parallel_dims", "torchtitan.distributed.utils"):
        module = importlib.import_module(name)
        for attribute, value in (("device_type", "cpu"), ("device_module", torch.cpu)):
            if hasattr(module, attribute):
                setattr(module, attribute, value)


def init_one_rank_group() -> None:
    """The one-process group torchtitan's FSDP2 mesh needs (nccl on CUDA, gloo elsewhere)."""
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if device_type() == "cuda":
        torch.cuda.set_device(local_device())
    dist.init_process_group("nccl" if device_type() == "cuda" else "gloo")


def titan_step(args: argparse.Namespace) -> Callable[[list[bench.Batch]], torch.Tensor]:
    """Build torchtitan's model, parallelisation, loss and optimizer; one call = one optimizer step."""
    from torchtitan.components.loss import IGNORE_INDEX, ChunkedLossWrapper, CrossEntropyLoss
    from torchtitan.components.optimizer import default_adamw
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed import utils as dist_utils
    from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC
    from torchtitan.distributed.spmd_types import annotate_input_spmd_types
    from torchtitan.models.qwen3 import parallelize_qwen3

    if device_type() == "cpu":
        point_torchtitan_at_cpu()
    init_one_rank_group()
    parallelism = ParallelismConfig()
    dist_utils.set_spmd_backend(parallelism.spmd_backend)
    dims = ParallelDims.from_config(parallelism, world_size=1)
    training = TrainingConfig(local_batch_size=args.micro_batch_size, seq_len=args.seq_length,
                              global_batch_size=args.micro_batch_size * args.accumulation, max_norm=bench.CLIP)
    compile_config = CompileConfig(enable=args.compile)
    config = model_config(args.model, args.attn_backend)
    config.update_from_config(config=SimpleNamespace(parallelism=parallelism))
    torch.manual_seed(bench.SEED)
    with torch.device("meta"):
        model = config.build()
    ac = {None: None, "full": FullAC.Config(), "selective": SelectiveAC.Config()}[args.recompute]
    with tempfile.TemporaryDirectory() as dump:
        model = parallelize_qwen3(model, parallel_dims=dims, training=training, parallelism=parallelism,
                                  compile_config=compile_config, ac_config=ac, dump_folder=dump)
    device = local_device()
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    model.train()
    loss_fn = ChunkedLossWrapper.Config(
        loss_fn=CrossEntropyLoss.Config(global_vocab_size=config.vocab_size)
    ).build(compile_config=compile_config)
    loss_fn.set_lm_head(model.lm_head)
    model._skip_lm_head = True
    optimizers = default_adamw(lr=bench.LR, betas=bench.BETAS, eps=bench.EPS, weight_decay=bench.WEIGHT_DECAY).build(
        model_parts=[model])
    context = dist_utils.get_spmd_context(parallel_dims=dims)

    def step(batches: list[bench.Batch]) -> torch.Tensor:
        optimizers.zero_grad()
        labels = [b["labels"].masked_fill(b["loss_mask"] == 0, IGNORE_INDEX) for b in batches]
        valid = sum(int((label != IGNORE_INDEX).sum()) for label in labels)
        global_tokens = torch.tensor(valid, device=device)
        total = torch.zeros((), device=device)
        for batch, label in zip(batches, labels, strict=True):
            tokens = batch["tokens"].to(device, non_blocking=True)
            positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)  # [b, s]: one document each
            extra: dict[str, Any] = {"positions": positions}
            if args.attn_backend != "sdpa":  # torchtitan's masked backends take the (causal) block mask
                extra["attention_masks"] = model.get_attention_masks(positions=positions)
            inputs, targets, extra = annotate_input_spmd_types(dims, tokens, label.to(device, non_blocking=True), extra)
            with context():
                loss, _ = loss_fn(model(inputs, **extra), targets, global_tokens, positions=extra["positions"])
                loss.backward()
            total += loss.detach().float()
        dist_utils.clip_grad_norm_(list(model.parameters()), bench.CLIP, foreach=True, pp_mesh=None,
                                   ep_enabled=False)
        optimizers.step()
        return total

    return step


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Warm-up + timed steps (+ a profiled one) of torchtitan's step; the raw measurements (or the error)."""
    device = local_device()
    vocab = get_preset(args.model).vocab_size
    samples = bench.num_micro_batches(args) * args.micro_batch_size
    mock = MockGPTDataset(samples, args.seq_length, vocab, seed=bench.SEED)
    batches = bench.step_batches(mock, args, device, bench.num_steps(args))
    rss_start = bench.peak_rss_bytes()
    start = time.perf_counter()
    try:
        step = titan_step(args)
    except Exception as error:  # an incompatible torch, a missing package: reported, the script goes on
        return {"impl": IMPL, "dtype": "bf16", "error": f"building torchtitan's step: {type(error).__name__}: {error}"}
    print(f"[{IMPL}] built in {time.perf_counter() - start:.1f} s; {args.warmup} warmup iterations", file=sys.stderr,
          flush=True)
    if device.type != "cpu":
        device_module().reset_peak_memory_stats()
    losses = [step(b) for b in batches[: args.warmup]]
    bench.synchronize()
    start = time.perf_counter()
    losses += [step(b) for b in batches[args.warmup:]]
    bench.synchronize()
    seconds = time.perf_counter() - start
    peak = device_module().max_memory_allocated() if device.type != "cpu" else bench.peak_rss_bytes() - rss_start
    print(f"[{IMPL}] {seconds / args.iters * 1000:.1f} ms per iteration", file=sys.stderr, flush=True)
    result: dict[str, Any] = {"impl": IMPL, "dtype": "bf16", "seconds": seconds, "peak_memory_bytes": int(peak),
                              "losses": torch.stack(losses).float().tolist()}
    if args.profile:
        result["profile"] = bench.profile_step(step, bench.profiled_step_batches(args, device), Path(args.profile),
                                               f"{IMPL}_bf16")
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.skip_hf, args.dtype, args.fp8_format = True, "bf16", None
    args.attn_backend = args.attn_backend or ("sdpa" if device_type() == "cpu" else "flex")
    bench.check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    from qwen3_pretrain.train.metrics import device_peak_tflops

    size = args.matmul_size or (2048 if device_type() == "cpu" else 8192)
    peak, side = bench.matmul_peak_tflops(torch.bfloat16, size)
    spec_peak = device_peak_tflops(local_device(), torch.bfloat16)
    result = bench.summarize(run(args), args, {"bf16": peak}, spec_peak)
    config = get_preset(args.model)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]), "machine": bench.machine_info(),
        "config": {"model": args.model, "seq_length": args.seq_length, "micro_batch_size": args.micro_batch_size,
                   "accumulation": args.accumulation, "iters": args.iters, "warmup": args.warmup,
                   "compile": args.compile, "recompute": args.recompute, "attention_backend": args.attn_backend,
                   "fp8": None, "num_parameters": config.num_parameters(),
                   "flops_per_token": config.flops_per_token(args.seq_length)},
        "matmul_size": {"bf16": side}, "peak_tflops": {"bf16": peak}, "torch_bf16_peak_tflops": None,
        "spec_peak_tflops": spec_peak, "results": [result], "ratios": {},
    }
    print(bench.format_table(report), flush=True)
    if args.json:
        bench.write_json_atomic(args.json, report)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    raise SystemExit(main())
