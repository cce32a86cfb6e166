"""Closed-form batched derivatives of the paper's Gaussian MLP policy (policy.GaussianMLPPolicy)
for the three losses of MAML-TRPO: the gradients, the inner loss's Hessian-vector products by
Pearlmutter's R-operator, and the KL's Hessian at the old policy as a Gauss–Newton product.

Every task t has its own parameters (P [T, ...] per name) and its own K samples. The mean network
is Linear layers l = 1..L with ReLU between them: h_0 = x, z_l = h_{l-1} W_lᵀ + b_l,
h_l = relu(z_l), μ = z_L; m_l = not [z_l ≤ 0], the mask of autograd's ReLU backward (m ⊙ v below is
its select: 0 where z ≤ 0 whatever v is, even infinite or NaN, and v elsewhere, a NaN z included). With
g_μ = ∂L/∂μ and g_s = ∂L/∂s (s = log σ, one vector per task):
  backward      δ_L = g_μ, ∇W_l = δ_lᵀ h_{l-1}, ∇b_l = Σ_k δ_l, δ_{l-1} = m_{l-1} ⊙ (δ_l W_l), ∇s = g_s.
For a direction (U_l, c_l, u_s) the R-operator R{·} = d/dε (·)(P + ε u) at ε = 0 gives H u:
  R-forward     R z_l = R h_{l-1} W_lᵀ + h_{l-1} U_lᵀ + c_l, R h_l = m_l ⊙ R z_l, R h_0 = 0, R μ = R z_L;
  the loss      R g_μ, R g_s from the loss's second derivatives in (μ, s) applied to (R μ, u_s);
  R-backward    R δ_L = R g_μ, (H u)_W_l = R δ_lᵀ h_{l-1} + δ_lᵀ R h_{l-1}, (H u)_b_l = Σ_k R δ_l,
                R δ_{l-1} = m_{l-1} ⊙ (R δ_l W_l + δ_l U_l), (H u)_s = R g_s
(ReLU's second derivative is zero, as in autograd's double backward). The forward pass and the
δ_l are kept for all the products of one point, so each product costs its R-passes alone: the
hidden 100 × 100 layer's six batched products, against the forward and backward passes that a
backward through a retained double-backward graph redoes.

The losses, per task, with d = μ - a, e = exp(-2s), w_k the advantages, ρ_k the probability ratio:
  REINFORCE  L = (1/K) Σ_k w_k (½ Σ_i d_ki² e_i + Σ_i s_i) + const
             g_μ = w d e / K, g_s = (1/K) Σ_k w_k (1 - d² e)
             R g_μ = w e (R μ - 2 d u_s) / K, R g_s = -(2/K) Σ_k w_k d e (R μ - d u_s)
  surrogate  L = -(1/K) Σ_k ρ_k w_k, g_μ = ρ w d e / K, g_s = -(1/K) Σ_k ρ_k w_k (d² e - 1)
  KL         at the old policy (μ = μ_old, s = s_old, where the KL and its gradient vanish) the
             Hessian is the Gauss–Newton product: R g_μ = e R μ / K, R g_s = 2 u_s, the second
             derivatives of μ adding nothing since they multiply g_μ = 0.

`closed_form(policy)` gives these for a policy that computes exactly GaussianMLPPolicy's forward,
and None otherwise (`unsupported_reason` says why), so that pymaml.rl.trpo falls back to torch.func
and autograd for any other policy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..backends.layout import global_hook_reason, module_override_reason
from .policy import GaussianMLPPolicy, module_lock

LOG_STD = "log_std"
_LOG_2PI = math.log(2 * math.pi)


def unsupported_reason(policy: nn.Module) -> str | None:
    """Why the closed forms would not compute what `policy` computes, or None: anything but a
    GaussianMLPPolicy (subclasses included) whose mean is Linear layers with biases separated by
    ReLUs and a log_std of one entry per action, without hooks, parametrizations, buffers, calls
    replaced on an instance or parameters of another dtype. Read under the module's lock, so that
    another thread's functional call (policy.module_lock) cannot show its swapped-in tensors."""
    with module_lock(policy):
        return _unsupported_reason(policy)


def _unsupported_reason(policy: nn.Module) -> str | None:
    if type(policy) is not GaussianMLPPolicy:
        return f"the policy is a {type(policy).__qualname__}, not a GaussianMLPPolicy"
    reason = global_hook_reason()
    if reason is not None:
        return reason
    for name, module in policy.named_modules():
        reason = module_override_reason(module, f"module {name or '(the policy)'}")
        if reason is not None:
            return reason
    if any(True for _ in policy.buffers()):
        return "the policy has buffers, which GaussianMLPPolicy's forward does not use"
    mean = policy.mean
    if type(mean) is not nn.Sequential or len(mean) % 2 == 0:
        return "the policy's mean is not an nn.Sequential of Linear layers separated by ReLUs"
    for index, layer in enumerate(mean):
        expected = nn.Linear if index % 2 == 0 else nn.ReLU
        if type(layer) is not expected:
            return f"layer mean.{index} is a {type(layer).__qualname__}, not an nn.{expected.__name__}"
        if expected is nn.Linear and layer.bias is None:
            return f"layer mean.{index} has no bias"
    names = [name for name, _ in policy.named_parameters()]
    expected_names = [f"mean.{index}.{kind}" for index in range(0, len(mean), 2) for kind in ("weight", "bias")]
    if sorted(names) != sorted([*expected_names, LOG_STD]):
        return f"the policy's parameters are {names}, not the mean's Linear layers and log_std"
    if policy.log_std.shape != (mean[-1].out_features,):
        return (f"log_std has shape {tuple(policy.log_std.shape)}, not one entry per action "
                f"({mean[-1].out_features})")
    if len({p.dtype for p in policy.parameters()}) != 1:
        return "the policy's parameters are of several dtypes"
    return None


def closed_form(policy: nn.Module) -> GaussianMLPDerivatives | None:
    """The closed-form derivatives of `policy`, or None where unsupported_reason gives a reason."""
    if unsupported_reason(policy) is not None:
        return None
    return GaussianMLPDerivatives([(f"mean.{i}.weight", f"mean.{i}.bias") for i in range(0, len(policy.mean), 2)])


@dataclass
class MeanPass:
    """The mean network's forward pass at P on x: each layer's input h_{l-1} [T, K, n_{l-1}], where
    each hidden layer's ReLU passes nothing (z_l ≤ 0, boolean), the means μ [T, K, A] and s [T, A]."""

    inputs: list[torch.Tensor]
    blocked: list[torch.Tensor]
    mean: torch.Tensor
    log_std: torch.Tensor

    @property
    def outputs(self) -> torch.Tensor:
        """The policy's outputs [T, K, 2A]: (μ, s) per sample, as GaussianMLPPolicy.forward."""
        return torch.cat([self.mean, self.log_std.unsqueeze(1).expand_as(self.mean)], dim=-1)


# A loss's derivatives in (μ, s): (pass, target) -> (g_μ [T, K, A], g_s [T, A]).
Gradient = Callable[[MeanPass, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _residual(forward: MeanPass, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d = μ - a, e = exp(-2s) [T, 1, A])."""
    return forward.mean - actions, torch.exp(-2 * forward.log_std).unsqueeze(1)


def _reinforce_terms(forward: MeanPass, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d, e, w / K [T, K, 1]) of policy.reinforce_loss; target [T, K, A + 1] = (actions, advantages)."""
    d, e = _residual(forward, target[..., :-1])
    return d, e, target[..., -1:] / target.shape[1]


def reinforce_gradient(forward: MeanPass, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """policy.reinforce_loss's g_μ, g_s; target [T, K, A + 1] = (actions, advantages)."""
    d, e, weight = _reinforce_terms(forward, target)
    return weight * d * e, (weight * (1 - d.square() * e)).sum(1)


def surrogate_gradient(forward: MeanPass, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """policy.surrogate_loss's g_μ, g_s; target [T, K, A + 2] = (actions, advantages, log π_old)."""
    d, e = _residual(forward, target[..., :-2])
    scaled = d.square() * e
    log_prob = -0.5 * scaled.sum(-1) - forward.log_std.sum(-1, keepdim=True) - 0.5 * d.shape[-1] * _LOG_2PI
    weight = (torch.exp(log_prob - target[..., -1]) * target[..., -2]).unsqueeze(-1) / target.shape[1]
    return weight * d * e, (weight * (1 - scaled)).sum(1)


class GaussianMLPDerivatives:
    """The closed forms for one policy structure: the mean's Linear layers as (weight, bias) names."""

    def __init__(self, layers: list[tuple[str, str]]):
        self.layers = layers

    def forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> MeanPass:
        inputs, blocked, h = [], [], x
        for index, (weight, bias) in enumerate(self.layers):
            inputs.append(h)
            z = torch.bmm(h, params[weight].transpose(1, 2)).add_(params[bias].unsqueeze(1))
            if index < len(self.layers) - 1:
                blocked.append(z <= 0)
                h = torch.relu(z)
        return MeanPass(inputs, blocked, z, params[LOG_STD])

    def outputs(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The policy's outputs [T, K, 2A] for every task."""
        return self.forward(params, x).outputs

    def _backward(self, params: dict[str, torch.Tensor], forward: MeanPass, delta: torch.Tensor,
                  keep: list | None = None) -> dict[str, torch.Tensor]:
        """∇W_l = δ_lᵀ h_{l-1}, ∇b_l = Σ_k δ_l from δ_L = delta; keep, if given, receives δ_l by layer."""
        out = {}
        for index in reversed(range(len(self.layers))):
            weight, bias = self.layers[index]
            if keep is not None:
                keep[index] = delta
            out[weight] = delta.transpose(1, 2) @ forward.inputs[index]
            out[bias] = delta.sum(1)
            if index > 0:
                delta = torch.bmm(delta, params[weight]).masked_fill_(forward.blocked[index - 1], 0)
        return out

    def _ordered(self, values: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: values[name] for name in like}

    def gradient(self, gradient: Gradient, params: dict[str, torch.Tensor], x: torch.Tensor,
                 target: torch.Tensor) -> dict[str, torch.Tensor]:
        """∇_P L_t(P_t) for every task, [T, ...] per name."""
        forward = self.forward(params, x)
        g_mean, g_log_std = gradient(forward, target)
        out = self._backward(params, forward, g_mean)
        out[LOG_STD] = g_log_std
        return self._ordered(out, params)

    def _r_forward(self, params: dict[str, torch.Tensor], forward: MeanPass,
                   direction: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list]:
        """R μ, and R h_{l-1} by layer (None for the input)."""
        r_inputs, r_h = [], None
        for index, (weight, bias) in enumerate(self.layers):
            r_inputs.append(r_h)
            r_z = torch.bmm(forward.inputs[index], direction[weight].transpose(1, 2))
            if r_h is not None:
                r_z += torch.bmm(r_h, params[weight].transpose(1, 2))
            r_z += direction[bias].unsqueeze(1)
            if index < len(self.layers) - 1:
                r_h = r_z.masked_fill_(forward.blocked[index], 0)
        return r_z, r_inputs

    def reinforce_hvp(self, params: dict[str, torch.Tensor], x: torch.Tensor,
                      target: torch.Tensor) -> Callable[[dict], dict]:
        """u ↦ H_t u_t for every task, H_t the Hessian of policy.reinforce_loss at P_t (u [T, ...]
        per name); the forward pass and the δ_l are taken here, once."""
        forward = self.forward(params, x)
        d, e, weight = _reinforce_terms(forward, target)
        deltas = [None] * len(self.layers)
        self._backward(params, forward, weight * d * e, keep=deltas)

        def product(direction: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            r_mean, r_inputs = self._r_forward(params, forward, direction)
            u_log_std = direction[LOG_STD].unsqueeze(1)
            r_delta = weight * e * (r_mean - 2 * d * u_log_std)
            out = {LOG_STD: -2 * (weight * d * e * (r_mean - d * u_log_std)).sum(1)}
            for index in reversed(range(len(self.layers))):
                name_weight, name_bias = self.layers[index]
                delta, r_h = deltas[index], r_inputs[index]
                product_weight = r_delta.transpose(1, 2) @ forward.inputs[index]
                if r_h is not None:
                    product_weight += delta.transpose(1, 2) @ r_h
                out[name_weight], out[name_bias] = product_weight, r_delta.sum(1)
                if index > 0:
                    r_delta = torch.bmm(r_delta, params[name_weight]).add_(delta @ direction[name_weight])
                    r_delta.masked_fill_(forward.blocked[index - 1], 0)
            return self._ordered(out, params)

        return product

    def kl_fisher(self, params: dict[str, torch.Tensor], x: torch.Tensor,
                  forward: MeanPass | None = None) -> Callable[[dict], dict]:
        """u ↦ F_t u_t for every task, F_t the Hessian of policy.kl_loss(π_old ‖ π_P) at P_t = the
        old policy's parameters (the only point where TRPO asks for it), a Gauss–Newton product;
        forward: this class's forward pass at params on x, if already taken."""
        forward = self.forward(params, x) if forward is None else forward
        scale = torch.exp(-2 * forward.log_std).unsqueeze(1) / x.shape[1]

        def product(direction: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            r_mean, _ = self._r_forward(params, forward, direction)
            out = self._backward(params, forward, scale * r_mean)
            out[LOG_STD] = 2 * direction[LOG_STD]
            return self._ordered(out, params)

        return product
