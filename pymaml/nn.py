"""Layers that know which inner step they run at: MAML++'s per-step BatchNorm (Antoniou et al. 2019).

Every pymaml inner loop (the oracle, `func` in both second-order modes, `MAML.adapt` and the
adapted model it returns) runs the forward at θ_s inside `inner_step(s)`: s = 0 at θ (the
pre-adaptation loss too), s = S for the query loss after S steps. `current_inner_step()` reads it.

PerStepBatchNorm2d keeps running statistics for each step s = 0..S, and optionally a weight and a
bias per step. In training mode it always normalizes with the statistics of the batch it is
given (MAML++'s code could fall back to running statistics there: its issues #3 and #24). A
meta-step never changes the running statistics, so there is nothing to back up and restore (the
MAML++ backup was a shallow copy that restored nothing: its #42); `update_step_statistics`
records them from the support sets, on request. In eval mode step s uses its own statistics.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .numerics.losses import resolve_loss
from .numerics.schedule import step_size
from .numerics.state import adapted_parameters, fixed_state

_step = 0
_recording = False


@contextmanager
def inner_step(step: int):
    """Forwards inside run at inner step `step` (0: at θ before any step)."""
    global _step
    previous, _step = _step, step
    try:
        yield
    finally:
        _step = previous


def current_inner_step() -> int:
    return _step


class PerStepBatchNorm2d(nn.Module):
    """BatchNorm2d with running statistics per inner step 0..steps and, with per_step_affine, a
    weight and bias per step (rows of `weight` and `bias`, [steps + 1, C]); a step beyond `steps`
    uses the last row, as MAML++ does when evaluating with more steps than it trained with."""

    def __init__(self, num_features: int, steps: int, eps: float = 1e-5, momentum: float = 0.1,
                 per_step_affine: bool = True):
        super().__init__()
        if num_features < 1 or steps < 0 or not 0 <= momentum <= 1:
            raise ValueError(f"PerStepBatchNorm2d needs num_features >= 1, steps >= 0 and momentum in [0, 1], got "
                             f"{num_features}, {steps}, {momentum}")
        self.num_features, self.steps, self.eps, self.momentum = num_features, steps, eps, momentum
        self.per_step_affine = per_step_affine
        shape = (steps + 1, num_features) if per_step_affine else (num_features,)
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape))
        self.register_buffer("running_mean", torch.zeros(steps + 1, num_features))
        self.register_buffer("running_var", torch.ones(steps + 1, num_features))

    def _row(self) -> int:
        return min(current_inner_step(), self.steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"PerStepBatchNorm2d({self.num_features}) takes [N, {self.num_features}, H, W], "
                             f"got {tuple(x.shape)}")
        row = self._row()
        weight = self.weight[row] if self.per_step_affine else self.weight
        bias = self.bias[row] if self.per_step_affine else self.bias
        if self.training:
            if _recording:
                with torch.no_grad():
                    mean = x.mean(dim=(0, 2, 3))
                    var = x.var(dim=(0, 2, 3), unbiased=x.numel() > x.shape[1])
                    self.running_mean[row].lerp_(mean, self.momentum)
                    self.running_var[row].lerp_(var, self.momentum)
            return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
        return F.batch_norm(x, self.running_mean[row], self.running_var[row], weight, bias, False, 0.0, self.eps)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, steps={self.steps}, eps={self.eps}, momentum={self.momentum}, "
                f"per_step_affine={self.per_step_affine}")


def update_step_statistics(maml, support_x: torch.Tensor, support_y: torch.Tensor) -> None:
    """Update the per-step running statistics of every PerStepBatchNorm2d of `maml`'s model from a
    meta-batch's support sets: each task is adapted for maml.inner_steps steps (first order, one
    task at a time, eagerly) and each layer blends the batch statistics it sees at step s into its
    row s with its momentum (the unbiased variance, as torch's BatchNorm keeps)."""
    global _recording
    model = maml.module
    if not any(isinstance(m, PerStepBatchNorm2d) for m in model.modules()):
        raise ValueError("the model has no PerStepBatchNorm2d layer whose statistics could be updated")
    if not model.training:
        raise ValueError("update_step_statistics needs the model in training mode (batch statistics)")
    loss_fn = resolve_loss(maml.config.loss)
    params = {name: p.detach() for name, p in adapted_parameters(model).items()}
    fixed, inner_lr = fixed_state(model), maml.inner_lr
    previous, _recording = _recording, True
    try:
        for task in range(support_x.shape[0]):
            theta = params
            for step in range(maml.config.inner_steps + 1):
                with inner_step(step), torch.enable_grad():
                    theta = {name: p.requires_grad_() for name, p in theta.items()}
                    loss = loss_fn(torch.func.functional_call(model, (theta, fixed), (support_x[task],)),
                                   support_y[task])
                if step == maml.config.inner_steps:
                    break
                grads = torch.autograd.grad(loss, list(theta.values()))
                theta = {name: (p - step_size(inner_lr, step, name) * g).detach()
                         for (name, p), g in zip(theta.items(), grads)}
    finally:
        _recording = previous
