"""pymaml.IMAML against the closed form (linear regression) and a dense per-task solve with autograd Hessians."""

import pytest
import torch
from torch import nn

import pymaml
from helpers import TOLERANCE, make_batch, make_mlp, relative_error

HAS_EXTENSION = pymaml.build_info()["extension"]
F64 = TOLERANCE[torch.float64]


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def flat_grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def dense_imaml(model, batch, inner_lr, inner_steps, reg_lambda, loss_fn):
    """Per task, in a Python loop with plain autograd: φ_t by the proximal gradient steps, then
    (I + H_t/λ)⁻¹ ∇L_query(φ_t) by a dense solve, H_t from torch.autograd.functional.hessian.
    Returns the per-task φ_t [T, P], per-task solutions [T, P] and the matrices A_t [T, P, P]."""
    support_x, support_y, query_x, query_y = batch
    fixed = pymaml.numerics.state.fixed_state(model)  # batch statistics for normalization layers
    shapes = {name: p.shape for name, p in model.named_parameters()}

    def loss_of(flat, x, y):
        params, offset = {}, 0
        for name, shape in shapes.items():
            params[name] = flat[offset : offset + shape.numel()].reshape(shape)
            offset += shape.numel()
        return loss_fn(torch.func.functional_call(model, (params, fixed), (x,)), y)

    theta = flat_params(model)
    phis, solutions, matrices = [], [], []
    for t in range(support_x.shape[0]):
        phi = theta.clone()
        for _ in range(inner_steps):
            phi.requires_grad_(True)
            (g,) = torch.autograd.grad(loss_of(phi, support_x[t], support_y[t]), phi)
            phi = (phi - inner_lr * (g + reg_lambda * (phi - theta))).detach()
        hessian = torch.autograd.functional.hessian(lambda f: loss_of(f, support_x[t], support_y[t]), phi)
        matrix = torch.eye(phi.numel(), dtype=phi.dtype) + hessian / reg_lambda
        query_phi = phi.clone().requires_grad_(True)
        (b,) = torch.autograd.grad(loss_of(query_phi, query_x[t], query_y[t]), query_phi)
        phis.append(phi)
        solutions.append(torch.linalg.solve(matrix, b))
        matrices.append(matrix)
    return torch.stack(phis), torch.stack(solutions), torch.stack(matrices)


def test_matches_the_closed_form_of_linear_regression():
    # L(φ) = mean over K points and o outputs of (φx − y)², H = 2/(K·o) XᵀX acting on rows of φ,
    # so φ* = (λθ + 2/(K·o) YᵀX)(M + λI)⁻¹ with M = 2/(K·o) XᵀX, and the meta-gradient is
    # ∇L_q(φ*)(I + M/λ)⁻¹ (M symmetric). 4 CG steps ≥ the 3 distinct eigenvalues of I + H/λ.
    tasks, shots, inputs, outputs, reg_lambda = 3, 8, 3, 2, 1.0
    torch.manual_seed(0)
    model = nn.Linear(inputs, outputs, bias=False).double()
    batch = make_batch(tasks, shots, inputs, outputs, "mse", seed=3)
    support_x, support_y, query_x, query_y = batch
    # Step size 1/(largest eigenvalue of M + λ): the contraction factor is below 0.7 here, so
    # 120 steps bring φ to φ* within rounding.
    moments = 2 / (shots * outputs) * support_x.transpose(1, 2) @ support_x
    inner_lr = 1 / float(torch.linalg.eigvalsh(moments).max() + reg_lambda)
    imaml = pymaml.IMAML(model, inner_lr, 120, reg_lambda, cg_steps=6)
    out = imaml.meta_gradient(*batch)

    theta = model.weight.detach()
    eye = torch.eye(inputs, dtype=torch.float64)
    phi_star = torch.linalg.solve(
        (moments + reg_lambda * eye).transpose(1, 2),
        (reg_lambda * theta + 2 / (shots * outputs) * support_y.transpose(1, 2) @ support_x).transpose(1, 2),
    ).transpose(1, 2)
    query_grad = 2 / (shots * outputs) * (phi_star @ query_x.transpose(1, 2) - query_y.transpose(1, 2)) @ query_x
    expected = torch.linalg.solve(eye + moments / reg_lambda, query_grad.transpose(1, 2)).transpose(1, 2).mean(0)
    expected_losses = (query_x @ phi_star.transpose(1, 2) - query_y).square().mean(dim=(1, 2))

    assert relative_error(model.weight.grad, expected) <= F64
    assert relative_error(out.task_losses, expected_losses) <= F64
    assert float(out.cg_residuals.max()) <= 1e-12
    adapted = imaml.adapt(support_x, support_y)
    assert relative_error(adapted.params["weight"], phi_star) <= F64
    assert relative_error(adapted(query_x), query_x @ phi_star.transpose(1, 2)) <= F64


@pytest.mark.parametrize("fused", [
    pytest.param(True, marks=pytest.mark.skipif(not HAS_EXTENSION, reason="pymaml._C is not built")),
    False,
])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_mlp_matches_a_dense_solve(fused, loss):
    model = make_mlp((3, 5, 2), "tanh")
    batch = make_batch(3, 6, 3, 2, loss)
    imaml = pymaml.IMAML(model, 0.1, 10, reg_lambda=2.0, cg_steps=32, loss=loss, fused_hvp=fused)
    out = imaml.meta_gradient(*batch)
    phis, solutions, _ = dense_imaml(model, batch, 0.1, 10, 2.0, pymaml.numerics.losses.resolve_loss(loss))
    assert relative_error(flat_grads(model), solutions.mean(0)) <= F64
    adapted = imaml.adapt(batch[0], batch[1])
    assert relative_error(torch.cat([p.reshape(3, -1) for p in adapted.params.values()], 1), phis) <= F64
    assert float(out.cg_residuals.max()) <= 1e-12


@pytest.mark.skipif(not HAS_EXTENSION, reason="pymaml._C is not built")
def test_fused_and_torch_func_hvps_agree():
    model = make_mlp((2, 8, 8, 1), "relu")
    batch = make_batch(4, 5, 2, 1, "mse")
    results = []
    for fused in (True, False):
        model.zero_grad()
        out = pymaml.IMAML(model, 0.05, 5, reg_lambda=5.0, cg_steps=3, fused_hvp=fused).meta_gradient(*batch)
        results.append((flat_grads(model), out.cg_residuals))
    # After 3 CG steps the solve is far from converged, so both paths run the same iterates.
    assert float(results[0][1].min()) > 1e-4
    assert relative_error(results[0][0], results[1][0]) <= F64
    assert relative_error(results[0][1], results[1][1]) <= F64


def test_cg_residual_falls_as_cg_steps_grow():
    model = make_mlp((2, 16, 1), "tanh")
    batch = make_batch(3, 8, 2, 1, "mse")
    residuals = torch.stack([
        pymaml.IMAML(model, 0.1, 10, reg_lambda=1.0, cg_steps=steps).meta_gradient(*batch).cg_residuals
        for steps in (1, 3, 10)
    ])
    assert bool((residuals[1:] < residuals[:-1]).all())
    assert float(residuals[-1].max()) <= 1e-4


def test_reported_residual_is_that_of_the_returned_solution():
    # One task, so .grad holds that task's CG solution x; ‖b − A x‖/‖b‖ from the dense A.
    model = make_mlp((2, 6, 1), "tanh")
    batch = make_batch(1, 8, 2, 1, "mse")
    _, solutions, matrices = dense_imaml(model, batch, 0.1, 4, 1.0, pymaml.numerics.losses.mse)
    b = matrices[0] @ solutions[0]
    for steps in (1, 3):
        model.zero_grad()
        out = pymaml.IMAML(model, 0.1, 4, reg_lambda=1.0, cg_steps=steps).meta_gradient(*batch)
        expected = (b - matrices[0] @ flat_grads(model)).norm() / b.norm()
        assert float(expected) > 1e-3
        assert relative_error(out.cg_residuals[0], expected) <= 1e-8


def test_conv_and_batchnorm_model_through_torch_func():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3)).double()
    running_mean = model[1].running_mean.clone()
    generator = torch.Generator().manual_seed(1)
    support_x, query_x = (torch.randn(2, 4, 1, 5, 5, generator=generator, dtype=torch.float64) for _ in range(2))
    support_y, query_y = (torch.randint(0, 3, (2, 4), generator=generator) for _ in range(2))
    batch = (support_x, support_y, query_x, query_y)
    imaml = pymaml.IMAML(model, 0.1, 3, reg_lambda=4.0, cg_steps=40, loss="cross_entropy")
    out = imaml.meta_gradient(*batch)
    _, solutions, _ = dense_imaml(model, batch, 0.1, 3, 4.0, pymaml.numerics.losses.cross_entropy)
    assert relative_error(flat_grads(model), solutions.mean(0)) <= F64
    assert float(out.cg_residuals.max()) <= 1e-10
    assert torch.equal(model[1].running_mean, running_mean)
    with pytest.raises(RuntimeError, match="layer 1 \\(BatchNorm2d\\) tracks running statistics"):
        pymaml.IMAML(model, 0.1, 3, 4.0, 5, loss="cross_entropy", fused_hvp=True).meta_gradient(*batch)
    # Without running statistics the fused HVP computes this network and gives the same solutions.
    model[1].track_running_stats = False
    model[1].running_mean = model[1].running_var = model[1].num_batches_tracked = None
    model.zero_grad(set_to_none=True)
    out = pymaml.IMAML(model, 0.1, 3, 4.0, 40, loss="cross_entropy", fused_hvp=True).meta_gradient(*batch)
    assert relative_error(flat_grads(model), solutions.mean(0)) <= F64
    assert float(out.cg_residuals.max()) <= 1e-10


def test_gradient_accumulates_and_trains_with_any_optimizer():
    model = make_mlp((2, 4, 1), "tanh")
    batch = make_batch(2, 5, 2, 1, "mse")
    imaml = pymaml.IMAML(model, 0.1, 3, reg_lambda=1.0, cg_steps=4)
    out = imaml.meta_gradient(*batch)
    once = flat_grads(model).clone()
    assert out.loss.requires_grad is False and model[0].weight.grad.requires_grad is False
    imaml.meta_gradient(*batch)
    assert relative_error(flat_grads(model), 2 * once) <= F64
    with torch.no_grad():
        pre_adaptation = torch.stack([pymaml.numerics.losses.mse(model(x), y) for x, y in zip(batch[2], batch[3])]).mean()
    assert relative_error(out.pre_adaptation_loss, pre_adaptation) <= F64
    before = flat_params(model)
    imaml.meta_train_step(*batch, torch.optim.SGD(model.parameters(), lr=0.5))
    assert relative_error(flat_params(model), before - 0.5 * once) <= F64


def test_indefinite_system_stops_with_a_warning():
    # A concave loss makes I + H/λ negative definite at small λ: CG cannot start.
    model = nn.Linear(2, 1, bias=False).double()
    batch = make_batch(2, 6, 2, 1, "mse")
    concave = lambda prediction, target: -(prediction - target).square().mean()  # noqa: E731
    imaml = pymaml.IMAML(model, 0.1, 0, reg_lambda=1e-3, cg_steps=3, loss=concave)
    with pytest.warns(RuntimeWarning, match=r"tasks \[0, 1\].*not positive definite"):
        out = imaml.meta_gradient(*batch)
    assert torch.equal(out.cg_residuals, torch.ones(2, dtype=torch.float64))


def test_rejects_bad_arguments_and_inputs():
    model = make_mlp((2, 4, 1), "tanh")
    for kwargs, message in [
        (dict(reg_lambda=0.0), "reg_lambda must be a finite number > 0"),
        (dict(reg_lambda=-1.0), "reg_lambda must be a finite number > 0"),
        (dict(reg_lambda=float("nan")), "reg_lambda must be a finite number > 0"),
        (dict(cg_steps=0), "cg_steps must be an integer >= 1"),
        (dict(cg_steps=2.0), "cg_steps must be an integer >= 1"),
        (dict(inner_lr=0.0), "inner_lr must be a finite number > 0"),
        (dict(inner_steps=-1), "inner_steps must be an integer >= 0"),
        (dict(loss="hinge"), "unknown loss"),
        (dict(fused_hvp="yes"), "fused_hvp must be None, True or False"),
    ]:
        arguments = dict(inner_lr=0.1, inner_steps=2, reg_lambda=1.0, cg_steps=2) | kwargs
        with pytest.raises(ValueError, match=message):
            pymaml.IMAML(model, **arguments)
    with pytest.raises(TypeError, match="nn.Module"):
        pymaml.IMAML(lambda x: x, 0.1, 2, 1.0, 2)
    with pytest.raises(ValueError, match="no parameters that require grad"):
        pymaml.IMAML(nn.ReLU(), 0.1, 2, 1.0, 2)

    imaml = pymaml.IMAML(model, 0.1, 2, 1.0, 2)
    support_x, support_y, query_x, query_y = make_batch(2, 5, 2, 1, "mse")
    with pytest.raises(ValueError, match="task dimension"):
        imaml.meta_gradient(support_x, support_y, query_x[:1], query_y[:1])
    with pytest.raises(ValueError, match="support_x has 5 points per task but support_y has 4"):
        imaml.meta_gradient(support_x, support_y[:, :4], query_x, query_y)
    with pytest.raises(TypeError, match="query_x has dtype torch.float32"):
        imaml.meta_gradient(support_x, support_y, query_x.float(), query_y)
    bad = support_y.clone()
    bad[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="support_y contains NaN or Inf"):
        imaml.meta_gradient(support_x, bad, query_x, query_y)
    with pytest.raises(ValueError, match="support_x has no points per task"):
        imaml.adapt(support_x[:, :0], support_y[:, :0])
    with pytest.raises(FloatingPointError, match="inner loop diverged"):
        # φ − θ grows by a factor |1 − αλ| = 999 per step and overflows.
        pymaml.IMAML(model, 10.0, 120, 100.0, 2).meta_gradient(support_x, support_y, query_x, query_y)


@pytest.mark.parametrize("fused", [
    pytest.param(True, marks=pytest.mark.skipif(not HAS_EXTENSION, reason="pymaml._C is not built")),
    False,
])
def test_float32_is_within_float32_rounding_of_float64(fused):
    # I + H/λ is well conditioned here (λ = 2), so CG and the inner loop amplify rounding little.
    results = {}
    for dtype in (torch.float64, torch.float32):
        model = make_mlp((3, 8, 2), "tanh", dtype)
        batch = make_batch(3, 6, 3, 2, "mse", dtype)
        out = pymaml.IMAML(model, 0.1, 10, reg_lambda=2.0, cg_steps=12, fused_hvp=fused).meta_gradient(*batch)
        results[dtype] = (flat_grads(model), out.task_losses)
    assert relative_error(*(results[dtype][0] for dtype in (torch.float32, torch.float64))) <= TOLERANCE[torch.float32]
    assert relative_error(*(results[dtype][1] for dtype in (torch.float32, torch.float64))) <= TOLERANCE[torch.float32]
