"""Loads the optional compiled core `pymaml._C` and reports why when it is missing."""

from __future__ import annotations

import importlib
import os
from typing import Any

try:
    _C = importlib.import_module("pymaml._C")
    EXTENSION_ERROR: str | None = None
except ImportError as error:  # built with PYMAML_NO_EXTENSION=1, or the build failed
    _C = None
    EXTENSION_ERROR = f"pymaml._C is not importable ({error}); reinstall without PYMAML_NO_EXTENSION=1"

CPU_LEVEL_VARIABLE = "PYMAML_CPU_LEVEL"


def _apply_cpu_level_variable() -> None:
    """PYMAML_CPU_LEVEL=<level> runs the CPU kernels of that ISA level, as _C.set_cpu_level does;
    a level this build or CPU lacks is an error at import rather than a silent fallback."""
    level = os.environ.get(CPU_LEVEL_VARIABLE, "").strip()
    if not level:
        return
    if _C is None:
        raise ImportError(f"{CPU_LEVEL_VARIABLE}={level} is set but {EXTENSION_ERROR}")
    try:
        _C.set_cpu_level(level)
    except ValueError as error:
        raise ImportError(f"{CPU_LEVEL_VARIABLE}={level}: {error}") from None


_apply_cpu_level_variable()


def extension():
    """The compiled module, or None when it is not built."""
    return _C


def cpu_level_lines(info: dict[str, Any]) -> list[str]:
    """What `pymaml backends` says of the CPU kernels: the level that runs and why, and every level
    compiled in, marking those this CPU cannot run."""
    if not info.get("extension"):
        return [f"CPU kernels: none ({info.get('reason')})"]
    runs, runnable = info["cpu_level"], info["cpu_levels"]
    variable = os.environ.get(CPU_LEVEL_VARIABLE, "").strip()
    if runs != runnable[0]:
        why = f"chosen by {CPU_LEVEL_VARIABLE}={variable}" if variable == runs else "chosen by set_cpu_level"
    else:
        why = "the best this CPU runs"
    compiled = [level if level in runnable else f"{level} (this CPU lacks its instructions)"
                for level in info["cpu_levels_compiled"]]
    return [f"CPU kernels: {runs} runs ({why})", f"CPU kernels compiled in: {', '.join(compiled)}"]


def build_info() -> dict[str, Any]:
    """How the compiled core was built: compiler, flags, OpenMP, CUDA archs; or why it is absent."""
    if _C is None:
        return {"extension": False, "reason": EXTENSION_ERROR}
    info = dict(_C.build_info())
    info["extension"] = True
    return info
