"""The MAML API: outputs, adapt, backend choice, parameters, build info."""

import contextlib
import subprocess
import sys
from unittest import mock

import pytest
import torch

import pymaml
from helpers import TOLERANCE, backends_on, make_batch, make_mlp, relative_error
from pymaml import reference


USABLE = backends_on("cpu")


@pytest.mark.parametrize("backend", USABLE)
def test_output_fields(backend):
    model = make_mlp((3, 6, 2), "tanh")
    batch = make_batch(5, 4, 3, 2, "mse")
    out = pymaml.MAML(model, inner_lr=0.3, inner_steps=2, backend=backend)(*batch)
    expected_tasks = reference.task_query_losses(model, *batch, inner_lr=0.3, inner_steps=2)
    expected_pre = reference.meta_loss(model, *batch, inner_lr=0.3, inner_steps=0)
    assert out.loss.dim() == 0 and out.loss.requires_grad
    assert out.task_losses.shape == (5,) and not out.task_losses.requires_grad
    assert relative_error(out.task_losses, expected_tasks.detach()) <= TOLERANCE[torch.float64]
    assert relative_error(out.pre_adaptation_loss, expected_pre.detach()) <= TOLERANCE[torch.float64]
    assert out.backend == backend


@pytest.mark.parametrize("learn_inner_lr", [None, "per_parameter"])
@pytest.mark.parametrize("backend", USABLE)
def test_meta_gradient_accumulates_what_backward_gives(backend, learn_inner_lr):
    options = dict(inner_lr=0.2, inner_steps=2, learn_inner_lr=learn_inner_lr, step_weights=[0.5, 1.0])
    batch = make_batch(4, 5, 3, 2, "mse")
    model = make_mlp((3, 7, 2), "tanh")
    maml = pymaml.MAML(model, backend=backend, **options)
    out = maml(*batch)
    out.loss.backward()
    expected = {name: p.grad.clone() for name, p in maml.named_parameters()}

    twin = make_mlp((3, 7, 2), "tanh")
    twin_maml = pymaml.MAML(twin, backend=backend, **options)
    for p in twin_maml.parameters():
        p.grad = torch.ones_like(p)  # meta_gradient adds to what is there, as backward does
    result = twin_maml.meta_gradient(*batch)
    assert not result.loss.requires_grad and result.backend == backend
    assert relative_error(result.loss, out.loss.detach()) <= TOLERANCE[torch.float64]
    assert relative_error(result.task_losses, out.task_losses) <= TOLERANCE[torch.float64]
    assert set(expected) == {name for name, _ in twin_maml.named_parameters()}
    for name, p in twin_maml.named_parameters():
        assert relative_error(p.grad - 1, expected[name]) <= TOLERANCE[torch.float64], name
    twin_maml.meta_gradient(*batch, accumulate=False)  # replaces what is there
    for name, p in twin_maml.named_parameters():
        assert relative_error(p.grad, expected[name]) <= TOLERANCE[torch.float64], name


@pytest.mark.parametrize("backend", USABLE)
@pytest.mark.parametrize("steps", [0, 1, 4])
def test_adapt_matches_oracle_and_predicts_per_task(backend, steps):
    model = make_mlp((3, 6, 2), "tanh")
    sx, sy, qx, qy = make_batch(4, 5, 3, 2, "mse", queries=7)
    maml = pymaml.MAML(model, inner_lr=0.3, inner_steps=2, backend=backend)
    adapted = maml.adapt(sx, sy, steps=steps)
    params = pymaml.numerics.state.adapted_parameters(model)
    for name, value in adapted.params.items():
        assert value.shape == (4, *params[name].shape)
    predictions = adapted(qx)
    assert predictions.shape == (4, 7, 2)
    for t in range(4):
        theta = reference.adapt_task(model, params, {}, pymaml.numerics.losses.mse, sx[t], sy[t], 0.3, steps, False)
        expected = torch.func.functional_call(model, theta, (qx[t],))
        assert relative_error(predictions[t].detach(), expected.detach()) <= TOLERANCE[torch.float64]


@pytest.mark.parametrize("backend", USABLE)
def test_adapt_is_differentiable_and_no_grad_is_plain(backend):
    model = make_mlp((3, 6, 2), "tanh")
    sx, sy, qx, qy = make_batch(2, 5, 3, 2, "mse")
    maml = pymaml.MAML(model, inner_lr=0.3, backend=backend)
    differentiable = maml.adapt(sx, sy)(qx)
    assert differentiable.requires_grad
    with torch.no_grad():
        plain = maml.adapt(sx, sy)(qx)
    assert not plain.requires_grad
    assert torch.allclose(plain, differentiable.detach(), rtol=1e-12, atol=0)


def test_adapt_default_steps_is_inner_steps():
    model = make_mlp((3, 6, 2), "tanh")
    sx, sy, _, _ = make_batch(2, 5, 3, 2, "mse")
    maml = pymaml.MAML(model, inner_lr=0.3, inner_steps=3)
    default = maml.adapt(sx, sy).params
    explicit = maml.adapt(sx, sy, steps=3).params
    assert all(torch.equal(default[name], explicit[name]) for name in default)


def test_parameters_are_the_models_and_meta_training_reduces_loss():
    model = make_mlp((1, 20, 1), "tanh", torch.float32)
    maml = pymaml.MAML(model, inner_lr=0.01)
    assert [id(p) for p in maml.parameters()] == [id(p) for p in model.parameters()]
    tasks = pymaml.data.Sinusoid(seed=0)
    fixed_batch = tasks.sample(25, 10)
    optimizer = torch.optim.Adam(maml.parameters(), lr=1e-2)
    initial = maml(*fixed_batch.tasks).loss.item()
    for _ in range(30):
        optimizer.zero_grad()
        maml(*tasks.sample(25, 10).tasks).loss.backward()
        optimizer.step()
    assert maml(*fixed_batch.tasks).loss.item() < 0.9 * initial


def test_auto_says_which_backend_it_picked():
    maml = pymaml.MAML(make_mlp((3, 2)), backend="auto")
    assert maml.backend in {s.name for s in pymaml.available_backends() if s.usable}
    assert maml.backend in maml.backend_choice and "auto picked" in maml.backend_choice
    explicit = pymaml.MAML(make_mlp((3, 2)), backend="reference")
    assert explicit.backend == "reference"


def test_available_backends_lists_each_with_a_reason_when_unusable():
    statuses = pymaml.available_backends()
    names = [s.name for s in statuses]
    assert {"func", "reference"} <= set(names)
    for status in statuses:
        assert status.usable == (status.reason is None)
        assert status.name in str(status)


def test_build_info_reports_the_extension():
    info = pymaml.build_info()
    if info["extension"]:
        assert {"compiler", "flags", "openmp", "cuda_archs"} <= set(info)
        assert "-march=native" not in info["flags"]
        assert isinstance(info["cuda_archs"], list)
    else:
        assert "PYMAML_NO_EXTENSION" in info["reason"]


def test_import_without_the_extension(tmp_path):
    """With pymaml._C missing, pymaml still imports, says so, and trains through the torch backends."""
    script = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "pymaml._C":
            raise ImportError("blocked for this test")
sys.meta_path.insert(0, Block())
import torch, pymaml
info = pymaml.build_info()
assert info["extension"] is False and "blocked for this test" in info["reason"], info
batch = pymaml.data.Sinusoid(0).sample(2, 3)
maml = pymaml.MAML(pymaml.models.sinusoid_mlp())
maml(*batch.tasks).loss.backward()
print("ok", maml.backend)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok ")


@pytest.mark.parametrize("options", [
    dict(lr=1e-2), dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1), dict(lr=1e-2, amsgrad=True),
], ids=["adam", "adam-weight-decay", "amsgrad-not-fused"])
@pytest.mark.parametrize("backend", USABLE)
def test_meta_train_step_equals_meta_gradient_then_adam(backend, options):
    """Three training steps: the same parameters, moments and step counts as meta_gradient
    followed by torch.optim.Adam's own step (which the cpp backend fuses into the kernel call)."""
    batches = [make_batch(4, 5, 3, 2, "mse", seed=seed) for seed in range(3)]
    models, optimizers = [], []
    for fused in (False, True):
        model = make_mlp((3, 9, 2), "tanh")
        maml = pymaml.MAML(model, inner_lr=0.2, inner_steps=2, backend=backend)
        optimizer = torch.optim.Adam(maml.parameters(), **options)
        kernel_steps = fused and backend == "cpp" and not options.get("amsgrad")
        # Where the kernel takes the Adam step, torch's must not run.
        guard = mock.patch.object(torch.optim.Adam, "step", side_effect=AssertionError("torch's Adam step ran"))
        with guard if kernel_steps else contextlib.nullcontext():
            for batch in batches:
                if fused:
                    out = maml.meta_train_step(*batch, optimizer)
                else:
                    out = maml.meta_gradient(*batch, accumulate=False)
                    optimizer.step()
                assert not out.loss.requires_grad
        models.append(model)
        optimizers.append(optimizer)
    for (name, expected), actual in zip(models[0].named_parameters(), models[1].parameters()):
        assert relative_error(actual, expected) <= TOLERANCE[torch.float64], name
        assert relative_error(actual.grad, expected.grad) <= TOLERANCE[torch.float64], name
    for expected, actual in zip(optimizers[0].state.values(), optimizers[1].state.values()):
        assert set(expected) == set(actual)
        for key in expected:
            assert relative_error(torch.as_tensor(actual[key]), torch.as_tensor(expected[key])) <= 1e-10, key
    # The optimizer's state stays usable by torch itself afterwards.
    torch.optim.Adam.step(optimizers[1])
