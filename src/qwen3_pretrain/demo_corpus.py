"""A small English corpus that every machine with Python has: the standard library's docstrings."""

from __future__ import annotations

import ast
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

_SKIPPED_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "__pycache__", "turtledemo"}


def _stdlib_sources() -> Iterator[Path]:
    """The standard library's .py files, in a fixed order, without its test suites."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in _SKIPPED_DIRS)
        for name in sorted(files):
            if name.endswith(".py"):
                yield Path(directory) / name


def _docstrings(source: str) -> Iterator[str]:
    """Module, class and function docstrings of one source file, in order of appearance."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node)
            if text and len(text) >= 80:
                yield text


def stdlib_documents(max_documents: int) -> list[str]:
    """Up to `max_documents` docstrings (>= 80 characters) from the standard library."""
    documents: list[str] = []
    for path in _stdlib_sources():
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for text in _docstrings(source):
            documents.append(text)
            if len(documents) >= max_documents:
                return documents
    return documents


def write_corpus_parquet(path: Path, max_documents: int) -> int:
    """Write the corpus as an Alpaca-style parquet with a `text` column; returns the document count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    documents = stdlib_documents(max_documents)
    if not documents:
        raise RuntimeError(f"no docstrings found under {sysconfig.get_paths()['stdlib']}; cannot build the demo corpus")
    table = pa.table({"text": documents})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, row_group_size=1000)
    os.replace(tmp, path)
    return len(documents)
