"""Exact MAML meta-gradients for any nn.Module in O(S·|θ|) memory per task: the reverse chain.

Per task, with θ_0 = θ, g_s = ∇L_support(θ_s) and θ_{s+1} = θ_s − α_s ⊙ g_s (s = 0..S−1), the task
loss is Σ_{s=1..S} w_s L_query(θ_s) (without step weights w_S = 1 and the other w_s = 0; S = 0:
L_query(θ_0)). Its gradients, by reverse accumulation through the inner loop:

    v_S = w_S ∇L_query(θ_S)
    v_s = v_{s+1} − H_s(α_s ⊙ v_{s+1}) + w_s ∇L_query(θ_s),   s = S−1..0 (w_0 = 0)
    ∂/∂θ = v_0,   ∂/∂α_s = −g_s ⊙ v_{s+1} (summed to α_s's shape),   ∂/∂w_s = L_query(θ_s)

H_s is the Hessian of the support loss at θ_s; first order drops the H_s term. The HVPs are
torch.func's forward-over-reverse products (jvp of grad), vmapped over tasks; their primal output
is g_s, so the inner gradients are not stored. The meta-loss and its gradients are means over tasks.

Only θ_1..θ_S of each task are kept (θ_0 is shared): no autograd graph spans inner steps, so memory
does not grow with S beyond those weights. The gradients are computed inside the forward pass of
a custom autograd function, whose backward only scales them by the incoming gradient (and refuses
create_graph=True: the result would silently lack the second derivatives of this computation).

Tasks go through in chunks of C = task_chunk tasks, each chunk vmapped. Peak memory beyond the
model and the batch, independent of the number of tasks T:

    C · ((S + 5) · |θ| · b + A)

with b bytes per number, (S + 5)·|θ| for θ_1..θ_S, v, α ⊙ v, g_s, H_s(α ⊙ v) and a query
gradient, and A the activation memory of one task's query gradient or support HVP, the larger
(it grows with the points per task and the model's activation sizes; measure it as the growth of
one meta-step with task_chunk=1). To fit a budget M, take C = M / ((S + 5)·|θ|·b + A). C = 1 is
the smallest footprint; larger chunks run fewer, larger batched operations, which is faster up to
a point (on a GPU, where launches cost more, usually further). The default (default_task_chunk)
estimates A from the model's activation sizes and fits DEFAULT_CHUNK_BYTES.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import grad, grad_and_value, jvp, vmap

from ..nn import inner_step
from .functional import loss_function
from .losses import LossFn
from .schedule import InnerLR, step_size

# Without task_chunk, the chunk is the largest whose estimated footprint C·((S + 5)·|θ| + 4·F)·b
# stays within DEFAULT_CHUNK_BYTES (at most T), F being the numbers one forward of a task's query
# set produces in the model's leaf modules (kept activations, their tangents and gradients: about
# four copies). On the paper's Omniglot Conv4 the estimate gives C = 2; small models such as the
# sinusoid MLP get one chunk, since there a chunked meta-step costs several times a single one.
# The measured footprints and times per chunk size behind DEFAULT_CHUNK_BYTES are in
# bench/RESULTS.md ("Measurements behind the Python code's choices"; bench/test_conv4_memory.py).
DEFAULT_CHUNK_BYTES = 160 * 2**20
_FORWARD_NUMBERS: dict = {}


def forward_numbers(model: nn.Module, params: dict, fixed: dict, x: Tensor) -> int:
    """How many numbers the leaf modules of `model` output on one task's inputs x (cached per model
    and input shape)."""
    key = (id(model), tuple(x.shape), x.dtype, x.device)
    if key not in _FORWARD_NUMBERS:
        counted = [0]

        def count(module, inputs, output):
            if isinstance(output, Tensor):
                counted[0] += output.numel()

        leaves = [m for m in model.modules() if next(m.children(), None) is None]
        handles = [m.register_forward_hook(count) for m in leaves]
        try:
            with torch.no_grad():
                torch.func.functional_call(model, ({k: v.detach() for k, v in params.items()}, fixed), (x,))
        finally:
            for handle in handles:
                handle.remove()
        if len(_FORWARD_NUMBERS) > 64:
            _FORWARD_NUMBERS.clear()
        _FORWARD_NUMBERS[key] = counted[0]
    return _FORWARD_NUMBERS[key]


def default_task_chunk(model, params, fixed, query_x: Tensor, inner_steps: int) -> int:
    """The largest chunk within DEFAULT_CHUNK_BYTES by the estimate above, at least 1, at most T."""
    numbers = sum(p.numel() for p in params.values())
    per_task = ((inner_steps + 5) * numbers + 4 * forward_numbers(model, params, fixed, query_x[0]))
    per_task *= query_x.element_size()
    return max(1, min(query_x.shape[0], DEFAULT_CHUNK_BYTES // max(per_task, 1)))


@dataclass
class _Plan:
    """What the chain needs besides tensors: the loss of one task (with torch's normalization
    kernels for values and gradients, decomposed for HVPs), the step-size layout and the options. reverse_over_reverse turns True once an op of the model or loss is found to lack a
    forward-mode derivative (for example huber_loss's backward in torch 2.13)."""

    loss_at: object
    hvp_loss_at: object
    names: tuple[str, ...]
    steps: int
    first_order: bool
    # Per inner step and parameter name: an index into the step-size tensors, or a number.
    step_sizes: tuple[dict[str, int | float], ...]
    task_chunk: int
    reverse_over_reverse: bool = False


def _step_size_layout(inner_lr: InnerLR, steps: int, names) -> tuple[list[Tensor], tuple[dict, ...]]:
    """The distinct step-size tensors of the schedule (each gets its own gradient, summed over the
    steps and parameters that share it) and, per step and name, the index of its tensor or the number."""
    tensors: list[Tensor] = []
    index_of: dict[int, int] = {}
    layout = []
    for step in range(steps):
        entry: dict[str, int | float] = {}
        for name in names:
            alpha = step_size(inner_lr, step, name)
            if isinstance(alpha, Tensor):
                if id(alpha) not in index_of:
                    index_of[id(alpha)] = len(tensors)
                    tensors.append(alpha)
                entry[name] = index_of[id(alpha)]
            else:
                entry[name] = float(alpha)
        layout.append(entry)
    return tensors, tuple(layout)


def _alpha(plan: _Plan, alphas, step: int, name: str):
    value = plan.step_sizes[step][name]
    return alphas[value] if isinstance(value, int) else value


def _batched(function, theta_is_shared: bool, extra_batched: int = 2):
    """vmap over the chunk's tasks; θ_0 is one shared dict (not batched), the later θ_s are per task."""
    return vmap(function, in_dims=(None if theta_is_shared else 0, *([0] * extra_batched)))


def _gradient_and_hvp(plan: _Plan, theta, u, x, y, theta_is_shared: bool):
    """(g, H u) per task at θ: forward-over-reverse (jvp of grad), whose primal is g; where an op
    has no forward-mode derivative, reverse-over-reverse (grad of g · u)."""
    loss_at = plan.hvp_loss_at

    def forward_over_reverse(theta, u, x, y):
        return jvp(lambda p: grad(loss_at)(p, x, y), (theta,), (u,))

    def reverse_over_reverse(theta, u, x, y):
        def directional(p):
            g = grad(loss_at)(p, x, y)
            return sum((g[name] * u[name]).sum() for name in g), g

        hessian_u, g = grad(directional, has_aux=True)(theta)
        return g, hessian_u

    if not plan.reverse_over_reverse:
        try:
            return _batched(forward_over_reverse, theta_is_shared, 3)(theta, u, x, y)
        except NotImplementedError:
            plan.reverse_over_reverse = True
    return _batched(reverse_over_reverse, theta_is_shared, 3)(theta, u, x, y)


def _chunk(plan: _Plan, params, alphas, step_weights, sx, sy, qx, qy, alpha_wanted, weights_wanted, gradients):
    """One chunk of tasks. Returns (task losses [C], pre-adaptation losses [C], and, when
    `gradients`, the sums over the chunk's tasks of ∂/∂θ (dict), ∂/∂α (list, None where not
    wanted) and ∂/∂w [S])."""
    loss_at, steps = plan.loss_at, plan.steps
    thetas = [params]
    for step in range(steps):
        with inner_step(step):
            g = _batched(grad(loss_at), step == 0)(thetas[-1], sx, sy)
        thetas.append({name: w - _alpha(plan, alphas, step, name) * g[name] for name, w in thetas[-1].items()})
    pre = _batched(loss_at, True)(params, qx, qy)
    weighted = steps > 0 and step_weights is not None
    # The steps whose query loss enters the task loss.
    scored = range(1, steps + 1) if weighted else [steps]
    weight = (lambda s: step_weights[s - 1]) if weighted else (lambda s: 1.0)

    if not gradients:
        task_losses = 0.0
        for s in scored:
            with inner_step(s):
                task_losses = task_losses + weight(s) * _batched(loss_at, s == 0)(thetas[s], qx, qy)
        return task_losses, pre, None

    def query_grad(s):
        with inner_step(s):
            return _batched(grad_and_value(loss_at), s == 0)(thetas[s], qx, qy)

    g_query, loss_s = query_grad(steps)
    v = {name: weight(steps) * g for name, g in g_query.items()}
    task_losses = weight(steps) * loss_s
    step_losses = [None] * steps
    if weighted:
        step_losses[steps - 1] = loss_s.sum()
    alpha_grads: list[Tensor | None] = [None] * len(alphas)

    for step in range(steps - 1, -1, -1):
        thetas.pop()  # θ_{step+1} is no longer needed
        theta = thetas[-1]
        needs_g = any(alpha_wanted[i] for i in (plan.step_sizes[step][n] for n in plan.names) if isinstance(i, int))
        if not plan.first_order:
            u = {name: _alpha(plan, alphas, step, name) * v[name] for name in plan.names}
            with inner_step(step):
                g, hessian_u = _gradient_and_hvp(plan, theta, u, sx, sy, step == 0)
        elif needs_g:
            with inner_step(step):
                g, hessian_u = _batched(grad(loss_at), step == 0)(theta, sx, sy), None
        else:
            g, hessian_u = None, None
        if needs_g:
            for name in plan.names:
                index = plan.step_sizes[step][name]
                if isinstance(index, int) and alpha_wanted[index]:
                    contribution = -(g[name] * v[name]).sum(0).sum_to_size(alphas[index].shape)
                    alpha_grads[index] = contribution if alpha_grads[index] is None else alpha_grads[index] + contribution
        if hessian_u is not None:
            v = {name: v[name] - hessian_u[name] for name in plan.names}
        if weighted and step >= 1:
            g_query, loss_s = query_grad(step)
            v = {name: v[name] + weight(step) * g_query[name] for name in plan.names}
            task_losses = task_losses + weight(step) * loss_s
            step_losses[step - 1] = loss_s.sum()
    grad_params = {name: value.sum(0) for name, value in v.items()}
    grad_weights = torch.stack(step_losses) if weighted and weights_wanted else None
    return task_losses, pre, (grad_params, alpha_grads, grad_weights)


def _run(plan: _Plan, batch, params, alphas, step_weights, alpha_wanted, weights_wanted, gradients):
    """The chain over all tasks, chunk by chunk: task and pre-adaptation losses [T], and the means
    over tasks of the gradients (when `gradients`)."""
    tasks = batch[0].shape[0]
    task_losses, pre_losses, totals = [], [], None
    for start in range(0, tasks, plan.task_chunk):
        chunk = [t[start : start + plan.task_chunk] for t in batch]
        losses, pre, sums = _chunk(plan, params, alphas, step_weights, *chunk, alpha_wanted, weights_wanted, gradients)
        task_losses.append(losses)
        pre_losses.append(pre)
        if sums is not None:
            totals = sums if totals is None else _add(totals, sums)
    if totals is not None:
        grad_params, alpha_grads, grad_weights = totals
        totals = ({name: g / tasks for name, g in grad_params.items()},
                  [None if g is None else g / tasks for g in alpha_grads],
                  None if grad_weights is None else grad_weights / tasks)
    return torch.cat(task_losses), torch.cat(pre_losses), totals


def _add(totals, sums):
    grad_params, alpha_grads, grad_weights = totals
    more_params, more_alphas, more_weights = sums
    return ({name: g + more_params[name] for name, g in grad_params.items()},
            [a if b is None else (b if a is None else a + b) for a, b in zip(alpha_grads, more_alphas)],
            None if grad_weights is None else grad_weights + more_weights)


class _MemoryEfficientMetaStep(torch.autograd.Function):
    """meta-loss = mean over tasks of the task loss; the forward computes its gradients (reverse
    chain), the backward scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, plan, wanted, support_x, support_y, query_x, query_y, step_weights, *tensors):
        count = len(plan.names)
        params = {name: p.detach() for name, p in zip(plan.names, tensors[:count])}
        alphas = [a.detach() for a in tensors[count:]]
        params_wanted, alpha_wanted, weights_wanted = wanted
        weights = None if step_weights is None else step_weights.detach()
        task_losses, pre_losses, (grad_params, alpha_grads, grad_weights) = _run(
            plan, (support_x, support_y, query_x, query_y), params, alphas, weights, alpha_wanted, weights_wanted, True)
        ctx.shapes = [p.shape for p in tensors[:count]]
        ctx.save_for_backward(*grad_params.values(), *(g if g is not None else torch.empty(0) for g in alpha_grads),
                              grad_weights if grad_weights is not None else torch.empty(0))
        ctx.wanted = (params_wanted, alpha_wanted, weights_wanted)
        ctx.mark_non_differentiable(task_losses, pre_losses)
        return task_losses.mean(), task_losses, pre_losses

    @staticmethod
    def backward(ctx, grad_meta_loss, *_non_differentiable):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "the memory-efficient meta-step (backend 'func', second_order='memory_efficient') computes its "
                "gradients inside the forward pass, so its backward cannot be differentiated again "
                "(create_graph=True); use second_order='graph' or backend='reference' for higher derivatives")
        saved = ctx.saved_tensors
        params_wanted, alpha_wanted, weights_wanted = ctx.wanted
        count = len(ctx.shapes)
        grad_params = [grad_meta_loss * g if wanted else None for g, wanted in zip(saved[:count], params_wanted)]
        grad_alphas = [grad_meta_loss * g if wanted else None for g, wanted in zip(saved[count:-1], alpha_wanted)]
        grad_weights = grad_meta_loss * saved[-1] if weights_wanted else None
        return (None, None, None, None, None, None, grad_weights, *grad_params, *grad_alphas)


def meta_losses(
    model: nn.Module,
    params: dict[str, Tensor],
    fixed: dict,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    *,
    inner_lr: InnerLR,
    inner_steps: int,
    first_order: bool,
    loss_fn: LossFn,
    step_weights: Tensor | None = None,
    task_chunk: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(meta-loss, task losses [T], pre-adaptation query losses [T]) through the reverse chain.

    The meta-loss is differentiable with respect to params, the step-size tensors of inner_lr and
    step_weights (where they require grad and grad mode is on); its backward gives the exact
    meta-gradient (module docstring) but cannot itself be differentiated. task_chunk: tasks per
    vmapped chunk (default: default_task_chunk); see the module docstring for the memory it takes."""
    tasks = support_x.shape[0]
    if tasks == 0:
        raise ValueError("the meta-batch has no tasks")
    if task_chunk is None:
        task_chunk = default_task_chunk(model, params, fixed, query_x, inner_steps)
    if isinstance(task_chunk, bool) or not isinstance(task_chunk, int) or task_chunk < 1:
        raise ValueError(f"task_chunk must be an integer >= 1, got {task_chunk!r}")
    names = tuple(params)
    alphas, layout = _step_size_layout(inner_lr, inner_steps, names)
    plan = _Plan(loss_function(model, fixed, loss_fn, decompose_norms=False), loss_function(model, fixed, loss_fn),
                 names, inner_steps, first_order, layout, task_chunk)
    if step_weights is not None and step_weights.shape != (inner_steps,):
        raise ValueError(f"step_weights must have shape ({inner_steps},), got {tuple(step_weights.shape)}")
    batch = (support_x, support_y, query_x, query_y)
    weights_wanted = step_weights is not None and step_weights.requires_grad and inner_steps > 0
    wanted = ([p.requires_grad for p in params.values()], [a.requires_grad for a in alphas], weights_wanted)
    if torch.is_grad_enabled() and (any(wanted[0]) or any(wanted[1]) or weights_wanted):
        return _MemoryEfficientMetaStep.apply(plan, wanted, *batch, step_weights, *params.values(), *alphas)
    with torch.no_grad():
        detached = {name: p.detach() for name, p in params.items()}
        weights = None if step_weights is None else step_weights.detach()
        task_losses, pre_losses, _ = _run(plan, batch, detached, [a.detach() for a in alphas], weights,
                                          wanted[1], False, False)
    return task_losses.mean(), task_losses, pre_losses
