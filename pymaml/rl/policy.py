"""The paper's Gaussian MLP policy and the per-task losses of MAML-TRPO, written as pymaml losses
(prediction, target) -> scalar so that pymaml.hvp and torch.func batch them over tasks.

The policy's output per observation is [mean, log_std] (2A numbers): the mean from an MLP of
two hidden layers of 100 ReLU units, the log standard deviation a learned vector independent of
the state. π(a | s) = N(a; μ(s), diag(σ²)), log π = -½ Σ ((a - μ)/σ)² - Σ log σ - (A/2) log 2π.
"""

from __future__ import annotations

import math
import threading
import weakref

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

HIDDEN = (100, 100)


class GaussianMLPPolicy(nn.Module):
    def __init__(self, observation_size: int, action_size: int, hidden: tuple[int, ...] = HIDDEN,
                 initial_std: float = 1.0):
        super().__init__()
        layers: list[nn.Module] = []
        widths = (observation_size, *hidden)
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], action_size))
        self.mean = nn.Sequential(*layers)
        self.log_std = nn.Parameter(torch.full((action_size,), math.log(initial_std)))
        self.action_size = action_size

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        mean = self.mean(observations)
        return torch.cat([mean, self.log_std.expand_as(mean)], dim=-1)


def split(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, log_std) of a policy output [..., 2A]."""
    actions = output.shape[-1] // 2
    return output[..., :actions], output[..., actions:]


def log_prob(output: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """log π(a | s) per sample, [...], for policy outputs [..., 2A] and actions [..., A]."""
    mean, log_std = split(output)
    z = (actions - mean) * torch.exp(-log_std)
    return -0.5 * z.square().sum(-1) - log_std.sum(-1) - 0.5 * actions.shape[-1] * math.log(2 * math.pi)


def reinforce_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The inner (vanilla policy gradient) loss of one task: -(1/K) Σ_k log π(a_k | s_k) A_k.
    target [K, A + 1] = (actions, advantages)."""
    return -(log_prob(output, target[:, :-1]) * target[:, -1]).mean()


def surrogate_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """TRPO's surrogate of one task: -(1/K) Σ_k exp(log π(a_k | s_k) - log π_old(a_k | s_k)) A_k.
    target [K, A + 2] = (actions, advantages, log π_old(a_k | s_k))."""
    ratio = torch.exp(log_prob(output, target[:, :-2]) - target[:, -1])
    return -(ratio * target[:, -2]).mean()


def kl_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the task's states of KL(π_old(· | s) ‖ π(· | s)), target [K, 2A] = the old outputs:
    Σ_i log σ_i - log σ_old,i + (σ_old,i² + (μ_old,i - μ_i)²) / (2σ_i²) - ½."""
    mean, log_std = split(output)
    old_mean, old_log_std = split(target)
    ratio = torch.exp(2 * (old_log_std - log_std))
    terms = log_std - old_log_std + 0.5 * (ratio + (old_mean - mean).square() * torch.exp(-2 * log_std)) - 0.5
    return terms.sum(-1).mean()


# torch.func.functional_call swaps the module's parameters for the call's tensors and puts them back
# afterwards: two threads calling it on one module at once would each run with the other's tensors,
# and one could put the other's (vmapped) tensors back as the parameters. So every call here holds
# the module's lock.
_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def module_lock(module: nn.Module) -> threading.RLock:
    """The lock that serializes this module's functional calls."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(module)
        if lock is None:
            lock = _LOCKS[module] = threading.RLock()
        return lock


def parameters_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the module's parameters by name, detached, read under its lock."""
    with module_lock(module):
        return {name: p.detach().clone() for name, p in module.named_parameters()}


def batched_outputs(policy: nn.Module, params: dict[str, torch.Tensor], observations: torch.Tensor) -> torch.Tensor:
    """The policy's outputs for every task: params [T, ...] per name, observations [T, ...]."""
    with module_lock(policy):
        return vmap(lambda p, x: functional_call(policy, p, (x,)))(params, observations)


def per_task_loss(policy: nn.Module, loss) -> callable:
    """(params, x, y) -> loss of one task, for torch.func's grad and vmap."""
    return lambda p, x, y: loss(functional_call(policy, p, (x,)), y)


def batched_losses(policy: nn.Module, loss, params: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss of every task, [T]."""
    with module_lock(policy):
        return vmap(per_task_loss(policy, loss))(params, x, y)


def batched_gradients(policy: nn.Module, loss, params: dict, x: torch.Tensor, y: torch.Tensor) -> dict:
    """∇_θ loss_t(θ_t) of every task, [T, ...] per name."""
    with module_lock(policy):
        return vmap(grad(per_task_loss(policy, loss)))(params, x, y)


def expand(params: dict[str, torch.Tensor], tasks: int) -> dict[str, torch.Tensor]:
    """The same parameters for each of `tasks` tasks, [T, ...] per name; differentiable. Copies, not
    expanded views: forward-mode AD (in pymaml.hvp) refuses tensors whose elements share memory."""
    return {name: p.unsqueeze(0).expand(tasks, *p.shape).contiguous() for name, p in params.items()}
