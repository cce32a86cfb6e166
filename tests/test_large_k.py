"""Sums over many points: the fused kernels' float32 results stay within the float32 tolerance of
the float64 oracle at any number of points per task.

The parameter gradients, the bias sums, the loss and the HVP's R-pass are sums over the K points
of a task; summed in order, a float32 sum of K terms loses about √K·ε, too much at K = 100,000
for the float32 tolerance. The kernels sum in blocks whose sums are added pairwise.
The float64 cases check the blocked sums themselves (one block and a partial one; block counts
that are and are not powers of two) at the float64 tolerance.
"""

import copy

import pytest
import torch

import pymaml
from helpers import TOLERANCE, make_batch, make_mlp, oracle_meta_gradient, relative_error
from pymaml._extension import extension

needs_extension = pytest.mark.skipif(pymaml.build_info()["extension"] is False, reason="pymaml._C is not built")
LEVELS = pymaml.build_info().get("cpu_levels", [])
WIDTHS = (1, 8, 8, 1)
MANY_POINTS = 100_000


@pytest.fixture
def cpu_level(request):
    """Runs the test on the named level, then restores the best one."""
    extension().set_cpu_level(request.param)
    yield request.param
    extension().set_cpu_level(LEVELS[0])


def as_float64(model, batch):
    """The same float32 values in float64: the oracle sees exactly the kernel's inputs."""
    return copy.deepcopy(model).double(), tuple(t.double() if t.is_floating_point() else t for t in batch)


def fused_meta_gradient(model, batch, **options):
    out = pymaml.MAML(model, backend="cpp", **options)(*batch)
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    return out, torch.cat([g.reshape(-1) for g in grads])


def per_task_state(model, tasks, seed=4):
    generator = torch.Generator().manual_seed(seed)
    params = {n: p.detach().expand(tasks, *p.shape).clone() for n, p in model.named_parameters()}
    v = {n: torch.randn(tasks, *p.shape, generator=generator, dtype=torch.float64).to(p.dtype)
         for n, p in model.named_parameters()}
    return params, v


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors.values()])


@needs_extension
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_float32_meta_gradient_at_many_points(activation):
    model = make_mlp(WIDTHS, activation, torch.float32)
    batch = make_batch(2, MANY_POINTS, WIDTHS[0], WIDTHS[-1], "mse", torch.float32)
    options = dict(inner_lr=0.05, inner_steps=1)
    expected_loss, expected_grad = oracle_meta_gradient(*as_float64(model, batch), **options)
    out, grad = fused_meta_gradient(model, batch, **options)
    assert relative_error(out.loss.detach(), expected_loss) <= TOLERANCE[torch.float32]
    assert relative_error(grad, expected_grad) <= TOLERANCE[torch.float32]


@needs_extension
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_float32_hvp_at_many_points(activation):
    model = make_mlp(WIDTHS, activation, torch.float32)
    x, y, _, _ = make_batch(1, MANY_POINTS, WIDTHS[0], WIDTHS[-1], "mse", torch.float32)
    params, v = per_task_state(model, 1)
    expected = pymaml.hvp(copy.deepcopy(model).double(), {n: p.double() for n, p in params.items()}, x.double(),
                          y.double(), {n: t.double() for n, t in v.items()}, fused=False)
    actual = pymaml.hvp(model, params, x, y, v, fused=True)
    assert relative_error(flat(actual), flat(expected)) <= TOLERANCE[torch.float32]


# 129 points: a full block and one point; 700: six blocks (not a power of two), the last partial;
# 1024: eight full blocks.
BLOCKED = [129, 700, 1024]


@needs_extension
@pytest.mark.parametrize("cpu_level", LEVELS, indirect=True)
@pytest.mark.parametrize("points", BLOCKED)
@pytest.mark.parametrize("activation,loss", [("tanh", "cross_entropy"), ("relu", "mse")])
def test_blocked_point_sums_match_the_oracle(cpu_level, points, activation, loss):
    widths = (3, 17, 5, 3)
    model = make_mlp(widths, activation, torch.float64)
    batch = make_batch(2, points, widths[0], widths[-1], loss, torch.float64, queries=points + 5)
    options = dict(inner_lr=0.1, inner_steps=2, loss=loss)
    expected_loss, expected_grad = oracle_meta_gradient(model, batch, **options)
    out, grad = fused_meta_gradient(model, batch, **options)
    assert relative_error(out.loss.detach(), expected_loss) <= TOLERANCE[torch.float64]
    assert relative_error(grad, expected_grad) <= TOLERANCE[torch.float64]
    params, v = per_task_state(model, 2)
    x, y = batch[0], batch[1]
    expected_hv = pymaml.hvp(model, params, x, y, v, loss=loss, fused=False)
    actual_hv = pymaml.hvp(model, params, x, y, v, loss=loss, fused=True)
    assert relative_error(flat(actual_hv), flat(expected_hv)) <= TOLERANCE[torch.float64]
