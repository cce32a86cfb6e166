"""pymaml.Reptile against a hand-written per-task loop (a copy of the model and torch.optim.SGD per task)."""

import copy

import pytest
import torch
from torch import nn

import pymaml
from helpers import TOLERANCE, make_batch, make_mlp, relative_error

F64 = TOLERANCE[torch.float64]


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def hand_written_reptile(model, x, y, inner_lr, inner_steps, loss_fn):
    """Per task: a copy of the model, inner_steps full-batch SGD steps with loss.backward().
    Returns the mean over tasks of φ_t − θ (flat) and the loss of each task at θ."""
    theta = flat_params(model)
    deltas, losses = [], []
    for t in range(x.shape[0]):
        task_model = copy.deepcopy(model)
        optimizer = torch.optim.SGD(task_model.parameters(), lr=inner_lr)
        for step in range(inner_steps):
            optimizer.zero_grad()
            loss = loss_fn(task_model(x[t]), y[t])
            if step == 0:
                losses.append(loss.detach())
            loss.backward()
            optimizer.step()
        deltas.append(flat_params(task_model) - theta)
    return torch.stack(deltas).mean(0), torch.stack(losses)


def batchnorm_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).double()


@pytest.mark.parametrize("model_kind, loss", [("mlp", "mse"), ("mlp", "cross_entropy"), ("batchnorm", "mse")])
def test_step_matches_a_hand_written_loop(model_kind, loss):
    model = make_mlp((3, 6, 6, 2), "tanh") if model_kind == "mlp" else batchnorm_mlp()
    x, y, _, _ = make_batch(4, 5, 3, 2, loss)
    running_stats = [b.clone() for b in model.buffers()]
    mean_delta, losses = hand_written_reptile(model, x, y, 0.1, 3, pymaml.numerics.losses.resolve_loss(loss))
    expected = flat_params(model) + 0.5 * mean_delta
    out = pymaml.Reptile(model, inner_lr=0.1, inner_steps=3, outer_lr=0.5, loss=loss).step(x, y)
    assert relative_error(flat_params(model), expected) <= F64
    assert relative_error(out.task_losses, losses) <= F64
    assert relative_error(out.loss, losses.mean()) <= F64
    assert all(torch.equal(b, r) for b, r in zip(model.buffers(), running_stats))
    assert all(p.grad is None for p in model.parameters())


def test_meta_gradient_is_the_reptile_direction_for_any_optimizer():
    model = batchnorm_mlp()
    x, y, _, _ = make_batch(3, 6, 3, 2, "mse")
    mean_delta, _ = hand_written_reptile(model, x, y, 0.05, 4, pymaml.numerics.losses.mse)
    reptile = pymaml.Reptile(model, inner_lr=0.05, inner_steps=4, outer_lr=0.3)
    reptile.meta_gradient(x, y)
    direction = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert relative_error(direction, -mean_delta) <= F64
    reptile.meta_gradient(x, y)
    assert relative_error(torch.cat([p.grad.reshape(-1) for p in model.parameters()]), -2 * mean_delta) <= F64
    stepped = copy.deepcopy(model)
    pymaml.Reptile(stepped, inner_lr=0.05, inner_steps=4, outer_lr=0.3).step(x, y)
    reptile.meta_gradient(x, y, accumulate=False)
    torch.optim.SGD(model.parameters(), lr=0.3).step()
    assert relative_error(flat_params(model), flat_params(stepped)) <= F64


def test_adapt_gives_each_task_its_adapted_weights():
    model = make_mlp((2, 5, 1), "tanh")
    x, y, query_x, _ = make_batch(3, 4, 2, 1, "mse")
    adapted = pymaml.Reptile(model, inner_lr=0.1, inner_steps=2, outer_lr=1.0).adapt(x, y, steps=5)
    for t in range(3):
        task_model = copy.deepcopy(model)
        optimizer = torch.optim.SGD(task_model.parameters(), lr=0.1)
        for _ in range(5):
            optimizer.zero_grad()
            pymaml.numerics.losses.mse(task_model(x[t]), y[t]).backward()
            optimizer.step()
        with torch.no_grad():
            assert relative_error(adapted(query_x)[t], task_model(query_x[t])) <= F64


def test_rejects_bad_arguments_and_inputs():
    model = make_mlp((2, 4, 1), "tanh")
    for kwargs, message in [
        (dict(inner_steps=0), "inner_steps must be >= 1"),
        (dict(inner_steps=1.5), "inner_steps must be an integer"),
        (dict(inner_lr=float("nan")), "inner_lr must be a finite number"),
        (dict(outer_lr=float("inf")), "outer_lr must be a finite number"),
        (dict(outer_lr="0.1"), "outer_lr must be a finite number"),
        (dict(loss="hinge"), "unknown loss"),
    ]:
        with pytest.raises(ValueError, match=message):
            pymaml.Reptile(model, **(dict(inner_lr=0.1, inner_steps=2, outer_lr=0.5) | kwargs))
    with pytest.raises(ValueError, match="no parameters that require grad"):
        pymaml.Reptile(nn.Tanh(), 0.1, 2, 0.5)

    reptile = pymaml.Reptile(model, 0.1, 2, 0.5)
    x, y, _, _ = make_batch(2, 5, 2, 1, "mse")
    before = flat_params(model)
    with pytest.raises(ValueError, match="task dimension"):
        reptile.step(x, y[:1])
    with pytest.raises(ValueError, match="x has 5 points per task but y has 3"):
        reptile.step(x, y[:, :3])
    with pytest.raises(TypeError, match="y has dtype torch.int64"):
        reptile.step(x, y.long())
    bad = x.clone()
    bad[0, 1, 1] = float("inf")
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        reptile.step(bad, y)
    with pytest.raises(ValueError, match="x has no points per task"):
        reptile.meta_gradient(x[:, :0], y[:, :0])
    with pytest.raises(ValueError, match="mse: the model's output per task has shape"):
        reptile.step(x, y.expand(2, 5, 3))
    with pytest.raises(FloatingPointError, match="inner loop diverged"):
        pymaml.Reptile(nn.Linear(2, 1).double(), 1e3, 200, 0.5).step(x, y)
    assert torch.equal(flat_params(model), before)
    classifier = make_mlp((2, 4, 3), "tanh")
    with pytest.raises(TypeError, match="cross_entropy needs integer class labels"):
        pymaml.Reptile(classifier, 0.1, 2, 0.5, loss="cross_entropy").step(x, y.squeeze(-1))
