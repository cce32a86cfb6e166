"""ANIL and partial adaptation: MAML(..., adapt=...) adapts only some parameters in the inner loop;
every backend (through a zero step size) against the oracle (which only moves the named ones)."""

import pytest
import torch
from torch import nn

import pymaml
from helpers import TOLERANCE, backends_on, make_batch, make_mlp, relative_error
from pymaml import reference

HEAD = {"2.weight", "2.bias"}


def oracle_gradient(model, batch, adapt, **options):
    loss = reference.meta_loss(model, *batch, adapt=adapt, **options)
    return torch.autograd.grad(loss, list(model.parameters()))


# second_order only selects between the func backend's two modes.
CASES = [(backend, "memory_efficient") for backend in backends_on("cpu")] + [("func", "graph")]


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("backend,second_order", CASES)
def test_head_only_matches_the_oracle(backend, second_order, first_order):
    model = make_mlp((3, 8, 2), "tanh")
    batch = make_batch(5, 4, 3, 2, "mse")
    options = dict(inner_lr=0.3, inner_steps=3, first_order=first_order)
    expected = oracle_gradient(model, batch, HEAD, **options)
    maml = pymaml.MAML(model, backend=backend, adapt=["2"], second_order=second_order, **options)
    maml.meta_gradient(*batch, accumulate=False)
    for (name, p), g in zip(model.named_parameters(), expected):
        assert g.abs().sum() > 0, name  # the body still gets a meta-gradient
        assert relative_error(p.grad, g) <= TOLERANCE[torch.float64], name
    adapted = maml.adapt(batch[0], batch[1])
    assert torch.equal(adapted.params["0.weight"][0], model[0].weight) and torch.equal(adapted.params["0.bias"][1],
                                                                                       model[0].bias)
    assert not torch.equal(adapted.params["2.weight"][0], model[2].weight)


@pytest.mark.parametrize("backend", backends_on("cpu"))
def test_predicate_with_learned_step_sizes_and_adam(backend):
    model = make_mlp((3, 8, 2), "tanh")
    batch = make_batch(5, 4, 3, 2, "mse")
    maml = pymaml.MAML(model, inner_lr=0.3, inner_steps=2, backend=backend, learn_inner_lr="per_layer_per_step",
                       adapt=lambda name, p: name.endswith("weight"))
    assert maml.adapted_names == {"0.weight", "2.weight"}
    maml.meta_gradient(*batch, accumulate=False)
    alphas = maml.inner_lr
    expected = torch.autograd.grad(
        reference.meta_loss(model, *batch, inner_lr=alphas, inner_steps=2, adapt={"0.weight", "2.weight"}),
        [*model.parameters(), maml.inner_lrs])
    for p, g in zip([*model.parameters(), maml.inner_lrs], expected):
        assert relative_error(p.grad, g) <= TOLERANCE[torch.float64]
    # The step sizes of the parameters that are not adapted get no gradient from the inner loop.
    assert maml.inner_lrs.grad[:, [1, 3]].abs().max() == 0
    optimizer = torch.optim.Adam(maml.parameters(), lr=1e-2)
    before = model[0].bias.detach().clone()
    maml.meta_train_step(*batch, optimizer)
    assert not torch.equal(model[0].bias, before)  # meta-learned, though never adapted


def test_conv_net_with_batchnorm_head_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 4 * 4, 2)).double()
    generator = torch.Generator().manual_seed(1)
    batch = (torch.randn(3, 4, 1, 6, 6, generator=generator, dtype=torch.float64),
             torch.randint(0, 2, (3, 4), generator=generator),
             torch.randn(3, 4, 1, 6, 6, generator=generator, dtype=torch.float64),
             torch.randint(0, 2, (3, 4), generator=generator))
    options = dict(inner_lr=0.4, inner_steps=2, loss="cross_entropy")
    expected = oracle_gradient(model, batch, {"4.weight", "4.bias"}, **options)
    maml = pymaml.MAML(model, backend="func", adapt="4", **options)
    maml.meta_gradient(*batch, accumulate=False)
    # Compared whole: the convolution's bias, which BatchNorm cancels, has a gradient of rounding noise.
    actual = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert relative_error(actual, torch.cat([g.reshape(-1) for g in expected])) <= TOLERANCE[torch.float64]


def test_adapt_errors():
    model = make_mlp((3, 8, 2), "tanh")
    with pytest.raises(ValueError, match="adapt names 'head'"):
        pymaml.MAML(model, adapt=["head"])
    with pytest.raises(ValueError, match="selects no parameter"):
        pymaml.MAML(model, adapt=lambda name, p: False)
    with pytest.raises(TypeError, match="adapt must be"):
        pymaml.MAML(model, adapt=[2])
    assert pymaml.MAML(model, adapt=lambda name, p: True).adapted_names is None  # all: plain MAML


def test_trainable_parameters_changing_after_construction_is_an_error():
    model = make_mlp((3, 8, 2), "tanh")
    maml = pymaml.MAML(model, inner_lr=0.3, learn_inner_lr="per_layer_per_step")
    model[0].weight.requires_grad_(False)  # the step sizes' columns would shift by one parameter
    with pytest.raises(RuntimeError, match="trainable parameters changed since this MAML was built"):
        maml.meta_gradient(*make_batch(2, 4, 3, 2, "mse"))
