"""FLOPs of a meta-step, counted.

MLPs: what the fused MLP meta-step performs, from its schedule (the per-task meta-step in
csrc/core/). Only the matrix products are counted (2 FLOPs per multiply-add); on the paper's
sinusoid model they are about 94% of the work, the rest being activations, losses and parameter
updates.

Convolutional nets (W3, W4): a nominal count for any implementation. F(n), the forward of n images,
is Σ over convolutions 2·H_out·W_out·C_out·k²·C_in plus 2·fan_in·fan_out per linear layer; per task
and inner step a support forward, its backward (2×) and, for second order, its HVP (6×); then 3×
the query forward at θ_S (forward and backward of the query loss).
"""

from __future__ import annotations

import torch
from torch import nn


def _layers(widths):
    return list(zip(widths[:-1], widths[1:]))


def forward_flops(widths, points):
    return sum(2 * points * n_in * n_out for n_in, n_out in _layers(widths))


def gradient_flops(widths, points):
    """Forward, weight gradients, and back-propagated deltas (not through the first layer)."""
    backward = sum(2 * points * n_in * n_out * (2 if l > 0 else 1) for l, (n_in, n_out) in enumerate(_layers(widths)))
    return forward_flops(widths, points) + backward


def hvp_flops(widths, points):
    """Forward, R-forward, and the backward of R(gW) and of δ, R(δ) (R-operator)."""
    total = forward_flops(widths, points)
    for l, (n_in, n_out) in enumerate(_layers(widths)):
        product = 2 * points * n_in * n_out
        total += product * (2 if l > 0 else 1)  # R(z) = a U^T (+ R(a) W^T)
        total += product * (2 if l > 0 else 1)  # R(gW) = R(δ)^T a (+ δ^T R(a))
        total += product * 3 if l > 0 else 0    # δ W, R(δ) W, δ U
    return total


def meta_step_flops(widths, tasks, support, query, steps, first_order=False):
    per_task = forward_flops(widths, query)  # the pre-adaptation query loss
    if steps == 0:
        return tasks * (per_task + gradient_flops(widths, query))
    per_task += steps * gradient_flops(widths, support)
    per_task += (steps - 1) * forward_flops(widths, query) + gradient_flops(widths, query)
    if not first_order:
        per_task += steps * hvp_flops(widths, support)
    return tasks * per_task


def image_forward_flops(model: nn.Module, image_shape) -> int:
    """Multiply-add FLOPs (2 per multiply-add) of the convolutions and linear layers in one forward
    of one image of image_shape (C, H, W); other layers are not counted."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1]
            total += 2 * output[0].numel() * kernel * module.in_channels // module.groups
        elif isinstance(module, nn.Linear):
            total += 2 * module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *image_shape, dtype=next(model.parameters()).dtype))
    finally:
        for hook in hooks:
            hook.remove()
    return total


def conv_meta_step_flops(model: nn.Module, image_shape, tasks, support, query, steps, first_order=False) -> int:
    """The nominal count of one meta-step (see the module docstring); support and query are the
    images per task."""
    image = image_forward_flops(model, image_shape)
    per_step = (1 + 2 + (0 if first_order else 6)) * support * image
    return tasks * (steps * per_step + 3 * query * image)
