"""Backend `func`: the batched torch.func core for any nn.Module, any device.

config.second_order picks how the meta-gradient is computed: "memory_efficient" (default) runs the
reverse chain of pymaml.numerics.reverse_chain (no graph across inner steps, tasks in chunks), "graph"
differentiates the vmapped inner loop of pymaml.numerics.functional with ordinary autograd (one graph over
every step of every task; the only mode whose meta-loss can be differentiated twice).
"""

from __future__ import annotations

import torch

from ..numerics import functional, reverse_chain
from ..numerics.state import adapted_parameters, fixed_state
from .base import Backend, MetaConfig, MetaOutput, TaskBatch


def _hook_reason(model) -> str | None:
    """Why torch.func would not compute what the oracle computes: a module backward hook (its
    autograd.Function cannot run under torch.func's transforms), or a gradient hook on a trainable
    parameter (the inner loop differentiates functional copies of the parameters, so the hook
    would change the final meta-gradient only, not the inner steps' gradients as in the oracle)."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks:
        return "a global module backward hook is registered, which torch.func's transforms cannot run"
    for name, module in model.named_modules():
        if module._backward_hooks or module._backward_pre_hooks:
            return f"module {name or '(the model)'} has a backward hook, which torch.func's transforms cannot run"
    for name, p in model.named_parameters():
        if p.requires_grad and p._backward_hooks:
            return (f"parameter {name} has a gradient hook (register_hook); torch.func's inner loop would not run it "
                    f"on the inner steps' gradients")
    return None


class FuncBackend(Backend):
    name = "func"

    def unsupported_reason(self, model, config, device):
        return _hook_reason(model)

    def changed_reason(self, model, config, device):
        return _hook_reason(model)

    def differentiates_inputs(self, config):
        """The graph mode differentiates through the inputs; the reverse chain gives only θ's,
        the step sizes' and the step weights' gradients."""
        return config.second_order == "graph"

    def meta_step(self, model, config: MetaConfig, batch: TaskBatch, inner_lr, step_weights) -> MetaOutput:
        params, fixed = adapted_parameters(model), fixed_state(model)
        options = dict(inner_lr=inner_lr, inner_steps=config.inner_steps, first_order=config.first_order,
                       loss_fn=config.loss_fn, step_weights=step_weights)
        if config.second_order == "memory_efficient":
            loss, losses, pre = reverse_chain.meta_losses(model, params, fixed, *batch, task_chunk=config.task_chunk,
                                                          **options)
            return MetaOutput(loss, losses.detach(), pre.mean(), self.name)
        losses = functional.task_query_losses(model, params, fixed, *batch, **options)
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
