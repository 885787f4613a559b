"""Benchmark-only shims letting Megatron-LM's HEAD import on Python 3.11 without triton.

`benchmarks/preprocess.py` puts this folder on PYTHONPATH of its Megatron subprocesses only. Megatron
needs `typing.override` (Python >= 3.12: here a no-op decorator) and imports triton at module level
to define GPU kernels that preprocessing never runs: `import triton...` from a `megatron` module gets
a stand-in whose every attribute is a no-op decorator. Nothing enters sys.modules, so torch still
sees no triton.
"""

import builtins
import types
import typing
from typing import Any

if not hasattr(typing, "override"):
    typing.override = lambda f: f  # type: ignore[attr-defined]


class _Anything(types.ModuleType):
    __version__ = "3.4.0"

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything(f"{self.__name__}.{name}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return args[0] if len(args) == 1 and callable(args[0]) and not kwargs else self


_import = builtins.__import__


def _import_with_stand_in(
    name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0
) -> Any:
    importer = (globals or {}).get("__name__") or ""
    if level == 0 and name.partition(".")[0] == "triton" and importer.startswith("megatron"):
        return _Anything(name if fromlist else "triton")
    return _import(name, globals, locals, fromlist, level)


builtins.__import__ = _import_with_stand_in
