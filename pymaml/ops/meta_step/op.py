"""pymaml::meta_step: the whole MAML meta-step of a network over a batch of tasks, in one call.

Per task, with θ the flattened parameters (module order) and α_s = lrs[s]:
  g_s = ∇L_support(θ_s), θ_{s+1} = θ_s − α_s ⊙ g_s (s = 0..S−1);
  task loss Σ_{s=1..S} w_s L_query(θ_s) (S = 0: L_query(θ_0)).
Returns means over tasks of the loss and of its exact gradients with respect to θ, lrs and the
step weights w (first_order drops the Hessian terms), plus per-task losses. The forward
computes the gradients; the registered backward only scales them by the incoming gradient.

Schema: (theta [P], lrs [S, P], step_weights [S], support_x [T, Ks, n_0], support_y, query_x,
query_y, layers, layer_constants, loss, first_order, lr_grad) ->
(meta_loss [], task_losses [T], pre_losses [T], step_losses [S], grad_theta [P], grad_lrs [S or 0, P]).
The network is the one layers and layer_constants encode (network.py; an MLP through
network.encode_mlp), each point's input [C, H, W] flattened to n_0 values in torch's order.
Targets are [T, K, n_L] floats for "mse" and [T, K] int64 labels for "cross_entropy".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..._extension import extension
from .cpu import fused_cpu
from .cuda import cuda_kernel_available, fused_cuda
from .twin import meta_step_torch

# The op's arguments after the tensors: the network, the loss and the flags (the schema's order).
NON_TENSOR_ARGUMENTS = 5


def fused_forward(theta, lrs, step_weights, support_x, support_y, query_x, query_y, layers, layer_constants, loss,
                  first_order, lr_grad, all_step_losses=True):
    """The op's outputs, computed by the fused kernel for the tensors' device, or by the twin
    where the extension (or its CUDA launcher) is missing. No autograd. all_step_losses=False
    lets the kernel skip the query losses of steps with weight zero (step_losses then holds NaN
    there), for callers that do not differentiate with respect to the step weights."""
    arguments = (theta, lrs, step_weights, support_x, support_y, query_x, query_y, layers, layer_constants, loss,
                 first_order, lr_grad)
    if theta.device.type == "cpu" and extension() is not None:
        return fused_cpu(*arguments, all_step_losses)
    if theta.device.type == "cuda" and cuda_kernel_available():
        return fused_cuda(*arguments, all_step_losses)
    return meta_step_torch(*arguments)


def _backward_formula(lr_grad, saved, grad_meta_loss):
    if torch.is_grad_enabled():
        raise RuntimeError(
            "pymaml::meta_step computes its gradients inside the forward pass, so its backward cannot be "
            "differentiated again (create_graph=True); use backend='func' or 'reference' for higher derivatives"
        )
    grad_theta, grad_lrs, step_losses = saved
    return (grad_meta_loss * grad_theta, grad_meta_loss * grad_lrs if lr_grad else None, grad_meta_loss * step_losses)


@torch.library.custom_op("pymaml::meta_step", mutates_args=())
def meta_step_op(
    theta: Tensor, lrs: Tensor, step_weights: Tensor, support_x: Tensor, support_y: Tensor, query_x: Tensor,
    query_y: Tensor, layers: list[int], layer_constants: list[float], loss: str, first_order: bool, lr_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return fused_forward(theta, lrs, step_weights, support_x, support_y, query_x, query_y, layers, layer_constants,
                         loss, first_order, lr_grad)


def meta_step_fake(theta, lrs, step_weights, support_x, support_y, query_x, query_y, layers, layer_constants, loss,
                   first_order, lr_grad):
    """The op's output shapes (the fake kernel of every implementation of the schema)."""
    tasks, steps, params = support_x.shape[0], lrs.shape[0], theta.shape[0]
    return (theta.new_empty(()), theta.new_empty(tasks), theta.new_empty(tasks), theta.new_empty(steps),
            theta.new_empty(params), theta.new_empty(steps if lr_grad else 0, params))


def meta_step_setup_context(ctx, inputs, output):
    _, task_losses, pre_losses, step_losses, grad_theta, grad_lrs = output
    ctx.lr_grad = inputs[-1]
    ctx.save_for_backward(grad_theta, grad_lrs, step_losses)
    ctx.mark_non_differentiable(task_losses, pre_losses, step_losses, grad_theta, grad_lrs)


def meta_step_backward(ctx, grad_meta_loss, *_non_differentiable):
    return (*_backward_formula(ctx.lr_grad, ctx.saved_tensors, grad_meta_loss), *([None] * (4 + NON_TENSOR_ARGUMENTS)))


meta_step_op.register_fake(meta_step_fake)
meta_step_op.register_autograd(meta_step_backward, setup_context=meta_step_setup_context)


@dataclass(frozen=True)
class FusedImplementation:
    """One implementation of the pymaml::meta_step schema: `forward` gives the outputs without
    autograd (eager), `op` is its registered torch.library op (under torch.compile)."""

    forward: Callable
    op: Callable


NATIVE_IMPLEMENTATION = FusedImplementation(fused_forward, meta_step_op)


class _EagerMetaStep(torch.autograd.Function):
    """The registered op's forward and backward without the dispatcher's Python round trips
    (bench/RESULTS.md gives their cost), used outside torch.compile. θ arrives as one or more tensors that
    are flattened and concatenated in order (a model's parameters, or one flat theta), so that
    the gradient reaches each tensor without a cat node in the graph."""

    @staticmethod
    def forward(ctx, implementation, lrs, step_weights, support_x, support_y, query_x, query_y, layers,
                layer_constants, loss, first_order, lr_grad, all_step_losses, *theta_parts):
        theta = theta_parts[0].reshape(-1) if len(theta_parts) == 1 else torch.cat([p.reshape(-1) for p in theta_parts])
        output = implementation.forward(theta, lrs, step_weights, support_x, support_y, query_x, query_y, layers,
                                        layer_constants, loss, first_order, lr_grad, all_step_losses=all_step_losses)
        _, task_losses, pre_losses, step_losses, grad_theta, grad_lrs = output
        ctx.lr_grad = lr_grad
        ctx.shapes = [p.shape for p in theta_parts]
        ctx.save_for_backward(grad_theta, grad_lrs, step_losses)
        ctx.mark_non_differentiable(task_losses, pre_losses, step_losses, grad_theta, grad_lrs)
        return output

    @staticmethod
    def backward(ctx, grad_meta_loss, *_non_differentiable):
        grad_theta, grad_lrs, grad_step_weights = _backward_formula(ctx.lr_grad, ctx.saved_tensors, grad_meta_loss)
        if len(ctx.shapes) == 1:
            parts = (grad_theta.view(ctx.shapes[0]),)
        else:
            parts = tuple(g.view(shape) for g, shape in
                          zip(grad_theta.split([shape.numel() for shape in ctx.shapes]), ctx.shapes))
        return (None, grad_lrs, grad_step_weights, *([None] * (5 + NON_TENSOR_ARGUMENTS)), *parts)


def meta_step(
    theta: Tensor, lrs: Tensor, step_weights: Tensor, support_x: Tensor, support_y: Tensor, query_x: Tensor,
    query_y: Tensor, layers: list[int], layer_constants: list[float], loss: str, first_order: bool, lr_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """pymaml::meta_step (see the module docstring); under torch.compile the registered op."""
    return meta_step_from_parts([theta], lrs, step_weights, support_x, support_y, query_x, query_y, layers,
                                layer_constants, loss, first_order, lr_grad)


def meta_step_from_parts(
    theta_parts: list[Tensor], lrs: Tensor, step_weights: Tensor, support_x: Tensor, support_y: Tensor,
    query_x: Tensor, query_y: Tensor, layers: list[int], layer_constants: list[float], loss: str, first_order: bool,
    lr_grad: bool, all_step_losses: bool = True, implementation: FusedImplementation | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """meta_step with θ the concatenation of the flattened theta_parts (a model's parameters in
    module order); the gradient reaches each part. all_step_losses: see fused_forward (it must stay
    True where step_weights requires grad). implementation: the kernel (default: the C++ core's,
    NATIVE_IMPLEMENTATION)."""
    implementation = implementation or NATIVE_IMPLEMENTATION
    layers, layer_constants = list(layers), list(layer_constants)
    if torch.compiler.is_compiling():
        theta = torch.cat([p.reshape(-1) for p in theta_parts])
        return implementation.op(theta, lrs, step_weights, support_x, support_y, query_x, query_y, layers,
                                 layer_constants, loss, first_order, lr_grad)
    return _EagerMetaStep.apply(implementation, lrs, step_weights, support_x, support_y, query_x, query_y, layers,
                                layer_constants, loss, first_order, lr_grad,
                                all_step_losses or step_weights.requires_grad, *theta_parts)
