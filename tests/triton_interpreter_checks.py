"""The Triton kernels against the oracle, run on CPU tensors through Triton's interpreter.

Not collected by a plain `pytest tests` (the file name does not start with test_): the
interpreter must be switched on before the kernels are defined, so tests/test_triton.py runs
this file in a subprocess with TRITON_INTERPRET=1.
"""

import os

import pytest
import torch

import pymaml
from helpers import make_batch, relative_error
from pymaml import reference
from pymaml.ops import encode_mlp, hvp_torch, meta_step_torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
TOLERANCE = 1e-4  # float32 kernel against float64 references
ACTIVATIONS = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid, "none": torch.nn.Identity}


def kernels():
    from pymaml.kernels import mlp_meta_step as module

    return module


def model_of(widths, activation, bias=True, seed=0):
    torch.manual_seed(seed)
    return pymaml.models.mlp(widths, ACTIVATIONS[activation], bias=bias).double()


CASES = [  # widths, activation, loss, steps, shots, first_order, lr_grad, bias
    ((1, 40, 40, 1), "relu", "mse", 1, 10, False, False, True),
    ((1, 40, 40, 1), "relu", "mse", 3, 5, False, True, True),
    ((2, 20, 3), "tanh", "mse", 2, 7, False, True, True),
    ((3, 17, 33, 4), "tanh", "cross_entropy", 2, 6, False, True, True),
    ((3, 17, 4), "sigmoid", "cross_entropy", 3, 9, True, True, True),
    ((5, 24, 2), "sigmoid", "mse", 2, 17, False, False, False),
    ((4, 16, 16, 16, 3), "none", "mse", 1, 4, False, True, True),
    ((6, 3), "relu", "cross_entropy", 0, 8, False, False, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{'-'.join(map(str, c[0]))}-{c[1]}-{c[2]}-S{c[3]}")
def test_meta_step_kernel_matches_the_twin(case):
    widths, activation, loss, steps, shots, first_order, lr_grad, bias = case
    model = model_of(widths, activation, bias)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    generator = torch.Generator().manual_seed(3)
    lrs = 0.05 + 0.1 * torch.rand(steps, theta.numel(), generator=generator, dtype=torch.float64)
    step_weights = torch.rand(steps, generator=generator, dtype=torch.float64)
    batch = make_batch(3, shots, widths[0], widths[-1], loss, torch.float64, queries=shots + 3)
    arguments = (theta, lrs, step_weights, *batch, *encode_mlp(widths, activation, bias), loss, first_order, lr_grad)
    expected = meta_step_torch(*arguments)
    as_float = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in arguments]
    got = kernels().meta_step_triton(*as_float)
    names = ["meta_loss", "task_losses", "pre_losses", "step_losses", "grad_theta", "grad_lrs"]
    for name, a, b in zip(names, got, expected):
        assert a.shape == b.shape, name
        assert relative_error(a, b) <= TOLERANCE, (name, relative_error(a, b))


@pytest.mark.parametrize("learn_inner_lr", [None, "per_parameter"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_backend_matches_the_oracle(loss, learn_inner_lr):
    widths = (3, 24, 18, 4)
    options = dict(inner_lr=0.1, inner_steps=2, loss=loss, learn_inner_lr=learn_inner_lr, step_weights=[0.3, 1.0])
    batch64 = make_batch(4, 6, widths[0], widths[-1], loss, torch.float64)
    oracle_model = model_of(widths, "tanh")
    oracle = pymaml.MAML(oracle_model, backend="reference", **options)
    oracle(*batch64).loss.backward()
    expected = {name: p.grad for name, p in oracle.named_parameters()}

    model = model_of(widths, "tanh").float()
    maml = pymaml.MAML(model, backend="triton", **options)
    assert maml.backend == "triton"
    batch = [t.float() if t.is_floating_point() else t for t in batch64]
    maml(*batch).loss.backward()  # the autograd path
    for name, p in maml.named_parameters():
        assert relative_error(p.grad, expected[name]) <= TOLERANCE, name
    maml.meta_gradient(*batch, accumulate=False)  # the direct path
    for name, p in maml.named_parameters():
        assert relative_error(p.grad, expected[name]) <= TOLERANCE, name


def test_auto_does_not_pick_the_interpreter():
    maml = pymaml.MAML(pymaml.models.sinusoid_mlp(), inner_lr=0.01)
    assert maml.backend != "triton"
    assert "triton: the Triton interpreter runs only when asked for by name" in maml.backend_choice


def test_unsupported_configurations_are_named():
    with pytest.raises(RuntimeError, match="computes in float32, not torch.float64"):
        pymaml.MAML(model_of((2, 8, 1), "relu"), backend="triton")
    with pytest.raises(RuntimeError, match="widths up to 128, got 200"):
        pymaml.MAML(model_of((2, 200, 1), "relu").float(), backend="triton")
    maml = pymaml.MAML(model_of((2, 8, 1), "relu").float(), backend="triton")
    with pytest.raises(ValueError, match="up to 64 points per task, got 80"):
        maml(*make_batch(2, 80, 2, 1, "mse", torch.float32))


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_hvp_kernel_matches_the_twin(loss):
    widths = (3, 33, 18, 3)
    model = model_of(widths, "tanh")
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    tasks = 3
    generator = torch.Generator().manual_seed(5)
    thetas = theta + 0.01 * torch.randn(tasks, theta.numel(), generator=generator, dtype=torch.float64)
    v = torch.randn(tasks, theta.numel(), generator=generator, dtype=torch.float64)
    x, y, _, _ = make_batch(tasks, 11, widths[0], widths[-1], loss, torch.float64)
    expected = hvp_torch(thetas, v, x, y, *encode_mlp(widths, "tanh", True), loss)
    got = kernels().mlp_hvp_triton(thetas.float(), v.float(), x.float(), y if loss != "mse" else y.float(),
                                   list(widths), "tanh", True, loss)
    assert relative_error(got, expected) <= TOLERANCE


def test_oracle_agrees_on_the_sinusoid_meta_gradient():
    """The paper's configuration end to end: the kernel's meta-gradient against the oracle's."""
    model = pymaml.models.sinusoid_mlp()
    batch = pymaml.data.Sinusoid(seed=0).sample(5, 10).tasks
    loss = reference.meta_loss(model.double(), *[t.double() for t in batch], inner_lr=0.01, inner_steps=2)
    expected = torch.autograd.grad(loss, list(model.parameters()))
    model.float()
    maml = pymaml.MAML(model, inner_lr=0.01, inner_steps=2, backend="triton")
    maml.meta_gradient(*batch, accumulate=False)
    for p, e in zip(model.parameters(), expected):
        assert relative_error(p.grad, e) <= TOLERANCE
