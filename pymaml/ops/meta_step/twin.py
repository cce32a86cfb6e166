"""The pure-torch twins of the fused ops: torch.func over the network's torch forward
(network.network_apply), with the ops' signatures. They are the ops' fallback where the extension
(or its CUDA launcher) is missing, and what the tests compare the kernels with."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from .network import network_apply


def task_loss(prediction: Tensor, target: Tensor, loss: str) -> Tensor:
    """A task's loss: the mean squared error over points and outputs, or the mean cross-entropy."""
    if loss == "mse":
        return (prediction - target).square().mean()
    return torch.nn.functional.cross_entropy(prediction, target)


def meta_step_torch(
    theta: Tensor, lrs: Tensor, step_weights: Tensor, support_x: Tensor, support_y: Tensor, query_x: Tensor,
    query_y: Tensor, layers: list[int], layer_constants: list[float], loss: str, first_order: bool, lr_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The twin of pymaml::meta_step (torch.func vmap over tasks, autograd for the gradients)."""
    steps = lrs.shape[0]
    with torch.enable_grad():
        theta = theta.detach().requires_grad_()
        lrs = lrs.detach().requires_grad_(lr_grad)

        def loss_at(parameters, x, y, step):
            return task_loss(network_apply(parameters, x, layers, layer_constants, step), y, loss)

        def one_task(sx, sy, qx, qy):
            current, total, step_losses = theta, 0.0, []
            for s in range(steps):
                g = grad(loss_at)(current, sx, sy, s)
                current = current - lrs[s] * (g.detach() if first_order else g)
                step_losses.append(loss_at(current, qx, qy, s + 1))
                total = total + step_weights[s] * step_losses[-1]
            pre = loss_at(theta, qx, qy, 0)
            if steps == 0:
                total = pre
            stacked = torch.stack(step_losses) if steps else pre.new_zeros(0)
            return total, pre, stacked

        task_losses, pre_losses, step_losses = vmap(one_task)(support_x, support_y, query_x, query_y)
        meta_loss = task_losses.mean()
        inputs = [theta, lrs] if lr_grad else [theta]
        grads = torch.autograd.grad(meta_loss, inputs, allow_unused=True, materialize_grads=True)
    grad_lrs = grads[1] if lr_grad else lrs.new_zeros(0, theta.shape[0])
    return (meta_loss.detach(), task_losses.detach(), pre_losses.detach(), step_losses.mean(0).detach(),
            grads[0], grad_lrs.detach())


def hvp_torch(theta: Tensor, v: Tensor, x: Tensor, y: Tensor, layers: list[int], layer_constants: list[float],
              loss: str) -> Tensor:
    """The twin of pymaml::hvp: vmap over tasks of jvp(grad(L)) (forward-over-reverse)."""

    def loss_at(parameters, xt, yt):
        return task_loss(network_apply(parameters, xt, layers, layer_constants), yt, loss)

    def one_task(theta_t, v_t, x_t, y_t):
        return jvp(lambda p: grad(loss_at)(p, x_t, y_t), (theta_t,), (v_t,))[1]

    return vmap(one_task)(theta.detach(), v.detach(), x, y)
