"""The oracle: MAML written as plainly as possible. Every backend is tested against it.

For each task t: θ_0 = θ, θ_{s+1} = θ_s - α_s ∇L(support_t; θ_s) for s < S, and the task's
loss is L(query_t; θ_S), or Σ_{s=1..S} w_s L(query_t; θ_s) with step weights w (MAML++'s
multi-step loss). The meta-loss is the mean over tasks. With first_order=True the inner
gradients are taken without a graph, so the H_s terms of the meta-gradient vanish. α_s is a
number or learned per step and parameter (pymaml.numerics.schedule). With `adapt` (a set of parameter
names) only those parameters take inner steps; the others stay at θ (ANIL).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from .nn import inner_step
from .numerics.losses import LossFn, resolve_loss
from .numerics.schedule import InnerLR, step_size
from .numerics.state import adapted_parameters, fixed_state


def _loss_at(model, params, fixed, loss_fn, x, y):
    return loss_fn(functional_call(model, (params, fixed), (x,)), y)


def adapt_task(model, params, fixed, loss_fn, x, y, inner_lr, steps, first_order, adapt=None):
    """S plain SGD steps on one task's support set, differentiable unless first_order."""
    return adapt_task_steps(model, params, fixed, loss_fn, x, y, inner_lr, steps, first_order, adapt)[-1]


def adapt_task_steps(model, params, fixed, loss_fn, x, y, inner_lr: InnerLR, steps, first_order, adapt=None):
    """[θ_0, θ_1, ..., θ_S] for one task; only the parameters named in `adapt` move (all if None)."""
    thetas = [dict(params)]
    for step in range(steps):
        theta = thetas[-1]
        moving = [name for name in theta if adapt is None or name in adapt]
        with inner_step(step):
            loss = _loss_at(model, theta, fixed, loss_fn, x, y)
        if loss.requires_grad:
            grads = torch.autograd.grad(
                loss, [theta[name] for name in moving], create_graph=not first_order, materialize_grads=True
            )
        else:  # no parameter that requires grad reaches the loss (frozen layers): every gradient is zero
            grads = [torch.zeros_like(theta[name]) for name in moving]
        updated = dict(theta)
        for name, g in zip(moving, grads):
            updated[name] = theta[name] - step_size(inner_lr, step, name) * g
        thetas.append(updated)
    return thetas


def task_query_losses(
    model: nn.Module,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    query_x: torch.Tensor,
    query_y: torch.Tensor,
    *,
    inner_lr: InnerLR,
    inner_steps: int,
    first_order: bool = False,
    loss: str | LossFn = "mse",
    params: dict[str, torch.Tensor] | None = None,
    step_weights: torch.Tensor | None = None,
    adapt=None,
) -> torch.Tensor:
    """Query loss of each task after adaptation (weighted over steps if step_weights is given), shape [T]."""
    loss_fn = resolve_loss(loss)
    params = adapted_parameters(model) if params is None else params
    fixed = fixed_state(model)
    losses = []
    for t in range(support_x.shape[0]):
        thetas = adapt_task_steps(
            model, params, fixed, loss_fn, support_x[t], support_y[t], inner_lr, inner_steps, first_order, adapt
        )
        if step_weights is None or inner_steps == 0:
            with inner_step(inner_steps):
                losses.append(_loss_at(model, thetas[-1], fixed, loss_fn, query_x[t], query_y[t]))
        else:
            query_losses = []
            for step, theta in enumerate(thetas[1:], start=1):
                with inner_step(step):
                    query_losses.append(_loss_at(model, theta, fixed, loss_fn, query_x[t], query_y[t]))
            losses.append(sum(w * loss for w, loss in zip(step_weights, query_losses)))
    return torch.stack(losses)


def meta_loss(model, support_x, support_y, query_x, query_y, **options) -> torch.Tensor:
    """The meta-loss: the mean over tasks of the adapted query loss."""
    return task_query_losses(model, support_x, support_y, query_x, query_y, **options).mean()
