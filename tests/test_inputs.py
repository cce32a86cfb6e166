"""Bad input raises an error that names the problem."""

import re

import pytest
import torch

import pymaml
from helpers import make_batch, make_mlp


@pytest.fixture
def regression():
    return pymaml.MAML(make_mlp((3, 4, 2)), inner_lr=0.1), make_batch(3, 4, 3, 2, "mse")


@pytest.fixture
def classification():
    return pymaml.MAML(make_mlp((3, 4, 2)), inner_lr=0.1, loss="cross_entropy"), make_batch(3, 4, 3, 2, "cross_entropy")


def _replace(batch, index, value):
    batch = list(batch)
    batch[index] = value
    return batch


@pytest.mark.parametrize("index,name", [(0, "support_x"), (1, "support_y"), (2, "query_x"), (3, "query_y")])
def test_task_dimension_mismatch(regression, index, name):
    maml, batch = regression
    bad = _replace(batch, index, batch[index][:2])
    with pytest.raises(ValueError, match=rf"task dimension.*{name}: 2"):
        maml(*bad)


def test_points_mismatch_between_x_and_y(regression):
    maml, batch = regression
    with pytest.raises(ValueError, match="query_x has 4 points per task but query_y has 3"):
        maml(*_replace(batch, 3, batch[3][:, :3]))


@pytest.mark.parametrize("index,name", [(0, "support_x"), (3, "query_y")])
def test_wrong_number_of_dimensions(regression, index, name):
    maml, batch = regression
    with pytest.raises(ValueError, match=rf"{name} must be \[T, K"):
        maml(*_replace(batch, index, batch[index][:, 0, 0]))


def test_scalar_input(regression):
    maml, batch = regression
    with pytest.raises(ValueError, match="support_x must have a leading task dimension"):
        maml(*_replace(batch, 0, torch.tensor(1.0, dtype=torch.float64)))


def test_output_shape_mismatch_for_mse(regression):
    maml, batch = regression
    message = re.escape("output per task has shape (4, 2) but the targets have shape (4, 1)")
    fused_message = re.escape("support_y must have shape (3, 4, 2) ([tasks, support points, outputs]), got (3, 4, 1)")
    with pytest.raises(ValueError, match=f"{message}|{fused_message}"):
        maml(*_replace(batch, 1, batch[1][..., :1]))


def test_integer_targets_for_mse(regression):
    maml, batch = regression
    with pytest.raises(TypeError, match="support_y has dtype torch.int64; mse needs floating targets"):
        maml(*_replace(batch, 1, batch[1].long()))


def test_float_targets_for_cross_entropy(classification):
    maml, batch = classification
    with pytest.raises(TypeError, match="query_y has dtype torch.float64; cross_entropy needs integer class labels"):
        maml(*_replace(batch, 3, batch[3].double()))


def test_cross_entropy_labels_shape_and_sign(classification):
    maml, batch = classification
    with pytest.raises(ValueError, match=r"support_y must be class labels \[T, K\]"):
        maml(*_replace(batch, 1, batch[1][..., None]))
    with pytest.raises(ValueError, match="support_y has negative class labels"):
        maml(*_replace(batch, 1, -batch[1] - 1))


def test_input_dtype_must_match_the_model(regression):
    maml, batch = regression
    with pytest.raises(TypeError, match="query_x has dtype torch.float32; the model's parameters are torch.float64"):
        maml(*_replace(batch, 2, batch[2].float()))


def test_non_tensor_input(regression):
    maml, batch = regression
    with pytest.raises(TypeError, match="support_x must be a torch.Tensor, got list"):
        maml(*_replace(batch, 0, [[1.0]]))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("index,name", [(0, "support_x"), (1, "support_y"), (2, "query_x"), (3, "query_y")])
def test_nan_and_inf(regression, index, name, value):
    maml, batch = regression
    poisoned = batch[index].clone()
    poisoned[1, 2, 0] = value
    with pytest.raises(ValueError, match=f"{name} contains NaN or Inf"):
        maml(*_replace(batch, index, poisoned))


@pytest.mark.parametrize("index,name", [(0, "support_x"), (1, "support_y")])
def test_nan_in_adapt(regression, index, name):
    maml, batch = regression
    poisoned = batch[index].clone()
    poisoned[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=f"{name} contains NaN or Inf"):
        maml.adapt(*_replace(batch, index, poisoned)[:2])


def test_empty_support_set_with_inner_steps(regression):
    maml, batch = regression
    empty = _replace(_replace(batch, 0, batch[0][:, :0]), 1, batch[1][:, :0])
    with pytest.raises(ValueError, match="support_x has no points per task"):
        maml(*empty)


@pytest.mark.parametrize("steps", [-1, 1.5, True])
def test_invalid_inner_steps(steps):
    with pytest.raises(ValueError, match="inner_steps must be an integer >= 0"):
        pymaml.MAML(make_mlp((3, 2)), inner_steps=steps)


def test_invalid_adapt_steps(regression):
    maml, batch = regression
    with pytest.raises(ValueError, match="steps must be an integer >= 0"):
        maml.adapt(batch[0], batch[1], steps=-2)


def test_model_without_parameters():
    with pytest.raises(ValueError, match="no parameters that require grad"):
        pymaml.MAML(torch.nn.ReLU())
    frozen = make_mlp((3, 2)).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters that require grad"):
        pymaml.MAML(frozen)


def test_not_a_module():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        pymaml.MAML(lambda x: x)


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"unknown backend 'fastest'; choose 'auto' or one of \["):
        pymaml.MAML(make_mlp((3, 2)), backend="fastest")


def test_unknown_loss():
    with pytest.raises(ValueError, match="unknown loss 'l1'"):
        pymaml.MAML(make_mlp((3, 2)), loss="l1")


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), "0.1", None])
def test_invalid_inner_lr(lr):
    with pytest.raises(ValueError, match="inner_lr must be a finite number"):
        pymaml.MAML(make_mlp((3, 2)), inner_lr=lr)


def test_mixed_dtypes_in_the_model():
    model = make_mlp((3, 4, 2))
    model[2].float()
    with pytest.raises(ValueError, match="one device and one floating dtype"):
        pymaml.MAML(model)


def test_adapted_model_rejects_wrong_task_count(regression):
    maml, batch = regression
    adapted = maml.adapt(batch[0], batch[1])
    with pytest.raises(ValueError, match=r"x must be \[T=3, K, features...\]"):
        adapted(batch[2][:2])


def test_tied_weights_are_refused():
    shared = torch.nn.Linear(3, 3)
    with pytest.raises(ValueError, match=r"tied weights: \['0.weight', '2.weight'\]"):
        pymaml.MAML(torch.nn.Sequential(shared, torch.nn.Tanh(), shared))
