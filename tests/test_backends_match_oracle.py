"""Every backend's meta-loss and meta-gradient equal the oracle's, over a grid of MLPs and settings."""

import itertools

import pytest
import torch

from helpers import (
    TOLERANCE,
    assert_backend_matches_oracle,
    backend_meta_gradient,
    backends_on,
    make_batch,
    make_mlp,
    oracle_meta_gradient,
    relative_error,
)

BACKENDS = backends_on("cpu")
# Depth 1 to 3, with widths of 1 and odd sizes; 3 inputs, 2 outputs (or 2 classes).
ARCHITECTURES = [(3, 2), (3, 1, 2), (3, 7, 2), (3, 5, 1, 2)]
GRID = list(
    itertools.product(
        ARCHITECTURES, ["relu", "tanh"], ["mse", "cross_entropy"], [0, 1, 3], [1, 7], [1, 5], [False, True]
    )
)


def _id(case):
    widths, activation, loss, steps, tasks, shots, first_order = case
    order = "first" if first_order else "second"
    return f"{'-'.join(map(str, widths))}-{activation}-{loss}-S{steps}-T{tasks}-K{shots}-{order}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", GRID, ids=[_id(c) for c in GRID])
def test_meta_gradient_matches_oracle(case, dtype):
    widths, activation, loss, steps, tasks, shots, first_order = case
    model = make_mlp(widths, activation, dtype)
    batch = make_batch(tasks, shots, widths[0], widths[-1], loss, dtype)
    options = dict(inner_lr=0.3, inner_steps=steps, first_order=first_order, loss=loss)
    expected_loss, expected_grad = oracle_meta_gradient(model, batch, **options)
    assert expected_grad.abs().sum() > 0
    for backend in BACKENDS:
        actual_loss, actual_grad = backend_meta_gradient(model, batch, backend, **options)
        assert relative_error(actual_loss, expected_loss) <= TOLERANCE[dtype], backend
        assert relative_error(actual_grad, expected_grad) <= TOLERANCE[dtype], backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_order_terms_are_present(backend):
    """Guards against a backend that silently drops the Hessian terms: second order must differ from first."""
    model = make_mlp((3, 8, 2), "tanh")
    batch = make_batch(4, 5, 3, 2, "mse")
    options = dict(inner_lr=0.5, inner_steps=2, loss="mse")
    _, second = backend_meta_gradient(model, batch, backend, first_order=False, **options)
    _, first = backend_meta_gradient(model, batch, backend, first_order=True, **options)
    _, oracle_first = oracle_meta_gradient(model, batch, first_order=True, **options)
    assert relative_error(first, oracle_first) <= TOLERANCE[torch.float64]
    assert relative_error(second, first) > 1e-3


@pytest.mark.parametrize("backend", ["func", "reference"])
def test_callable_loss(backend):
    def huber(prediction, target):
        return torch.nn.functional.huber_loss(prediction, target, delta=0.5)

    assert_backend_matches_oracle(make_mlp((3, 6, 2), "tanh"), make_batch(3, 4, 3, 2, "mse"), backend,
                                  inner_lr=0.2, inner_steps=2, first_order=False, loss=huber)
