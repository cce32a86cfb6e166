"""pymaml.rl.gaussian_mlp's closed-form derivatives against torch.func and autograd: gradients of
the REINFORCE and surrogate losses, the REINFORCE Hessian-vector product, the KL's Hessian at the
old policy; which policies they serve (any other falls back, and the fallback is right); and the
allocator setting the RL job makes."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from helpers import TOLERANCE, relative_error
from pymaml.rl import GaussianMLPPolicy
from pymaml.rl.gaussian_mlp import closed_form, reinforce_gradient, surrogate_gradient, unsupported_reason
from pymaml.rl.policy import batched_gradients, batched_outputs, kl_loss, log_prob, reinforce_loss, surrogate_loss
from pymaml.rl.trajectories import PolicyBatch
from pymaml.rl.trpo import _retained_hvp, flatten, hvp_at, inner_step

FLOAT64 = TOLERANCE[torch.float64]
TASKS, SAMPLES = 3, 7


def random_point(policy: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Different parameters for each task, [T, ...] per name, near the policy's own."""
    return {name: p.detach() + 0.3 * torch.randn((TASKS, *p.shape), generator=generator, dtype=p.dtype)
            for name, p in policy.named_parameters()}


def data(observation_size: int, action_size: int, generator: torch.Generator):
    x = torch.randn(TASKS, SAMPLES, observation_size, generator=generator, dtype=torch.float64)
    actions = torch.randn(TASKS, SAMPLES, action_size, generator=generator, dtype=torch.float64)
    advantage = torch.randn(TASKS, SAMPLES, generator=generator, dtype=torch.float64)
    return x, actions, advantage


def assert_close(actual: dict, expected: dict):
    assert list(actual) == list(expected)
    for name in expected:
        assert actual[name].shape == expected[name].shape, name
    assert relative_error(flatten(actual, batched=True), flatten(expected, batched=True)) <= FLOAT64


@pytest.mark.parametrize("hidden", [(), (5,), (6, 7, 4)], ids=["no_hidden", "one_hidden", "three_hidden"])
@pytest.mark.parametrize("action_size", [1, 3])
def test_closed_forms_match_torch_func_and_autograd(hidden, action_size):
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(3, action_size, hidden=hidden, initial_std=0.7).double()
    derivatives = closed_form(policy)
    assert derivatives is not None
    generator = torch.Generator().manual_seed(1)
    point = random_point(policy, generator)
    x, actions, advantage = data(3, action_size, generator)
    direction = {name: torch.randn(p.shape, generator=generator, dtype=p.dtype) for name, p in point.items()}

    assert relative_error(derivatives.outputs(point, x), batched_outputs(policy, point, x)) <= FLOAT64
    reinforce_targets = torch.cat([actions, advantage.unsqueeze(-1)], -1)
    assert_close(derivatives.gradient(reinforce_gradient, point, x, reinforce_targets),
                 batched_gradients(policy, reinforce_loss, point, x, reinforce_targets))
    old_log_prob = log_prob(batched_outputs(policy, point, x), actions) + 0.2 * torch.randn(
        TASKS, SAMPLES, generator=generator, dtype=torch.float64)  # ratios away from 1
    surrogate_targets = torch.cat([actions, advantage.unsqueeze(-1), old_log_prob.unsqueeze(-1)], -1)
    assert_close(derivatives.gradient(surrogate_gradient, point, x, surrogate_targets),
                 batched_gradients(policy, surrogate_loss, point, x, surrogate_targets))
    assert_close(derivatives.reinforce_hvp(point, x, reinforce_targets)(direction),
                 _retained_hvp(policy, reinforce_loss, point, x, reinforce_targets)(direction))
    old_outputs = batched_outputs(policy, point, x)
    assert_close(derivatives.kl_fisher(point, x)(direction),
                 _retained_hvp(policy, kl_loss, point, x, old_outputs)(direction))


def test_float32_closed_forms_match_the_float64_oracle():
    """The float32 closed forms (the RL job's dtype) against torch.func and autograd in float64,
    within float32's tolerance, on the paper's widths."""
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(3, 2).double()
    generator = torch.Generator().manual_seed(6)
    point = random_point(policy, generator)
    x, actions, advantage = data(3, 2, generator)
    targets = torch.cat([actions, advantage.unsqueeze(-1)], -1)
    direction = {name: torch.randn(p.shape, generator=generator, dtype=p.dtype) for name, p in point.items()}
    derivatives = closed_form(policy.float())
    single = {name: p.float() for name, p in point.items()}
    pairs = [(derivatives.gradient(reinforce_gradient, single, x.float(), targets.float()),
              batched_gradients(policy.double(), reinforce_loss, point, x, targets)),
             (derivatives.reinforce_hvp(single, x.float(), targets.float())({n: u.float() for n, u in direction.items()}),
              _retained_hvp(policy, reinforce_loss, point, x, targets)(direction))]
    for actual, expected in pairs:
        assert relative_error(flatten(actual, batched=True).double(),
                              flatten(expected, batched=True)) <= TOLERANCE[torch.float32]


def test_the_kl_away_from_the_old_policy_takes_its_full_hessian():
    """hvp_at(kl_loss) is the Gauss–Newton product only where the old outputs are the outputs at
    the point (TRPO's case); elsewhere the KL's Hessian has more terms, and the autograd graph gives it."""
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(3, 2, hidden=(5, 4)).double()
    generator = torch.Generator().manual_seed(5)
    point = random_point(policy, generator)
    x, *_ = data(3, 2, generator)
    direction = {name: torch.randn(p.shape, generator=generator, dtype=p.dtype) for name, p in point.items()}
    at_minimum = closed_form(policy).outputs(point, x)
    away = at_minimum + 0.3 * torch.randn(at_minimum.shape, generator=generator, dtype=at_minimum.dtype)
    for old in (at_minimum, away):
        assert_close(hvp_at(policy, kl_loss, point, x, old)(direction),
                     _retained_hvp(policy, kl_loss, point, x, old)(direction))
    full = flatten(_retained_hvp(policy, kl_loss, point, x, away)(direction), batched=True)
    gauss_newton = flatten(closed_form(policy).kl_fisher(point, x)(direction), batched=True)
    assert relative_error(gauss_newton, full) > 1e-3


def test_closed_forms_propagate_non_finite_values_as_autograd_does():
    """A NaN observation in task 0 and an infinite advantage in task 1: the gradient has its
    non-finite entries exactly where autograd's has them (ReLU's backward a select, as autograd's);
    the HVP is non-finite in those tasks too (where within a task differs: autograd's double
    backward multiplies by the zeros the closed forms skip); task 2 agrees with autograd."""
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(3, 2, hidden=(5, 4)).double()
    generator = torch.Generator().manual_seed(2)
    point = random_point(policy, generator)
    x, actions, advantage = data(3, 2, generator)
    x[0, 2, 1] = float("nan")
    advantage[1, 4] = float("inf")
    targets = torch.cat([actions, advantage.unsqueeze(-1)], -1)
    direction = {name: torch.randn(p.shape, generator=generator, dtype=p.dtype) for name, p in point.items()}
    gradient = flatten(closed_form(policy).gradient(reinforce_gradient, point, x, targets), batched=True)
    expected = flatten(batched_gradients(policy, reinforce_loss, point, x, targets), batched=True)
    assert torch.equal(gradient.isfinite(), expected.isfinite())
    hvp = flatten(closed_form(policy).reinforce_hvp(point, x, targets)(direction), batched=True)
    expected_hvp = flatten(_retained_hvp(policy, reinforce_loss, point, x, targets)(direction), batched=True)
    for actual, reference in ((gradient, expected), (hvp, expected_hvp)):
        assert not actual[0].isfinite().all() and not actual[1].isfinite().all()
        assert actual[2].isfinite().all()
        assert relative_error(actual[2], reference[2]) <= FLOAT64


class Scale(nn.Module):
    def forward(self, weight):
        return 2 * weight


class SubclassedLinear(nn.Linear):
    pass


def subclassed(policy):
    policy.__class__ = type("SubclassedPolicy", (GaussianMLPPolicy,), {})


def replace_layer(index, layer):
    def change(policy):
        policy.mean[index] = layer
    return change


MODIFICATIONS = {
    "subclass": (subclassed, "not a GaussianMLPPolicy"),
    "forward_hook": (lambda p: p.mean[2].register_forward_hook(lambda m, i, o: o + 1), "forward hook"),
    "forward_pre_hook": (lambda p: p.register_forward_pre_hook(lambda m, i: (2 * i[0],)), "forward pre-hook"),
    "instance_forward": (lambda p: setattr(p.mean[0], "forward", lambda x: nn.Linear.forward(p.mean[0], x) * 3),
                         "own forward"),
    "parametrization": (lambda p: parametrize.register_parametrization(p.mean[0], "weight", Scale()),
                        "parametrized"),
    "tanh": (replace_layer(1, nn.Tanh()), "not an nn.ReLU"),
    "linear_subclass": (replace_layer(2, SubclassedLinear(5, 4).double()), "not an nn.Linear"),
    "no_bias": (replace_layer(2, nn.Linear(5, 4, bias=False).double()), "no bias"),
    "buffer": (lambda p: p.register_buffer("scale", torch.ones(1)), "buffers"),
    "shared_log_std": (lambda p: setattr(p, "log_std", nn.Parameter(torch.zeros(1, dtype=torch.float64))),
                       "log_std has shape"),
    "extra_parameter": (lambda p: setattr(p, "extra", nn.Parameter(torch.zeros(2, dtype=torch.float64))),
                        "parameters are"),
}


@pytest.mark.parametrize("modification", list(MODIFICATIONS))
def test_a_policy_the_closed_forms_do_not_compute_falls_back_and_stays_right(modification):
    """Each change makes the closed forms refuse the policy, with a reason naming it; pymaml.rl then
    takes torch.func's inner step and autograd's HVPs, which match a per-task autograd loop."""
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(3, 2, hidden=(5, 4)).double()
    assert unsupported_reason(policy) is None
    change, expected_reason = MODIFICATIONS[modification]
    change(policy)
    reason = unsupported_reason(policy)
    assert reason is not None and expected_reason in reason
    assert closed_form(policy) is None
    generator = torch.Generator().manual_seed(3)
    point = {name: p.detach().unsqueeze(0).expand(TASKS, *p.shape).clone() for name, p in policy.named_parameters()}
    x, actions, advantage = data(3, 2, generator)
    batch = PolicyBatch(x, actions, advantage)
    adapted = inner_step(policy, point, batch, 0.1)
    direction = {name: torch.randn(p.shape, generator=generator, dtype=p.dtype) for name, p in point.items()}
    products = hvp_at(policy, reinforce_loss, point, x, batch.reinforce_targets)(direction)
    for task in range(TASKS):
        theta = {name: p[task].clone().requires_grad_() for name, p in point.items()}
        loss = reinforce_loss(torch.func.functional_call(policy, theta, (x[task],)), batch.reinforce_targets[task])
        grads = torch.autograd.grad(loss, list(theta.values()), create_graph=True, allow_unused=True,
                                    materialize_grads=True)
        expected = {name: theta[name] - 0.1 * g for name, g in zip(theta, grads)}
        assert relative_error(flatten({n: p[task] for n, p in adapted.items()}), flatten(expected)) <= FLOAT64
        directional = sum((g * direction[name][task]).sum() for g, name in zip(grads, theta))
        hvp = torch.autograd.grad(directional, list(theta.values()), allow_unused=True, materialize_grads=True)
        assert relative_error(flatten({n: p[task] for n, p in products.items()}),
                              torch.cat([h.reshape(-1) for h in hvp])) <= FLOAT64


def test_a_global_module_hook_turns_the_closed_forms_off():
    policy = GaussianMLPPolicy(3, 2, hidden=(5,))
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: o)
    try:
        assert "global module hook" in unsupported_reason(policy)
    finally:
        handle.remove()
    assert unsupported_reason(policy) is None


def test_parameters_of_two_dtypes_turn_the_closed_forms_off():
    policy = GaussianMLPPolicy(3, 2, hidden=(5,))
    policy.log_std.data = policy.log_std.data.double()
    assert "several dtypes" in unsupported_reason(policy)


def test_two_threads_on_one_policy_get_the_one_thread_products():
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(3, 2, hidden=(16, 16)).double()
    generator = torch.Generator().manual_seed(4)
    point = random_point(policy, generator)
    x, actions, advantage = data(3, 2, generator)
    targets = torch.cat([actions, advantage.unsqueeze(-1)], -1)
    direction = {name: torch.randn(p.shape, generator=generator, dtype=p.dtype) for name, p in point.items()}
    expected = flatten(hvp_at(policy, reinforce_loss, point, x, targets)(direction), batched=True)
    results, errors = [], []

    def work():
        try:
            for _ in range(20):
                results.append(flatten(hvp_at(policy, reinforce_loss, point, x, targets)(direction), batched=True))
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 40
    assert all(torch.equal(result, expected) for result in results)


FAULTS_SCRIPT = """
import ctypes, resource, sys, torch
from pymaml.rl import allocator
# Every block over 128 KiB its own mmap, whatever glibc's dynamic thresholds would have become
# (they depend on what the process freed before, and differ from run to run).
assert ctypes.CDLL("libc.so.6").mallopt(allocator.M_MMAP_THRESHOLD, 128 * 1024)
if sys.argv[1] == "retain":
    assert allocator.retain_freed_memory() and allocator.retain_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def group():
    tensors = [torch.empty(40, 400, 100).fill_(1.0) for _ in range(4)]
    del tensors
for _ in range(3):
    group()
before = faults()
for _ in range(10):
    group()
print((faults() - before) / 40)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the allocator setting is glibc's")
def test_retained_freed_memory_stops_page_faults_on_reallocation():
    """Four 6.4 MB tensors allocated and freed together, ten times after three such rounds, from a
    start where glibc maps every large block afresh: each new tensor faults in its 1,563 pages;
    after retain_freed_memory none does. (With glibc's own dynamic thresholds the count depends on
    the process's history: 0, 117 or 1,554 faults per tensor in eight runs of this script.)"""
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the C library is not glibc")
    per_tensor = {mode: float(subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, mode], check=True,
                                             capture_output=True, text=True).stdout)
                  for mode in ("mapped", "retain")}
    assert per_tensor["mapped"] > 1000
    assert per_tensor["retain"] < 10
