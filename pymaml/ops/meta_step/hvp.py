"""pymaml::hvp: batched Hessian-vector products of a network's per-task loss.

hv[t] = ∇²_θ L(θ_t; x_t, y_t) v_t, with θ_t and v_t rows of theta and v ([T, P], parameters
flattened in module order); x [T, K, n_0] with each point's [C, H, W] flattened; y [T, K, n_L]
(mse) or [T, K] int64 labels (cross_entropy); the network that layers and layer_constants encode
(network.py). The fused kernel uses Pearlmutter's R-operator; the twin uses torch.func's
forward-over-reverse (jvp of grad). The result is not differentiable (its backward raises).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..._extension import extension
from .twin import hvp_torch


@torch.library.custom_op("pymaml::hvp", mutates_args=())
def hvp(theta: Tensor, v: Tensor, x: Tensor, y: Tensor, layers: list[int], layer_constants: list[float],
        loss: str) -> Tensor:
    if theta.device.type != "cpu" or extension() is None:
        return hvp_torch(theta, v, x, y, layers, layer_constants, loss)
    hv = torch.empty_like(theta)
    buffer = lambda t: t.detach().contiguous()  # noqa: E731
    extension().hvp(theta=buffer(theta), v=buffer(v), x=buffer(x), y=buffer(y), layers=list(layers),
                    layer_constants=list(layer_constants), loss=loss, hv=hv, threads=torch.get_num_threads())
    return hv


@hvp.register_fake
def _(theta, v, x, y, layers, layer_constants, loss):
    return torch.empty_like(theta)


def _backward(ctx, grad_hv):
    raise RuntimeError(
        "pymaml::hvp is not differentiable; for derivatives of Hessian-vector products call "
        "pymaml.hvp(..., fused=False), which uses torch.func"
    )


hvp.register_autograd(_backward)
