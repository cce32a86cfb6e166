"""Batched Hessian-vector products against torch.autograd.functional.hvp."""

import pytest
import torch

import pymaml
from helpers import TOLERANCE, make_batch, make_mlp, relative_error
from pymaml.ops import encode_mlp, hvp, hvp_torch

HAS_EXTENSION = pymaml.build_info()["extension"]


def per_task_state(model, tasks, seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = {n: p.detach() + 0.1 * torch.randn(tasks, *p.shape, generator=generator, dtype=p.dtype)
              for n, p in model.named_parameters()}
    v = {n: torch.randn(tasks, *p.shape, generator=generator, dtype=p.dtype) for n, p in model.named_parameters()}
    return params, v


def autograd_hvp(model, params, v, x, y, loss_fn, t):
    names = list(params)

    def loss_of(*flat):
        return loss_fn(torch.func.functional_call(model, dict(zip(names, flat)), (x[t],)), y[t])

    _, result = torch.autograd.functional.hvp(loss_of, tuple(params[n][t] for n in names), tuple(v[n][t] for n in names))
    return dict(zip(names, result))


@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_hvp_matches_autograd(fused, activation, loss, dtype):
    model = make_mlp((3, 7, 5, 2), activation, dtype)
    x, y, _, _ = make_batch(4, 6, 3, 2, loss, dtype)
    params, v = per_task_state(model, 4)
    out = pymaml.hvp(model, params, x, y, v, loss=loss, fused=fused)
    loss_fn = pymaml.numerics.losses.resolve_loss(loss)
    for t in range(4):
        expected = autograd_hvp(model, params, v, x, y, loss_fn, t)
        actual = torch.cat([out[n][t].reshape(-1) for n in params])
        wanted = torch.cat([expected[n].reshape(-1) for n in params])
        assert relative_error(actual, wanted) <= TOLERANCE[dtype]


def test_hvp_of_a_convnet_through_torch_func():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.Tanh(), torch.nn.Flatten(),
                                torch.nn.Linear(27, 2)).double()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 1, 5, 5, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 2, (2, 4), generator=generator)
    params, v = per_task_state(model, 2)
    out = pymaml.hvp(model, params, x, y, v, loss="cross_entropy")
    for t in range(2):
        expected = autograd_hvp(model, params, v, x, y, pymaml.numerics.losses.cross_entropy, t)
        for n in params:
            assert relative_error(out[n][t], expected[n]) <= TOLERANCE[torch.float64]


@pytest.mark.skipif(not HAS_EXTENSION, reason="pymaml._C is not built")
def test_fused_hvp_op_equals_twin_and_opcheck():
    model = make_mlp((3, 6, 2), "tanh")
    x, y, _, _ = make_batch(3, 4, 3, 2, "mse")
    theta = torch.randn(3, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    v = torch.randn_like(theta)
    arguments = (theta, v, x, y, *encode_mlp([3, 6, 2], "tanh", True), "mse")
    assert relative_error(hvp(*arguments), hvp_torch(*arguments)) <= TOLERANCE[torch.float64]
    torch.library.opcheck(torch.ops.pymaml.hvp.default, arguments)


@pytest.mark.skipif(not HAS_EXTENSION, reason="pymaml._C is not built")
def test_fused_hvp_is_not_silently_differentiable():
    model = make_mlp((3, 6, 2), "tanh")
    x, y, _, _ = make_batch(2, 4, 3, 2, "mse")
    theta = torch.randn(2, sum(p.numel() for p in model.parameters()), dtype=torch.float64, requires_grad=True)
    hv = hvp(theta, torch.ones_like(theta), x, y, *encode_mlp([3, 6, 2], "tanh", True), "mse")
    with pytest.raises(RuntimeError, match="pymaml::hvp is not differentiable"):
        hv.sum().backward()
    params, v = per_task_state(model, 2)
    params = {n: p.requires_grad_() for n, p in params.items()}
    with pytest.raises(RuntimeError, match="fused HVP cannot run here"):
        pymaml.hvp(model, params, x, y, v, fused=True)
    differentiable = pymaml.hvp(model, params, x, y, v)  # falls back to torch.func
    assert differentiable["0.weight"].requires_grad


def test_hvp_rejects_mismatched_inputs():
    model = make_mlp((3, 6, 2), "tanh")
    x, y, _, _ = make_batch(2, 4, 3, 2, "mse")
    params, v = per_task_state(model, 2)
    with pytest.raises(ValueError, match="same names"):
        pymaml.hvp(model, params, x, y, {"0.weight": v["0.weight"]})
    with pytest.raises(ValueError, match="leading task dimension"):
        pymaml.hvp(model, params, x[:1], y[:1], v)
