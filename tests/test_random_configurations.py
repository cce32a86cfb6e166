"""Random MLP configurations drawn by hypothesis: every backend against the oracle."""

import copy

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import pymaml
from helpers import TOLERANCE, backends_on, flat_grad, make_batch, relative_error
from pymaml import reference

BACKENDS = [name for name in backends_on("cpu") if name != "reference"]
ACTIVATIONS = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid, "none": torch.nn.Identity}

configurations = st.fixed_dictionaries(dict(
    widths=st.integers(1, 4).flatmap(lambda depth: st.lists(st.sampled_from([1, 3, 40, 64, 129]),
                                                            min_size=depth + 1, max_size=depth + 1)),
    activation=st.sampled_from(sorted(ACTIVATIONS)),
    loss=st.sampled_from(["mse", "cross_entropy"]),
    steps=st.sampled_from([0, 1, 2, 5, 10]),
    tasks=st.sampled_from([1, 3, 25]),
    shots=st.sampled_from([1, 10]),
    first_order=st.booleans(),
    learn_inner_lr=st.sampled_from([None, "scalar", "per_layer_per_step", "per_parameter"]),
    multi_step=st.booleans(),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float64, torch.float32]),
))


def _oracle(model, batch, maml, steps, config):
    loss = reference.meta_loss(model, *batch, inner_lr=maml.inner_lr, inner_steps=steps,
                               first_order=config["first_order"], loss=config["loss"], step_weights=maml.step_weights)
    return loss, flat_grad(loss, list(maml.parameters()))


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(configurations)
def test_random_configuration_matches_oracle(config):
    """float64: within 1e-10 of the oracle. float32: within 1e-5 of the float64 oracle, or, where the
    problem is so ill-conditioned that the float32 oracle itself is further off, within 4x its error."""
    widths, steps, dtype = config["widths"], config["steps"], config["dtype"]
    torch.manual_seed(config["seed"])
    model = pymaml.models.mlp(widths, ACTIVATIONS[config["activation"]], bias=config["bias"]).to(dtype)
    batch = make_batch(config["tasks"], config["shots"], widths[0], widths[-1], config["loss"], dtype,
                       seed=config["seed"])
    step_weights = torch.linspace(0.5, 1.5, steps).tolist() if config["multi_step"] and steps else None
    options = dict(inner_lr=0.05, inner_steps=steps, first_order=config["first_order"], loss=config["loss"],
                   learn_inner_lr=config["learn_inner_lr"], step_weights=step_weights)
    exact = pymaml.MAML(copy.deepcopy(model).double(), backend="reference", **options)
    exact_batch = tuple(t.double() if t.is_floating_point() else t for t in batch)
    exact_loss, exact_grad = _oracle(exact.module, exact_batch, exact, steps, config)
    assume(bool(torch.isfinite(exact_loss)) and bool(torch.isfinite(exact_grad).all()))  # the inner loop diverged
    if dtype == torch.float32:
        oracle_maml = pymaml.MAML(model, backend="reference", **options)
        oracle_loss, oracle_grad = _oracle(model, batch, oracle_maml, steps, config)
        bound = max(TOLERANCE[dtype], 4 * relative_error(oracle_grad, exact_grad))
    else:
        bound = TOLERANCE[dtype]
    for backend in BACKENDS:
        maml = pymaml.MAML(model, backend=backend, **options)
        out = maml(*batch)
        assert relative_error(out.loss.detach(), exact_loss.detach()) <= max(bound, TOLERANCE[dtype]), backend
        assert relative_error(flat_grad(out.loss, list(maml.parameters())), exact_grad) <= bound, backend


@pytest.mark.skipif("cpp" not in BACKENDS, reason="pymaml._C is not built")
def test_hypothesis_covers_the_fused_backend():
    assert pymaml.MAML(pymaml.models.mlp((3, 4, 2)).double(), backend="auto").backend == "cpp"
