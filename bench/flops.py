"""FLOPs the fused MLP meta-step performs, counted from its schedule (csrc/core/mlp_task.h).

Only the matrix products are counted (2 FLOPs per multiply-add); on the paper's sinusoid model
they are about 94% of the work, the rest being activations, losses and parameter updates.
"""

from __future__ import annotations


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
