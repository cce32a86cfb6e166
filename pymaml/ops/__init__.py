"""Fused ops, registered with torch.library. Each has a pure-torch twin with the same signature."""

from .mlp_hvp import mlp_hvp, mlp_hvp_torch
from .mlp_meta_step import mlp_meta_step, mlp_meta_step_torch

__all__ = ["mlp_hvp", "mlp_hvp_torch", "mlp_meta_step", "mlp_meta_step_torch"]
