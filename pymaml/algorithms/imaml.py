"""Implicit MAML (Rajeswaran, Finn, Kakade & Levine 2019): pymaml.IMAML.

Each task t adapts by minimizing its regularized support loss

    φ_t = argmin_φ L_t(φ) + λ/2 ‖φ − θ‖²,

approximated by S gradient steps φ ← φ − α (∇L_t(φ) + λ (φ − θ)) from φ = θ, with no graph kept
(memory does not depend on S). At the minimum, ∇L_t(φ_t) + λ(φ_t − θ) = 0, so by the implicit
function theorem dφ_t/dθ = (I + H_t/λ)⁻¹ with H_t = ∇²L_t(φ_t), and the meta-gradient of task t is

    g_t = (I + H_t/λ)⁻¹ ∇L_query,t(φ_t),

solved by conjugate gradient with batched Hessian-vector products (pymaml.hvp: the fused C++
R-operator for supported MLPs on the CPU, torch.func's forward-over-reverse otherwise). The
tasks are solved together, each with its own CG step sizes. The meta-gradient is the mean of
g_t over tasks.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import grad, grad_and_value, vmap

from ..numerics.functional import loss_function
from ..numerics.hvp import hvp
from ..numerics.losses import LossFn, resolve_loss
from ..numerics.state import adapted_parameters, fixed_state
from .checks import check_model_and_loss, check_steps, validate_inputs
from .maml import AdaptedModel


@dataclass
class IMAMLOutput:
    """Result of an iMAML meta-step; every tensor is detached.

    loss: mean over tasks of the query loss at the adapted parameters φ_t.
    task_losses: the query loss of each task at φ_t, [T].
    pre_adaptation_loss: mean query loss at the unadapted parameters θ.
    cg_residuals: relative residual ‖b_t − A_t x_t‖ / ‖b_t‖ of each task's CG solve, [T], with
        A_t = I + H_t/λ, b_t = ∇L_query,t(φ_t) and x_t the returned solution (0 where b_t = 0).
    """

    loss: torch.Tensor
    task_losses: torch.Tensor
    pre_adaptation_loss: torch.Tensor
    cg_residuals: torch.Tensor


def _positive_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _flatten(tensors: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """{name: [T, ...]} -> [T, P], parameters in `names` order."""
    return torch.cat([tensors[name].reshape(tensors[name].shape[0], -1) for name in names], dim=1)


def _unflatten(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """[T, P] -> {name: [T, *shape]} with the shapes of `like` (unbatched parameters)."""
    out, offset = {}, 0
    for name, p in like.items():
        out[name] = flat[:, offset : offset + p.numel()].reshape(flat.shape[0], *p.shape)
        offset += p.numel()
    return out


class IMAML(nn.Module):
    """Implicit MAML over a batch of tasks; see the module docstring for the math.

    imaml = IMAML(model, inner_lr=0.1, inner_steps=20, reg_lambda=1.0, cg_steps=5, loss="mse")
    out = imaml.meta_gradient(support_x, support_y, query_x, query_y)   # leading task dim T
    meta_opt.step()                                                     # any torch optimizer

    inner_lr, inner_steps: the inner gradient descent on L_support(φ) + λ/2‖φ − θ‖² (it
        converges for inner_lr < 2/(λ + largest Hessian eigenvalue); the implicit gradient is
        exact only at the minimum, so inner_steps should bring φ close to it).
    reg_lambda: λ > 0, the strength of the proximal term.
    cg_steps: conjugate-gradient iterations per meta-step (each one batched HVP over the tasks);
        the output's cg_residuals says how far each solve got.
    loss: "mse", "cross_entropy" or a callable (prediction, target) -> scalar, per task.
    fused_hvp: passed to pymaml.hvp as `fused` (None: the fused kernel where it applies).
    check_inputs: check shapes, dtypes, devices, NaN and Inf of every meta-batch.

    The adapted parameters are the model's parameters that require grad; frozen parameters and
    buffers pass through, and normalization layers follow pymaml.numerics.state's rule (batch statistics
    in training mode, running statistics never updated).
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float,
        inner_steps: int,
        reg_lambda: float,
        cg_steps: int,
        loss: str | LossFn = "mse",
        fused_hvp: bool | None = None,
        check_inputs: bool = True,
    ):
        super().__init__()
        check_model_and_loss(model, loss, "iMAML")
        if fused_hvp not in (None, True, False):
            raise ValueError(f"fused_hvp must be None, True or False, got {fused_hvp!r}")
        if isinstance(cg_steps, bool) or not isinstance(cg_steps, int) or cg_steps < 1:
            raise ValueError(f"cg_steps must be an integer >= 1, got {cg_steps!r}")
        self.module = model
        self.inner_lr = _positive_number("inner_lr", inner_lr)
        self.inner_steps = check_steps("inner_steps", inner_steps)
        self.reg_lambda = _positive_number("reg_lambda", reg_lambda)
        self.cg_steps = cg_steps
        self.loss = loss
        self.fused_hvp = fused_hvp
        self.check_inputs = check_inputs

    def _loss_at(self, fixed: dict):
        return loss_function(self.module, fixed, resolve_loss(self.loss))

    def _validate(self, inputs: dict[str, torch.Tensor], steps: int) -> None:
        if not self.check_inputs:
            return
        reference_param = next(self.module.parameters())
        validate_inputs(inputs, self.loss, reference_param.dtype, reference_param.device, True)
        if inputs["support_x"].shape[1] == 0 and steps > 0:
            raise ValueError("support_x has no points per task; the inner loop needs at least one")
        if "query_x" in inputs and inputs["query_x"].shape[1] == 0:
            raise ValueError("query_x has no points per task")

    def _inner_loop(self, loss_at, theta: dict, support_x, support_y, steps: int) -> dict[str, torch.Tensor]:
        """φ after `steps` steps φ ← φ − α(∇L(φ) + λ(φ − θ)) from θ, per task, [T, ...]; no graph."""
        tasks = support_x.shape[0]
        phi = {name: p.detach().expand(tasks, *p.shape).clone() for name, p in theta.items()}
        support_grad = vmap(grad(loss_at), in_dims=(0, 0, 0))
        alpha, lam = self.inner_lr, self.reg_lambda
        with torch.no_grad():
            for _ in range(steps):
                g = support_grad(phi, support_x, support_y)
                phi = {name: w - alpha * (g[name] + lam * (w - theta[name])) for name, w in phi.items()}
        diverged = ~torch.isfinite(_flatten(phi, list(phi))).all(dim=1)
        if bool(diverged.any()):
            raise FloatingPointError(
                f"the inner loop diverged (non-finite adapted parameters) in tasks "
                f"{diverged.nonzero().flatten().tolist()}; lower inner_lr (it must stay below "
                f"2/(reg_lambda + the largest eigenvalue of the support loss's Hessian))"
            )
        return phi

    def _solve(self, phi: dict, support_x, support_y, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x ≈ (I + H/λ)⁻¹ b per task by cg_steps of conjugate gradient, and the relative residuals.

        Each task has its own step sizes α_k = r·r / p·Ap and β_k = r'·r' / r·r. A task whose
        residual is exactly zero has converged and stops; a task with p·Ap ≤ 0 (I + H/λ not
        positive definite: λ too small for a Hessian with negative eigenvalues) stops with a
        warning, and its residual shows how far it got."""
        names, lam = list(phi), self.reg_lambda
        phi_shapes = {name: t[0] for name, t in phi.items()}

        def apply_a(v: torch.Tensor) -> torch.Tensor:
            hv = hvp(self.module, phi, support_x, support_y, _unflatten(v, phi_shapes), self.loss, fused=self.fused_hvp)
            return v + _flatten(hv, names) / lam

        x = torch.zeros_like(b)
        r, p = b.clone(), b.clone()
        rs = (r * r).sum(dim=1)
        stopped = torch.zeros(b.shape[0], dtype=torch.bool, device=b.device)
        for _ in range(self.cg_steps):
            ap = apply_a(p)
            pap = (p * ap).sum(dim=1)
            stopped |= (rs > 0) & ~(pap > 0)
            active = ~stopped & (rs > 0)
            alpha = torch.where(active, rs / torch.where(active, pap, 1), 0).unsqueeze(1)
            x = x + alpha * p
            r = r - alpha * ap
            rs_next = (r * r).sum(dim=1)
            beta = torch.where(active, rs_next / torch.where(active, rs, 1), 0).unsqueeze(1)
            p = torch.where(active.unsqueeze(1), r + beta * p, p)
            rs = rs_next
        if bool(stopped.any()):
            warnings.warn(
                f"iMAML: conjugate gradient stopped early in tasks {stopped.nonzero().flatten().tolist()}: "
                f"I + H/reg_lambda is not positive definite there (raise reg_lambda)",
                RuntimeWarning,
                stacklevel=4,
            )
        # The true residual costs one more HVP; the recurrence's r drifts from it by rounding.
        b_norm = b.norm(dim=1)
        true_residual = (b - apply_a(x)).norm(dim=1)
        residuals = torch.where(b_norm > 0, true_residual / torch.where(b_norm > 0, b_norm, 1), 0)
        return x, residuals

    def meta_gradient(self, support_x, support_y, query_x, query_y, *, accumulate: bool = True) -> IMAMLOutput:
        """Adds the iMAML meta-gradient, mean over tasks of (I + H_t/λ)⁻¹ ∇L_query,t(φ_t), to the
        .grad of the model's parameters that require grad (replaces .grad when not accumulate),
        and returns the losses and CG residuals. No autograd graph is built."""
        with torch.no_grad():
            return self._meta_gradient(support_x, support_y, query_x, query_y, accumulate)

    def _meta_gradient(self, support_x, support_y, query_x, query_y, accumulate: bool) -> IMAMLOutput:
        self._validate(dict(support_x=support_x, support_y=support_y, query_x=query_x, query_y=query_y),
                       self.inner_steps)
        theta = {name: p.detach() for name, p in adapted_parameters(self.module).items()}
        fixed = fixed_state(self.module)
        loss_at = self._loss_at(fixed)
        phi = self._inner_loop(loss_at, theta, support_x, support_y, self.inner_steps)
        query_grads, task_losses = vmap(grad_and_value(loss_at))(phi, query_x, query_y)
        pre_adaptation = vmap(loss_at, in_dims=(None, 0, 0))(theta, query_x, query_y)
        names = list(theta)
        solutions, residuals = self._solve(phi, support_x, support_y, _flatten(query_grads, names))
        if not bool(torch.isfinite(solutions).all()):
            raise FloatingPointError("the iMAML meta-gradient is not finite (non-finite query gradients or CG breakdown)")
        meta_grad = _unflatten(solutions.mean(dim=0, keepdim=True), theta)
        for name, p in adapted_parameters(self.module).items():
            g = meta_grad[name][0]
            if accumulate and p.grad is not None:
                p.grad.add_(g)
            else:
                p.grad = g.clone()
        return IMAMLOutput(task_losses.mean(), task_losses, pre_adaptation.mean(), residuals)

    def meta_train_step(self, support_x, support_y, query_x, query_y, optimizer: torch.optim.Optimizer) -> IMAMLOutput:
        """meta_gradient(..., accumulate=False) followed by optimizer.step()."""
        out = self.meta_gradient(support_x, support_y, query_x, query_y, accumulate=False)
        optimizer.step()
        return out

    def adapt(self, support_x, support_y, steps: int | None = None) -> AdaptedModel:
        """Per-task φ_t after `steps` (default inner_steps) steps on the regularized support loss;
        calling the result maps x [T, K, ...] to the per-task outputs. Not differentiable."""
        steps = self.inner_steps if steps is None else check_steps("steps", steps)
        self._validate(dict(support_x=support_x, support_y=support_y), steps)
        theta = {name: p.detach() for name, p in adapted_parameters(self.module).items()}
        fixed = fixed_state(self.module)
        phi = self._inner_loop(self._loss_at(fixed), theta, support_x, support_y, steps)
        return AdaptedModel(self.module, phi, fixed)

    def extra_repr(self) -> str:
        loss = self.loss if isinstance(self.loss, str) else getattr(self.loss, "__name__", "callable")
        return (f"inner_lr={self.inner_lr}, inner_steps={self.inner_steps}, reg_lambda={self.reg_lambda}, "
                f"cg_steps={self.cg_steps}, loss={loss}, fused_hvp={self.fused_hvp}")
