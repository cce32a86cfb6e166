"""The batched core for any nn.Module: the oracle's computation vectorized over tasks.

torch.func.vmap maps one task's inner loop over the leading task dimension; torch.func.grad
gives the inner gradients. Ordinary autograd then differentiates through both, so the
meta-gradient is exact (second order) unless first_order detaches the inner gradients; that is the
`func` backend's second_order="graph" mode (pymaml.numerics.reverse_chain is its memory-efficient one).
Parameters and fixed state are shared by all tasks (not batched); see pymaml.numerics.state for how
buffers and normalization layers are treated, and pymaml.numerics.decomposed_norms for why those layers
are recomputed from primitives here.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ..nn import inner_step
from .decomposed_norms import DecomposedNorms
from .losses import LossFn
from .schedule import InnerLR, step_size


def loss_function(model: nn.Module, fixed: dict, loss_fn: LossFn, decompose_norms: bool = True):
    """One task's loss as a function of the adapted parameters: (params, x, y) -> scalar.

    decompose_norms=False keeps torch's own normalization kernels, whose first derivatives under
    vmap are right (only their second derivatives are not; pymaml.numerics.decomposed_norms): for values
    and gradients that are not differentiated again, at a fraction of the decomposition's memory."""

    def loss_at(params, x, y):
        if not decompose_norms:
            return loss_fn(functional_call(model, (params, fixed), (x,)), y)
        with DecomposedNorms():
            prediction = functional_call(model, (params, fixed), (x,))
        return loss_fn(prediction, y)

    return loss_at


def _inner_loop(loss_at, params, x, y, inner_lr: InnerLR, steps: int, first_order: bool):
    """[θ_0, ..., θ_S]: θ_{s+1} = θ_s − α_s ⊙ ∇L(θ_s)."""
    support_grad = grad(loss_at)
    thetas = [params]
    for step in range(steps):
        theta = thetas[-1]
        with inner_step(step):
            g = support_grad(theta, x, y)
        thetas.append({
            name: w - step_size(inner_lr, step, name) * (g[name].detach() if first_order else g[name])
            for name, w in theta.items()
        })
    return thetas


def task_query_losses(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    fixed: dict,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    query_x: torch.Tensor,
    query_y: torch.Tensor,
    *,
    inner_lr: InnerLR,
    inner_steps: int,
    first_order: bool,
    loss_fn: LossFn,
    step_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Query loss of each task after `inner_steps` SGD steps on its support set, shape [T];
    Σ_{s=1..S} w_s L_query(θ_s) when step weights w are given."""
    loss_at = loss_function(model, fixed, loss_fn)

    def one_task(sx, sy, qx, qy):
        thetas = _inner_loop(loss_at, params, sx, sy, inner_lr, inner_steps, first_order)
        if step_weights is None or inner_steps == 0:
            with inner_step(inner_steps):
                return loss_at(thetas[-1], qx, qy)
        total = 0.0
        for step, theta in enumerate(thetas[1:], start=1):
            with inner_step(step):
                total = total + step_weights[step - 1] * loss_at(theta, qx, qy)
        return total

    return vmap(one_task)(support_x, support_y, query_x, query_y)


def query_losses_at(model, params, fixed, query_x, query_y, *, loss_fn: LossFn) -> torch.Tensor:
    """Query loss of each task at the shared, unadapted parameters, shape [T]."""
    loss_at = loss_function(model, fixed, loss_fn)
    return vmap(loss_at, in_dims=(None, 0, 0))(params, query_x, query_y)


def adapt(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    fixed: dict,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    *,
    inner_lr: InnerLR,
    steps: int,
    first_order: bool,
    loss_fn: LossFn,
) -> dict[str, torch.Tensor]:
    """Per-task adapted parameters, each with a leading task dimension T."""
    loss_at = loss_function(model, fixed, loss_fn)

    def one_task(sx, sy):
        return _inner_loop(loss_at, params, sx, sy, inner_lr, steps, first_order)[-1]

    return vmap(one_task)(support_x, support_y)


def batched_forward(model: nn.Module, task_params: dict[str, torch.Tensor], fixed: dict, x: torch.Tensor,
                    step: int = 0):
    """The model's output for each task's inputs under that task's parameters: x [T, K, ...] -> [T, K, ...];
    `step`: the inner step those parameters come from (pymaml.nn.inner_step)."""

    def one_task(p, xt):
        with DecomposedNorms(), inner_step(step):
            return functional_call(model, (p, fixed), (xt,))

    return vmap(one_task)(task_params, x)
