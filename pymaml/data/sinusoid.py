"""The sinusoid regression task family of Finn et al. (2017)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class SinusoidBatch(NamedTuple):
    """Sinusoid tasks: x and y are [T, K, 1]; amplitude and phase are [T]."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    amplitude: torch.Tensor
    phase: torch.Tensor

    @property
    def tasks(self):
        """The four tensors MAML takes: (support_x, support_y, query_x, query_y)."""
        return self.support_x, self.support_y, self.query_x, self.query_y


class Sinusoid:
    """The regression family of Finn et al. (2017): y = A·sin(x − φ).

    A ~ U[0.1, 5.0], φ ~ U[0, π], x ~ U[−5, 5], drawn from a torch.Generator seeded with `seed`,
    so the same seed gives the same sequence of batches. `generator` exposes that state (for
    checkpoints).
    """

    AMPLITUDE = (0.1, 5.0)
    PHASE = (0.0, math.pi)
    X_RANGE = (-5.0, 5.0)

    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float32):
        self.generator = torch.Generator().manual_seed(seed)
        self.dtype = dtype

    def _uniform(self, shape, bounds) -> torch.Tensor:
        low, high = bounds
        return low + (high - low) * torch.rand(shape, generator=self.generator, dtype=torch.float64)

    def sample(self, tasks: int, shots: int, queries: int | None = None) -> SinusoidBatch:
        """`tasks` tasks with `shots` support points and `queries` query points each (default: shots)."""
        queries = shots if queries is None else queries
        for name, value in (("tasks", tasks), ("shots", shots), ("queries", queries)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        amplitude = self._uniform((tasks,), self.AMPLITUDE)
        phase = self._uniform((tasks,), self.PHASE)
        x = self._uniform((tasks, shots + queries, 1), self.X_RANGE)
        y = self.function(x, amplitude, phase)
        x, y = x.to(self.dtype), y.to(self.dtype)
        parts = [t.contiguous() for t in (x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])]
        return SinusoidBatch(*parts, amplitude, phase)

    @staticmethod
    def function(x: torch.Tensor, amplitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        """A·sin(x − φ) for x [T, K, 1] and per-task A, φ [T]."""
        return amplitude[:, None, None] * torch.sin(x - phase[:, None, None])
