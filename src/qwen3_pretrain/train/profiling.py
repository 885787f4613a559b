"""`--profile`: a torch.profiler window over the training iterations on the chosen ranks.

The window covers the steps taken from `--profile-step-start` completed iterations until
`--profile-step-end` (Megatron's counting: start 10, end 12 profiles the iterations logged as 11 and
12). At its end each profiled rank writes a Chrome/Perfetto trace (`rank{R}_iters{A}-{B}.pt.trace.json`,
open it in https://ui.perfetto.dev or chrome://tracing) and the top operators table (`key_averages`)
as `.txt` beside it, and prints the table. A run that stops inside the window writes what it recorded.
MindSpeed's `--profile-with-cpu` adds the CPU operators to an accelerator's kernels (on a CPU they are
all there is); `--profile-with-stack`, `--profile-with-memory` and `--profile-record-shapes` are
torch.profiler's `with_stack`, `profile_memory` and `record_shapes` (Megatron spells two of them
`--pytorch-profiler-collect-callstack` and `--pytorch-profiler-collect-shapes`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity

from qwen3_pretrain.config import TrainConfig
from qwen3_pretrain.distributed.device import device_module
from qwen3_pretrain.distributed.mesh import ParallelEnv

DEFAULT_SAVE_PATH = "profile_dir"  # MindSpeed's default, when the run has no TensorBoard or run directory
TABLE_ROWS = 25
_DEVICE_ACTIVITIES = {"cuda": ProfilerActivity.CUDA, "npu": ProfilerActivity.PrivateUse1}


def profile_save_path(config: TrainConfig) -> Path:
    """--profile-save-path, else `<tensorboard dir, else run dir>/profile`, else ./profile_dir."""
    log = config.logging
    if log.profile_save_path is not None:
        return Path(log.profile_save_path)
    parent = log.tensorboard_dir or log.run_dir or config.checkpoint.save
    return Path(parent) / "profile" if parent is not None else Path(DEFAULT_SAVE_PATH)


def profiler_activities(device: torch.device, with_cpu: bool) -> list[ProfilerActivity]:
    """The accelerator's kernels (where torch.profiler supports it), plus CPU operators with `with_cpu` or when
    nothing else is recorded."""
    device_activity = _DEVICE_ACTIVITIES.get(device.type)
    supported = torch.profiler.supported_activities()
    activities = [device_activity] if device_activity is not None and device_activity in supported else []
    if with_cpu or not activities:
        activities.append(ProfilerActivity.CPU)
    return activities


class StepProfiler:
    """Opens the profiler before the first step of the window and closes it after the last one; `close()`
    ends a window the run left open. Inactive on ranks not in --profile-ranks and without --profile."""

    def __init__(self, config: TrainConfig, env: ParallelEnv) -> None:
        log = config.logging
        ranks = log.profile_ranks
        self.active = log.profile and (-1 in ranks or env.rank in ranks)
        self.start, self.end = log.profile_step_start, log.profile_step_end
        self.config, self.env = config, env
        self.profiler: torch.profiler.profile | None = None
        self.first = 0

    def before_step(self, iteration: int) -> None:
        """Called with the number of completed iterations before each step."""
        if not self.active or self.profiler is not None or iteration < self.start:
            return
        if iteration >= self.end:
            self.active = False
            print(f"--profile: this run starts after iteration {iteration}, past --profile-step-end {self.end}; "
                  "nothing profiled", flush=True)
            return
        log = self.config.logging
        self.profiler = torch.profiler.profile(
            activities=profiler_activities(self.env.device, log.profile_with_cpu),
            record_shapes=log.profile_record_shapes or log.pytorch_profiler_collect_shapes,
            profile_memory=log.profile_with_memory,
            with_stack=log.profile_with_stack or log.pytorch_profiler_collect_callstack,
        )
        self.profiler.start()
        self.first = iteration + 1

    def after_step(self, iteration: int) -> float:
        """Called with the number of completed iterations after each step; returns the seconds spent writing
        the trace (kept out of the iteration timing)."""
        if self.profiler is None or iteration < self.end:
            return 0.0
        start = time.perf_counter()
        self.close(iteration)
        return time.perf_counter() - start

    def close(self, iteration: int) -> None:
        """End an open window at `iteration` (also when the run finished or stopped inside it): write the trace
        and the table, and print the table."""
        profiler, self.profiler = self.profiler, None
        if profiler is None:
            return
        self.active = False
        if self.env.device.type != "cpu":
            device_module(self.env.device.type).synchronize()
        profiler.stop()
        folder = profile_save_path(self.config)
        folder.mkdir(parents=True, exist_ok=True)
        stem = folder / f"rank{self.env.rank}_iters{self.first}-{iteration}"
        trace = stem.with_name(stem.name + ".pt.trace.json")
        profiler.export_chrome_trace(os.fspath(trace))
        device_recorded = any(a != ProfilerActivity.CPU for a in profiler.activities)
        table = profiler.key_averages().table(
            sort_by="self_device_time_total" if device_recorded else "self_cpu_time_total", row_limit=TABLE_ROWS
        )
        stem.with_name(stem.name + ".txt").write_text(table + "\n")
        print(f"profile of rank {self.env.rank}, iterations {self.first}-{iteration} (trace: {trace}):\n{table}",
              flush=True)
