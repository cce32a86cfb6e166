"""Inner step sizes: a number, or learned values per step and parameter.

`inner_lr` is either a number α, or a list over inner steps of {parameter name: α_s} where α_s
is a scalar tensor or a tensor of the parameter's shape. Adapting for more steps than the
list holds repeats its last entry (as MAML++ and Meta-SGD do when evaluating with more steps).
"""

from __future__ import annotations

from typing import Mapping, Sequence, Union

import torch

InnerLR = Union[float, Sequence[Mapping[str, torch.Tensor]]]


def step_size(inner_lr: InnerLR, step: int, name: str):
    """α for parameter `name` at inner step `step` (0-based)."""
    if isinstance(inner_lr, (int, float)):
        return inner_lr
    if len(inner_lr) == 0:
        raise ValueError("there are no learned inner step sizes (inner_steps=0 with per-step learned step sizes)")
    return inner_lr[min(step, len(inner_lr) - 1)][name]
