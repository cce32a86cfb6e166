"""Fused ops, registered with torch.library. Each has a pure-torch twin with the same signature."""

from .meta_step import encode_mlp, hvp, hvp_torch, meta_step, meta_step_torch

__all__ = ["encode_mlp", "hvp", "hvp_torch", "meta_step", "meta_step_torch"]
