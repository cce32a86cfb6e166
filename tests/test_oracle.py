"""The oracle itself: gradcheck, gradgradcheck, and a case with a closed form."""

import pytest
import torch

import pymaml
from helpers import make_batch, make_mlp
from pymaml import reference


def test_oracle_gradcheck_and_gradgradcheck():
    model = make_mlp((2, 3, 2), "tanh")
    batch = make_batch(2, 3, 2, 2, "mse")
    names = list(pymaml.numerics.state.adapted_parameters(model))
    inputs = tuple(p.detach().clone().requires_grad_() for p in model.parameters())

    def meta_loss(*params):
        return reference.meta_loss(
            model, *batch, inner_lr=0.3, inner_steps=2, loss="mse", params=dict(zip(names, params))
        )

    assert torch.autograd.gradcheck(meta_loss, inputs)
    assert torch.autograd.gradgradcheck(meta_loss, inputs)


def test_first_order_gradient_is_the_query_gradient_at_the_adapted_weights():
    # First-order MAML treats dθ_S/dθ as the identity (it is not the gradient of any loss, so no gradcheck).
    model = make_mlp((2, 4, 2), "tanh")
    sx, sy, qx, qy = make_batch(3, 4, 2, 2, "mse")
    params = pymaml.numerics.state.adapted_parameters(model)
    loss = reference.meta_loss(model, sx, sy, qx, qy, inner_lr=0.3, inner_steps=2, first_order=True)
    grads = torch.autograd.grad(loss, list(params.values()))
    expected = [torch.zeros_like(p) for p in params.values()]
    for t in range(sx.shape[0]):
        adapted = reference.adapt_task(model, params, {}, pymaml.numerics.losses.mse, sx[t], sy[t], 0.3, 2, True)
        leaves = {name: w.detach().requires_grad_() for name, w in adapted.items()}
        query = pymaml.numerics.losses.mse(torch.func.functional_call(model, leaves, (qx[t],)), qy[t])
        for total, g in zip(expected, torch.autograd.grad(query, list(leaves.values()))):
            total += g / sx.shape[0]
    for g, e in zip(grads, expected):
        assert torch.allclose(g, e, rtol=1e-13, atol=1e-15)


def test_oracle_matches_closed_form_for_scalar_linear_regression():
    # f(x) = w·x, L(w) = mean((w x - y)^2): L' = 2 mean(x (w x - y)), L'' = 2 mean(x^2).
    # One step: w1 = w - α L_s'(w); d L_q(w1) / dw = L_q'(w1) (1 - α L_s''), first order drops the bracket.
    model = torch.nn.Linear(1, 1, bias=False).double()
    w = 0.7
    with torch.no_grad():
        model.weight.fill_(w)
    sx = torch.tensor([[[1.0], [2.0], [-1.5]]], dtype=torch.float64)
    sy = torch.tensor([[[0.5], [1.0], [0.2]]], dtype=torch.float64)
    qx = torch.tensor([[[0.3], [-2.0]]], dtype=torch.float64)
    qy = torch.tensor([[[1.0], [-0.4]]], dtype=torch.float64)
    alpha = 0.1
    support_grad = 2 * (sx * (w * sx - sy)).mean()
    support_curvature = 2 * (sx**2).mean()
    w1 = w - alpha * support_grad
    query_grad_at_w1 = 2 * (qx * (w1 * qx - qy)).mean()
    for first_order, expected in ((False, query_grad_at_w1 * (1 - alpha * support_curvature)), (True, query_grad_at_w1)):
        loss = reference.meta_loss(model, sx, sy, qx, qy, inner_lr=alpha, inner_steps=1, first_order=first_order)
        (grad,) = torch.autograd.grad(loss, [model.weight])
        assert loss.item() == pytest.approx(((w1 * qx - qy) ** 2).mean().item(), rel=1e-14)
        assert grad.item() == pytest.approx(expected.item(), rel=1e-13)


def test_oracle_with_zero_steps_is_the_query_loss():
    model = make_mlp((3, 4, 2), "relu")
    batch = make_batch(3, 4, 3, 2, "mse")
    loss = reference.meta_loss(model, *batch, inner_lr=0.5, inner_steps=0)
    expected = ((model(batch[2]) - batch[3]) ** 2).mean()
    assert torch.allclose(loss, expected, rtol=1e-14, atol=0)
