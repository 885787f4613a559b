"""The `train` command line: argparse over the config schema, Megatron flags that do not apply here,
and `--config` YAML recipes -> a `TrainConfig` that passed every pure check.

Values come from, in increasing priority: the field defaults, the `--config` YAML file (a flat mapping
of flag names, dashes or underscores), then the command-line flags. Unknown flags are errors that
suggest the nearest known flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from pathlib import Path
from typing import Any

import yaml

from qwen3_pretrain.config.model import ConfigError
from qwen3_pretrain.config.train import (
    CONFIG_FLAG,
    FIELDS,
    IGNORED_FLAGS,
    SECTIONS,
    TrainConfig,
    check_fixed_by_qwen3,
    flag_name,
    suggest_flag,
)


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of exiting."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


def build_parser(prog: str = "qwen3-pretrain train") -> argparse.ArgumentParser:
    """The flag parser; only flags given on the command line appear in the namespace."""
    parser = _Parser(
        prog=prog, allow_abbrev=False, argument_default=argparse.SUPPRESS,
        description="Pretrain a Qwen3 model with Megatron/MindSpeed flags (flags override --config).",
    )
    parser.add_argument(CONFIG_FLAG, metavar="YAML", help="recipe: a YAML mapping of flag names to values")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        for f in dataclasses.fields(cls):
            base = FIELDS[f.name][1]
            kwargs: dict[str, Any] = {"dest": f.name, "help": f.metadata["help"]}
            if base is bool:
                kwargs["action"] = "store_true"
            elif base is list:
                kwargs["nargs"] = "+"
            else:
                kwargs["type"] = base
                kwargs["metavar"] = base.__name__.upper()
            group.add_argument(flag_name(f.name), **kwargs)
    return parser


def _take_ignored(argv: list[str]) -> tuple[list[str], list[str]]:
    """Remove ignored Megatron flags (and their values) from argv; return (rest, ignored flag names)."""
    rest: list[str] = []
    ignored: list[str] = []
    i = 0
    while i < len(argv):
        name, eq, inline = argv[i].partition("=")
        if name not in IGNORED_FLAGS:
            rest.append(argv[i])
            i += 1
            continue
        count = IGNORED_FLAGS[name]
        values = [inline] if eq else argv[i + 1 : i + 1 + count]
        if len(values) != count or any(v.startswith("--") for v in values):
            raise ConfigError(f"{name} expects {count} value(s)")
        check_fixed_by_qwen3(name, values, "command line")
        ignored.append(name)
        i += 1 + (0 if eq else count)
    return rest, ignored


def load_recipe(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[str]]:
    """A YAML recipe -> ({field name: value}, ignored flag names); ConfigError names the file and key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{CONFIG_FLAG} {path}: cannot read the file ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{CONFIG_FLAG} {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}, []
    if not isinstance(data, dict):
        raise ConfigError(f"{CONFIG_FLAG} {path} must hold a mapping of flag names to values")
    values: dict[str, Any] = {}
    ignored: list[str] = []
    for key, value in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        flag = flag_name(name)
        if flag in IGNORED_FLAGS:
            check_fixed_by_qwen3(flag, [value], str(path))
            ignored.append(flag)
            continue
        if name not in FIELDS:
            raise ConfigError(f"{path}: unknown setting {key!r}.{suggest_flag(flag)}")
        values[name] = value
    return values, ignored


def parse_train_args(argv: list[str], world_size: int | None = None) -> TrainConfig:
    """Flags (and the `--config` recipe they name) -> a TrainConfig that passed the pure checks for
    `world_size` processes (default $WORLD_SIZE or 1); `train.preflight` checks files and devices."""
    rest, ignored = _take_ignored(list(argv))
    namespace, unknown = build_parser().parse_known_args(rest)
    for token in unknown:
        if token.startswith("-"):
            raise ConfigError(f"unknown flag {token.partition('=')[0]}.{suggest_flag(token.partition('=')[0])}")
        raise ConfigError(f"unexpected value {token!r}: it follows no flag that takes a value")
    given = vars(namespace)
    values: dict[str, Any] = {}
    recipe = given.pop("config", None)
    if recipe is not None:
        values, recipe_ignored = load_recipe(recipe)
        ignored = recipe_ignored + ignored
    values.update(given)
    config = TrainConfig.from_flat(values, source=str(recipe) if recipe else "command line")
    config.ignored = list(dict.fromkeys(ignored))
    config.check(int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size)
    return config

