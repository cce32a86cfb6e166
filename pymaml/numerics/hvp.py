"""Public batched Hessian-vector products: for each task t, H_t v_t with H_t = ∇²_θ L(θ_t; x_t, y_t)."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import grad, jvp, vmap

from .functional import loss_function
from .losses import LossFn, resolve_loss
from .state import fixed_state


def _check_shapes(model: nn.Module, params: dict[str, torch.Tensor], v: dict[str, torch.Tensor], tasks: int) -> None:
    """Every entry of params and v is [T, *shape] of the model's parameter or buffer of that name."""
    known = dict(model.named_parameters())
    known.update(model.named_buffers())
    for name in params:
        if name not in known:
            raise ValueError(f"params names {name!r}, which is neither a parameter nor a buffer of the model; "
                             f"its parameters are {[n for n, _ in model.named_parameters()]}")
        expected = (tasks, *known[name].shape)
        for kind, tensors in (("params", params), ("v", v)):
            tensor = tensors[name]
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{kind}[{name!r}] must be a torch.Tensor, got {type(tensor).__name__}")
            if tuple(tensor.shape) != expected:
                raise ValueError(f"{kind}[{name!r}] must be [T, *{name}.shape] = {list(expected)}, "
                                 f"got {list(tensor.shape)}")


def hvp(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    v: dict[str, torch.Tensor],
    loss: str | LossFn = "mse",
    fused: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Batched HVPs. params and v map the model's parameter names to tensors with a leading task
    dimension T; x and y are [T, K, ...]. Returns H_t v_t per name, [T, ...].

    fused: None uses the fused C++ kernel for supported MLPs on the CPU when no input requires grad
    (its result is not differentiable), and torch.func's forward-over-reverse otherwise; True
    insists on the kernel (error if it cannot run); False always uses torch.func. The kernel
    takes exactly the MLPs the `cpp` backend takes (see pymaml.backends.cpp: no subclasses,
    module hooks or parametrizations), checked on every call.
    """
    from .._extension import EXTENSION_ERROR, extension
    from ..backends.cpp import current_mlp_layout
    from ..nn import current_inner_step

    if params.keys() != v.keys():
        raise ValueError(f"params and v must have the same names; got {sorted(params)} and {sorted(v)}")
    tasks = {t.shape[0] for t in [*params.values(), *v.values(), x, y]}
    if len(tasks) != 1:
        raise ValueError(f"params, v, x and y must share the leading task dimension, got sizes {sorted(tasks)}")
    _check_shapes(model, params, v, tasks.pop())
    layout, reason = current_mlp_layout(model)
    if layout is not None and list(params) != layout.names:
        layout, reason = None, f"the fused kernel needs every parameter of the MLP, in order ({layout.names})"
    if layout is not None and layout.per_step_rows and current_inner_step() != 0:
        layout, reason = None, (f"the model has a PerStepBatchNorm2d with a weight and bias per step and this runs at "
                                f"inner step {current_inner_step()} (pymaml.nn.inner_step); the fused HVP evaluates "
                                f"step 0")
    differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in [*params.values(), *v.values(), x])
    if x.device.type != "cpu" or extension() is None or not isinstance(loss, str):
        reason = reason or (EXTENSION_ERROR if extension() is None else "the fused kernel needs a CPU tensor and a named loss")
        layout = None
    if fused is True and (layout is None or differentiable):
        raise RuntimeError(f"the fused HVP cannot run here: {reason or 'an input requires grad'}")
    if fused is not False and layout is not None and not differentiable:
        from ..ops.meta_step import hvp as fused_hvp

        names = layout.names
        flatten = lambda tensors: torch.cat([tensors[n].reshape(x.shape[0], -1) for n in names], dim=1)  # noqa: E731
        layers, constants = layout.network(tuple(x.shape[2:]))
        layout.check_points(tuple(x.shape[2:]), x.shape[1], x.shape[1], 1)
        flat = fused_hvp(flatten(params), flatten(v), x.reshape(*x.shape[:2], -1), y, layers, constants, loss)
        out, offset = {}, 0
        for name in names:
            size = params[name][0].numel()
            out[name] = flat[:, offset : offset + size].reshape(params[name].shape)
            offset += size
        return out

    loss_fn, fixed = resolve_loss(loss), fixed_state(model)
    for name in params:
        fixed.pop(name, None)

    loss_at = loss_function(model, fixed, loss_fn)

    def one_task(p, vt, xt, yt):
        return jvp(lambda q: grad(loss_at)(q, xt, yt), (p,), (vt,))[1]

    return vmap(one_task)(params, v, x, y)
