"""Backend `reference`: the oracle itself, a Python loop over tasks (slow, obviously right)."""

from __future__ import annotations

import torch

from .. import reference
from ..numerics.state import adapted_parameters, fixed_state
from .base import Backend, MetaConfig, MetaOutput, TaskBatch


class ReferenceBackend(Backend):
    name = "reference"

    def unsupported_reason(self, model, config, device):
        return None

    def differentiates_inputs(self, config):
        return True

    def meta_step(self, model, config: MetaConfig, batch: TaskBatch, inner_lr, step_weights) -> MetaOutput:
        options = dict(inner_lr=inner_lr, first_order=config.first_order, loss=config.loss)
        losses = reference.task_query_losses(
            model, *batch, inner_steps=config.inner_steps, step_weights=step_weights, **options
        )
        with torch.no_grad():
            pre = reference.task_query_losses(model, *batch, inner_steps=0, **options)
        return MetaOutput(losses.mean(), losses.detach(), pre.mean(), self.name)

    def adapt(self, model, config, support_x, support_y, steps, inner_lr):
        differentiable = torch.is_grad_enabled()
        params, fixed = adapted_parameters(model), fixed_state(model)
        per_task = []
        with torch.enable_grad():  # the inner gradients need autograd even when the caller is in no_grad
            for t in range(support_x.shape[0]):
                theta = reference.adapt_task(
                    model, params, fixed, config.loss_fn, support_x[t], support_y[t],
                    inner_lr, steps, config.first_order,
                )
                per_task.append(theta)
        stacked = {name: torch.stack([theta[name] for theta in per_task]) for name in params}
        return stacked if differentiable else {name: w.detach() for name, w in stacked.items()}


BACKEND = ReferenceBackend()
