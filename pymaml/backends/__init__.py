"""Backends behind one interface (pymaml.backends.base.Backend), and how `auto` picks one.

`auto` tries the backends in AUTO_ORDER, fastest first, and takes the first that is available
in this process and supports the model and device. `reference` supports everything.

A fused backend (cuda, triton, cpp) supports a model only where it computes exactly what the
model computes (pymaml.backends.cpp says what that excludes: subclasses, hooks,
parametrizations, extra parameters, ...); `auto` then passes over it and the reason appears in
the choice's sentence (maml.backend_choice), while naming it explicitly raises that reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import cpp, func, reference, triton
from .base import Backend, MetaConfig, MetaOutput, TaskBatch

BACKENDS: dict[str, Backend] = {
    b.name: b for b in (cpp.CUDA_BACKEND, triton.BACKEND, cpp.BACKEND, func.BACKEND, reference.BACKEND)
}
# On CUDA tensors `cuda` comes before `triton`: neither has been timed on a GPU yet
# (bench/gpu_check.py times both; the faster one belongs first).
AUTO_ORDER: tuple[str, ...] = ("cuda", "triton", "cpp", "func", "reference")


@dataclass(frozen=True)
class BackendStatus:
    name: str
    usable: bool
    reason: str | None

    def __str__(self) -> str:
        return f"{self.name}: {'usable' if self.usable else 'not usable'}" + (f" ({self.reason})" if self.reason else "")


def available_backends() -> list[BackendStatus]:
    """Every backend, with whether it can run in this process and why not if not."""
    statuses = []
    for name, backend in BACKENDS.items():
        reason = backend.unavailable_reason()
        statuses.append(BackendStatus(name, reason is None, reason))
    return statuses


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose 'auto' or one of {sorted(BACKENDS)}")
    return BACKENDS[name]


def resolve(name: str, model: nn.Module, config: MetaConfig, device: torch.device) -> tuple[Backend, str]:
    """The backend to use and a sentence saying why; raises if an explicitly named one cannot serve."""
    if name != "auto":
        backend = get_backend(name)
        reason = backend.unavailable_reason() or backend.unsupported_reason(model, config, device)
        if reason is not None:
            raise RuntimeError(f"backend {name!r} cannot run this model on {device}: {reason}")
        return backend, f"backend {name!r} was requested"
    skipped = []
    for candidate in AUTO_ORDER:
        backend = BACKENDS[candidate]
        reason = (backend.unavailable_reason() or backend.unsupported_reason(model, config, device)
                  or backend.auto_skip_reason(device))
        if reason is None:
            because = f" (skipped: {'; '.join(skipped)})" if skipped else ""
            return backend, f"auto picked {candidate!r} on {device}{because}"
        skipped.append(f"{candidate}: {reason}")
    raise RuntimeError("no backend supports this model: " + "; ".join(skipped))


__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "Backend",
    "BackendStatus",
    "MetaConfig",
    "MetaOutput",
    "TaskBatch",
    "available_backends",
    "get_backend",
    "resolve",
]
