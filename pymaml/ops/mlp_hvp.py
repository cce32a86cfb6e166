"""pymaml::mlp_hvp: batched Hessian-vector products of an MLP's per-task loss.

hv[t] = ∇²_θ L(θ_t; x_t, y_t) v_t, with θ_t and v_t rows of theta and v ([T, P], parameters
flattened in nn.Sequential order); x [T, K, n_0]; y [T, K, n_L] (mse) or [T, K] int64 labels
(cross_entropy). With `layers`, the network they encode (pymaml/ops/network.py) in place of the
MLP, x [T, K, n_0] with each point's [C, H, W] flattened. The fused kernel uses Pearlmutter's R-operator; the twin uses torch.func's
forward-over-reverse (jvp of grad). The result is not differentiable (its backward raises).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from .._extension import extension
from .mlp_meta_step import _task_loss, model_apply


def mlp_hvp_torch(theta: Tensor, v: Tensor, x: Tensor, y: Tensor, widths: list[int], activation: str, bias: bool,
                  loss: str, layers: list[int] | None = None, layer_constants: list[float] | None = None) -> Tensor:
    """The pure-torch twin: vmap over tasks of jvp(grad(L)) (forward-over-reverse)."""

    def loss_at(parameters, xt, yt):
        return _task_loss(model_apply(parameters, xt, widths, activation, bias, layers, layer_constants), yt, loss)

    def one_task(theta_t, v_t, x_t, y_t):
        return jvp(lambda p: grad(loss_at)(p, x_t, y_t), (theta_t,), (v_t,))[1]

    return vmap(one_task)(theta.detach(), v.detach(), x, y)


@torch.library.custom_op("pymaml::mlp_hvp", mutates_args=())
def mlp_hvp(theta: Tensor, v: Tensor, x: Tensor, y: Tensor, widths: list[int], activation: str, bias: bool,
            loss: str, layers: list[int] | None = None, layer_constants: list[float] | None = None) -> Tensor:
    if theta.device.type != "cpu" or extension() is None:
        return mlp_hvp_torch(theta, v, x, y, widths, activation, bias, loss, layers, layer_constants)
    hv = torch.empty_like(theta)
    buffer = lambda t: t.detach().contiguous()  # noqa: E731
    extension().mlp_hvp(theta=buffer(theta), v=buffer(v), x=buffer(x), y=buffer(y), widths=list(widths),
                        activation=activation, bias=bias, loss=loss, hv=hv, threads=torch.get_num_threads(),
                        layers=list(layers or ()), layer_constants=list(layer_constants or ()))
    return hv


@mlp_hvp.register_fake
def _(theta, v, x, y, widths, activation, bias, loss, layers=None, layer_constants=None):
    return torch.empty_like(theta)


def _backward(ctx, grad_hv):
    raise RuntimeError(
        "pymaml::mlp_hvp is not differentiable; for derivatives of Hessian-vector products call "
        "pymaml.hvp(..., fused=False), which uses torch.func"
    )


mlp_hvp.register_autograd(_backward)
