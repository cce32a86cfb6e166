"""MAML-TRPO on 2D navigation: one meta-iteration's three phases, batched over tasks (pymaml.rl)
against the same algorithm one task at a time (each task's own sampler calls, autograd per task
for the inner step, autograd through each task's inner step for the meta-gradient and a per-task
double backward of the KL for every Fisher-vector product).

Implementations: `batched` (pymaml.rl with the paper's policy: the closed-form derivatives of
pymaml.rl.gaussian_mlp), `batched-autograd` (pymaml.rl with a subclass of the policy, which the
closed forms refuse: torch.func gradients and HVPs through retained autograd graphs), and
`one-task-at-a-time`. All run in one process with glibc's freed memory retained
(pymaml.rl.allocator, as `pymaml rl` runs), so the three see the same allocator
(PYMAML_BENCH_DEFAULT_ALLOCATOR=1: glibc's defaults for all three).

Phases: `sampling` (the pre- and post-adaptation trajectories), `inner` (the baselines, the
advantages and the inner step), `outer` (the TRPO step: meta-gradient, 10 CG iterations over
Fisher-vector products, line search). Meta-batch 40, 20 trajectories per task, the paper's policy;
horizon 100 is the paper's, horizon 20 a shorter case that runs in a few minutes here.
Run: PYMAML_BENCH_NO_REPORT=1 pytest bench/test_rl_meta_iteration.py --benchmark-only
(Not bench/test_rl.py: pytest collects tests/ and bench/ in one session, and two test modules
named test_rl in folders without __init__.py collide.)
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch.func import functional_call

from pymaml.rl import GaussianMLPPolicy, Navigation2D, TRPOSettings, advantages, sample
from pymaml.rl.allocator import retain_freed_memory
from pymaml.rl.policy import expand, kl_loss, log_prob, reinforce_loss, surrogate_loss
from pymaml.rl.trpo import conjugate_gradient, flatten, inner_step, outer_problem, trpo_step, unflatten

META_BATCH, TRAJECTORIES = 40, 20
HORIZONS = [20, 100]
ONE_TASK = "one-task-at-a-time"
IMPLEMENTATIONS = ["batched", "batched-autograd", ONE_TASK]
# PYMAML_BENCH_DEFAULT_ALLOCATOR=1 keeps glibc's default thresholds, to measure what retaining saves.
if os.environ.get("PYMAML_BENCH_DEFAULT_ALLOCATOR") != "1":
    retain_freed_memory()


class SubclassedPolicy(GaussianMLPPolicy):
    """The paper's policy under another class: pymaml.rl falls back to torch.func and autograd."""


def skip_long_horizon_in_smoke_mode(request, horizon: int) -> None:
    """Smoke runs (--benchmark-disable, part of the tests) take the short horizon only: the paper's
    horizon of 100 costs about a minute of outer steps on 2 cores."""
    if horizon != min(HORIZONS) and request.config.getoption("benchmark_disable"):
        pytest.skip(f"smoke mode runs horizon {min(HORIZONS)} only; horizon {horizon} is timed")


def setting(horizon, implementation="batched"):
    torch.manual_seed(0)
    env = Navigation2D(horizon=horizon)
    policy = (SubclassedPolicy if implementation == "batched-autograd" else GaussianMLPPolicy)(2, 2)
    generator = torch.Generator().manual_seed(0)
    tasks = env.sample_tasks(META_BATCH, generator)
    params = {name: p.detach() for name, p in policy.named_parameters()}
    first = sample(policy, expand(params, META_BATCH), env, tasks, TRAJECTORIES, generator)
    pre = advantages(first, 0.99)
    with torch.no_grad():
        adapted = inner_step(policy, expand(params, META_BATCH), pre, 0.1)
    post = advantages(sample(policy, adapted, env, tasks, TRAJECTORIES, generator), 0.99)
    return env, policy, tasks, params, first, pre, post


def per_task_adapted(policy, theta, pre, task, inner_lr, create_graph):
    loss = reinforce_loss(functional_call(policy, theta, (pre.observations[task],)), pre.reinforce_targets[task])
    grads = torch.autograd.grad(loss, list(theta.values()), create_graph=create_graph)
    return {name: p - inner_lr * g for (name, p), g in zip(theta.items(), grads)}


def one_task_at_a_time_trpo_step(policy, params, pre, post, settings):
    """The TRPO step of pymaml.rl.trpo.trpo_step with every per-task quantity from autograd on that task alone."""
    tasks = post.observations.shape[0]
    names = list(params)
    old = []
    for task in range(tasks):
        start = {n: p.clone().requires_grad_() for n, p in params.items()}
        adapted = per_task_adapted(policy, start, pre, task, settings.inner_lr, create_graph=False)
        with torch.no_grad():
            outputs = functional_call(policy, {n: p.detach() for n, p in adapted.items()}, (post.observations[task],))
        old.append((outputs, post.surrogate_targets(log_prob(outputs, post.actions[task]).expand(tasks, -1))[task]))

    def per_task(theta, task):
        adapted = per_task_adapted(policy, theta, pre, task, settings.inner_lr, create_graph=True)
        return functional_call(policy, adapted, (post.observations[task],))

    theta = {n: p.clone().requires_grad_() for n, p in params.items()}
    gradient = torch.zeros(sum(p.numel() for p in params.values()))
    for task in range(tasks):
        loss = surrogate_loss(per_task(theta, task), old[task][1]) / tasks
        gradient += torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(theta.values()))])

    def fisher(vector):
        product = torch.zeros_like(vector)
        pieces = unflatten(vector, params)
        for task in range(tasks):
            kl = kl_loss(per_task(theta, task), old[task][0]) / tasks
            grads = torch.autograd.grad(kl, list(theta.values()), create_graph=True)
            directional = sum((g * pieces[n]).sum() for g, n in zip(grads, names))
            product += torch.cat([g.reshape(-1) for g in torch.autograd.grad(directional, list(theta.values()))])
        return product + settings.cg_damping * vector

    def surrogate_and_kl(candidate):
        loss = kl = 0.0
        for task in range(tasks):
            start = {n: p.clone().requires_grad_() for n, p in candidate.items()}
            adapted = {n: p.detach() for n, p in per_task_adapted(policy, start, pre, task, settings.inner_lr,
                                                                    False).items()}
            with torch.no_grad():
                outputs = functional_call(policy, adapted, (post.observations[task],))
                loss += surrogate_loss(outputs, old[task][1]).item() / tasks
                kl += kl_loss(outputs, old[task][0]).item() / tasks
        return loss, kl

    direction = conjugate_gradient(fisher, gradient, settings.cg_iterations)
    full_step = math.sqrt(2 * settings.max_kl / (direction @ fisher(direction)).item()) * direction
    before, _ = surrogate_and_kl(params)
    flat = flatten(params)
    for backtrack in range(settings.max_backtracks):
        candidate = unflatten(flat - settings.backtrack_ratio ** backtrack * full_step, params)
        loss, kl = surrogate_and_kl(candidate)
        if loss < before and kl <= settings.max_kl:
            return candidate
    return params


@pytest.mark.parametrize("horizon", HORIZONS)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_sampling(benchmark, request, implementation, horizon):
    skip_long_horizon_in_smoke_mode(request, horizon)
    env, policy, tasks, params, *_ = setting(horizon, implementation)
    benchmark.extra_info.update(phase="sampling", meta_batch=META_BATCH, trajectories=TRAJECTORIES, horizon=horizon)

    def run():
        generator = torch.Generator().manual_seed(1)
        for _ in range(2):  # before and after the inner step
            if implementation != ONE_TASK:
                sample(policy, expand(params, META_BATCH), env, tasks, TRAJECTORIES, generator)
            else:
                for task in range(META_BATCH):
                    sample(policy, expand(params, 1), env, tasks[task: task + 1], TRAJECTORIES, generator)

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)


def phase_calls(horizon: int, implementation: str) -> dict:
    """Per timed phase ("inner", "outer"), a call that runs it once for `implementation`: the
    baselines, advantages and inner step; the TRPO step. Shared by the benchmarks below and
    bench/interleaved_rl.py."""
    _, policy, _, params, first, pre, post = setting(horizon, implementation)
    settings = TRPOSettings()

    def inner():
        if implementation != ONE_TASK:
            with torch.no_grad():
                inner_step(policy, expand(params, META_BATCH), advantages(first, 0.99), 0.1)
            return
        for task in range(META_BATCH):
            one = type(first)(first.observations[task: task + 1], first.actions[task: task + 1],
                              first.rewards[task: task + 1])
            theta = {n: p.clone().requires_grad_() for n, p in params.items()}
            per_task_adapted(policy, theta, advantages(one, 0.99), 0, 0.1, create_graph=False)

    def outer():
        if implementation != ONE_TASK:
            return trpo_step(policy, outer_problem(policy, params, pre, post, settings.inner_lr), settings).params
        return one_task_at_a_time_trpo_step(policy, params, pre, post, settings)

    return {"inner": inner, "outer": outer}


@pytest.mark.parametrize("horizon", HORIZONS)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_inner(benchmark, request, implementation, horizon):
    skip_long_horizon_in_smoke_mode(request, horizon)
    run = phase_calls(horizon, implementation)["inner"]
    benchmark.extra_info.update(phase="inner", meta_batch=META_BATCH, trajectories=TRAJECTORIES, horizon=horizon)
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("horizon", HORIZONS)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_outer(benchmark, request, implementation, horizon):
    skip_long_horizon_in_smoke_mode(request, horizon)
    run = phase_calls(horizon, implementation)["outer"]
    benchmark.extra_info.update(phase="outer", meta_batch=META_BATCH, trajectories=TRAJECTORIES, horizon=horizon)
    benchmark.pedantic(run, rounds=1, warmup_rounds=1)  # the warm-up round pays torch.func's first-call cost
