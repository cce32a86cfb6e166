"""Backend `func`: the batched torch.func core (pymaml.functional); any nn.Module, any device."""

from __future__ import annotations

import torch

from .. import functional
from ..state import adapted_parameters, fixed_state
from .base import Backend, MetaConfig, MetaOutput, TaskBatch


class FuncBackend(Backend):
    name = "func"

    def unsupported_reason(self, model, config, device):
        return None

    def meta_step(self, model, config: MetaConfig, batch: TaskBatch, inner_lr, step_weights) -> MetaOutput:
        params, fixed = adapted_parameters(model), fixed_state(model)
        losses = functional.task_query_losses(
            model,
            params,
            fixed,
            *batch,
            inner_lr=inner_lr,
            inner_steps=config.inner_steps,
            first_order=config.first_order,
            loss_fn=config.loss_fn,
            step_weights=step_weights,
        )
        with torch.no_grad():
            pre = functional.query_losses_at(
                model, params, fixed, batch.query_x, batch.query_y, loss_fn=config.loss_fn
            )
        return MetaOutput(losses.mean(), losses.detach(), pre.mean(), self.name)

    def adapt(self, model, config, support_x, support_y, steps, inner_lr):
        return functional.adapt(
            model,
            adapted_parameters(model),
            fixed_state(model),
            support_x,
            support_y,
            inner_lr=inner_lr,
            steps=steps,
            first_order=config.first_order,
            loss_fn=config.loss_fn,
        )


BACKEND = FuncBackend()
