"""pymaml.rl against plain one-task-at-a-time loops: the environment, the sampler, the baseline,
the inner policy-gradient step, the TRPO meta-gradient and Fisher-vector product (autograd over
each task, through the inner step), conjugate gradient and the line search."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.func import functional_call

from helpers import TOLERANCE, relative_error
from pymaml.rl import GaussianMLPPolicy, MetaTRPO, Navigation2D, TRPOSettings, advantages, sample
from pymaml.rl.navigation import MAX_SPEED
from pymaml.rl.policy import expand, kl_loss, log_prob, reinforce_loss, surrogate_loss
from pymaml.rl.trajectories import BASELINE_RIDGE, baseline_features, discounted_returns, fit_baseline
from pymaml.rl.trpo import (conjugate_gradient, fisher_vector_product, flatten, inner_step, meta_gradient,
                            outer_problem, surrogate_and_kl, trpo_step)

FLOAT64 = TOLERANCE[torch.float64]
TASKS, TRAJECTORIES, HORIZON = 3, 4, 6


def small_policy(seed: int = 0) -> GaussianMLPPolicy:
    torch.manual_seed(seed)
    return GaussianMLPPolicy(2, 2, hidden=(8, 8), initial_std=0.5).double()


def parameters(policy) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in policy.named_parameters()}


class SubclassedPolicy(GaussianMLPPolicy):
    """Computes what GaussianMLPPolicy computes, but is not one: pymaml.rl takes its derivatives
    from torch.func and autograd instead of the closed forms."""


def policy_of_kind(kind: str) -> GaussianMLPPolicy:
    """closed_form: the plain policy; autograd: a subclass; hooked: a forward hook that changes the
    first layer's output, which the closed forms would not run (both of the latter fall back)."""
    policy = small_policy()
    if kind == "autograd":
        policy.__class__ = SubclassedPolicy
    elif kind == "hooked":
        policy.mean[0].register_forward_hook(lambda module, inputs, output: 1.5 * output)
    return policy


POLICY_KINDS = ["closed_form", "autograd", "hooked"]


@pytest.fixture(params=POLICY_KINDS)
def problem_data(request):
    """A small policy, tasks, and FIXED pre- and post-adaptation batches (float64)."""
    policy, env = policy_of_kind(request.param), Navigation2D(horizon=HORIZON)
    generator = torch.Generator().manual_seed(3)
    goals = env.sample_tasks(TASKS, generator, dtype=torch.float64)
    params = parameters(policy)
    pre = advantages(sample(policy, expand(params, TASKS), env, goals, TRAJECTORIES, generator), 0.99)
    with torch.no_grad():
        adapted = inner_step(policy, expand(params, TASKS), pre, 0.1)
    post = advantages(sample(policy, adapted, env, goals, TRAJECTORIES, generator), 0.99)
    return policy, params, pre, post


def loop_adapted(policy, theta, pre, task, inner_lr, first_order):
    """θ'_t = θ - α ∇L_in,t(θ) by autograd on task t alone, differentiable in θ unless first order."""
    loss = reinforce_loss(functional_call(policy, theta, (pre.observations[task],)), pre.reinforce_targets[task])
    grads = torch.autograd.grad(loss, list(theta.values()), create_graph=not first_order)
    return {name: p - inner_lr * g for (name, p), g in zip(theta.items(), grads)}


def test_navigation_step_matches_one_trajectory_loop():
    env = Navigation2D(horizon=HORIZON)
    generator = torch.Generator().manual_seed(0)
    goals = env.sample_tasks(TASKS, generator, dtype=torch.float64)
    actions = torch.randn(TASKS, TRAJECTORIES, HORIZON, 2, generator=generator, dtype=torch.float64) * 0.2
    observation = env.reset(goals, TRAJECTORIES)
    batched = []
    for step in range(HORIZON):
        observation, reward = env.step(observation, actions[:, :, step], goals)
        batched.append(reward)
    batched = torch.stack(batched, -1)
    assert bool((goals.abs() <= 0.5).all())
    for task in range(TASKS):
        for trajectory in range(TRAJECTORIES):
            x = y = 0.0
            for step in range(HORIZON):
                dx, dy = (min(max(float(a), -MAX_SPEED), MAX_SPEED) for a in actions[task, trajectory, step])
                x, y = x + dx, y + dy
                expected = -math.hypot(x - float(goals[task, 0]), y - float(goals[task, 1]))
                assert abs(float(batched[task, trajectory, step]) - expected) <= FLOAT64 * abs(expected)
            assert abs(float(observation[task, trajectory, 0]) - x) <= FLOAT64
            assert abs(float(observation[task, trajectory, 1]) - y) <= FLOAT64


def test_navigation_rejects_bad_shapes():
    env = Navigation2D()
    with pytest.raises(ValueError, match="goals \\[T, 2\\]"):
        env.reset(torch.zeros(3), 2)
    with pytest.raises(ValueError, match="observations and actions"):
        env.step(torch.zeros(2, 3, 2), torch.zeros(2, 3, 3), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="horizon"):
        Navigation2D(horizon=0)


def test_sampler_matches_one_task_loop():
    """All tasks and trajectories stepped together equal each task's own policy and each
    trajectory stepped alone, with the same noise."""
    policy, env = small_policy(), Navigation2D(horizon=HORIZON)
    goals = env.sample_tasks(TASKS, torch.Generator().manual_seed(1), dtype=torch.float64)
    params = {name: p + 0.1 * torch.randn(TASKS, *p.shape, dtype=p.dtype) for name, p in parameters(policy).items()}
    batched = sample(policy, params, env, goals, TRAJECTORIES, torch.Generator().manual_seed(2))
    generator = torch.Generator().manual_seed(2)
    noise = [torch.randn(TASKS, TRAJECTORIES, 2, generator=generator, dtype=torch.float64) for _ in range(HORIZON)]
    for task in range(TASKS):
        theta = {name: p[task] for name, p in params.items()}
        for trajectory in range(TRAJECTORIES):
            position = torch.zeros(2, dtype=torch.float64)
            for step in range(HORIZON):
                with torch.no_grad():
                    output = functional_call(policy, theta, (position,))
                action = output[:2] + output[2:].exp() * noise[step][task, trajectory]
                assert relative_error(batched.observations[task, trajectory, step], position) <= FLOAT64
                assert relative_error(batched.actions[task, trajectory, step], action) <= FLOAT64
                position = position + action.clamp(-MAX_SPEED, MAX_SPEED)
                reward = -(position - goals[task]).norm()
                assert relative_error(batched.rewards[task, trajectory, step], reward) <= FLOAT64


def test_sampler_share_equals_its_slice_of_the_whole_meta_batch():
    """A share of the tasks (a process's part of the meta-batch) gets the trajectories those tasks
    get when the whole meta-batch is sampled, and leaves the generator in the same state."""
    policy, env = small_policy(), Navigation2D(horizon=HORIZON)
    goals = env.sample_tasks(5, torch.Generator().manual_seed(1), dtype=torch.float64)
    params = {name: p + 0.1 * torch.randn(5, *p.shape, dtype=p.dtype) for name, p in parameters(policy).items()}
    whole_generator = torch.Generator().manual_seed(2)
    whole = sample(policy, params, env, goals, TRAJECTORIES, whole_generator)
    for share in (range(0, 3), range(3, 5)):
        generator = torch.Generator().manual_seed(2)
        part = sample(policy, {name: p[share.start:share.stop] for name, p in params.items()}, env, goals,
                      TRAJECTORIES, generator, share)
        for name in ("observations", "actions", "rewards"):
            assert torch.equal(getattr(part, name), getattr(whole, name)[share.start:share.stop])
        assert torch.equal(generator.get_state(), whole_generator.get_state())
    with pytest.raises(ValueError, match="the parameters hold \\[5\\] tasks but the share has 2"):
        sample(policy, params, env, goals, TRAJECTORIES, torch.Generator(), range(3, 5))
    with pytest.raises(ValueError, match="share must be a non-empty contiguous range"):
        sample(policy, params, env, goals, TRAJECTORIES, torch.Generator(), range(3, 8))


def test_sampler_refuses_tasks_of_another_dtype():
    policy, env = small_policy(), Navigation2D(horizon=HORIZON)
    goals = env.sample_tasks(TASKS, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="the tasks are torch.float32 but the policy's parameters are"):
        sample(policy, expand(parameters(policy), TASKS), env, goals, TRAJECTORIES, torch.Generator())


def test_sampling_and_training_are_reproducible():
    env = Navigation2D(horizon=HORIZON)
    runs = []
    for _ in range(2):
        policy = small_policy(seed=5)
        trainer = MetaTRPO(policy, env, trajectories=TRAJECTORIES)
        generator = torch.Generator().manual_seed(7)
        stats = [trainer.step(env.sample_tasks(TASKS, generator, dtype=torch.float64), generator) for _ in range(2)]
        runs.append((flatten(parameters(policy)), [(s.pre_return, s.post_return) for s in stats]))
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]


def test_discounted_returns_and_baseline_match_per_task_solutions():
    generator = torch.Generator().manual_seed(4)
    rewards = torch.randn(TASKS, TRAJECTORIES, HORIZON, generator=generator, dtype=torch.float64)
    returns = discounted_returns(rewards, 0.9)
    for task in range(TASKS):
        for trajectory in range(TRAJECTORIES):
            running = 0.0
            for step in reversed(range(HORIZON)):
                running = float(rewards[task, trajectory, step]) + 0.9 * running
                assert abs(float(returns[task, trajectory, step]) - running) <= FLOAT64 * max(1.0, abs(running))
    observations = torch.randn(TASKS, TRAJECTORIES, HORIZON, 2, generator=generator, dtype=torch.float64)
    features = baseline_features(observations).reshape(TASKS, TRAJECTORIES * HORIZON, -1)
    targets = returns.reshape(TASKS, -1)
    values = fit_baseline(features, targets)
    for task in range(TASKS):
        # ridge regression as least squares on [X; √λ I] w ≈ [R; 0]
        stacked = torch.cat([features[task], math.sqrt(BASELINE_RIDGE) * torch.eye(features.shape[-1],
                                                                                    dtype=torch.float64)])
        padded = torch.cat([targets[task], torch.zeros(features.shape[-1], dtype=torch.float64)])
        weights = torch.linalg.lstsq(stacked, padded.unsqueeze(-1)).solution.squeeze(-1)
        assert relative_error(values[task], features[task] @ weights) <= 1e-8


def test_baseline_of_observations_held_at_the_clip_is_solved_in_float64():
    """Observations past FEATURE_CLIP make a task's s and s² columns multiples of the constant
    one: its float32 Gram matrix plus λ = 1e-5 is singular (λ is below its rounding). That task is
    solved again in float64; the others keep the float32 solve of the whole batch, bit for bit."""
    generator = torch.Generator().manual_seed(8)
    observations = torch.randn(3, 20, 100, 2, generator=generator)
    observations[0] = 50.0
    observations[2, :, 40:] = -30.0
    features = baseline_features(observations).reshape(3, 2000, -1)
    returns = torch.randn(3, 2000, generator=generator)
    gram = features.transpose(1, 2) @ features
    moment = features.transpose(1, 2) @ returns.unsqueeze(-1)
    _, info = torch.linalg.solve_ex(gram + BASELINE_RIDGE * torch.eye(features.shape[-1]), moment)
    assert info[0] != 0 and info[1] == 0  # the case this guards against
    values = fit_baseline(features, returns)
    assert torch.isfinite(values).all()
    plain = torch.linalg.solve_ex(gram + BASELINE_RIDGE * torch.eye(features.shape[-1]), moment)[0]
    assert torch.equal(values[1], (features @ plain).squeeze(-1)[1])
    for task in (0, 2) if info[2] != 0 else (0,):
        x, r = features[task].double(), returns[task].double()
        stacked = torch.cat([x, math.sqrt(BASELINE_RIDGE) * torch.eye(x.shape[-1], dtype=torch.float64)])
        padded = torch.cat([r, torch.zeros(x.shape[-1], dtype=torch.float64)])
        weights = torch.linalg.lstsq(stacked, padded.unsqueeze(-1), driver="gelsd").solution
        assert relative_error(values[task].double(), (x @ weights).squeeze(-1)) <= 1e-5


def test_inner_step_matches_autograd_loop(problem_data):
    policy, params, pre, _ = problem_data
    batched = inner_step(policy, expand(params, TASKS), pre, 0.1)
    for task in range(TASKS):
        theta = {name: p.clone().requires_grad_() for name, p in params.items()}
        expected = loop_adapted(policy, theta, pre, task, 0.1, first_order=True)
        actual = {name: p[task] for name, p in batched.items()}
        assert relative_error(flatten(actual), flatten(expected)) <= FLOAT64


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
def test_meta_gradient_matches_autograd_loop(problem_data, first_order):
    """∇_θ (1/T) Σ_t L_out,t(θ'_t(θ)) by autograd through each task's inner step."""
    policy, params, pre, post = problem_data
    settings = TRPOSettings(first_order=first_order)
    actual = flatten(meta_gradient(policy, outer_problem(policy, params, pre, post, 0.1), settings))
    theta = {name: p.clone().requires_grad_() for name, p in params.items()}
    total = 0.0
    for task in range(TASKS):
        adapted = loop_adapted(policy, theta, pre, task, 0.1, first_order)
        output = functional_call(policy, adapted, (post.observations[task],))
        old = log_prob(output.detach(), post.actions[task])
        total = total + surrogate_loss(output, post.surrogate_targets(old.unsqueeze(0).expand(TASKS, -1))[task])
    expected = torch.autograd.grad(total / TASKS, list(theta.values()))
    assert relative_error(actual, torch.cat([g.reshape(-1) for g in expected])) <= FLOAT64


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
def test_fisher_vector_product_matches_double_backward_of_kl(problem_data, first_order):
    """∇_θ (∇_θ KL(θ) · v) with KL(θ) = (1/T) Σ_t KL(π_θ'_t(θ₀) ‖ π_θ'_t(θ)), per task by autograd
    through the inner step (its third-derivative term included, which vanishes at θ₀)."""
    policy, params, pre, post = problem_data
    settings = TRPOSettings(first_order=first_order)
    problem = outer_problem(policy, params, pre, post, 0.1)
    vector = {name: torch.randn(p.shape, generator=torch.Generator().manual_seed(9), dtype=p.dtype)
              for name, p in params.items()}
    actual = flatten(fisher_vector_product(policy, problem, settings, vector))
    theta = {name: p.clone().requires_grad_() for name, p in params.items()}
    total = 0.0
    for task in range(TASKS):
        adapted = loop_adapted(policy, theta, pre, task, 0.1, first_order)
        output = functional_call(policy, adapted, (post.observations[task],))
        total = total + kl_loss(output, output.detach())
    grads = torch.autograd.grad(total / TASKS, list(theta.values()), create_graph=True)
    directional = sum((g * vector[name]).sum() for g, name in zip(grads, theta))
    expected = torch.autograd.grad(directional, list(theta.values()))
    assert relative_error(actual, torch.cat([g.reshape(-1) for g in expected])) <= FLOAT64


def test_conjugate_gradient_solves_positive_definite_system():
    generator = torch.Generator().manual_seed(0)
    factor = torch.randn(12, 12, generator=generator, dtype=torch.float64)
    matrix = factor @ factor.T / 12 + torch.eye(12, dtype=torch.float64)
    b = torch.randn(12, generator=generator, dtype=torch.float64)
    solution = conjugate_gradient(lambda v: matrix @ v, b, iterations=30, tolerance=0.0)
    assert relative_error(solution, torch.linalg.solve(matrix, b)) <= FLOAT64


@pytest.mark.parametrize("max_kl", [1e-2, 1e-4])
def test_line_search_keeps_the_kl_bound_and_improves_the_surrogate(problem_data, max_kl):
    policy, params, pre, post = problem_data
    settings = TRPOSettings(max_kl=max_kl)
    problem = outer_problem(policy, params, pre, post, 0.1)
    result = trpo_step(policy, problem, settings)
    assert result.accepted
    loss, kl = surrogate_and_kl(policy, problem, settings, result.params)
    assert 0 < kl <= max_kl
    assert loss < result.loss_before
    assert (loss, kl) == (result.loss_after, result.kl)


@pytest.mark.parametrize("first_order, multitask, builds", [(False, False, 2), (True, False, 1), (False, True, 1)],
                         ids=["second_order", "first_order", "multitask"])
def test_a_trpo_step_builds_each_products_graph_once(problem_data, monkeypatch, first_order, multitask, builds):
    """The meta-gradient, the CG's Fisher products and the step's curvature all take their HVPs
    (H_t through the inner step, F_t of the KL) from one product per kind, whose forward pass (the
    closed forms) or gradient graph (autograd) is built once per TRPO step, not once per product;
    and the step equals one whose every product builds its own anew."""
    import pymaml.rl.trpo as trpo

    policy, params, pre, post = problem_data
    settings = TRPOSettings(first_order=first_order)
    built = []
    original = trpo.hvp_at

    def counting(*arguments):
        built.append(arguments[1])
        return original(*arguments)

    monkeypatch.setattr(trpo, "hvp_at", counting)
    problem = outer_problem(policy, params, None if multitask else pre, post, 0.1)
    result = trpo_step(policy, problem, settings)
    assert len(built) == builds
    assert built[-1] is kl_loss and (builds == 1 or built[0] is reinforce_loss)

    def fresh(self, policy, which):  # every product from a graph of its own
        self._products.clear()
        return original_hvp(self, policy, which)

    original_hvp = trpo.OuterProblem.hvp
    monkeypatch.setattr(trpo.OuterProblem, "hvp", fresh)
    again = trpo_step(policy, outer_problem(policy, params, None if multitask else pre, post, 0.1), settings)
    assert len(built) > 2 * builds
    assert relative_error(flatten(again.params), flatten(result.params)) <= FLOAT64


def test_trpo_step_without_gradient_keeps_the_parameters(problem_data):
    policy, params, pre, post = problem_data
    post.advantages = torch.zeros_like(post.advantages)
    problem = outer_problem(policy, params, pre, post, 0.1)
    result = trpo_step(policy, problem, TRPOSettings())
    assert not result.accepted
    assert torch.equal(flatten(result.params), flatten(params))


def test_settings_reject_bad_values():
    with pytest.raises(ValueError, match="max_kl"):
        TRPOSettings(max_kl=0.0)
    with pytest.raises(ValueError, match="backtrack_ratio"):
        TRPOSettings(backtrack_ratio=1.0)
    with pytest.raises(ValueError, match="trajectories"):
        MetaTRPO(small_policy(), Navigation2D(), trajectories=1)


def small_job(tmp_path, iterations, checkpoint=None):
    from pymaml.jobs.rl import RLConfig

    return RLConfig(iterations=iterations, meta_batch=2, trajectories=3, eval_tasks=2, eval_steps=2, horizon=5,
                    checkpoint=str(checkpoint) if checkpoint else None, checkpoint_every=1, progress=False)


def test_rl_command_end_to_end(tmp_path, capsys):
    from pymaml.jobs.cli import main

    out = tmp_path / "out"
    assert main(["rl", "--iterations", "2", "--meta-batch", "2", "--trajectories", "3", "--eval-tasks", "2",
                 "--eval-steps", "2", "--horizon", "5", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for policy in ("meta-learned", "pretrained", "random"):
        assert policy in printed
    report = json.loads((out / "report.json").read_text())
    assert report["iterations"] == 2 and len(report["history"]) == 2
    assert set(report["evaluation"]) == {"meta-learned", "pretrained", "random"}
    assert sorted(report["evaluation"]["random"]["mean"]) == ["0", "1", "2"]
    assert (out / report["figure"]).stat().st_size > 0
    import platform

    assert report["freed_memory_retained"] == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")


def test_rl_job_resumed_equals_uninterrupted(tmp_path):
    from pymaml.jobs.rl import run

    whole = run(small_job(tmp_path, 2), tmp_path / "whole")
    checkpoint = tmp_path / "run.pt"
    first = run(small_job(tmp_path, 1, checkpoint), tmp_path / "first")
    assert first["iterations"] == 1
    resumed = run(small_job(tmp_path, 2, checkpoint), tmp_path / "resumed")
    assert resumed["resumed_from"] == 1 and resumed["iterations_run"] == 1
    strip = lambda history: [{k: v for k, v in h.items() if not k.startswith("seconds")} for h in history]  # noqa: E731
    assert strip(resumed["history"]) == strip(whole["history"])
    assert resumed["evaluation"] == whole["evaluation"]


def test_returns_after_steps_takes_each_step_of_its_own_size():
    """Figure 5's measure against the steps written out: step s of size step_sizes[s], each on
    trajectories of the previous parameters, the returns of the same noise stream."""
    from pymaml.rl import returns_after_steps

    policy, env = small_policy(), Navigation2D(horizon=HORIZON)
    goals = env.sample_tasks(TASKS, torch.Generator().manual_seed(5), dtype=torch.float64)
    got = returns_after_steps(policy, env, goals, [0.3, 0.07], TRAJECTORIES, torch.Generator().manual_seed(6))
    generator, params, expected = torch.Generator().manual_seed(6), expand(parameters(policy), TASKS), []
    for size in (0.3, 0.07, None):
        batch = sample(policy, params, env, goals, TRAJECTORIES, generator)
        expected.append(batch.returns)
        if size is not None:
            params = {name: p - size * g for name, p, g in
                      zip(params, params.values(), loop_gradients(policy, params, advantages(batch, 0.99)))}
    assert got.shape == (3, TASKS)
    assert relative_error(got, torch.stack(expected)) <= FLOAT64
    assert not torch.equal(got[1], got[2])  # the second step moved the policy
    for bad in ([-0.1], [math.nan], [0.1, math.inf]):
        with pytest.raises(ValueError, match="step size"):
            returns_after_steps(policy, env, goals, bad, TRAJECTORIES, torch.Generator().manual_seed(6))


def loop_gradients(policy, params, batch):
    """∇ of each task's REINFORCE loss by autograd, one task at a time, stacked per name."""
    per_task = []
    for task in range(batch.observations.shape[0]):
        theta = {name: p[task].detach().requires_grad_() for name, p in params.items()}
        loss = reinforce_loss(functional_call(policy, theta, (batch.observations[task],)),
                              batch.reinforce_targets[task])
        per_task.append(torch.autograd.grad(loss, list(theta.values())))
    return [torch.stack(grads) for grads in zip(*per_task)]


@pytest.mark.parametrize("kind", ["closed_form", "autograd"])
def test_two_threads_evaluating_one_policy_get_what_one_thread_gets(kind):
    """functional_call swaps a module's parameters while it runs: without the module's lock two
    threads read each other's tensors, fail, or leave vmapped tensors behind as the parameters."""
    import threading

    from pymaml.rl import returns_after_steps

    policy, env = policy_of_kind(kind), Navigation2D(horizon=HORIZON)
    before = parameters(policy)
    jobs = [(env.sample_tasks(TASKS, torch.Generator().manual_seed(seed), dtype=torch.float64), sizes, seed)
            for seed, sizes in ((1, [0.5, 0.3]), (2, [0.05, 0.01]))]

    def call(tasks, sizes, seed):
        return returns_after_steps(policy, env, tasks, sizes, TRAJECTORIES, torch.Generator().manual_seed(seed))

    serial = [call(*job) for job in jobs]
    for _ in range(4):
        results, errors = [None, None], []

        def work(index):
            try:
                results[index] = call(*jobs[index])
            except Exception as error:  # noqa: BLE001 - any failure in a thread is the finding
                errors.append(error)

        threads = [threading.Thread(target=work, args=(index,)) for index in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert all(torch.equal(got, expected) for got, expected in zip(results, serial))
        assert all(torch.equal(p, before[name]) for name, p in policy.named_parameters())


def test_returns_after_steps_stops_where_the_policy_diverges():
    """A step size that blows the policy up: the row after the first non-finite trajectories and
    every later one are NaN, instead of a baseline solve failing on them."""
    from pymaml.rl import returns_after_steps

    policy, env = small_policy(), Navigation2D(horizon=HORIZON)
    goals = env.sample_tasks(TASKS, torch.Generator().manual_seed(5), dtype=torch.float64)
    got = returns_after_steps(policy, env, goals, [1e300, 0.1, 0.1], TRAJECTORIES, torch.Generator().manual_seed(6))
    assert torch.isfinite(got[0]).all()
    first_bad = next(row for row in range(4) if not torch.isfinite(got[row]).all())
    assert first_bad >= 1 and torch.isnan(got[first_bad + 1:]).all()


def test_fit_baseline_names_the_tasks_whose_returns_are_not_finite():
    features = torch.randn(3, 10, 4, dtype=torch.float64)
    returns = torch.randn(3, 10, dtype=torch.float64)
    returns[1, 4] = math.nan
    features[2, 0, 1] = math.inf
    with pytest.raises(FloatingPointError, match=r"task\(s\) \[1, 2\] are not finite"):
        fit_baseline(features, returns)


def test_rl_job_reports_a_diverging_step_size_and_keeps_its_report(tmp_path, capsys):
    """A candidate step size under which the baselines diverge scores None and loses the tuning; a
    meta-learned schedule that diverges gives None means, printed as "diverged"; report.json stays
    strict JSON, written after the whole run."""
    from pymaml.jobs.cli import main

    out = tmp_path / "out"
    assert main(["rl", "--iterations", "1", "--meta-batch", "2", "--trajectories", "3", "--eval-tasks", "2",
                 "--eval-steps", "3", "--horizon", "5", "--tune-tasks", "2", "--baseline-lrs", "0.1", "1e300",
                 "--eval-later-lr", "1e300", "--no-progress", "--out", str(out)]) == 0
    text = (out / "report.json").read_text()
    report = json.loads(text, parse_constant=lambda constant: pytest.fail(f"report.json holds {constant}"))
    for name in ("pretrained", "random"):
        assert report["baseline_tuning"][name] == {"0.1": report["baseline_tuning"][name]["0.1"], "1e+300": None}
        assert report["baseline_tuning"][name]["0.1"] is not None
        assert report["step_sizes"][name] == [0.1, 0.1, 0.1]
    means = report["evaluation"]["meta-learned"]["mean"]
    assert means["0"] is not None and means["1"] is not None and means["3"] is None
    assert "diverged" in capsys.readouterr().out


def test_rl_job_without_iterations_draws_its_figure_without_warnings(tmp_path):
    import warnings

    from pymaml.jobs.rl import run

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = run(small_job(tmp_path, 0), tmp_path / "out")
    assert report["history"] == [] and (tmp_path / "out" / report["figure"]).stat().st_size > 0


def test_keep_if_best_keeps_a_copy_of_the_first_best_and_never_a_nan():
    from pymaml.jobs.rl import keep_if_best, new_best

    best = new_best()["meta-learned"]
    weights = torch.zeros(3)
    keep_if_best(best, 1, math.nan, {"w": weights})
    assert best["state"] is None and best["iteration"] == 0
    keep_if_best(best, 2, -5.0, {"w": weights})
    weights += 1  # training goes on in place: the kept parameters must not follow
    keep_if_best(best, 3, -5.0, {"w": weights})
    keep_if_best(best, 4, -7.0, {"w": weights})
    assert (best["iteration"], best["trpo_steps"], best["return"]) == (2, 1, -5.0)
    assert torch.equal(best["state"]["w"], torch.zeros(3))
    keep_if_best(best, 5, -1.0, {"w": weights})
    assert best["iteration"] == 5 and torch.equal(best["state"]["w"], torch.ones(3))


def test_rl_job_evaluates_the_parameters_of_its_best_iteration(tmp_path):
    """select="best" evaluates each trained policy at the parameters that sampled its best
    iteration: the same run stopped just before that iteration ends with them. select="last"
    evaluates the final ones. The meta-learned policy adapts with α then α/2; each baseline with
    the candidate of best tuning score."""
    from pymaml.jobs.rl import run, train

    config = small_job(tmp_path, 4)
    config.baseline_lrs = (0.05, 0.3)
    result = train(config)
    history = result.history
    for name, key in (("meta-learned", "post_return"), ("pretrained", "pretrained_return")):
        best = result.best[name]
        returns = [h[key] for h in history]
        assert best["return"] == max(returns) and best["iteration"] == returns.index(max(returns)) + 1
        logged = history[best["iteration"] - 1]["log_std" if name == "meta-learned" else "pretrained_log_std"]
        assert logged == best["state"]["log_std"].tolist()
        stopped = small_job(tmp_path, best["iteration"] - 1)
        early = train(stopped)
        early_policy = early.meta_policy if name == "meta-learned" else early.pretrained_policy
        for tensor_name, tensor in early_policy.state_dict().items():
            assert torch.equal(best["state"][tensor_name], tensor)
    report = run(config, tmp_path / "best")
    assert report["selection"]["rule"] == "best"
    for name in ("meta-learned", "pretrained"):
        assert report["selection"][name]["iteration"] == result.best[name]["iteration"]
    assert report["step_sizes"]["meta-learned"] == [0.1, 0.05]
    for name in ("pretrained", "random"):
        scores = report["baseline_tuning"][name]
        assert set(scores) == {"0.05", "0.3"}
        chosen = max(config.baseline_lrs, key=lambda lr: scores[repr(lr)])
        assert report["step_sizes"][name] == [chosen, chosen]
    config.select = "last"
    last = run(config, tmp_path / "last")
    assert last["selection"]["meta-learned"] == {"iteration": None, "trpo_steps": 4, "training_return": None}
    assert last["evaluation"]["random"] == report["evaluation"]["random"]
    finals = {"meta-learned": result.meta_policy, "pretrained": result.pretrained_policy}
    for name, policy in finals.items():
        moved = any(not torch.equal(result.best[name]["state"][k], v) for k, v in policy.state_dict().items())
        assert (last["evaluation"][name] != report["evaluation"][name]) == moved


def test_rl_job_refuses_to_select_the_best_from_a_checkpoint_without_it(tmp_path):
    """A checkpoint of an earlier pymaml has no "best": select="best" would silently pick among the
    resumed iterations only, so it is refused; select="last" resumes it."""
    from pymaml.jobs.rl import run
    from pymaml.jobs.training import JobError, save_checkpoint

    checkpoint = tmp_path / "run.pt"
    run(small_job(tmp_path, 1, checkpoint), tmp_path / "first")
    state = torch.load(checkpoint, weights_only=True)
    malformed = tmp_path / "malformed.pt"
    state["best"]["pretrained"].pop("tracked_from")
    save_checkpoint(malformed, state)
    with pytest.raises(JobError, match="holds a best iteration this pymaml cannot read"):
        run(small_job(tmp_path, 2, malformed), tmp_path / "malformed")
    del state["best"]
    save_checkpoint(checkpoint, state)
    with pytest.raises(JobError, match="no parameters of the best iteration before iteration 1.*--select last"):
        run(small_job(tmp_path, 2, checkpoint), tmp_path / "second")
    config = small_job(tmp_path, 2, checkpoint)
    config.select = "last"
    report = run(config, tmp_path / "last")
    assert report["resumed_from"] == 1 and report["selection"]["rule"] == "last"
    # The checkpoint now tracks the best of iteration 2 only: "best" stays refused, resumed further or not.
    for iterations in (2, 3):
        with pytest.raises(JobError, match="before iteration 1"):
            run(small_job(tmp_path, iterations, checkpoint), tmp_path / f"again{iterations}")


def test_rl_job_one_baseline_step_size_needs_no_tuning(tmp_path):
    from pymaml.jobs.rl import run

    config = small_job(tmp_path, 1)
    config.baseline_lrs, config.eval_later_lr = (0.2,), 0.02
    report = run(config, tmp_path / "out")
    assert report["baseline_tuning"] == {"pretrained": {}, "random": {}}
    assert report["step_sizes"] == {"meta-learned": [0.1, 0.02], "pretrained": [0.2, 0.2], "random": [0.2, 0.2]}


@pytest.mark.parametrize("change, message", [
    (dict(select="worst"), "select must be"), (dict(baseline_lrs=()), "baseline_lrs"),
    (dict(baseline_lrs=(0.1, -1.0)), "baseline_lrs"), (dict(eval_later_lr=math.nan), "eval_later_lr"),
    (dict(inner_lr=math.inf), "inner_lr"), (dict(tune_tasks=1), "tune_tasks"), (dict(max_kl=0.0), "max_kl"),
    (dict(max_kl=math.nan), "max_kl"), (dict(trajectories=1), "trajectories")])
def test_rl_config_refuses_bad_evaluation_settings(tmp_path, change, message):
    from pymaml.jobs.rl import RLConfig
    from pymaml.jobs.training import JobError

    with pytest.raises(JobError, match=message):
        RLConfig(**change)


def test_rl_job_refuses_a_checkpoint_of_other_settings(tmp_path):
    from pymaml.jobs.rl import run
    from pymaml.jobs.training import JobError

    checkpoint = tmp_path / "run.pt"
    run(small_job(tmp_path, 1, checkpoint), tmp_path / "first")
    other = small_job(tmp_path, 2, checkpoint)
    other.inner_lr = 0.2
    with pytest.raises(JobError, match="differ from this run"):
        run(other, tmp_path / "second")


@pytest.mark.parametrize("family", ["halfcheetah-vel", "halfcheetah-dir"])
def test_halfcheetah_matches_one_simulator_loop(family, tmp_path, monkeypatch):
    """T·N simulators stepped by one call equal each simulator stepped alone, and the rewards are
    the paper's, from the forward velocity that gymnasium's own reward uses
    (gymnasium: r = v - 0.1 ‖a‖², so v = r + 0.1 ‖a‖²)."""
    from pymaml.rl import ENVIRONMENTS, simulator_missing_reason

    reason = simulator_missing_reason()
    if reason is not None:
        pytest.skip(reason)
    monkeypatch.chdir(tmp_path)  # MuJoCo writes its warnings to MUJOCO_LOG.TXT in the working folder
    import gymnasium
    import numpy

    env = ENVIRONMENTS[family](horizon=4)
    generator = torch.Generator().manual_seed(0)
    goals = env.sample_tasks(2, generator, dtype=torch.float64)
    state = generator.get_state()
    observations = initial = env.reset(goals, 2, generator)
    actions = torch.randn(2, 2, 4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1.5
    batched = []
    for step in range(4):
        observations, reward = env.step(observations, actions[:, :, step], goals)
        batched.append((observations, reward))
    second_task = env.reset(goals, 2, torch.Generator().set_state(state), range(1, 2))
    assert torch.equal(second_task, initial[1:])
    seeds = torch.randint(0, 2**31 - 1, (4,), generator=torch.Generator().set_state(state)).tolist()
    for index, seed in enumerate(seeds):
        task, trajectory = divmod(index, 2)
        simulator = gymnasium.make("HalfCheetah-v5")
        simulator.reset(seed=seed)
        for step in range(4):
            action = numpy.clip(actions[task, trajectory, step].numpy(), -1.0, 1.0)
            observation, gymnasium_reward, *_ = simulator.step(action)
            control = float(numpy.square(action).sum())
            velocity = gymnasium_reward + 0.1 * control
            goal = float(goals[task, 0])
            expected = (-abs(velocity - goal) if family == "halfcheetah-vel" else goal * velocity) - 0.05 * control
            assert abs(float(batched[step][1][task, trajectory]) - expected) <= FLOAT64 * max(1.0, abs(expected))
            assert relative_error(batched[step][0][task, trajectory], torch.from_numpy(observation)) <= FLOAT64
    if family == "halfcheetah-vel":
        assert bool(((goals >= 0) & (goals <= 2)).all())
    else:
        assert set(goals.flatten().tolist()) <= {-1.0, 1.0}


def test_rl_command_halfcheetah_end_to_end(tmp_path, capsys, monkeypatch):
    from pymaml.jobs.cli import main
    from pymaml.rl import simulator_missing_reason

    reason = simulator_missing_reason()
    if reason is not None:
        pytest.skip(reason)
    monkeypatch.chdir(tmp_path)  # MuJoCo writes its warnings to MUJOCO_LOG.TXT in the working folder
    out = tmp_path / "out"
    assert main(["rl", "--env", "halfcheetah-vel", "--iterations", "1", "--meta-batch", "2", "--trajectories", "2",
                 "--eval-tasks", "2", "--eval-steps", "1", "--horizon", "5", "--no-progress", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["env"] == "halfcheetah-vel" and report["iterations"] == 1
    assert (out / "halfcheetah-vel.png").stat().st_size > 0
    assert "meta-learned" in capsys.readouterr().out


def test_rl_command_names_the_missing_extra(tmp_path, capsys, monkeypatch):
    import sys

    from pymaml.jobs.cli import main

    monkeypatch.setitem(sys.modules, "mujoco", None)
    assert main(["rl", "--env", "halfcheetah-dir", "--iterations", "1", "--out", str(tmp_path / "out")]) == 1
    assert 'pip install "pymaml[rl]"' in capsys.readouterr().err
