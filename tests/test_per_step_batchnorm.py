"""MAML++'s per-step BatchNorm (pymaml.nn.PerStepBatchNorm2d) through func against the oracle."""

import pytest
import torch
from torch import nn

import pymaml
from helpers import TOLERANCE, relative_error
from pymaml import reference
from pymaml.nn import PerStepBatchNorm2d, current_inner_step, inner_step, update_step_statistics

STEPS = 2


def make_model(per_step_affine=True, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), PerStepBatchNorm2d(3, STEPS, per_step_affine=per_step_affine), nn.ReLU(),
                          nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).double()
    with torch.no_grad():  # rows that differ, so a wrong row shows
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model


def make_batch(tasks=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(tasks, 4, 1, 6, 6, generator=generator, dtype=torch.float64),
            torch.randint(0, 2, (tasks, 4), generator=generator),
            torch.randn(tasks, 5, 1, 6, 6, generator=generator, dtype=torch.float64),
            torch.randint(0, 2, (tasks, 5), generator=generator))


OPTIONS = dict(inner_lr=0.3, inner_steps=STEPS, loss="cross_entropy")


@pytest.mark.parametrize("step_weights", [None, [0.3, 0.7]])
@pytest.mark.parametrize("second_order", ["memory_efficient", "graph"])
@pytest.mark.parametrize("per_step_affine", [True, False])
def test_func_matches_the_oracle(per_step_affine, second_order, step_weights):
    model, batch = make_model(per_step_affine), make_batch()
    weights = None if step_weights is None else torch.tensor(step_weights, dtype=torch.float64)
    expected = torch.autograd.grad(reference.meta_loss(model, *batch, step_weights=weights, **OPTIONS),
                                   list(model.parameters()))
    maml = pymaml.MAML(model, backend="func", second_order=second_order, step_weights=step_weights, **OPTIONS)
    before = [b.clone() for b in model.buffers()]
    maml.meta_gradient(*batch, accumulate=False)
    actual = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert relative_error(actual, torch.cat([g.reshape(-1) for g in expected])) <= TOLERANCE[torch.float64]
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), before))  # a meta-step leaves the statistics


@pytest.mark.parametrize("backend", ["func", "reference"])
def test_each_step_uses_its_own_row(backend):
    """Without step weights the loss is L_query(θ_S): row S gets its gradient from the query loss,
    rows 0..S-1 only through the inner loop, so first order leaves them at exactly zero."""
    batch = make_batch()
    first = make_model()
    pymaml.MAML(first, backend=backend, first_order=True, **OPTIONS).meta_gradient(*batch)
    assert torch.all(first[1].weight.grad[:STEPS] == 0) and first[1].weight.grad[STEPS].abs().sum() > 0
    second = make_model()
    pymaml.MAML(second, backend=backend, **OPTIONS).meta_gradient(*batch)
    assert torch.all(second[1].weight.grad.abs().sum(dim=1) > 0)


def test_statistics_per_step_and_evaluation():
    model, batch = make_model(), make_batch()
    maml = pymaml.MAML(model, backend="func", **OPTIONS)
    update_step_statistics(maml, batch[0], batch[1])
    layer = model[1]
    # Step 0 sees the raw convolution of each task's support set: blended in task order.
    expected_mean, expected_var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for task in range(3):
        out = model[0](batch[0][task])
        expected_mean = expected_mean.lerp(out.mean(dim=(0, 2, 3)), 0.1)
        expected_var = expected_var.lerp(out.var(dim=(0, 2, 3)), 0.1)
    assert relative_error(layer.running_mean[0], expected_mean) <= 1e-12
    assert relative_error(layer.running_var[0], expected_var) <= 1e-12
    assert not torch.equal(layer.running_mean[1], layer.running_mean[0])
    model.eval()
    adapted = maml.adapt(batch[0], batch[1])
    assert adapted.steps == STEPS and current_inner_step() == 0
    first_task = {name: p[0] for name, p in adapted.params.items()}
    with torch.no_grad():
        reached = adapted(batch[2])[0]
        with inner_step(STEPS):  # the adapted model runs at step S: row S's statistics and weights
            expected = torch.func.functional_call(model, first_task, (batch[2][0],))
            hidden = torch.func.functional_call(model[0], {"weight": first_task["0.weight"],
                                                           "bias": first_task["0.bias"]}, (batch[2][0],))
        at_zero = torch.func.functional_call(model, first_task, (batch[2][0],))
    assert torch.allclose(reached, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(reached, at_zero)
    scale = first_task["1.weight"][STEPS] / torch.sqrt(layer.running_var[STEPS] + layer.eps)
    normalized = (hidden - layer.running_mean[STEPS].view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) \
        + first_task["1.bias"][STEPS].view(1, -1, 1, 1)
    manual = torch.func.functional_call(model[4], {"weight": first_task["4.weight"], "bias": first_task["4.bias"]},
                                        (model[3](model[2](normalized)),))
    assert torch.allclose(reached, manual, rtol=1e-12, atol=1e-12)


def test_errors():
    with pytest.raises(ValueError, match="num_features >= 1"):
        PerStepBatchNorm2d(0, 1)
    with pytest.raises(ValueError, match=r"takes \[N, 3, H, W\]"):
        PerStepBatchNorm2d(3, 1)(torch.zeros(2, 4, 5, 5))
    with pytest.raises(ValueError, match="no PerStepBatchNorm2d"):
        update_step_statistics(pymaml.MAML(nn.Linear(2, 2)), torch.zeros(1, 2, 2), torch.zeros(1, 2, 2))
