"""MAML++'s per-step BatchNorm (pymaml.nn.PerStepBatchNorm2d) through func and the fused cpp kernel
against the oracle."""

import re

import pytest
import torch
from torch import nn

import pymaml
from helpers import TOLERANCE, backend_meta_gradient, oracle_meta_gradient, relative_error
from pymaml import reference
from pymaml.backends import MetaConfig, get_backend
from pymaml.backends.cpp import mlp_layout
from pymaml.nn import PerStepBatchNorm2d, current_inner_step, inner_step, update_step_statistics
from pymaml.ops import meta_step, meta_step_torch

needs_extension = pytest.mark.skipif(not pymaml.build_info()["extension"], reason="pymaml._C is not built")

STEPS = 2


def make_model(per_step_affine=True, seed=0, dtype=torch.float64, rows=STEPS):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), PerStepBatchNorm2d(3, rows, per_step_affine=per_step_affine), nn.ReLU(),
                          nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).to(dtype)
    with torch.no_grad():  # rows that differ, so a wrong row shows
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model


def make_batch(tasks=3, seed=1, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(tasks, 4, 1, 6, 6, generator=generator, dtype=dtype),
            torch.randint(0, 2, (tasks, 4), generator=generator),
            torch.randn(tasks, 5, 1, 6, 6, generator=generator, dtype=dtype),
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


@pytest.mark.parametrize("backend", ["func", "reference", pytest.param("cpp", marks=needs_extension)])
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


# The fused kernel (cpp): row min(s, steps) of the weight and bias at inner step s, batch statistics.
@needs_extension
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("inner_steps", [0, 1, 2, 3])  # 3 > the layer's 2 steps: the last row again
@pytest.mark.parametrize("per_step_affine", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_cpp_matches_the_oracle(dtype, per_step_affine, inner_steps, first_order):
    model, batch = make_model(per_step_affine, dtype=dtype), make_batch(dtype=dtype)
    options = dict(OPTIONS, inner_steps=inner_steps, first_order=first_order)
    assert pymaml.MAML(model, **options).backend == "cpp"
    expected_loss, expected_grad = oracle_meta_gradient(model, batch, **options)
    actual_loss, actual_grad = backend_meta_gradient(model, batch, "cpp", **options)
    assert relative_error(actual_loss, expected_loss) <= TOLERANCE[dtype]
    assert relative_error(actual_grad, expected_grad) <= TOLERANCE[dtype]


@needs_extension
@pytest.mark.parametrize("options", [
    dict(step_weights=[0.3, 0.7]),
    dict(learn_inner_lr="per_parameter"),
    dict(learn_inner_lr="per_layer_per_step", step_weights=[0.5, 1.0]),
    dict(loss="mse"),
], ids=["step_weights", "per_parameter_lr", "per_layer_per_step_lr", "mse"])
def test_cpp_with_step_weights_learned_step_sizes_and_mse(options):
    model, batch = make_model(), make_batch()
    options = {**OPTIONS, **options}
    if options["loss"] == "mse":
        generator = torch.Generator().manual_seed(3)
        batch = (batch[0], torch.randn(3, 4, 2, generator=generator, dtype=torch.float64), batch[2],
                 torch.randn(3, 5, 2, generator=generator, dtype=torch.float64))
    maml = pymaml.MAML(model, backend="cpp", **options)
    expected = pymaml.MAML(model, backend="reference", **options)
    maml.meta_gradient(*batch, accumulate=False)
    actual = [p.grad.clone() for p in maml.parameters()]
    expected.meta_gradient(*batch, accumulate=False)
    for a, e in zip(actual, [p.grad for p in expected.parameters()]):
        assert a.shape == e.shape
    flat = lambda grads: torch.cat([g.reshape(-1) for g in grads])  # noqa: E731
    assert relative_error(flat(actual), flat([p.grad for p in expected.parameters()])) <= TOLERANCE[torch.float64]


@needs_extension
def test_fused_op_equals_its_torch_twin_on_a_per_step_network():
    """The op's pure-torch twin evaluates θ_s with row min(s, R − 1) too."""
    model, batch = make_model(), make_batch()
    layout, reason = mlp_layout(model)
    assert layout is not None, reason
    layers, constants = layout.network(tuple(batch[0].shape[2:]))
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    generator = torch.Generator().manual_seed(4)
    lrs = 0.1 + 0.2 * torch.rand(3, theta.numel(), generator=generator, dtype=torch.float64)
    step_weights = torch.rand(3, generator=generator, dtype=torch.float64)
    flat = [b.flatten(2) if b.dim() > 2 else b for b in batch]
    arguments = (theta, lrs, step_weights, *flat, layers, constants, "cross_entropy", False, True)
    fused, twin = meta_step(*arguments), meta_step_torch(*arguments)
    for a, b in zip(fused, twin):
        assert a.shape == b.shape and relative_error(a, b) <= TOLERANCE[torch.float64]


def _reason(model):
    return get_backend("cpp").unsupported_reason(model, MetaConfig(STEPS, False, "cross_entropy"), torch.device("cpu"))


@needs_extension
def test_eval_mode_falls_back_and_is_seen_after_a_call():
    """Eval mode normalizes with the running statistics, which the fused kernel does not: auto runs
    func (the oracle's numbers), an explicit cpp raises, and a model put in eval mode after a
    fused call is re-checked on the next."""
    model, batch = make_model(), make_batch()
    explicit, auto = pymaml.MAML(model, backend="cpp", **OPTIONS), pymaml.MAML(model, **OPTIONS)
    assert auto.backend == "cpp"
    explicit.meta_gradient(*batch, accumulate=False)
    auto.meta_gradient(*batch, accumulate=False)
    model.eval()
    reason = r"layer 1 \(PerStepBatchNorm2d\) is in eval mode"
    assert re.search(reason, _reason(model))
    with pytest.raises(RuntimeError, match=reason):
        pymaml.MAML(model, backend="cpp", **OPTIONS)
    with pytest.raises(RuntimeError, match=reason):
        explicit.meta_gradient(*batch, accumulate=False)
    fresh = pymaml.MAML(model, **OPTIONS)
    assert fresh.backend == "func" and re.search(reason, fresh.backend_choice)
    expected = torch.autograd.grad(reference.meta_loss(model, *batch, **OPTIONS), list(model.parameters()))
    flat = lambda grads: torch.cat([g.reshape(-1) for g in grads])  # noqa: E731
    for maml in (auto, fresh):  # auto, chosen before, re-checks the model and falls back too
        maml.meta_gradient(*batch, accumulate=False)
        assert relative_error(flat([p.grad for p in model.parameters()]), flat(expected)) <= TOLERANCE[torch.float64]


class ScaledPerStepBatchNorm2d(PerStepBatchNorm2d):
    def forward(self, x):
        return 2 * super().forward(x)


@needs_extension
def test_refused_variants_name_the_problem():
    subclass = make_model()
    subclass[1] = ScaledPerStepBatchNorm2d(3, STEPS)
    assert "is a subclass of pymaml.nn.PerStepBatchNorm2d" in _reason(subclass)
    extra_buffer = make_model()
    extra_buffer[1].register_buffer("scale", torch.ones(3, dtype=torch.float64))
    assert "holds buffers ['scale']" in _reason(extra_buffer)
    wrong_shape = make_model()
    wrong_shape[1].weight = nn.Parameter(torch.ones(STEPS, 3, dtype=torch.float64))
    assert re.search(r"weight of shape \(2, 3\); its settings make it \(3, 3\)", _reason(wrong_shape))
    hooked = make_model()
    hooked[1].register_forward_hook(lambda module, inputs, output: output * 2)
    assert "forward hook" in _reason(hooked)


@needs_extension
def test_rows_changed_in_place_are_read_on_the_next_call():
    """An in-place edit of one row between calls (the same parameter object) is computed."""
    model, batch = make_model(), make_batch()
    maml = pymaml.MAML(model, backend="cpp", **OPTIONS)
    maml.meta_gradient(*batch, accumulate=False)
    with torch.no_grad():
        model[1].weight[1].mul_(-1.5)
        model[1].bias.data = model[1].bias.data + 0.25
    _, expected_grad = oracle_meta_gradient(model, batch, **OPTIONS)
    _, actual_grad = backend_meta_gradient(model, batch, "cpp", **OPTIONS)
    assert relative_error(actual_grad, expected_grad) <= TOLERANCE[torch.float64]


@needs_extension
@pytest.mark.parametrize("step", [0, 1, STEPS, STEPS + 2])
def test_hvp_at_an_inner_step_uses_its_row(step):
    """pymaml.hvp inside inner_step(s) evaluates row min(s, steps), as torch.func does: the fused
    kernel evaluates step 0, so at another step `fused=None` runs torch.func and `fused=True` raises."""
    model, batch = make_model(), make_batch()
    tasks = batch[0].shape[0]
    generator = torch.Generator().manual_seed(6)
    params = {name: p.detach().expand(tasks, *p.shape).clone() for name, p in model.named_parameters()}
    v = {name: torch.randn(p.shape, generator=generator, dtype=p.dtype) for name, p in params.items()}
    with inner_step(step):
        expected = pymaml.hvp(model, params, batch[0], batch[1], v, loss="cross_entropy", fused=False)
        actual = pymaml.hvp(model, params, batch[0], batch[1], v, loss="cross_entropy")
        if step == 0:
            fused = pymaml.hvp(model, params, batch[0], batch[1], v, loss="cross_entropy", fused=True)
        else:
            with pytest.raises(RuntimeError, match=f"runs at inner step {step}"):
                pymaml.hvp(model, params, batch[0], batch[1], v, loss="cross_entropy", fused=True)
    flat = lambda d: torch.cat([d[n].reshape(tasks, -1) for n in params], dim=1)  # noqa: E731
    assert relative_error(flat(actual), flat(expected)) <= TOLERANCE[torch.float64]
    if step == 0:
        assert relative_error(flat(fused), flat(expected)) <= TOLERANCE[torch.float64]
    else:  # the rows differ, so step 0's HVP is not this one
        with inner_step(0):
            at_zero = pymaml.hvp(model, params, batch[0], batch[1], v, loss="cross_entropy", fused=False)
        assert relative_error(flat(at_zero), flat(expected)) > 1e-3
