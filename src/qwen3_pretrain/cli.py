"""The `qwen3-pretrain` command: one entry point that dispatches to subcommand modules.

Each subcommand lives in its own module with a `main(argv) -> int` function and is imported only
when called, so `qwen3-pretrain --help` stays fast and one command's dependencies never slow another.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module with main(argv), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("qwen3_pretrain.demo", "the whole pipeline on an embedded corpus: tokenizer, data, train, export, sample"),
    "train": ("qwen3_pretrain.train.cli", "pretrain with Megatron/MindSpeed flags (--config YAML, --nproc-per-node N)"),
    "plot": ("qwen3_pretrain.train.plot", "draw loss/lr/throughput curves of a run to a PNG (plot RUN_DIR)"),
    "export": ("qwen3_pretrain.checkpoint.export", "export a native checkpoint to HF safetensors + config + tokenizer"),
    "tokenizer": ("qwen3_pretrain.tokenizer", "build the offline Qwen3 tokenizer (tokenizer build OUT_DIR)"),
    "plan": ("qwen3_pretrain.distributed.planner", "estimate memory and speed of every parallel layout"),
    "preprocess": ("qwen3_pretrain.data.preprocess", "tokenize text into Megatron .bin/.idx (MindSpeed flags)"),
    "data": ("qwen3_pretrain.data.info", "inspect tokenized data (data info PREFIX)"),
    "convert": ("qwen3_pretrain.checkpoint.convert", "convert checkpoints HF <-> Megatron/MindSpeed mcore (any TP/PP)"),
    "checkpoint": ("qwen3_pretrain.checkpoint.verify", "verify native checkpoints' checksums (checkpoint verify DIR)"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: qwen3-pretrain COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Run `qwen3-pretrain COMMAND --help` for the flags of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch `qwen3-pretrain COMMAND ...` to the command's module."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from qwen3_pretrain import __version__

        print(f"qwen3-pretrain {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" Did you mean `{close[0]}`?" if close else ""
        print(f"qwen3-pretrain: unknown command {name!r}.{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
