"""Configuration as data: the Qwen3 model shape (`config.model`), the training run's settings and their
flags (`config.train`), and the pure rules a layout must follow (`config.layout`).

Nothing here touches disk beyond reading a recipe or config.json, devices or torch: `import
qwen3_pretrain.config` stays light, so `qwen3-pretrain train --help` starts fast, and every layer may
read it. Checks that need files, devices or the tokenizer run in `qwen3_pretrain.train.preflight`.
"""

from qwen3_pretrain.config.flags import build_parser, load_recipe, parse_train_args
from qwen3_pretrain.config.layout import PipelineLayout
from qwen3_pretrain.config.model import PRESETS, ConfigError, Qwen3Config, Qwen3MoeConfig, get_preset
from qwen3_pretrain.config.train import (
    ATTENTION_BACKENDS,
    CheckpointArgs,
    DataArgs,
    LoggingArgs,
    ModelArgs,
    MoEArgs,
    OptimizerArgs,
    ParallelArgs,
    PrecisionArgs,
    Resolved,
    ScheduleSteps,
    TrainConfig,
    TrainingArgs,
    flag_name,
    schedule_steps,
)

__all__ = [
    "ATTENTION_BACKENDS", "PRESETS", "CheckpointArgs", "ConfigError", "DataArgs", "LoggingArgs", "MoEArgs", "ModelArgs",
    "OptimizerArgs", "ParallelArgs", "PipelineLayout", "PrecisionArgs", "Qwen3Config", "Qwen3MoeConfig", "Resolved",
    "ScheduleSteps", "TrainConfig", "TrainingArgs", "build_parser", "flag_name", "get_preset", "load_recipe",
    "parse_train_args", "schedule_steps"
]
