"""Random MLP configurations drawn by hypothesis: every backend against the oracle (float64)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pymaml
from helpers import TOLERANCE, flat_grad, make_batch, relative_error
from pymaml import reference

BACKENDS = [s.name for s in pymaml.available_backends() if s.usable and s.name != "reference"]
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
))


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(configurations)
def test_random_configuration_matches_oracle(config):
    widths, steps = config["widths"], config["steps"]
    torch.manual_seed(config["seed"])
    model = pymaml.models.mlp(widths, ACTIVATIONS[config["activation"]], bias=config["bias"]).double()
    batch = make_batch(config["tasks"], config["shots"], widths[0], widths[-1], config["loss"], seed=config["seed"])
    step_weights = torch.linspace(0.5, 1.5, steps).tolist() if config["multi_step"] and steps else None
    for backend in BACKENDS:
        torch.manual_seed(config["seed"])
        maml = pymaml.MAML(model, inner_lr=0.05, inner_steps=steps, first_order=config["first_order"],
                           loss=config["loss"], backend=backend, learn_inner_lr=config["learn_inner_lr"],
                           step_weights=step_weights)
        parameters = list(maml.parameters())
        out = maml(*batch)
        expected = reference.meta_loss(model, *batch, inner_lr=maml.inner_lr, inner_steps=steps,
                                       first_order=config["first_order"], loss=config["loss"],
                                       step_weights=maml.step_weights)
        assert relative_error(out.loss.detach(), expected.detach()) <= TOLERANCE[torch.float64], backend
        actual_grad, expected_grad = flat_grad(out.loss, parameters), flat_grad(expected, parameters)
        assert relative_error(actual_grad, expected_grad) <= TOLERANCE[torch.float64], backend


@pytest.mark.skipif("cpp" not in BACKENDS, reason="pymaml._C is not built")
def test_hypothesis_covers_the_fused_backend():
    assert pymaml.MAML(pymaml.models.mlp((3, 4, 2)).double(), backend="auto").backend == "cpp"
