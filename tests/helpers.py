"""Shared helpers: models, data, meta-gradients and the error measure every test uses."""

from __future__ import annotations

import torch
from torch import nn

import pymaml
from pymaml import reference

# Largest relative error a backend may show against the oracle, per dtype.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


def backends_on(device: str = "cpu") -> list[str]:
    """The backends usable here that run an MLP on `device` (the GPU backends need CUDA tensors)."""
    probe = pymaml.models.mlp((2, 3, 2))
    config = pymaml.backends.MetaConfig(1, False, "mse")
    names = []
    for status in pymaml.available_backends():
        backend = pymaml.backends.get_backend(status.name)
        if status.usable and backend.unsupported_reason(probe, config, torch.device(device)) is None:
            names.append(status.name)
    return names


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, computed in float64; 0 when both vanish."""
    actual, expected = actual.double(), expected.double()
    scale = expected.norm().item()
    difference = (actual - expected).norm().item()
    return difference / scale if scale > 0 else difference


def make_mlp(widths, activation="tanh", dtype=torch.float64, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    return pymaml.models.mlp(widths, ACTIVATIONS[activation]).to(dtype)


def make_batch(tasks, shots, in_features, out_features, loss, dtype=torch.float64, seed=1, queries=None):
    """Random tasks: x ~ N(0, 1); MSE targets ~ N(0, 1) [T, K, out]; class labels [T, K] in [0, out)."""
    generator = torch.Generator().manual_seed(seed)
    queries = shots if queries is None else queries
    tensors = []
    for points in (shots, queries):
        x = torch.randn(tasks, points, in_features, generator=generator, dtype=torch.float64).to(dtype)
        if loss == "cross_entropy":
            y = torch.randint(0, out_features, (tasks, points), generator=generator)
        else:
            y = torch.randn(tasks, points, out_features, generator=generator, dtype=torch.float64).to(dtype)
        tensors += [x, y]
    return tuple(tensors)


def flat_grad(loss: torch.Tensor, params) -> torch.Tensor:
    grads = torch.autograd.grad(loss, list(params), allow_unused=True, materialize_grads=True)
    return torch.cat([g.reshape(-1) for g in grads])


def oracle_meta_gradient(model, batch, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle's meta-loss and its gradient with respect to the adapted parameters."""
    loss = reference.meta_loss(model, *batch, **options)
    return loss.detach(), flat_grad(loss, pymaml.numerics.state.adapted_parameters(model).values())


def backend_meta_gradient(model, batch, backend, **options) -> tuple[torch.Tensor, torch.Tensor]:
    out = pymaml.MAML(model, backend=backend, **options)(*batch)
    return out.loss.detach(), flat_grad(out.loss, pymaml.numerics.state.adapted_parameters(model).values())


def assert_backend_matches_oracle(model, batch, backend, **options):
    """The backend's meta-loss and meta-gradient are within the dtype's tolerance of the oracle's."""
    dtype = next(model.parameters()).dtype
    expected_loss, expected_grad = oracle_meta_gradient(model, batch, **options)
    actual_loss, actual_grad = backend_meta_gradient(model, batch, backend, **options)
    assert relative_error(actual_loss, expected_loss) <= TOLERANCE[dtype], backend
    assert relative_error(actual_grad, expected_grad) <= TOLERANCE[dtype], backend
