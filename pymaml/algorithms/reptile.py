"""Reptile (Nichol, Achiam & Schulman 2018): pymaml.Reptile.

For each task t, S full-batch SGD steps φ ← φ − α ∇L_t(φ) from φ = θ on the task's data
(batched over tasks with torch.func, no graph kept), then

    θ ← θ + ε · mean_t (φ_t − θ).

The Reptile direction θ − mean_t φ_t can also be written into .grad, so that any torch optimizer
takes the outer step (torch.optim.SGD with lr=ε gives the update above).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import grad_and_value, vmap

from ..numerics.functional import loss_function
from ..numerics.losses import LossFn, resolve_loss
from ..numerics.state import adapted_parameters, fixed_state
from .checks import check_model_and_loss, check_steps, validate_inputs
from .maml import AdaptedModel


@dataclass
class ReptileOutput:
    """Result of a Reptile step; every tensor is detached.

    loss: mean over tasks of the loss at θ on the task's data (before the inner loop; it is the
        first inner step's loss, so it costs nothing extra).
    task_losses: that loss per task, [T].
    """

    loss: torch.Tensor
    task_losses: torch.Tensor


def _finite_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


class Reptile(nn.Module):
    """Reptile over a batch of tasks; see the module docstring for the math.

    reptile = Reptile(model, inner_lr=0.02, inner_steps=5, outer_lr=0.1, loss="mse")
    out = reptile.step(x, y)                 # x, y: [T, K, ...]; updates the model in place
    # or, with an outer optimizer:
    reptile.meta_gradient(x, y); meta_opt.step()

    inner_lr, inner_steps: the S ≥ 1 full-batch SGD steps on each task's data.
    outer_lr: ε of step(); meta_gradient() does not use it.
    loss: "mse", "cross_entropy" or a callable (prediction, target) -> scalar, per task.
    check_inputs: check shapes, dtypes, devices, NaN and Inf of every batch.

    The adapted parameters are the model's parameters that require grad; frozen parameters and
    buffers pass through, and normalization layers follow pymaml.numerics.state's rule (batch statistics
    in training mode, running statistics never updated).
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float,
        inner_steps: int,
        outer_lr: float,
        loss: str | LossFn = "mse",
        check_inputs: bool = True,
    ):
        super().__init__()
        check_model_and_loss(model, loss, "Reptile")
        self.inner_steps = check_steps("inner_steps", inner_steps)
        if self.inner_steps < 1:
            raise ValueError("inner_steps must be >= 1: with no inner step the Reptile direction is zero")
        self.module = model
        self.inner_lr = _finite_number("inner_lr", inner_lr)
        self.outer_lr = _finite_number("outer_lr", outer_lr)
        self.loss = loss
        self.check_inputs = check_inputs

    def _adapted(self, x, y, steps: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor, dict]:
        """θ, the per-task φ after `steps` SGD steps ([T, ...]), the per-task loss at θ, and the fixed state."""
        if self.check_inputs:
            reference_param = next(self.module.parameters())
            validate_inputs(dict(x=x, y=y), self.loss, reference_param.dtype, reference_param.device, True)
            if x.shape[1] == 0:
                raise ValueError("x has no points per task; the inner loop needs at least one")
        model, fixed = self.module, fixed_state(self.module)
        loss_at = loss_function(model, fixed, resolve_loss(self.loss))

        theta = {name: p.detach() for name, p in adapted_parameters(model).items()}
        grad_and_loss = vmap(grad_and_value(loss_at), in_dims=(0, 0, 0))
        tasks = x.shape[0]
        phi = {name: p.expand(tasks, *p.shape).clone() for name, p in theta.items()}
        with torch.no_grad():
            initial_losses = vmap(loss_at, in_dims=(None, 0, 0))(theta, x, y) if steps == 0 else None
            for step in range(steps):
                g, losses = grad_and_loss(phi, x, y)
                if step == 0:
                    initial_losses = losses
                phi = {name: w - self.inner_lr * g[name] for name, w in phi.items()}
        diverged = [name for name, w in phi.items() if not bool(torch.isfinite(w).all())]
        if diverged:
            raise FloatingPointError(f"the inner loop diverged (non-finite {diverged[0]}); lower inner_lr")
        return theta, phi, initial_losses, fixed

    @torch.no_grad()
    def step(self, x, y) -> ReptileOutput:
        """θ ← θ + outer_lr · mean_t(φ_t − θ), in place on the model's parameters; .grad is untouched."""
        theta, phi, losses, _ = self._adapted(x, y, self.inner_steps)
        for name, p in adapted_parameters(self.module).items():
            p.add_(phi[name].mean(dim=0) - theta[name], alpha=self.outer_lr)
        return ReptileOutput(losses.mean(), losses)

    @torch.no_grad()
    def meta_gradient(self, x, y, *, accumulate: bool = True) -> ReptileOutput:
        """Adds the Reptile direction θ − mean_t φ_t to the .grad of the model's parameters that
        require grad (replaces .grad when not accumulate), for an outer optimizer to step."""
        theta, phi, losses, _ = self._adapted(x, y, self.inner_steps)
        for name, p in adapted_parameters(self.module).items():
            direction = theta[name] - phi[name].mean(dim=0)
            if accumulate and p.grad is not None:
                p.grad.add_(direction)
            else:
                p.grad = direction
        return ReptileOutput(losses.mean(), losses)

    def adapt(self, x, y, steps: int | None = None) -> AdaptedModel:
        """Per-task φ_t after `steps` (default inner_steps) SGD steps on (x, y); calling the result
        maps inputs [T, K, ...] to the per-task outputs. Not differentiable."""
        steps = self.inner_steps if steps is None else check_steps("steps", steps)
        _, phi, _, fixed = self._adapted(x, y, steps)
        return AdaptedModel(self.module, phi, fixed)

    def extra_repr(self) -> str:
        loss = self.loss if isinstance(self.loss, str) else getattr(self.loss, "__name__", "callable")
        return f"inner_lr={self.inner_lr}, inner_steps={self.inner_steps}, outer_lr={self.outer_lr}, loss={loss}"
