"""Copies and pickles of the meta-learners: a copy chooses its backend again and builds its own
native plans; a pickle round-trips the module, the step sizes and the settings."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from helpers import backends_on, make_batch, make_mlp, relative_error

import pymaml


def _gradients(maml, batch):
    maml.meta_gradient(*batch, accumulate=False)
    return [p.grad.clone() for p in maml.parameters()]


def _trained_cpp_maml():
    """A MAML whose cpp backend holds native plans, for meta_gradient and for an Adam optimizer."""
    maml = pymaml.MAML(make_mlp((2, 5, 3), "relu"), inner_lr=0.1, backend="cpp")
    optimizer = torch.optim.Adam(maml.parameters(), lr=1e-3)
    batch = make_batch(3, 4, 2, 3, "mse")
    maml.meta_train_step(*batch, optimizer)
    maml.meta_gradient(*batch, accumulate=False)
    return maml, batch


COPIES = {"deepcopy": copy.deepcopy, "pickle": lambda obj: pickle.loads(pickle.dumps(obj))}


@pytest.mark.parametrize("how", sorted(COPIES))
@pytest.mark.parametrize("backend", ["auto", *backends_on("cpu")])
def test_maml_copy_gives_the_same_meta_gradient(how, backend):
    maml = pymaml.MAML(make_mlp((2, 5, 3), "relu"), inner_lr=0.1, inner_steps=2, backend=backend,
                       learn_inner_lr="per_layer_per_step", step_weights=[0.5, 1.0])
    batch = make_batch(3, 4, 2, 3, "mse")
    expected = _gradients(maml, batch)
    clone = COPIES[how](maml)
    assert clone.backend == maml.backend
    assert clone.inner_steps == 2 and clone.learn_inner_lr == "per_layer_per_step"
    torch.testing.assert_close(clone.inner_lrs, maml.inner_lrs)
    torch.testing.assert_close(clone.step_weights, maml.step_weights)
    actual = _gradients(clone, batch)
    assert all(relative_error(a, e) == 0 for a, e in zip(actual, expected))
    assert all(p is not q for p, q in zip(clone.parameters(), maml.parameters()))


@pytest.mark.parametrize("how", sorted(COPIES))
def test_copy_of_a_maml_with_native_plans_builds_its_own(how):
    maml, batch = _trained_cpp_maml()
    clone = COPIES[how](maml)
    expected = _gradients(maml, batch)
    actual = _gradients(clone, batch)
    assert all(relative_error(a, e) == 0 for a, e in zip(actual, expected))
    # The clone's plan writes into the clone's gradient buffers, never into the original's.
    assert all(p.grad.data_ptr() != q.grad.data_ptr() for p, q in zip(clone.parameters(), maml.parameters()))
    clone_optimizer = torch.optim.Adam(clone.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in maml.parameters()]
    clone.meta_train_step(*batch, clone_optimizer)
    assert all(torch.equal(p, b) for p, b in zip(maml.parameters(), before))


@pytest.mark.parametrize("how", sorted(COPIES))
def test_imaml_and_reptile_copy_while_native_plans_exist(how):
    _trained_cpp_maml()  # native plans exist in this process
    batch = make_batch(3, 4, 2, 3, "mse")
    imaml = pymaml.IMAML(make_mlp((2, 5, 3)), inner_lr=0.1, inner_steps=2, reg_lambda=1.0, cg_steps=3)
    reptile = pymaml.Reptile(make_mlp((2, 5, 3)), inner_lr=0.1, inner_steps=2, outer_lr=0.5)
    for learner, arguments in ((imaml, batch), (reptile, batch[:2])):
        learner.meta_gradient(*arguments, accumulate=False)
        expected = [p.grad.clone() for p in learner.parameters()]
        clone = COPIES[how](learner)
        clone.meta_gradient(*arguments, accumulate=False)
        assert all(relative_error(p.grad, e) == 0 for p, e in zip(clone.parameters(), expected))
