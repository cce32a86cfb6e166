"""pymaml::meta_step on the CPU: one call of the C++ core (csrc/cpu/meta_step_cpu.cpp)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.dlpack import to_dlpack

from ..._extension import extension


def capsule(tensor: Tensor):
    """A DLPack capsule of the tensor's data, made contiguous (DLPack carries no autograd)."""
    return to_dlpack(tensor.contiguous())


def fused_cpu(theta, lrs, step_weights, support_x, support_y, query_x, query_y, layers, layer_constants, loss,
              first_order, lr_grad, all_step_losses=True, grad_out=None, adam=None):
    """The op's outputs from the C++ core. grad_out: tensors (contiguous, θ's dtype, sizes adding
    up to P) for the meta-gradient to be written into, in place of a new grad_theta, which is then
    returned as None. adam: the binding's adam_* arguments (one buffer per grad_out tensor), to
    take an Adam step in place."""
    tasks, steps, params = support_x.shape[0], lrs.shape[0], theta.shape[0]
    empty = theta.new_empty
    meta_loss, task_losses, pre_losses = empty(()), empty(tasks), empty(tasks)
    step_losses, grad_lrs = empty(steps), empty(steps if lr_grad else 0, params)
    grad_theta = empty(params) if grad_out is None else None
    grad_capsules = capsule(grad_theta) if grad_out is None else [to_dlpack(g) for g in grad_out]
    # DLPack capsules rather than the tensors: the binding then skips 12 Python calls of __dlpack__.
    extension().meta_step(
        theta=capsule(theta), lrs=capsule(lrs), step_weights=capsule(step_weights),
        support_x=capsule(support_x), support_y=capsule(support_y), query_x=capsule(query_x),
        query_y=capsule(query_y), layers=layers, layer_constants=layer_constants, loss=loss,
        first_order=first_order, meta_loss=capsule(meta_loss), task_losses=capsule(task_losses),
        pre_losses=capsule(pre_losses), step_losses=capsule(step_losses), grad_theta=grad_capsules,
        grad_lrs=capsule(grad_lrs) if lr_grad else None, threads=torch.get_num_threads(),
        all_step_losses=all_step_losses, **(adam or {}),
    )
    return meta_loss, task_losses, pre_losses, step_losses, grad_theta, grad_lrs
