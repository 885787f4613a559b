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

from qwen3_pretrain.config.flag_table import LAUNCHER_FLAGS, Treatment, treatment
from qwen3_pretrain.config.model import ConfigError
from qwen3_pretrain.config.train import (
    CONFIG_FLAG,
    FIELDS,
    SECTION_TITLES,
    SECTIONS,
    TrainConfig,
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
        group = parser.add_argument_group(SECTION_TITLES[section])
        for f in dataclasses.fields(cls):
            base = FIELDS[f.name][1]
            kwargs: dict[str, Any] = {"dest": f.name, "help": f.metadata["help"]}
            if base is bool:
                kwargs["action"] = "store_true"
            elif typing.get_origin(base) is list:
                kwargs["nargs"] = "+"
            else:
                kwargs["type"] = base
                kwargs["metavar"] = base.__name__.upper()
            group.add_argument(flag_name(f.name), **kwargs)
    return parser


def flag_treatment(flag: str) -> Treatment | None:
    """How `train` treats `flag`: implemented (a schema field, --config, --help) or the flag table's treatment."""
    name = flag.lstrip("-").replace("-", "_")
    if name in FIELDS:
        section, _ = FIELDS[name]
        field = next(f for f in dataclasses.fields(SECTIONS[section]) if f.name == name)
        return Treatment("implemented", field.metadata["help"])
    if flag == CONFIG_FLAG:
        return Treatment("implemented", "a YAML recipe of flags")
    if flag == "--help":
        return Treatment("implemented", "this help")
    return treatment(flag)


def help_epilog() -> str:
    """The end of `train --help`: the launcher's flags and where the other Megatron/MindSpeed flags are listed."""
    width = max(map(len, LAUNCHER_FLAGS)) + 4
    lines = ["launcher (qwen3-pretrain train starts torchrun; torchrun's underscore spellings work too):"]
    lines += [f"  {usage:<{width}}{what}" for usage, what in LAUNCHER_FLAGS.items()]
    lines += ["", "Every other Megatron-LM / MindSpeed flag is either accepted without effect on results (listed "
              "in the startup summary) or refused with a reason: docs/flags.md lists each one."]
    return "\n".join(lines)


def _table_flag(flag: str, values: list[str], source: str) -> str | None:
    """Check one non-schema flag against the flag table; returns it when accepted (no effect), raises when not."""
    found = treatment(flag)
    if found is None:
        return None
    if found.kind == "refused":
        raise ConfigError(f"{source}: {flag} is not supported by qwen3-pretrain: {found.reason}")
    if found.kind == "qwen3-fixed" and str(values[0]) not in found.accepted:
        raise ConfigError(f"{source}: {flag} {values[0]} is not supported: Qwen3 uses {found.accepted[0]}")
    return flag


def _take_table_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """Remove the flags of the flag table (and their values) from argv; return (rest, accepted flag names).

    Schema flags and unknown flags stay in `rest` for argparse; a refused flag raises ConfigError.
    """
    rest: list[str] = []
    accepted: list[str] = []
    i = 0
    while i < len(argv):
        name, eq, inline = argv[i].partition("=")
        found = treatment(name) if name.startswith("--") and name.lstrip("-").replace("-", "_") not in FIELDS else None
        if found is None:
            rest.append(argv[i])
            i += 1
            continue
        following = [] if eq else argv[i + 1 :]
        count = next((n for n, v in enumerate(following) if v.startswith("--")), len(following))
        wanted = count if found.values == "+" else int(found.values)
        values = [inline] if eq else following[:wanted]
        if len(values) != wanted or (found.values == "+" and not values):
            raise ConfigError(f"{name} expects {found.values if found.values != '+' else 'one or more'} value(s)")
        if _table_flag(name, values, "command line"):
            accepted.append(name)
        i += 1 + (0 if eq else len(values))
    return rest, accepted


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
        if name not in FIELDS and _table_flag(flag, [value], str(path)):
            ignored.append(flag)
            continue
        if name not in FIELDS:
            raise ConfigError(f"{path}: unknown setting {key!r}.{suggest_flag(flag)}")
        values[name] = value
    return values, ignored


def parse_train_args(argv: list[str], world_size: int | None = None) -> TrainConfig:
    """Flags (and the `--config` recipe they name) -> a TrainConfig that passed the pure checks for
    `world_size` processes (default $WORLD_SIZE or 1); `train.preflight` checks files and devices."""
    rest, ignored = _take_table_flags(list(argv))
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



def flags_markdown(upstream: list[tuple[str, str, str]]) -> str:
    """docs/flags.md: each upstream (flag, source, group) with its treatment, grouped by treatment."""
    kinds = {
        "implemented": "Implemented (Megatron's meaning and default unless the help says otherwise)",
        "launcher": "Taken by the launcher (`qwen3-pretrain train` starts torchrun)",
        "speed-only": "Accepted without effect on results (speed/memory/logging switches; listed at startup)",
        "qwen3-fixed": "Accepted when the value describes Qwen3",
        "refused": "Refused, with the reason",
        "unknown": "Unknown (not yet classified: refused as an unknown flag)",
    }
    rows: dict[str, list[str]] = {kind: [] for kind in kinds}
    for flag, source, group in upstream:
        found = flag_treatment(flag)
        kind = found.kind if found is not None else "unknown"
        reason = found.reason if found is not None else ""
        rows[kind].append(f"| `{flag}` | {source} | {group} | {reason} |")
    lines = [
        "# Megatron-LM and MindSpeed flags in `qwen3-pretrain train`",
        "",
        "Generated by `python scripts/flags_doc.py` from `tests/data/upstream_flags.tsv` (the flag names of",
        "Megatron-LM's and MindSpeed's argument parsers) and the flag table in `src/qwen3_pretrain/config/`.",
        "A flag that changes results is either implemented with its meaning or refused: none is silently accepted.",
        "",
        "| treatment | flags |",
        "|---|---|",
        *(f"| {title} | {len(rows[kind])} |" for kind, title in kinds.items() if rows[kind]),
    ]
    for kind, title in kinds.items():
        if rows[kind]:
            lines += ["", f"## {title}", "", "| flag | from | group | what it does here |", "|---|---|---|---|"]
            lines += rows[kind]
    return "\n".join(lines) + "\n"


def read_upstream_flags(path: str | os.PathLike[str]) -> list[tuple[str, str, str]]:
    """The (flag, source, group) rows of a tab-separated upstream flag list (lines starting with # skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if line and not line.startswith("#"):
            flag, source, group = line.split("\t")
            rows.append((flag, source, group))
    return rows
