"""NaN and Inf in the parameters propagate through the fused kernels exactly as through torch.

A NaN or Inf in a weight or a bias, or activations that overflow, must reach the meta-loss, the
task losses, the pre-adaptation loss and every gradient element where the oracle
(pymaml/reference.py) puts them: where the oracle is NaN the backend is NaN, where it is ±Inf the
backend is the same Inf, and where it is finite the backend is within the dtype's tolerance.
ReLU's backward is torch's threshold_backward on the result (the incoming gradient where
relu(z) > 0 or is NaN, else exactly 0), so a NaN unit passes its gradient on and a dead unit
stops even a NaN one. Every ISA level of the CPU kernels is checked, and the Triton kernels
under Triton's interpreter (in a subprocess, as tests/test_triton.py runs them). NaN and Inf in the
data are rejected before any kernel runs.
"""

import importlib.util
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from torch import nn

import pymaml
from helpers import TOLERANCE, make_batch, relative_error
from pymaml._extension import extension

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_extension = pytest.mark.skipif(pymaml.build_info()["extension"] is False, reason="pymaml._C is not built")
LEVELS = pymaml.build_info().get("cpu_levels", [])
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "none": nn.Identity}
DTYPES = {"f32": torch.float32, "f64": torch.float64}
# Padding lanes in every layer; the middle layer reads transposed weights, the last one (3
# outputs) takes the dot-product path.
WIDTHS = (3, 17, 5, 3)
NAN, INF = float("nan"), float("inf")


def _set(tensor, index, value):
    with torch.no_grad():
        tensor[index] = value


# Where the non-finite value goes: (layer of the Sequential, "weight" or "bias", index, value);
# "overflow" sets a whole first-layer column to the dtype's largest value, so that z_1 overflows to
# ±Inf at the points with |x_0| > 1 and stays huge but finite at the others.
PLACEMENTS = {
    "nan-weight": (0, "weight", (4, 1), NAN),
    "inf-weight": (2, "weight", (2, 9), INF),
    "nan-bias": (2, "bias", 1, NAN),
    "inf-hidden-bias": (0, "bias", 6, INF),
    "minus-inf-hidden-bias": (0, "bias", 6, -INF),
    "overflow": (0, "weight", (slice(None), 0), "max"),
}


def poisoned_mlp(activation, dtype, placement, seed=0):
    torch.manual_seed(seed)
    model = pymaml.models.mlp(WIDTHS, ACTIVATIONS[activation]).to(dtype)
    layer, name, index, value = PLACEMENTS[placement]
    _set(getattr(model[layer], name), index, torch.finfo(dtype).max if value == "max" else value)
    return model


def assert_same_values(actual, expected, dtype, what):
    """NaN where the oracle is NaN, the same ±Inf where it is infinite, within tolerance elsewhere."""
    actual, expected = actual.detach().double().reshape(-1), expected.detach().double().reshape(-1)
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan), (
        f"{what}: NaN at {actual.isnan().nonzero().flatten().tolist()}, "
        f"the oracle at {nan.nonzero().flatten().tolist()}")
    infinite = expected.isinf()
    assert torch.equal(actual.isinf(), infinite) and torch.equal(actual[infinite], expected[infinite]), (
        f"{what}: ±Inf at {actual.isinf().nonzero().flatten().tolist()}, "
        f"the oracle at {infinite.nonzero().flatten().tolist()}")
    finite = expected.isfinite()
    assert relative_error(actual[finite], expected[finite]) <= TOLERANCE[dtype], what


def meta_results(model, batch, backend, options):
    out = pymaml.MAML(model, backend=backend, **options)(*batch)
    grads = torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True, materialize_grads=True)
    return dict(loss=out.loss.detach(), task_losses=out.task_losses, pre_adaptation_loss=out.pre_adaptation_loss,
                grad=torch.cat([g.reshape(-1) for g in grads]))


def meta_case(activation, loss, dtype_name, placement, steps, first_order):
    dtype = DTYPES[dtype_name]
    model = poisoned_mlp(activation, dtype, placement)
    batch = make_batch(2, 6, WIDTHS[0], WIDTHS[-1], loss, dtype, queries=7)
    return model, batch, dict(inner_lr=0.1, inner_steps=steps, first_order=first_order, loss=loss)


@lru_cache(maxsize=None)
def oracle_results(*case):
    model, batch, options = meta_case(*case)
    return meta_results(model, batch, "reference", options)


@pytest.fixture
def cpu_level(request):
    """Runs the test on the named level, then restores the best one."""
    extension().set_cpu_level(request.param)
    yield request.param
    extension().set_cpu_level(LEVELS[0])


# S = 0 (the plain gradient), one step first order, two steps second order (two HVPs in the chain).
STEPS = [(0, False), (1, True), (2, False)]


@needs_extension
@pytest.mark.parametrize("cpu_level", LEVELS, indirect=True)
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("steps,first_order", STEPS, ids=[f"S{s}-{'first' if f else 'second'}" for s, f in STEPS])
@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_meta_step_propagates_nonfinite_values_like_the_oracle(cpu_level, activation, loss, dtype_name, steps,
                                                               first_order, placement):
    case = (activation, loss, dtype_name, placement, steps, first_order)
    expected = oracle_results(*case)
    model, batch, options = meta_case(*case)
    actual = meta_results(model, batch, "cpp", options)
    for name in expected:
        assert_same_values(actual[name], expected[name], DTYPES[dtype_name], name)


def test_the_placements_reach_the_oracle():
    """The cases above are not vacuous: in the oracle a NaN bias gives NaN and finite gradient
    elements, overflow non-finite task losses, and a ReLU unit killed by a -Inf bias a finite loss."""
    nan_grad = oracle_results("relu", "mse", "f32", "nan-bias", 0, False)["grad"]
    assert nan_grad.isnan().any() and nan_grad.isfinite().any()
    assert not oracle_results("relu", "mse", "f64", "overflow", 0, False)["task_losses"].isfinite().any()
    for steps, first_order in STEPS:
        assert oracle_results("relu", "mse", "f32", "minus-inf-hidden-bias", steps, first_order)["loss"].isfinite()


# The HVP: non-finite values in θ, in the direction v and in the points x (the HVP does not check
# its data), against torch.func's forward-over-reverse.
HVP_PLACEMENTS = [*PLACEMENTS, "nan-direction", "inf-direction", "nan-input"]


def hvp_case(activation, loss, dtype, placement, tasks=3):
    if placement in PLACEMENTS:
        model = poisoned_mlp(activation, dtype, placement)
    else:
        torch.manual_seed(0)
        model = pymaml.models.mlp(WIDTHS, ACTIVATIONS[activation]).to(dtype)
    generator = torch.Generator().manual_seed(2)
    params = {n: p.detach().expand(tasks, *p.shape).clone() for n, p in model.named_parameters()}
    v = {n: torch.randn(tasks, *p.shape, generator=generator, dtype=torch.float64).to(dtype)
         for n, p in model.named_parameters()}
    x, y, _, _ = make_batch(tasks, 6, WIDTHS[0], WIDTHS[-1], loss, dtype)
    if placement == "nan-direction":
        _set(v["2.weight"], (1, 3, 4), NAN)
    elif placement == "inf-direction":
        _set(v["0.bias"], (0, 5), INF)
    elif placement == "nan-input":
        _set(x, (2, 4, 1), NAN)
    return model, params, v, x, y


@needs_extension
@pytest.mark.parametrize("cpu_level", LEVELS, indirect=True)
@pytest.mark.parametrize("placement", HVP_PLACEMENTS)
@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_hvp_propagates_nonfinite_values_like_torch(cpu_level, activation, loss, dtype_name, placement):
    dtype = DTYPES[dtype_name]
    model, params, v, x, y = hvp_case(activation, loss, dtype, placement)
    expected = pymaml.hvp(model, params, x, y, v, loss=loss, fused=False)
    actual = pymaml.hvp(model, params, x, y, v, loss=loss, fused=True)
    for name in params:
        assert_same_values(actual[name], expected[name], dtype, name)


@needs_extension
@pytest.mark.parametrize("cpu_level", LEVELS, indirect=True)
@pytest.mark.parametrize("dtype_name", DTYPES)
def test_a_nonfinite_call_leaves_no_trace(cpu_level, dtype_name):
    """The CPU launcher keeps its workspace between calls of one layout (whatever the activation):
    after NaN and Inf in it, a finite model of that layout gets the oracle's results. (A tanh call
    with a NaN weight leaves NaN in padding lanes that a sigmoid call does not write.)"""
    for placement in ("overflow", "inf-hidden-bias", "nan-weight"):
        for activation in ("relu", "tanh"):
            model, batch, options = meta_case(activation, "mse", dtype_name, placement, 2, False)
            meta_results(model, batch, "cpp", options)
    for activation in ("sigmoid", "relu"):
        model, batch, options = meta_case(activation, "mse", dtype_name, "minus-inf-hidden-bias", 2, False)
        _set(model[0].bias, 6, 0.25)
        expected = meta_results(model, batch, "reference", options)
        actual = meta_results(model, batch, "cpp", options)
        for name in expected:
            assert actual[name].isfinite().all(), name
            assert_same_values(actual[name], expected[name], DTYPES[dtype_name], name)


@needs_extension
@pytest.mark.parametrize("tensor", ["support_x", "support_y", "query_x", "query_y"])
@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
def test_nonfinite_data_is_still_rejected(tensor, value):
    model = poisoned_mlp("relu", torch.float32, "nan-weight")
    batch = dict(zip(["support_x", "support_y", "query_x", "query_y"], make_batch(2, 5, 3, 3, "mse", torch.float32)))
    _set(batch[tensor], (1, 2, 0), value)
    for check_inputs in (True, False):  # MAML's own scan, then the kernel binding's
        maml = pymaml.MAML(model, backend="cpp", inner_lr=0.1, check_inputs=check_inputs)
        with pytest.raises(ValueError, match=f"{tensor} contains NaN or Inf"):
            maml(*batch.values())


# The Triton kernels, float32 only, under the interpreter: every activation and placement at one
# second-order step, S = 0 and two first-order steps, and the HVP kernel. (The interpreter takes
# seconds per launch, so this is a selection of the cases above.)
TRITON_META_CASES = [
    *[("relu", "mse", placement, 1, False) for placement in PLACEMENTS],
    ("tanh", "cross_entropy", "nan-weight", 1, False),
    ("sigmoid", "mse", "overflow", 1, False),
    ("none", "cross_entropy", "nan-weight", 1, False),
    ("relu", "cross_entropy", "nan-bias", 0, False),
    ("tanh", "mse", "inf-hidden-bias", 2, True),
]
TRITON_HVP_CASES = [("relu", "nan-weight"), ("tanh", "nan-direction")]
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 (see the test below)")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.skipif(INTERPRETED, reason="starts the interpreted run itself")
def test_triton_kernels_propagate_nonfinite_values_under_the_interpreter():
    here = Path(__file__).parent
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)), "-k",
         "interpreted_triton"],
        cwd=here, env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert f"{len(TRITON_META_CASES) + len(TRITON_HVP_CASES)} passed" in summary and "skipped" not in summary, summary


@needs_interpreter
@pytest.mark.parametrize("activation,loss,placement,steps,first_order", TRITON_META_CASES,
                         ids=lambda value: str(value))
def test_interpreted_triton_meta_step(activation, loss, placement, steps, first_order):
    case = (activation, loss, "f32", placement, steps, first_order)
    expected = oracle_results(*case)
    model, batch, options = meta_case(*case)
    actual = meta_results(model, batch, "triton", options)
    for name in expected:
        assert_same_values(actual[name], expected[name], torch.float32, name)


@needs_interpreter
@pytest.mark.parametrize("activation,placement", TRITON_HVP_CASES)
def test_interpreted_triton_hvp(activation, placement):
    from pymaml.kernels.mlp_meta_step import mlp_hvp_triton

    model, params, v, x, y = hvp_case(activation, "mse", torch.float32, placement)
    expected = pymaml.hvp(model, params, x, y, v, loss="mse", fused=False)
    names = list(params)
    flatten = lambda tensors: torch.cat([tensors[n].reshape(x.shape[0], -1) for n in names], dim=1)  # noqa: E731
    actual = mlp_hvp_triton(flatten(params), flatten(v), x, y, list(WIDTHS), activation, True, "mse")
    assert_same_values(actual, flatten(expected), torch.float32, "hv")
