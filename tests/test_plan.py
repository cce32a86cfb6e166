"""The cpp backend's held native plan (pymaml._C.MetaStepPlan): the parameter, gradient and Adam
buffers are checked once, so every call must notice when any of them changed and stay exact."""

import copy
import warnings

import pytest
import torch

import pymaml
from helpers import TOLERANCE, make_batch, make_mlp, relative_error
from pymaml._extension import extension
from pymaml.backends.cpp import BACKEND as CPP
from pymaml.ops import encode_mlp

pytestmark = pytest.mark.skipif(extension() is None, reason="the compiled extension is not built")

BATCHES = [make_batch(4, 5, 3, 2, "mse", seed=seed) for seed in range(4)]


def _network(widths, activation="tanh", bias=True) -> dict:
    layers, constants = encode_mlp(widths, activation, bias)
    return dict(layers=layers, layer_constants=constants)


def twins(dtype=torch.float64, **adam):
    """Two identical MAMLs with Adam: the first steps through the plan, the second through
    meta_gradient on a fresh batch copy and torch's own Adam (the general path)."""
    out = []
    for backend in ("cpp", "func"):
        model = make_mlp((3, 9, 2), "tanh").to(dtype)
        maml = pymaml.MAML(model, inner_lr=0.2, inner_steps=2, backend=backend)
        out.append((maml, torch.optim.Adam(maml.parameters(), **adam)))
    out[1][0].module.load_state_dict(out[0][0].module.state_dict())
    return out


def train(pair, batch, dtype=torch.float64):
    maml, optimizer = pair
    batch = [t.to(dtype) if t.is_floating_point() else t for t in batch]
    if maml.backend == "cpp":
        return maml.meta_train_step(*batch, optimizer)
    out = maml.meta_gradient(*batch, accumulate=False)
    optimizer.step()
    return out


def assert_same(planned, general, tolerance=TOLERANCE[torch.float64]):
    for (name, expected), actual in zip(general[0].module.named_parameters(), planned[0].module.parameters()):
        assert relative_error(actual, expected) <= tolerance, name
        assert relative_error(actual.grad, expected.grad) <= tolerance, name
    for expected, actual in zip(general[1].state.values(), planned[1].state.values()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert relative_error(torch.as_tensor(actual[key]).double(), torch.as_tensor(expected[key]).double()) \
                <= tolerance, key


def test_plan_is_reused_and_matches_torch_adam():
    planned, general = twins(lr=1e-2)
    for batch in BATCHES:
        out = train(planned, batch)
        expected = train(general, batch)
        assert relative_error(out.loss, expected.loss) <= TOLERANCE[torch.float64]
        assert relative_error(out.task_losses, expected.task_losses) <= TOLERANCE[torch.float64]
        assert relative_error(out.pre_adaptation_loss, expected.pre_adaptation_loss) <= TOLERANCE[torch.float64]
    assert_same(planned, general)
    assert len([plan for plan in CPP._plans.values() if plan.params[0] is planned[0].module[0].weight]) == 1


@pytest.mark.parametrize("change", [
    "zero_grad_to_none", "replace_parameter_data", "load_optimizer_state", "learning_rate", "torch_step_between",
    "replace_layer", "replace_grad",
])
def test_plan_follows_changes(change):
    planned, general = twins(lr=1e-2, weight_decay=0.01)
    for index, batch in enumerate(BATCHES):
        if index == 2:
            for maml, optimizer in (planned, general):
                model = maml.module
                if change == "zero_grad_to_none":
                    optimizer.zero_grad(set_to_none=True)
                elif change == "replace_parameter_data":
                    with torch.no_grad():
                        model[0].weight.data = model[0].weight.data.clone() * 0.5
                elif change == "load_optimizer_state":
                    optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
                elif change == "learning_rate":
                    optimizer.param_groups[0]["lr"] = 3e-2
                elif change == "torch_step_between":
                    maml.meta_gradient(*batch, accumulate=False)
                    torch.optim.Adam.step(optimizer)
                elif change == "replace_layer":
                    torch.manual_seed(5)
                    model[2] = torch.nn.Linear(9, 2).double()
                    optimizer.param_groups[0]["params"] = list(model.parameters())
                elif change == "replace_grad":
                    for p in model.parameters():
                        p.grad = torch.full_like(p, 7.0)
        train(planned, batch)
        train(general, batch)
    assert_same(planned, general)


def test_plan_in_float32_and_meta_gradient_without_optimizer():
    """float32 through the plan: each step's meta-gradient against the float64 oracle's at the
    same parameters, within 4× the error of float32 on the general path there."""
    planned, general = twins(torch.float32, lr=1e-2, fused=True)
    for batch in BATCHES:
        before = [p.detach().clone() for p in planned[0].module.parameters()]
        with torch.no_grad():
            for q, p in zip(general[0].module.parameters(), before):
                q.copy_(p)
        train(planned, batch, torch.float32)
        train(general, batch, torch.float32)
        exact = make_mlp((3, 9, 2), "tanh")
        with torch.no_grad():
            for q, p in zip(exact.parameters(), before):
                q.copy_(p.double())
        expected = torch.autograd.grad(pymaml.reference.meta_loss(exact, *batch, inner_lr=0.2, inner_steps=2),
                                       list(exact.parameters()))
        for p32, q32, g64 in zip(planned[0].module.parameters(), general[0].module.parameters(), expected):
            assert relative_error(p32.grad, g64) <= 4 * relative_error(q32.grad, g64) + 1e-7
    assert planned[1].state[planned[0].module[0].weight]["step"].dtype == torch.float32
    assert int(planned[1].state[planned[0].module[0].weight]["step"]) == len(BATCHES)
    model = make_mlp((3, 9, 2), "tanh")
    maml = pymaml.MAML(model, inner_lr=0.2, inner_steps=2, backend="cpp")
    for batch in BATCHES[:2]:  # the second call runs the plan built by the first
        maml.meta_gradient(*batch, accumulate=False)
        expected = torch.autograd.grad(pymaml.reference.meta_loss(model, *batch, inner_lr=0.2, inner_steps=2),
                                       list(model.parameters()))
        for p, g in zip(model.parameters(), expected):
            assert relative_error(p.grad, g) <= TOLERANCE[torch.float64]


def test_plan_rejects_bad_batches_and_counters():
    planned, _ = twins(lr=1e-2)
    train(planned, BATCHES[0])
    maml, optimizer = planned
    bad = list(BATCHES[1])
    bad[2] = bad[2].clone()
    bad[2][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="query_x contains NaN"):
        maml.meta_train_step(*bad, optimizer)
    with pytest.raises(ValueError, match="support_x must have shape"):
        maml.meta_train_step(BATCHES[1][0][..., :2].contiguous(), *BATCHES[1][1:], optimizer)
    optimizer.state[maml.module[0].weight]["step"] += 1
    with pytest.raises(ValueError, match="step counters differ"):
        maml.meta_train_step(*BATCHES[1], optimizer)


def test_native_plan_argument_errors():
    model = make_mlp((3, 9, 2), "tanh")
    params = [p.detach() for p in model.parameters()]
    grads = [torch.zeros_like(p) for p in params]
    common = dict(**_network((3, 9, 2)), loss="mse", first_order=False, steps=1,
                  inner_lr=0.1)
    with pytest.raises(ValueError, match="the params hold 36 values; the network has 56"):
        extension().MetaStepPlan(**common, params=params[:2], grads=grads[:2])
    with pytest.raises(ValueError, match="grads\\[1\\] holds 3 values"):
        extension().MetaStepPlan(**common, params=params, grads=[grads[0], grads[0][0], *grads[2:]])
    with pytest.raises(TypeError, match="grads\\[0\\] has dtype float32"):
        extension().MetaStepPlan(**common, params=params, grads=[grads[0].float(), *grads[1:]])
    plan = extension().MetaStepPlan(**common, params=params, grads=grads)
    batch = make_batch(2, 3, 3, 2, "mse")
    with pytest.raises(ValueError, match="losses must have shape \\(4,\\)"):
        plan.run(*batch, torch.empty(3, dtype=torch.float64))


def test_held_gradients_and_hooks_are_respected():
    """A .grad set to None gets a new buffer (a tensor the caller kept is not overwritten); step
    hooks and a step patched by an LR scheduler make meta_train_step call optimizer.step()."""
    maml, optimizer = twins(lr=1e-2)[0]
    train((maml, optimizer), BATCHES[0])
    kept = [p.grad for p in maml.module.parameters()]
    snapshot = [g.clone() for g in kept]
    optimizer.zero_grad(set_to_none=True)
    train((maml, optimizer), BATCHES[1])
    assert all(torch.equal(g, s) for g, s in zip(kept, snapshot))
    assert all(p.grad is not g for p, g in zip(maml.module.parameters(), kept))
    calls = []
    handle = optimizer.register_step_post_hook(lambda *args: calls.append(1))
    train((maml, optimizer), BATCHES[2])
    handle.remove()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    train((maml, optimizer), BATCHES[3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the scheduler warns when it sees no optimizer.step() first
        scheduler.step()
    assert calls == [1] and optimizer.param_groups[0]["lr"] == pytest.approx(5e-3)


def test_repeated_and_swapped_layers():
    torch.manual_seed(0)
    shared = torch.nn.Linear(3, 3).double()
    tied = torch.nn.Sequential(shared, torch.nn.Tanh(), shared)
    assert "repeats one (tied weights)" in pymaml.backends.cpp.mlp_layout(tied)[1]
    model = make_mlp((3, 9, 2), "tanh")
    maml = pymaml.MAML(model, inner_lr=0.2, inner_steps=2, backend="cpp")
    batch = BATCHES[0]
    maml.meta_gradient(*batch, accumulate=False)
    model[1] = torch.nn.ReLU()  # same Linear parameters, another activation: the plan must not be reused
    out = maml.meta_gradient(*batch, accumulate=False)
    expected = pymaml.reference.meta_loss(model, *batch, inner_lr=0.2, inner_steps=2)
    assert relative_error(out.loss, expected.detach()) <= TOLERANCE[torch.float64]


@pytest.mark.parametrize("beta2", [0.999, 0.9999, 0.99999])
def test_fused_adam_matches_torch_adam_in_float32(beta2):
    """1,000 float32 steps of the plan's fused Adam against torch.optim.Adam (default CPU
    implementation) on a twin whose parameters are reset to the plan's before every step, so both
    see the same gradients: the moments, kept apart throughout, and the parameters after every step
    agree to 1e-6 (torch computes 1 − β₂ and the bias corrections in float64; float32 1 − β₂ is off
    by up to 1.4e-3 at β₂ = 0.99999)."""
    models = [make_mlp((3, 9, 2), "tanh", dtype=torch.float32) for _ in range(2)]
    mamls = [pymaml.MAML(model, inner_lr=0.2, inner_steps=1, backend="cpp") for model in models]
    optimizers = [torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, beta2)) for model in models]
    batches = [[t.float() if t.is_floating_point() else t for t in batch] for batch in BATCHES]
    worst_parameter = 0.0
    for index in range(1000):
        batch = batches[index % len(batches)]
        before = [p.detach().clone() for p in models[0].parameters()]
        with torch.no_grad():
            for q, p in zip(models[1].parameters(), before):
                q.copy_(p)
        mamls[0].meta_train_step(*batch, optimizers[0])
        mamls[1].meta_gradient(*batch, accumulate=False)
        optimizers[1].step()
        for p, q in zip(models[0].parameters(), models[1].parameters()):
            assert torch.equal(p.grad, q.grad)  # the comparison's premise: the same gradients
            worst_parameter = max(worst_parameter, relative_error(p.detach(), q.detach()))
    assert worst_parameter <= 1e-6
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        planned, general = optimizers[0].state[p], optimizers[1].state[q]
        assert relative_error(planned["exp_avg_sq"], general["exp_avg_sq"]) <= 1e-6
        assert relative_error(planned["exp_avg"], general["exp_avg"]) <= 1e-6
        assert float(planned["step"]) == float(general["step"]) == 1000


def test_zero_size_batches():
    """A batch dimension of size zero is named as such, not reported as a layout problem; with no
    inner steps an empty support set is valid and the loss is the query loss at θ."""
    model = make_mlp((3, 9, 2), "tanh")
    params = [p.detach() for p in model.parameters()]
    common = dict(**_network((3, 9, 2)), loss="mse", first_order=False, inner_lr=0.1)
    support_x, support_y, query_x, query_y = make_batch(2, 3, 3, 2, "mse")
    empty_x, empty_y = torch.empty(2, 0, 3, dtype=torch.float64), torch.empty(2, 0, 2, dtype=torch.float64)
    plan = extension().MetaStepPlan(**common, steps=1, params=params, grads=[torch.zeros_like(p) for p in params])
    losses = torch.empty(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="support_x has no points per task; the inner loop needs at least one"):
        plan.run(empty_x, empty_y, query_x, query_y, losses)
    with pytest.raises(ValueError, match="query_x has no points per task"):
        plan.run(support_x, support_y, empty_x, empty_y, losses)
    with pytest.raises(ValueError, match="support_x has no tasks"):
        plan.run(torch.empty(0, 3, 3, dtype=torch.float64), *[t[:0] for t in (support_y, query_x, query_y)],
                 torch.empty(2, dtype=torch.float64))
    grads = [torch.zeros_like(p) for p in params]
    plan = extension().MetaStepPlan(**common, steps=0, params=params, grads=grads)
    plan.run(empty_x, empty_y, query_x, query_y, losses)
    expected = pymaml.reference.meta_loss(model, empty_x, empty_y, query_x, query_y, inner_lr=0.1, inner_steps=0)
    assert relative_error(losses[0], expected.detach()) <= TOLERANCE[torch.float64]
    for grad, want in zip(grads, torch.autograd.grad(expected, list(model.parameters()))):
        assert relative_error(grad, want) <= TOLERANCE[torch.float64]
