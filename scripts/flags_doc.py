"""Write docs/flags.md: every upstream Megatron-LM / MindSpeed flag with its treatment in `qwen3-pretrain train`.

Usage: python scripts/flags_doc.py   (from the repository root, after changing the flag table or the schema)
"""

from pathlib import Path

from qwen3_pretrain.config.flags import flags_markdown, read_upstream_flags

ROOT = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    target = ROOT / "docs" / "flags.md"
    target.write_text(flags_markdown(read_upstream_flags(ROOT / "tests" / "data" / "upstream_flags.tsv")))
    print(f"wrote {target}")
