"""Learned inner step sizes (scalar, MAML++ LSLR, Meta-SGD) and MAML++ step weights, against the oracle."""

import pytest
import torch

import pymaml
from helpers import TOLERANCE, backends_on, flat_grad, make_batch, make_mlp, relative_error
from pymaml import reference

USABLE = backends_on("cpu")
MODES = ["scalar", "per_layer_per_step", "per_parameter"]


def learned_maml(backend, mode, step_weights=None, steps=3, first_order=False, loss="mse", seed=0):
    model = make_mlp((3, 6, 4, 2), "tanh", seed=seed)
    maml = pymaml.MAML(model, inner_lr=0.2, inner_steps=steps, first_order=first_order, loss=loss, backend=backend,
                       learn_inner_lr=mode, step_weights=step_weights)
    generator = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():  # distinct values everywhere, so a misplaced α shows
        for p in ([maml.inner_lrs] if isinstance(maml.inner_lrs, torch.nn.Parameter) else maml.inner_lrs):
            p.copy_(0.05 + 0.3 * torch.rand(p.shape, generator=generator, dtype=p.dtype))
    return maml


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("step_weights", [None, (0.2, 0.3, 0.5)], ids=["last-step", "multi-step"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("backend", USABLE)
def test_learned_step_sizes_match_oracle(backend, loss, mode, step_weights, first_order):
    maml = learned_maml(backend, mode, step_weights, first_order=first_order, loss=loss)
    batch = make_batch(4, 5, 3, 2, loss)
    parameters = list(maml.parameters())
    assert len(parameters) > len(list(maml.module.parameters()))
    out = maml(*batch)
    actual = flat_grad(out.loss, parameters)
    expected_loss = reference.meta_loss(
        maml.module, *batch, inner_lr=maml.inner_lr, inner_steps=3, first_order=first_order, loss=loss,
        step_weights=maml.step_weights,
    )
    expected = flat_grad(expected_loss, parameters)
    assert relative_error(out.loss.detach(), expected_loss.detach()) <= TOLERANCE[torch.float64]
    assert relative_error(actual, expected) <= TOLERANCE[torch.float64]
    model_size = sum(p.numel() for p in maml.module.parameters())
    assert expected[model_size:].abs().max() > 0  # the step sizes do get gradients


@pytest.mark.parametrize("backend", USABLE)
def test_step_weights_gradient(backend):
    """Step weights given as a tensor that requires grad get d(meta-loss)/dw_s = mean_t L_query(θ_s)."""
    maml = pymaml.MAML(make_mlp((3, 5, 2), "tanh"), inner_lr=0.2, inner_steps=3, backend=backend)
    weights = torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64, requires_grad=True)
    batch = make_batch(4, 5, 3, 2, "mse")
    backend_object = pymaml.backends.get_backend(maml.backend)
    out = backend_object.meta_step(maml.module, maml.config, pymaml.backends.TaskBatch(*batch), 0.2, weights)
    (grad,) = torch.autograd.grad(out.loss, [weights])
    expected = torch.stack([
        reference.meta_loss(maml.module, *batch, inner_lr=0.2, inner_steps=s).detach() for s in (1, 2, 3)
    ])
    assert relative_error(grad, expected) <= TOLERANCE[torch.float64]


@pytest.mark.parametrize("mode", MODES)
def test_adapt_with_learned_step_sizes_repeats_the_last_step(mode):
    maml = learned_maml("func", mode, steps=2)
    sx, sy, qx, _ = make_batch(3, 4, 3, 2, "mse")
    params = pymaml.numerics.state.adapted_parameters(maml.module)
    adapted = maml.adapt(sx, sy, steps=4)
    schedule = maml.inner_lr
    for t in range(3):
        theta = dict(params)
        for step in range(4):
            loss = pymaml.numerics.losses.mse(torch.func.functional_call(maml.module, theta, (sx[t],)), sy[t])
            grads = torch.autograd.grad(loss, list(theta.values()), create_graph=True)
            lrs = schedule[min(step, len(schedule) - 1)]
            theta = {name: w - lrs[name] * g for (name, w), g in zip(theta.items(), grads)}
        for name in params:
            assert relative_error(adapted.params[name][t].detach(), theta[name].detach()) <= TOLERANCE[torch.float64]


def test_learned_step_sizes_train():
    """The step sizes move under meta-training."""
    maml = pymaml.MAML(make_mlp((1, 20, 1), "tanh", torch.float32), inner_lr=0.01, learn_inner_lr="scalar")
    optimizer = torch.optim.Adam(maml.parameters(), lr=1e-2)
    tasks = pymaml.data.Sinusoid(seed=0)
    for _ in range(5):
        optimizer.zero_grad()
        maml(*tasks.sample(10, 5).tasks).loss.backward()
        optimizer.step()
    assert maml.inner_lrs.item() != pytest.approx(0.01, abs=1e-4)


@pytest.mark.parametrize("bad,message", [
    (dict(learn_inner_lr="adam"), "learn_inner_lr must be one of"),
    (dict(step_weights=[1.0]), "step_weights must be 2 finite numbers"),
    (dict(step_weights=[float("nan"), 1.0]), "step_weights must be 2 finite numbers"),
])
def test_bad_step_size_settings(bad, message):
    with pytest.raises(ValueError, match=message):
        pymaml.MAML(make_mlp((3, 2)), inner_steps=2, **bad)


def test_per_step_learned_step_sizes_with_zero_steps_cannot_adapt():
    maml = pymaml.MAML(make_mlp((3, 2)), inner_steps=0, learn_inner_lr="per_layer_per_step")
    sx, sy, _, _ = make_batch(2, 3, 3, 2, "mse")
    with pytest.raises(ValueError, match="no learned inner step sizes"):
        maml.adapt(sx, sy, steps=1)
