"""Grad modes and inputs that require grad: one behaviour on every backend.

- meta_gradient and meta_train_step compute the meta-gradient whatever the grad mode, learned
  step sizes included; the forward under torch.no_grad() gives the same losses with no graph.
- An input that requires grad gets the oracle's gradient on the backends that differentiate the
  inputs (reference, func with second_order="graph"); every other backend refuses it by name.
"""

from __future__ import annotations

import pytest
import torch
from helpers import TOLERANCE, backends_on, make_batch, make_mlp, relative_error

import pymaml

CONFIGURATIONS = [(name, "memory_efficient") for name in backends_on("cpu")] + [("func", "graph")]


def _maml(backend, second_order, **options):
    return pymaml.MAML(make_mlp((2, 5, 3), "tanh"), inner_lr=0.1, inner_steps=2, backend=backend,
                       second_order=second_order, **options)


def _oracle_gradients(learn_inner_lr, batch):
    maml = _maml("reference", "graph", learn_inner_lr=learn_inner_lr)
    maml(*batch).loss.backward()
    return [p.grad.clone() for p in maml.parameters()]


@pytest.mark.parametrize("learn_inner_lr", [None, "scalar", "per_parameter"])
@pytest.mark.parametrize("backend,second_order", CONFIGURATIONS)
def test_meta_gradient_under_no_grad_is_the_oracle_gradient(backend, second_order, learn_inner_lr):
    batch = make_batch(3, 4, 2, 3, "mse")
    expected = _oracle_gradients(learn_inner_lr, batch)
    maml = _maml(backend, second_order, learn_inner_lr=learn_inner_lr)
    with torch.no_grad():
        out = maml.meta_gradient(*batch, accumulate=False)
    assert not out.loss.requires_grad
    for p, e in zip(maml.parameters(), expected):
        assert p.grad is not None
        assert relative_error(p.grad, e) < TOLERANCE[torch.float64]


@pytest.mark.parametrize("backend,second_order", CONFIGURATIONS)
def test_meta_train_step_under_no_grad_takes_the_oracle_step(backend, second_order):
    batch = make_batch(3, 4, 2, 3, "mse")
    expected_maml = _maml("reference", "graph")
    expected_optimizer = torch.optim.Adam(expected_maml.parameters(), lr=1e-2)
    expected_maml.meta_train_step(*batch, expected_optimizer)
    maml = _maml(backend, second_order)
    optimizer = torch.optim.Adam(maml.parameters(), lr=1e-2)
    with torch.no_grad():
        maml.meta_train_step(*batch, optimizer)
    for p, e in zip(maml.parameters(), expected_maml.parameters()):
        assert relative_error(p, e) < TOLERANCE[torch.float64]


@pytest.mark.parametrize("backend,second_order", CONFIGURATIONS)
def test_forward_under_no_grad_gives_the_losses_without_a_graph(backend, second_order):
    batch = make_batch(3, 4, 2, 3, "mse")
    expected = _maml("reference", "graph")(*batch)
    with torch.no_grad():
        out = _maml(backend, second_order)(*batch)
    assert not out.loss.requires_grad
    assert relative_error(out.loss, expected.loss.detach()) < TOLERANCE[torch.float64]
    assert relative_error(out.task_losses, expected.task_losses) < TOLERANCE[torch.float64]
    assert relative_error(out.pre_adaptation_loss, expected.pre_adaptation_loss) < TOLERANCE[torch.float64]


INPUT_NAMES = ("support_x", "support_y", "query_x", "query_y")


@pytest.mark.parametrize("index", range(4), ids=INPUT_NAMES)
@pytest.mark.parametrize("call", ["forward", "meta_gradient"])
def test_input_gradients_match_the_oracle_where_supported(call, index):
    def input_gradient(backend, second_order):
        batch = list(make_batch(3, 4, 2, 3, "mse"))
        batch[index].requires_grad_()
        maml = _maml(backend, second_order)
        if call == "forward":
            maml(*batch).loss.backward()
        else:
            maml.meta_gradient(*batch)
        return batch[index].grad

    expected = input_gradient("reference", "graph")
    assert expected is not None and bool(expected.ne(0).any())
    assert relative_error(input_gradient("func", "graph"), expected) < TOLERANCE[torch.float64]


@pytest.mark.parametrize("index", range(4), ids=INPUT_NAMES)
@pytest.mark.parametrize("backend,second_order", [c for c in CONFIGURATIONS if c[0] != "reference" and c[1] != "graph"])
def test_input_that_requires_grad_is_refused_where_unsupported(backend, second_order, index):
    batch = list(make_batch(3, 4, 2, 3, "mse"))
    batch[index].requires_grad_()
    maml = _maml(backend, second_order)
    for run in (lambda: maml(*batch), lambda: maml.meta_gradient(*batch),
                lambda: maml.meta_train_step(*batch, torch.optim.SGD(maml.parameters(), lr=0.1))):
        with pytest.raises(ValueError, match=rf"{INPUT_NAMES[index]} requires grad.*second_order='graph'"):
            run()
    with torch.no_grad():  # no graph is asked for: the losses come back
        assert torch.isfinite(maml(*batch).loss)


@pytest.mark.parametrize("backend", ["auto", "reference", "func"])
def test_a_meta_batch_without_tasks_is_refused_by_name(backend):
    batch = make_batch(0, 4, 2, 3, "mse")
    maml = pymaml.MAML(make_mlp((2, 5, 3)), backend=backend)
    for run in (lambda: maml(*batch), lambda: maml.meta_gradient(*batch), lambda: maml.adapt(*batch[:2])):
        with pytest.raises(ValueError, match="no tasks"):
            run()


def test_imaml_and_reptile_refuse_a_meta_batch_without_tasks():
    batch = make_batch(0, 4, 2, 3, "mse")
    imaml = pymaml.IMAML(make_mlp((2, 5, 3)), inner_lr=0.1, inner_steps=2, reg_lambda=1.0, cg_steps=3)
    reptile = pymaml.Reptile(make_mlp((2, 5, 3)), inner_lr=0.1, inner_steps=2, outer_lr=0.5)
    for run in (lambda: imaml.meta_gradient(*batch), lambda: imaml.adapt(*batch[:2]),
                lambda: reptile.meta_gradient(*batch[:2]), lambda: reptile.step(*batch[:2])):
        with pytest.raises(ValueError, match="no tasks"):
            run()
