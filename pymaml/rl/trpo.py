"""MAML-TRPO (Finn et al. 2017, section 5.3), batched over tasks.

Inner step, per task t: θ'_t = θ - α ∇_θ L_in,t(θ), L_in,t the REINFORCE loss on trajectories of
θ (policy.reinforce_loss). Outer step: TRPO on L(θ) = (1/T) Σ_t L_out,t(θ'_t(θ)), the surrogate
on trajectories of θ'_t (policy.surrogate_loss), under the trust region
KL(θ) = (1/T) Σ_t KL(π_θ'_t(θ₀) ‖ π_θ'_t(θ)) ≤ δ.

With J_t = ∂θ'_t/∂θ = I - α H_t, H_t = ∇²L_in,t(θ):
  meta-gradient   g  = (1/T) Σ_t J_tᵀ ∇L_out,t(θ'_t)
  Fisher product  Fv = (1/T) Σ_t J_tᵀ F_t J_t v,  F_t = ∇²_θ' KL_t at θ'_t,
exact because ∇_θ' KL_t vanishes at θ₀ (the old policy minimises the KL), so the term with the
second derivative of θ'_t drops out. H_t v and F_t u are batched Hessian-vector products. The
data and the points (θ, θ'_t) stay fixed through a TRPO step while CG asks for up to
cg_iterations + 1 Fisher products, each of three HVPs; so each kind of product is set up once per
step at its point (P [T, ...] per name) and kept (OuterProblem.hvp). For the paper's policy the
products are closed forms (pymaml.rl.gaussian_mlp: H_t u by the R-operator from a kept forward
pass, F_t u as a Gauss–Newton product), and so are the batched gradients; for any other policy,
the autograd graph of the batched gradient ∇_P Σ_t L_t(P_t), taken once with create_graph, is
kept, and each HVP is one backward pass through it with the vector as its output gradient
(reverse over reverse), gradients coming from torch.func. First order: J_t = I.
The step: s = CG(F, g), then θ - β s with β = √(2δ / sᵀFs), scaled by `backtrack_ratio` at each try until the
surrogate improves and the KL is within δ (`max_backtracks` tries; otherwise θ is kept).

Split over processes (torchrun), rank r holds the tasks S_r of the meta-batch and every mean over
tasks above is (1/T) Σ_r Σ_{t ∈ S_r}: each rank sums over its own tasks and one all-reduce adds the
ranks' sums (TaskSplit.mean), for g, for every Fv and for the line search's L and KL. Every rank
then holds the same g, Fv, L and KL, takes the same CG iterations and line-search decisions, and
so keeps the same θ.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import vmap

from ..distributed import DistributedContext
from .gaussian_mlp import closed_form, reinforce_gradient, surrogate_gradient
from .policy import (batched_gradients, batched_outputs, expand, kl_loss, log_prob, module_lock, parameters_of,
                     reinforce_loss, surrogate_loss)
from .trajectories import PolicyBatch, Trajectories, advantages, check_share, sample


@dataclass
class TRPOSettings:
    """The paper's: α = 0.1, δ = 0.01; CG, damping and backtracking as in rllab and pytorch-maml-rl."""

    inner_lr: float = 0.1
    first_order: bool = False
    max_kl: float = 0.01
    cg_iterations: int = 10
    cg_damping: float = 1e-5
    backtrack_ratio: float = 0.8
    max_backtracks: int = 15
    gamma: float = 0.99

    def __post_init__(self):
        if not (self.max_kl > 0 and math.isfinite(self.max_kl)):
            raise ValueError(f"max_kl must be a positive number, got {self.max_kl}")
        if not 0 < self.backtrack_ratio < 1:
            raise ValueError(f"backtrack_ratio must be in (0, 1), got {self.backtrack_ratio}")
        if self.cg_iterations < 1 or self.max_backtracks < 1:
            raise ValueError("cg_iterations and max_backtracks must be at least 1")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")


def flatten(tensors: dict[str, torch.Tensor], batched: bool = False) -> torch.Tensor:
    """One vector [P] (or [T, P] when batched) of the tensors, in the dict's order."""
    if batched:
        return torch.cat([t.reshape(t.shape[0], -1) for t in tensors.values()], dim=1)
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def unflatten(vector: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of flatten for unbatched tensors shaped like `like`."""
    out, offset = {}, 0
    for name, tensor in like.items():
        out[name] = vector[offset: offset + tensor.numel()].reshape(tensor.shape)
        offset += tensor.numel()
    return out


# The losses whose batched gradients pymaml.rl.gaussian_mlp has in closed form.
CLOSED_FORM_GRADIENTS = {reinforce_loss: reinforce_gradient, surrogate_loss: surrogate_gradient}


def outputs(policy: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The policy's outputs for every task (params [T, ...] per name, x [T, K, O]): by the closed
    forms' forward pass where they serve the policy, otherwise by torch.func."""
    derivatives = closed_form(policy)
    return batched_outputs(policy, params, x) if derivatives is None else derivatives.outputs(params, x)


def gradients(policy: nn.Module, loss, params: dict[str, torch.Tensor], x: torch.Tensor,
              y: torch.Tensor) -> dict[str, torch.Tensor]:
    """∇_θ loss_t(θ_t) for every task, [T, ...] per name: in closed form where
    pymaml.rl.gaussian_mlp serves the policy and the loss, otherwise by torch.func."""
    derivatives = closed_form(policy)
    if derivatives is None or loss not in CLOSED_FORM_GRADIENTS:
        return batched_gradients(policy, loss, params, x, y)
    return derivatives.gradient(CLOSED_FORM_GRADIENTS[loss], params, x, y)


def inner_step(policy: nn.Module, params: dict[str, torch.Tensor], batch: PolicyBatch,
               inner_lr: float) -> dict[str, torch.Tensor]:
    """θ'_t = θ_t - α ∇L_in,t(θ_t) for every task: params [T, ...] per name."""
    gradients_now = gradients(policy, reinforce_loss, params, batch.observations, batch.reinforce_targets)
    return {name: params[name] - inner_lr * gradients_now[name] for name in params}


@dataclass(frozen=True)
class TaskSplit:
    """This process's tasks `share` (a contiguous range) of a meta-batch of `total` tasks, and the
    distributed context whose ranks hold the other tasks (a single-process context: share is all)."""

    total: int
    share: range
    context: DistributedContext = field(default_factory=DistributedContext)

    def __post_init__(self):
        check_share(self.share, self.total)
        if not self.context.is_distributed and len(self.share) != self.total:
            raise ValueError(f"a single process holds all {self.total} tasks of the meta-batch, not {self.share!r}")

    @classmethod
    def whole(cls, total: int) -> TaskSplit:
        return cls(total, range(total))

    @classmethod
    def of(cls, total: int, context: DistributedContext) -> TaskSplit:
        """The contiguous share of this rank (pymaml.distributed.shard_range)."""
        return cls(total, context.shard_range(total), context)

    def mean(self, local_sum: torch.Tensor) -> torch.Tensor:
        """(1/T) Σ over all tasks, from the sum over this process's tasks: one all-reduce of the
        ranks' sums, so every rank gets the same tensor."""
        if self.context.is_distributed:
            self.context.require_process_group()
            local_sum = local_sum.clone()
            torch.distributed.all_reduce(local_sum)
        return local_sum / self.total


@dataclass
class OuterProblem:
    """The outer step at θ: the pre-adaptation batch (None for multi-task training, where θ'_t = θ),
    the post-adaptation batch, θ'_t and the old policy's outputs on the post-adaptation states, for
    this process's tasks `split.share` of the meta-batch."""

    params: dict[str, torch.Tensor]
    pre: PolicyBatch | None
    post: PolicyBatch
    adapted: dict[str, torch.Tensor]
    old_outputs: torch.Tensor
    surrogate_targets: torch.Tensor
    split: TaskSplit
    # The HVPs' retained gradient graphs, built on first use (hvp).
    _products: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def tasks(self) -> int:
        """This process's task count."""
        return self.post.observations.shape[0]

    def hvp(self, policy: nn.Module, which: str) -> Callable[[dict], dict]:
        """u ↦ H u for every task, u and H u [T, ...] per name: which = "inner", H_t of the
        REINFORCE loss at θ on the pre-adaptation batch; "fisher", F_t of the KL at θ'_t on the
        post-adaptation batch. The batched gradient's graph is built on the first call and kept
        while this problem lives; each product is one backward pass through it."""
        product = self._products.get(which)
        if product is None:
            if which == "inner":
                point, loss, x, y = expand(self.params, self.tasks), reinforce_loss, self.pre.observations, \
                    self.pre.reinforce_targets
            else:
                point, loss, x, y = self.adapted, kl_loss, self.post.observations, self.old_outputs
            product = self._products[which] = hvp_at(policy, loss, point, x, y)
        return product


def hvp_at(policy: nn.Module, loss, point: dict[str, torch.Tensor], x: torch.Tensor,
           y: torch.Tensor) -> Callable[[dict], dict]:
    """u ↦ H_t u_t for every task, H_t = ∇²_P loss_t at P_t = point, where pymaml.rl.gaussian_mlp
    serves the policy: loss = reinforce_loss by the R-operator; loss = kl_loss by the Gauss–Newton
    product when y (the old policy's outputs) equals the outputs at `point`, as TRPO asks for it.
    Otherwise (another policy or loss, or a KL away from its minimum) through a retained graph."""
    derivatives = closed_form(policy)
    if derivatives is not None and loss is reinforce_loss:
        return derivatives.reinforce_hvp(point, x, y)
    if derivatives is not None and loss is kl_loss:
        forward = derivatives.forward(point, x)
        if torch.equal(forward.outputs, y):
            return derivatives.kl_fisher(point, x, forward)
    return _retained_hvp(policy, loss, point, x, y)


def _retained_hvp(policy: nn.Module, loss, point: dict[str, torch.Tensor], x: torch.Tensor,
                  y: torch.Tensor) -> Callable[[dict], dict]:
    """u ↦ ∇_P (g(P) · u) with g(P) = ∇_P Σ_t loss_t(P_t) at P = point: per task H_t u_t, the tasks'
    losses being separable. g's graph is built here, once, and kept by the returned function."""
    names = list(point)
    leaves = [point[name].detach().requires_grad_() for name in names]
    with torch.enable_grad():
        predictions = batched_outputs(policy, dict(zip(names, leaves)), x)
        first = torch.autograd.grad(vmap(loss)(predictions, y).sum(), leaves, create_graph=True, allow_unused=True,
                                    materialize_grads=True)
    # A gradient that does not depend on P (a constant, or zeros for a parameter the outputs do not
    # use) adds nothing to any product.
    varying = [i for i, g in enumerate(first) if g.requires_grad]

    def product(vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not varying:
            return {name: torch.zeros_like(leaf) for name, leaf in zip(names, leaves)}
        with torch.enable_grad():
            products = torch.autograd.grad([first[i] for i in varying], leaves,
                                           grad_outputs=[vectors[names[i]] for i in varying], retain_graph=True,
                                           allow_unused=True, materialize_grads=True)
        return dict(zip(names, products))

    return product


def outer_problem(policy: nn.Module, params: dict[str, torch.Tensor], pre: PolicyBatch | None, post: PolicyBatch,
                  inner_lr: float, split: TaskSplit | None = None) -> OuterProblem:
    """split: this process's share of the meta-batch; None: the batches hold the whole meta-batch."""
    tasks = post.observations.shape[0]
    split = TaskSplit.whole(tasks) if split is None else split
    if len(split.share) != tasks:
        raise ValueError(f"the batches hold {tasks} tasks but this process's share has {len(split.share)}")
    params = {name: p.detach() for name, p in params.items()}
    with torch.no_grad():
        adapted = adapted_at(policy, params, pre, inner_lr, tasks)
        old_outputs = outputs(policy, adapted, post.observations)
        old_log_prob = log_prob(old_outputs, post.actions)
    return OuterProblem(params, pre, post, adapted, old_outputs, post.surrogate_targets(old_log_prob), split)


def adapted_at(policy: nn.Module, params: dict[str, torch.Tensor], pre: PolicyBatch | None, inner_lr: float,
               tasks: int) -> dict[str, torch.Tensor]:
    """θ'_t(θ) for every task; θ itself for each task without a pre-adaptation batch."""
    batched = expand(params, tasks)
    return batched if pre is None else inner_step(policy, batched, pre, inner_lr)


def chain(policy: nn.Module, problem: OuterProblem, settings: TRPOSettings,
          vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """J_tᵀ u_t = J_t u_t = u_t - α H_t u_t for every task (J_t = I first order or without inner step)."""
    if problem.pre is None or settings.first_order:
        return vectors
    products = problem.hvp(policy, "inner")(vectors)
    return {name: vectors[name] - settings.inner_lr * products[name] for name in vectors}


def meta_gradient(policy: nn.Module, problem: OuterProblem, settings: TRPOSettings) -> dict[str, torch.Tensor]:
    """g = (1/T) Σ_t J_tᵀ ∇L_out,t(θ'_t)."""
    outer = gradients(policy, surrogate_loss, problem.adapted, problem.post.observations, problem.surrogate_targets)
    local_sum = flatten(chain(policy, problem, settings, outer), batched=True).sum(0)
    return unflatten(problem.split.mean(local_sum), problem.params)


def fisher_vector_product(policy: nn.Module, problem: OuterProblem, settings: TRPOSettings,
                          vector: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fv = (1/T) Σ_t J_tᵀ F_t J_t v, without damping."""
    inward = chain(policy, problem, settings, expand(vector, problem.tasks))
    fisher = problem.hvp(policy, "fisher")(inward)
    local_sum = flatten(chain(policy, problem, settings, fisher), batched=True).sum(0)
    return unflatten(problem.split.mean(local_sum), problem.params)


def conjugate_gradient(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iterations: int,
                       tolerance: float = 1e-10) -> torch.Tensor:
    """x ≈ A⁻¹ b for a symmetric positive definite A given as matvec, after at most `iterations`
    steps, stopping once the squared residual is below `tolerance`."""
    x = torch.zeros_like(b)
    residual = b.clone()
    direction = b.clone()
    squared = residual @ residual
    for _ in range(iterations):
        if squared <= tolerance:
            break
        product = matvec(direction)
        step = squared / (direction @ product)
        x = x + step * direction
        residual = residual - step * product
        new_squared = residual @ residual
        direction = residual + (new_squared / squared) * direction
        squared = new_squared
    return x


def surrogate_and_kl(policy: nn.Module, problem: OuterProblem, settings: TRPOSettings,
                     params: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(L(θ), KL(θ)) at candidate parameters θ: the inner step redone from θ on the same
    pre-adaptation trajectories, the surrogate and KL on the post-adaptation ones."""
    with torch.no_grad():
        adapted = adapted_at(policy, params, problem.pre, settings.inner_lr, problem.tasks)
        candidate = outputs(policy, adapted, problem.post.observations)
        local_sums = torch.stack([vmap(surrogate_loss)(candidate, problem.surrogate_targets).sum(),
                                  vmap(kl_loss)(candidate, problem.old_outputs).sum()])
        loss, kl = problem.split.mean(local_sums).tolist()
    return loss, kl


@dataclass
class StepResult:
    params: dict[str, torch.Tensor]
    accepted: bool
    backtracks: int
    loss_before: float
    loss_after: float
    kl: float


def trpo_step(policy: nn.Module, problem: OuterProblem, settings: TRPOSettings) -> StepResult:
    """One TRPO step from problem.params (see the module's docstring)."""
    like = problem.params
    gradient = flatten(meta_gradient(policy, problem, settings))

    def damped_fisher(vector: torch.Tensor) -> torch.Tensor:
        product = flatten(fisher_vector_product(policy, problem, settings, unflatten(vector, like)))
        return product + settings.cg_damping * vector

    direction = conjugate_gradient(damped_fisher, gradient, settings.cg_iterations)
    curvature = (direction @ damped_fisher(direction)).item()
    loss_before, _ = surrogate_and_kl(policy, problem, settings, like)
    if not (curvature > 0 and math.isfinite(curvature)):
        return StepResult(like, False, 0, loss_before, loss_before, 0.0)
    full_step = math.sqrt(2 * settings.max_kl / curvature) * direction
    flat = flatten(like)
    for backtrack in range(settings.max_backtracks):
        candidate = unflatten(flat - settings.backtrack_ratio ** backtrack * full_step, like)
        loss, kl = surrogate_and_kl(policy, problem, settings, candidate)
        if loss < loss_before and kl <= settings.max_kl:
            return StepResult(candidate, True, backtrack, loss_before, loss, kl)
    return StepResult(like, False, settings.max_backtracks, loss_before, loss_before, 0.0)


@dataclass
class IterationStats:
    """Mean returns before and after the inner step (equal for multi-task training), the TRPO
    step's outcome, and the seconds spent sampling, in the inner step and in the outer step."""

    pre_return: float
    post_return: float
    accepted: bool
    backtracks: int
    kl: float
    seconds: dict[str, float]


class MetaTRPO:
    """Meta-trains `policy` in place on a task family, one meta-batch of tasks per `step`.
    multitask=True: the "pretrained" baseline, TRPO on the trajectories of θ itself, no inner step.
    context: a distributed context (pymaml.distributed.init()) whose ranks split every meta-batch;
    every rank passes the same tasks and an identically seeded generator to `step`, starts from the
    same θ and keeps the same θ. None: this process alone."""

    def __init__(self, policy: nn.Module, env, settings: TRPOSettings | None = None, trajectories: int = 20,
                 multitask: bool = False, context: DistributedContext | None = None):
        if trajectories < 2:
            raise ValueError(f"trajectories must be at least 2 (the advantages are normalised), got {trajectories}")
        self.policy, self.env, self.trajectories, self.multitask = policy, env, trajectories, multitask
        self.settings = TRPOSettings() if settings is None else settings
        self.context = DistributedContext() if context is None else context

    def params(self) -> dict[str, torch.Tensor]:
        with module_lock(self.policy):
            return {name: p.detach() for name, p in self.policy.named_parameters()}

    def step(self, tasks: torch.Tensor, generator: torch.Generator) -> IterationStats:
        """One meta-iteration on the meta-batch `tasks` [T, ...]; this rank samples, adapts and
        differentiates its share of the T tasks."""
        split = TaskSplit.of(tasks.shape[0], self.context)
        settings, params, count = self.settings, self.params(), len(split.share)
        seconds = {"sampling": 0.0, "inner": 0.0, "outer": 0.0}
        began = time.perf_counter()
        first = sample(self.policy, expand(params, count), self.env, tasks, self.trajectories, generator, split.share)
        seconds["sampling"] += time.perf_counter() - began
        if self.multitask:
            pre, after = None, first
        else:
            began = time.perf_counter()
            pre = advantages(first, settings.gamma)
            with torch.no_grad():
                adapted = inner_step(self.policy, expand(params, count), pre, settings.inner_lr)
            seconds["inner"] += time.perf_counter() - began
            began = time.perf_counter()
            after = sample(self.policy, adapted, self.env, tasks, self.trajectories, generator, split.share)
            seconds["sampling"] += time.perf_counter() - began
        began = time.perf_counter()
        problem = outer_problem(self.policy, params, pre, advantages(after, settings.gamma), settings.inner_lr, split)
        result = trpo_step(self.policy, problem, settings)
        with torch.no_grad(), module_lock(self.policy):
            for name, p in self.policy.named_parameters():
                p.copy_(result.params[name])
        seconds["outer"] += time.perf_counter() - began
        pre_return, post_return = split.mean(torch.stack([first.returns.sum(), after.returns.sum()])).tolist()
        return IterationStats(pre_return, post_return, result.accepted, result.backtracks, result.kl, seconds)


def returns_after_steps(policy: nn.Module, env, tasks: torch.Tensor, step_sizes: Sequence[float],
                        trajectories: int, generator: torch.Generator, gamma: float = 0.99) -> torch.Tensor:
    """The measure of Figures 4 and 5: the mean return of each task after 0..S policy-gradient steps from the
    policy's parameters, S = len(step_sizes), step s of size step_sizes[s] on trajectories of the
    previous parameters; [S + 1, T]. Once a step's trajectories hold a non-finite return or
    observation (the adapted policy diverged), no further step can be taken: the rows after it are NaN."""
    step_sizes = [float(size) for size in step_sizes]
    for size in step_sizes:
        if not (size >= 0 and math.isfinite(size)):
            raise ValueError(f"every step size must be a finite number >= 0, got {step_sizes}")
    params = expand(parameters_of(policy), tasks.shape[0])
    returns = []
    for step in range(len(step_sizes) + 1):
        trajectories_now: Trajectories = sample(policy, params, env, tasks, trajectories, generator)
        returns.append(trajectories_now.returns)
        if not (bool(torch.isfinite(trajectories_now.returns).all())
                and bool(torch.isfinite(trajectories_now.observations).all())):
            returns += [torch.full_like(trajectories_now.returns, math.nan)] * (len(step_sizes) - step)
            break
        if step < len(step_sizes):
            with torch.no_grad():
                params = inner_step(policy, params, advantages(trajectories_now, gamma), step_sizes[step])
    return torch.stack(returns)
