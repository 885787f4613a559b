"""Training throughput of our trainer against HF transformers, same model, data and device, side by side.

"ours": the `Trainer` of `qwen3-pretrain train` (built from the same flags a user passes) running
`Trainer.train_step` on one device. "hf": transformers' `Qwen3ForCausalLM` (eager, attention
"sdpa", `use_cache=False`) + `torch.optim.AdamW` with default settings, the same gradient clipping,
under `torch.autocast` for bf16 (ours: the trainer's bf16 policy). Both start from the same initial
weights and read the same micro batches of random tokens (`MockGPTDataset`, written once as a
Megatron .bin/.idx the trainer reads through `--data-path`), so their first losses agree.

Each (implementation, dtype) variant runs in a fresh process so peak memory is its own:
`max_memory_allocated` during training on CUDA/NPU, growth of the peak RSS since start-up on CPU.
The device's dense-matmul peak (fp32 and bf16, a large square matmul) is measured in the same run
(bf16 on a CPU without fast bf16 matmuls: through the model's float32 path, `model.kernels`, which is
faster there than torch's own bf16 gemm; both are reported); MFU = model TFLOP/s / that peak
(`mfu_spec` uses the datasheet bf16 peak where the device is known).
Model FLOPs per token are `Qwen3Config.flops_per_token`, which counts the LM-head matmul even when
it is tied.

`--profile DIR` (ours only): after the timed iterations, one more optimizer step runs under
`torch.profiler`, on micro batches of its own (the mock samples after the timed ones; the timed steps
read the same data as without --profile) and left out of the timing and the losses; its top ops by
self device time (CUDA; self CPU time on CPU and NPU) go to DIR/profile_ours_<dtype>.txt and the
shares of that time in matmuls, attention, the optimizer and the rest (`op_category`) into the result.

    PYTHONPATH=src python benchmarks/train_throughput.py [--model qwen3-bench] [--seq-length 512]
        [--micro-batch-size 1] [--accumulation 1] [--iters 10] [--warmup 2] [--dtype fp32|bf16|both] [--compile]
        [--recompute full|selective] [--attention-backend auto|flash|fused|efficient|unfused]
        [--fp8-format e4m3|hybrid [--fp8-recipe tensorwise|rowwise]] [--skip-hf]
        [--profile DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import itertools
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from qwen3_pretrain.config.fp8 import FP8_FORMATS, FP8_RECIPES
from qwen3_pretrain.config.model import Qwen3Config, Qwen3MoeConfig, get_preset
from qwen3_pretrain.data.gpt_dataset import build_gpt_datasets
from qwen3_pretrain.data.indexed import IndexedDatasetWriter, best_dtype
from qwen3_pretrain.data.loader import build_pretraining_loader
from qwen3_pretrain.data.mock import MockGPTDataset
from qwen3_pretrain.distributed.device import device_module, device_type, local_device
from qwen3_pretrain.model import kernels
from qwen3_pretrain.model.qwen3 import IGNORE_INDEX

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLEMENTATIONS = ("ours", "hf")
SEED = 1234
LR, WEIGHT_DECAY, BETAS, EPS, CLIP = 1e-5, 0.1, (0.9, 0.95), 1e-8, 1.0
PREFIX_NAME = "mock_text_document"

Batch = dict[str, torch.Tensor]


# ---- arguments -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen3-bench", help="model preset (default: qwen3-bench)")
    parser.add_argument("--num-layers", type=int, default=None,
                        help="decoder layers instead of the preset's (e.g. an MoE preset cut to fit one device)")
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--accumulation", type=int, default=1,
                        help="micro batches per optimizer step (the 1.7B recipe: 8 per device)")
    parser.add_argument("--iters", type=int, default=10, help="timed training iterations")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations before timing")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "both"), default="both")
    parser.add_argument("--compile", action="store_true", help="ours: torch.compile each block (HF stays eager)")
    parser.add_argument("--recompute", choices=("full", "selective"), default=None,
                        help="ours: --recompute-granularity; HF: gradient checkpointing")
    parser.add_argument("--attention-backend", choices=tuple(kernels.ATTENTION_BACKENDS), default="auto",
                        help="ours: the SDPA kernel tried first (HF keeps torch's order)")
    parser.add_argument("--fp8-format", choices=FP8_FORMATS, default=None,
                        help="ours: FP8 block linears (torchao float8; needs --dtype bf16); HF stays bf16")
    parser.add_argument("--fp8-recipe", choices=FP8_RECIPES, default="tensorwise", help="ours: with --fp8-format")
    parser.add_argument("--skip-hf", action="store_true", help="run only our trainer")
    parser.add_argument("--matmul-size", type=int, default=None,
                        help="largest side of the square matmul for the peak "
                             "(default 8192 on accelerators, 2048 on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="ours: profile one extra step; its op table goes to DIR/profile_ours_<dtype>.txt")
    parser.add_argument("--json", default=None, help="write the results here (atomically)")
    parser.add_argument("--worker", choices=IMPLEMENTATIONS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data-prefix", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return parser


def check_args(args: argparse.Namespace) -> None:
    for flag in ("seq_length", "micro_batch_size", "accumulation", "iters"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.num_layers is not None and args.num_layers < 1:
        raise SystemExit(f"--num-layers must be >= 1, got {args.num_layers}")
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    if args.warmup < 0:
        raise SystemExit(f"--warmup must be >= 0, got {args.warmup}")
    if args.fp8_format and args.dtype != "bf16":
        raise SystemExit(f"--fp8-format needs --dtype bf16, got {args.dtype}")
    if isinstance(bench_config(args), Qwen3MoeConfig) and not args.skip_hf and args.worker is None:  # names presets
        raise SystemExit(f"{args.model} is a mixture-of-experts preset: the HF side here is the dense Qwen3, so pass "
                         "--skip-hf (benchmarks/moe.py compares MoE with transformers' Qwen3MoeForCausalLM)")


def bench_config(args: argparse.Namespace) -> Qwen3Config:
    """The preset, with `--num-layers` decoder layers when given (a big model cut to fit one device)."""
    config = get_preset(args.model)
    return dataclasses.replace(config, num_hidden_layers=args.num_layers) if args.num_layers else config


def num_steps(args: argparse.Namespace) -> int:
    return args.warmup + args.iters


def num_micro_batches(args: argparse.Namespace) -> int:
    return num_steps(args) * args.accumulation


# ---- data ------------------------------------------------------------------------------------------


def write_mock_dataset(folder: Path, args: argparse.Namespace) -> str:
    """MockGPTDataset windows as documents of a Megatron .bin/.idx, so the trainer reads them with --data-path."""
    vocab = bench_config(args).vocab_size
    samples = num_micro_batches(args) * args.micro_batch_size
    mock = MockGPTDataset(samples, args.seq_length, vocab, seed=SEED)
    prefix = str(folder / PREFIX_NAME)
    with IndexedDatasetWriter(prefix, best_dtype(vocab)) as writer:
        for i in range(samples):
            writer.add_document(mock.window(i))
        writer.finalize()
    return prefix


def trainer_flags(args: argparse.Namespace, dtype: str) -> list[str]:
    """The `qwen3-pretrain train` flags of this benchmark: `--accumulation` micro batches per step, no eval, no
    saves."""
    flags = [
        "--model", args.model, "--data-path", args.data_prefix, "--split", "100,0,0",
        "--data-cache-path", str(Path(args.data_prefix).parent / "index-cache"),
        "--seq-length", str(args.seq_length), "--micro-batch-size", str(args.micro_batch_size),
        "--global-batch-size", str(args.micro_batch_size * args.accumulation), "--train-iters", str(num_steps(args)),
        "--lr", str(LR), "--lr-decay-style", "constant", "--weight-decay", str(WEIGHT_DECAY),
        "--adam-beta1", str(BETAS[0]), "--adam-beta2", str(BETAS[1]), "--adam-eps", str(EPS),
        "--clip-grad", str(CLIP), "--seed", str(SEED), "--init-method-std", "0.02",
        "--log-interval", str(num_steps(args)), "--eval-iters", "0", "--num-workers", "0",
    ]
    if dtype == "bf16":
        flags.append("--bf16")
    if args.recompute:
        flags += ["--recompute-granularity", args.recompute]
    flags += ["--attention-backend", args.attention_backend]
    if args.compile:
        flags.append("--compile")
    if args.fp8_format:
        flags += ["--fp8-format", args.fp8_format, "--fp8-recipe", args.fp8_recipe]
    if args.num_layers:
        flags += ["--num-layers", str(args.num_layers)]
    return flags


def step_batches(dataset: torch.utils.data.Dataset, args: argparse.Namespace, device: torch.device, steps: int,
                 first_sample: int = 0) -> list[list[Batch]]:
    """`steps` steps of `--accumulation` micro batches from sample `first_sample` on (pinned off the CPU)."""
    loader = build_pretraining_loader(dataset, first_sample, args.micro_batch_size, dp_rank=0, dp_size=1)
    needed = steps * args.accumulation
    batches = list(itertools.islice(loader, needed))
    if len(batches) < needed:
        raise RuntimeError(f"the mock dataset holds {len(batches)} micro batches, {needed} are needed")
    if device.type != "cpu":
        batches = [{key: value.pin_memory() for key, value in batch.items()} for batch in batches]
    n = args.accumulation
    return [batches[i : i + n] for i in range(0, needed, n)]


def profiled_step_batches(args: argparse.Namespace, device: torch.device) -> list[Batch]:
    """The micro batches of the profiled step: the mock samples right after the timed steps' samples.

    Drawn from `MockGPTDataset` itself, not from a longer .bin/.idx dataset, whose shuffle would change
    with its size and with it the timed steps' data.
    """
    timed = num_micro_batches(args) * args.micro_batch_size
    mock = MockGPTDataset(timed + args.accumulation * args.micro_batch_size, args.seq_length,
                          bench_config(args).vocab_size, seed=SEED)
    return step_batches(mock, args, device, steps=1, first_sample=timed)[0]


# ---- the two implementations -----------------------------------------------------------------------


def ours_step(args: argparse.Namespace, dtype: str) -> tuple[Callable[[list[Batch]], torch.Tensor], list[list[Batch]]]:
    """Our Trainer, built exactly as `qwen3-pretrain train` builds it; one call = one `train_step`."""
    from qwen3_pretrain.distributed.mesh import init_parallel
    from qwen3_pretrain.train.preflight import prepare
    from qwen3_pretrain.train.trainer import Trainer

    config = prepare(trainer_flags(args, dtype), world_size=1)
    trainer = Trainer(config, init_parallel(1, 1))

    def step(batches: list[Batch]) -> torch.Tensor:
        pending = trainer.train_step(batches)
        return pending.loss_sum / max(pending.tokens, 1)

    return step, step_batches(trainer.train_data, args, trainer.env.device, num_steps(args))


def hf_step(args: argparse.Namespace, dtype: str) -> tuple[Callable[[list[Batch]], torch.Tensor], list[list[Batch]]]:
    """transformers' Qwen3ForCausalLM with our initial weights + torch AdamW: what a user would write
    (gradient accumulation by averaging the micro batches' mean losses; the mock data has no masked labels)."""
    import transformers

    from qwen3_pretrain.distributed.mesh import init_parallel
    from qwen3_pretrain.train.preflight import prepare
    from qwen3_pretrain.train.trainer import Trainer

    transformers.logging.set_verbosity_error()
    ours_only = {"compile": False, "recompute": None, "attention_backend": "auto", "fp8_format": None}
    flags = trainer_flags(argparse.Namespace(**{**vars(args), **ours_only}), "fp32")
    config = prepare(flags, world_size=1)
    env = init_parallel(1, 1)
    device = env.device
    initial = Trainer(config, env).model_parts[0].state_dict()  # the weights our trainer starts from (--seed)
    model_config = config.require_resolved().model_config
    hf_config = transformers.Qwen3Config(**{**model_config.to_hf_dict(), "dtype": "float32", "use_cache": False})
    hf_config._attn_implementation = "sdpa"
    with device:
        model = transformers.Qwen3ForCausalLM(hf_config).to(torch.float32)
    model.load_state_dict(initial, strict=True)
    del initial
    model.train()
    if args.recompute:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    compute = DTYPES[dtype]
    dataset = build_gpt_datasets(
        [args.data_prefix], "100,0,0", args.seq_length, SEED, (num_micro_batches(args) * args.micro_batch_size, 0, 0),
        cache_dir=config.data.data_cache_path,
    )[0]

    def step(batches: list[Batch]) -> torch.Tensor:
        total = torch.zeros((), device=device)
        for batch in batches:
            tokens = batch["tokens"].to(device, non_blocking=True)
            labels = batch["labels"].masked_fill(batch["loss_mask"] == 0, IGNORE_INDEX).to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=compute, enabled=compute != torch.float32):
                loss = model(input_ids=tokens, labels=labels, shift_labels=labels).loss / len(batches)  # aligned labels
            loss.backward()
            total += loss.detach().float()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    return step, step_batches(dataset, args, device, num_steps(args))


# ---- measuring -------------------------------------------------------------------------------------


def synchronize() -> None:
    device_module().synchronize()


def _square_operands(dtype: torch.dtype, side: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    device = local_device()
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(side, side, device=device, dtype=dtype, generator=gen)
    b = torch.randn(side, side, device=device, dtype=dtype, generator=gen)
    return a, b, torch.empty_like(a)


def _seconds_per_matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, reps: int, model_kernels: bool) -> float:
    synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        if model_kernels:
            kernels.linear(a, b)  # a @ b.T: the same FLOPs
        else:
            torch.mm(a, b, out=out)
    synchronize()
    return (time.perf_counter() - start) / reps


def matmul_peak_tflops(
    dtype: torch.dtype, size: int, trial_seconds: float = 0.25, trials: int = 3, model_kernels: bool = False
) -> tuple[float, int]:
    """(best dense TFLOP/s, side used) of square matmuls in `dtype` on the chosen device.

    `torch.mm`, or with `model_kernels` the model's `kernels.linear` (bf16 on float32 units on CPUs
    without fast bf16 matmuls). The side grows from 256 by doubling up to `size`, stopping early when
    one matmul of the next side would take longer than `trial_seconds` (a slow path, e.g. torch's bf16
    gemm on a CPU without bf16 instructions, then costs seconds, not minutes).
    """
    side = min(size, 256)
    while True:
        a, b, out = _square_operands(dtype, side)
        _seconds_per_matmul(a, b, out, reps=1, model_kernels=model_kernels)  # warm-up
        seconds = _seconds_per_matmul(a, b, out, reps=1, model_kernels=model_kernels)
        if side >= size or seconds * 8 > trial_seconds:
            break
        side = min(size, side * 2)
    reps = max(1, int(trial_seconds / max(seconds, 1e-6)))
    best = min(_seconds_per_matmul(a, b, out, reps, model_kernels) for _ in range(trials))
    return 2.0 * side**3 / best / 1e12, side


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


PROFILE_CATEGORIES = ("matmul", "attention", "optimizer", "other")
_CATEGORY_NAMES = {  # checked in this order: cutlass also builds attention kernels (fmha_cutlass*)
    "attention": ("flash", "fmha", "efficient_attention", "sdpa", "scaled_dot_product"),
    "optimizer": ("adam", "foreach", "multi_tensor_apply"),
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::_scaled_mm",
               "gemm", "cutlass", "xmma", "nvjet", "cublas"),
}


def op_category(name: str) -> str:
    """The `PROFILE_CATEGORIES` entry of a profiled op or kernel name, by name heuristics only.

    attention: flash / memory-efficient / cuDNN SDPA ops and kernels; optimizer: AdamW (fused or not)
    and the foreach ops of gradient clipping (CUDA: multi_tensor_apply kernels); matmul: aten::mm,
    addmm, bmm, matmul, linear, _scaled_mm (FP8) and GEMM kernels (gemm, cutlass, xmma, nvjet, cublas); the rest:
    other. A kernel whose name hides what it does (e.g. an inductor-generated triton matmul) lands in other.
    """
    lowered = name.lower()
    return next((category for category, needles in _CATEGORY_NAMES.items() if any(n in lowered for n in needles)),
                "other")


def self_time_shares(events: Iterable[Any], time_key: str, device_only: bool) -> tuple[float, dict[str, float]]:
    """(total, shares by `op_category`) of `time_key` over profiler `key_averages()` rows.

    With `device_only`, only device rows (kernels, copies; not user annotations) count: the CPU ops that
    launched the kernels carry the same device time again.
    """
    times = dict.fromkeys(PROFILE_CATEGORIES, 0.0)
    for event in events:
        if device_only and (event.device_type == torch.autograd.DeviceType.CPU
                            or getattr(event, "is_user_annotation", False)):
            continue
        times[op_category(event.key)] += getattr(event, time_key)
    total = sum(times.values())
    if total <= 0:
        raise RuntimeError(f"the profile holds no {time_key}")
    return total, {category: value / total for category, value in times.items()}


def profile_step(step: Callable[[list[Batch]], torch.Tensor], batches: list[Batch], folder: Path,
                 label: str) -> dict[str, Any]:
    """Run one step under `torch.profiler`; write its top 40 ops to folder/profile_<label>.txt.

    Returns the step's total self time (device kernels on CUDA; CPU ops on CPU and NPU, whose device
    profiler is left out) and its shares by `op_category`, or {"error": ...} if profiling failed.
    """
    on_cuda = device_type() == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_cuda else [])
    time_key = "self_device_time_total" if on_cuda else "self_cpu_time_total"
    path = folder / f"profile_{label}.txt"
    try:
        with torch.profiler.profile(activities=activities) as prof:
            step(batches)
            synchronize()
        events = prof.key_averages()
        write_text_atomic(path, events.table(sort_by=time_key, row_limit=40, max_name_column_width=100))
        total, shares = self_time_shares(events, time_key, device_only=on_cuda)
    except Exception as error:
        return {"error": f"{type(error).__name__}: {error}"}
    return {"time": "cuda" if on_cuda else "cpu", "total_ms": total / 1000, "table": str(path), "shares": shares}


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Build one variant, run warmup + timed iterations (+ the profiled step of ours), return its measurements."""
    dtype = args.dtype
    label = f"[{args.worker} {dtype}]"
    kind = device_type()
    rss_start = peak_rss_bytes()
    build = ours_step if args.worker == "ours" else hf_step
    start = time.perf_counter()
    step, batches = build(args, dtype)
    if kind != "cpu":  # training peak: weights, gradients, optimizer state, activations (not setup copies)
        device_module().reset_peak_memory_stats()
    print(f"{label} built in {time.perf_counter() - start:.1f} s; {args.warmup} warmup iterations", file=sys.stderr,
          flush=True)
    losses = [step(batch) for batch in batches[: args.warmup]]
    synchronize()
    print(f"{label} timing {args.iters} iterations", file=sys.stderr, flush=True)
    start = time.perf_counter()
    losses += [step(batch) for batch in batches[args.warmup:]]
    synchronize()
    seconds = time.perf_counter() - start
    peak = device_module().max_memory_allocated() if kind != "cpu" else peak_rss_bytes() - rss_start
    values = torch.stack(losses).float().tolist()
    print(f"{label} {seconds / args.iters * 1000:.1f} ms per iteration", file=sys.stderr, flush=True)
    result = {"impl": args.worker, "dtype": dtype, "seconds": seconds, "peak_memory_bytes": int(peak), "losses": values}
    if args.profile and args.worker == "ours":
        print(f"{label} profiling one more step", file=sys.stderr, flush=True)
        batches = profiled_step_batches(args, local_device())
        result["profile"] = profile_step(step, batches, Path(args.profile), f"ours_{dtype}")
    return result


def run_variant(args: argparse.Namespace, impl: str, dtype: str, data_prefix: str) -> dict[str, Any]:
    """Run one variant in a fresh process; its measurements, or the error it died with."""
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "result.json"
        command = [sys.executable, os.path.abspath(__file__), *forwarded_flags(args),
                   "--dtype", dtype, "--worker", impl, "--data-prefix", data_prefix, "--result", str(result)]
        code = subprocess.call(command)
        if code != 0 or not result.is_file():
            return {"impl": impl, "dtype": dtype, "error": f"worker exited with code {code} (its log is above)"}
        return json.loads(result.read_text())


def forwarded_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--model", args.model, "--seq-length", str(args.seq_length),
             "--micro-batch-size", str(args.micro_batch_size), "--accumulation", str(args.accumulation),
             "--iters", str(args.iters), "--warmup", str(args.warmup)]
    if args.compile:
        flags.append("--compile")
    if args.recompute:
        flags += ["--recompute", args.recompute]
    flags += ["--attention-backend", args.attention_backend]
    if args.fp8_format:
        flags += ["--fp8-format", args.fp8_format, "--fp8-recipe", args.fp8_recipe]
    if args.threads:
        flags += ["--threads", str(args.threads)]
    if args.num_layers:
        flags += ["--num-layers", str(args.num_layers)]
    if args.profile:  # the HF worker ignores it
        flags += ["--profile", args.profile]
    return flags


# ---- report ----------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    kind = device_type()
    if kind == "cpu":
        name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
            else platform.processor()
    else:
        name = device_module().get_device_name(local_device())
    try:
        hf_version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        hf_version = None
    return {
        "device_type": kind, "device_name": name, "torch": torch.__version__, "transformers": hf_version,
        "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(), "hostname": platform.node(),
    }


def summarize(raw: dict[str, Any], args: argparse.Namespace, peaks: dict[str, float],
              spec_peak: float | None) -> dict[str, Any]:
    """Add tokens/s, TFLOP/s, MFU and memory in GB to one worker's raw measurements, and to its profile
    the profiled self time over the timed step time (`of_timed_step`: on CUDA below 1 by the GPU's idle time)."""
    if "error" in raw:
        return raw
    config = bench_config(args)
    tokens_per_s = args.iters * args.accumulation * args.micro_batch_size * args.seq_length / raw["seconds"]
    tflops = tokens_per_s * config.flops_per_token(args.seq_length) / 1e12
    ms_per_iter = raw["seconds"] / args.iters * 1000
    profile = raw.get("profile")
    if profile and "error" not in profile:
        raw = {**raw, "profile": {**profile, "of_timed_step": profile["total_ms"] / ms_per_iter}}
    return {
        **raw,
        "ms_per_iter": ms_per_iter,
        "tokens_per_s": tokens_per_s,
        "tflops": tflops,
        "mfu": tflops / peaks[raw["dtype"]],
        "mfu_spec": tflops / spec_peak if spec_peak and raw["dtype"] == "bf16" else None,
        "peak_memory_gb": raw["peak_memory_bytes"] / 1e9,
        "first_loss": raw["losses"][0],
        "last_loss": raw["losses"][-1],
    }


def format_profile(profile: dict[str, Any]) -> str:
    """One line: the profiled step's self time, its shares by `op_category`, and where the table is."""
    if "error" in profile:
        return f"profile failed: {profile['error']}"
    shares = ", ".join(f"{category} {100 * share:.1f}%" for category, share in profile["shares"].items())
    return (f"profile: {profile['total_ms']:.1f} ms {profile['time']} self time per step "
            f"({100 * profile['of_timed_step']:.0f}% of the timed step): {shares} ({profile['table']})")


def format_table(report: dict[str, Any]) -> str:
    m, c = report["machine"], report["config"]
    lines = [
        f"device: {m['device_type']} ({m['device_name']}), torch {m['torch']}, transformers {m['transformers']}, "
        f"{m['cpu_count']} CPUs ({m['cpu_affinity']} usable, {m['torch_threads']} torch threads)",
        f"model {c['model']} ({c['num_parameters'] / 1e6:.1f}M params, {c['flops_per_token'] / 1e9:.3f} GFLOP/token), "
        f"seq {c['seq_length']}, micro batch {c['micro_batch_size']} x {c['accumulation']} per step, "
        f"{c['iters']} timed + {c['warmup']} warmup "
        f"iterations, compile {c['compile']}, recompute {c['recompute']}, attention {c['attention_backend']}, "
        f"fp8 {c.get('fp8')}",
        "measured matmul peak: " + ", ".join(
            f"{k} {v:.3f} TFLOP/s (n={report['matmul_size'][k]})" for k, v in report["peak_tflops"].items()
        )
        + (f"; datasheet bf16 peak {report['spec_peak_tflops']:.0f} TFLOP/s" if report["spec_peak_tflops"] else "")
        + (f"; bf16 via the model's float32 path (torch's own bf16 gemm: {report['torch_bf16_peak_tflops']:.4f} "
           "TFLOP/s)" if report["torch_bf16_peak_tflops"] else ""),
        "",
        f"{'impl':<5} {'dtype':<5} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'MFU spec':>8} {'ms/iter':>9} "
        f"{'peak mem GB':>11} {'first loss':>10} {'last loss':>10}",
    ]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"{r['impl']:<5} {r['dtype']:<5} {r['error']}")
            continue
        spec = f"{100 * r['mfu_spec']:7.1f}%" if r["mfu_spec"] is not None else f"{'-':>8}"
        lines.append(
            f"{r['impl']:<5} {r['dtype']:<5} {r['tokens_per_s']:10.1f} {r['tflops']:8.3f} {100 * r['mfu']:5.1f}% "
            f"{spec} {r['ms_per_iter']:9.1f} {r['peak_memory_gb']:11.2f} {r['first_loss']:10.4f} {r['last_loss']:10.4f}"
        )
        if "profile" in r:
            lines.append(f"{r['impl']:<5} {r['dtype']:<5} {format_profile(r['profile'])}")
    for dtype, ratio in report["ratios"].items():
        lines.append(f"ours/hf tokens/s {dtype}: {ratio:.2f}x")
    return "\n".join(lines)


def write_text_atomic(path: str | Path, text: str) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, target)


def write_json_atomic(path: str, data: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Measure the matmul peaks, run every variant in its own process, and collect the report."""
    from qwen3_pretrain.train.metrics import device_peak_tflops

    kind = device_type()
    size = args.matmul_size or (2048 if kind == "cpu" else 8192)
    dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    print(f"measuring the matmul peak ({', '.join(dtypes)}, side up to {size})", file=sys.stderr, flush=True)
    measured = {d: matmul_peak_tflops(DTYPES[d], size) for d in dtypes}
    torch_bf16_peak = None
    if "bf16" in dtypes and kernels.bf16_via_float32(local_device(), torch.bfloat16):
        # The device's bf16 peak is what its fastest bf16 matmul reaches: here the model's float32 path.
        torch_bf16_peak = measured["bf16"][0]
        measured["bf16"] = matmul_peak_tflops(torch.bfloat16, size, model_kernels=True)
    peaks = {d: tflops for d, (tflops, _) in measured.items()}
    spec_peak = device_peak_tflops(local_device(), torch.bfloat16)
    impls = ["ours"] if args.skip_hf else list(IMPLEMENTATIONS)
    config = bench_config(args)
    with tempfile.TemporaryDirectory(prefix="qwen3-bench-") as folder:
        prefix = write_mock_dataset(Path(folder), args)
        results = [
            summarize(run_variant(args, impl, d, prefix), args, peaks, spec_peak) for d in dtypes for impl in impls
        ]
    ratios = {}
    for d in dtypes:
        by_impl = {r["impl"]: r for r in results if r["dtype"] == d and "error" not in r}
        if {"ours", "hf"} <= by_impl.keys():
            ratios[d] = by_impl["ours"]["tokens_per_s"] / by_impl["hf"]["tokens_per_s"]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": machine_info(),
        "config": {
            "model": args.model, "num_layers": bench_config(args).num_hidden_layers, "seq_length": args.seq_length,
            "micro_batch_size": args.micro_batch_size,
            "accumulation": args.accumulation,
            "iters": args.iters, "warmup": args.warmup, "compile": args.compile, "recompute": args.recompute,
            "attention_backend": args.attention_backend,
            "fp8": f"{args.fp8_format} {args.fp8_recipe}" if args.fp8_format else None,
            "threads": args.threads, "profile": args.profile,
            "num_parameters": config.num_parameters(), "flops_per_token": config.flops_per_token(args.seq_length),
        },
        "matmul_size": {d: side for d, (_, side) in measured.items()},
        "peak_tflops": peaks,
        "torch_bf16_peak_tflops": torch_bf16_peak,
        "spec_peak_tflops": spec_peak,
        "results": results,
        "ratios": ratios,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker is not None:
        write_json_atomic(args.result, run_worker(args))
        return 0
    report = run_benchmark(args)
    print(format_table(report), flush=True)
    if args.json:
        write_json_atomic(args.json, report)
        print(f"wrote {args.json}", flush=True)
    return 0 if all("error" not in r for r in report["results"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
