"""How a module's state is split for functional calls.

The inner loop adapts every parameter that requires grad. Frozen parameters and buffers pass
through unchanged. A normalization layer in training mode (BatchNorm, InstanceNorm) normalizes
with the statistics of the batch it is given, that is the task's support or query set, and
pymaml never updates its running statistics; in eval mode it uses its running statistics as
they are. Every backend, the oracle included, follows this rule, so their results agree.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

RUNNING_STAT_NAMES = ("running_mean", "running_var", "num_batches_tracked")


def adapted_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters the inner loop adapts: those that require grad."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def fixed_state(model: nn.Module) -> dict[str, torch.Tensor | None]:
    """Frozen parameters and buffers, with running statistics hidden from normalization layers in training mode."""
    fixed: dict[str, torch.Tensor | None] = {
        name: p for name, p in model.named_parameters() if not p.requires_grad
    }
    fixed.update(model.named_buffers())
    for module_name, module in model.named_modules():
        if isinstance(module, _NormBase) and module.training:
            prefix = f"{module_name}." if module_name else ""
            for stat in RUNNING_STAT_NAMES:
                if f"{prefix}{stat}" in fixed:
                    fixed[f"{prefix}{stat}"] = None
    return fixed
