"""Loads the optional compiled core `pymaml._C` and reports why when it is missing."""

from __future__ import annotations

import importlib
from typing import Any

try:
    _C = importlib.import_module("pymaml._C")
    EXTENSION_ERROR: str | None = None
except ImportError as error:  # built with PYMAML_NO_EXTENSION=1, or the build failed
    _C = None
    EXTENSION_ERROR = f"pymaml._C is not importable ({error}); reinstall without PYMAML_NO_EXTENSION=1"


def extension():
    """The compiled module, or None when it is not built."""
    return _C


def build_info() -> dict[str, Any]:
    """How the compiled core was built: compiler, flags, OpenMP, CUDA archs; or why it is absent."""
    if _C is None:
        return {"extension": False, "reason": EXTENSION_ERROR}
    info = dict(_C.build_info())
    info["extension"] = True
    return info
