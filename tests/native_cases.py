"""Cases for the torch-free driver csrc/tools/oracle_check.cpp: MLP meta-steps and HVPs whose
float64 results come from the oracle (pymaml.reference) and plain autograd, written as the
driver reads them (hexadecimal floats, so the values cross exactly)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import pymaml
from pymaml import reference

ACTIVATION_MODULES = {"none": nn.Identity, "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}

# widths, activation, bias, loss, steps, first_order, learned step sizes, tasks, support and query points
META_STEP_CASES = [
    ((1, 40, 40, 1), "relu", True, "mse", 2, False, True, 3, 10, 7),
    ((5, 33, 17, 3), "tanh", True, "cross_entropy", 1, False, False, 2, 7, 5),
    ((2, 64, 1), "sigmoid", False, "mse", 3, True, True, 2, 9, 4),
    ((9, 8, 24, 50, 4), "none", True, "cross_entropy", 0, False, False, 2, 6, 13),
    ((3, 20, 2), "relu", True, "mse", 2, False, False, 4, 1, 3),
]
# widths, activation, bias, loss, tasks, points
HVP_CASES = [
    ((1, 40, 40, 1), "relu", True, "mse", 3, 10),
    ((4, 17, 3), "tanh", True, "cross_entropy", 2, 9),
    ((2, 9, 9, 2), "sigmoid", False, "mse", 2, 5),
]


def _model(widths, activation, bias, seed):
    torch.manual_seed(seed)
    return pymaml.models.mlp(widths, ACTIVATION_MODULES[activation], bias).double()


def _data(generator, tasks, points, widths, loss):
    x = torch.randn(tasks, points, widths[0], generator=generator, dtype=torch.float64)
    if loss == "cross_entropy":
        return x, torch.randint(0, widths[-1], (tasks, points), generator=generator)
    return x, torch.randn(tasks, points, widths[-1], generator=generator, dtype=torch.float64)


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors]) if tensors else torch.zeros(0, dtype=torch.float64)


def _array(name: str, values: torch.Tensor) -> str:
    flat = values.detach().reshape(-1)
    if flat.is_floating_point():
        text = " ".join(float(v).hex() for v in flat.tolist())
    else:
        text = " ".join(str(int(v)) for v in flat.tolist())
    return f"{name} {flat.numel()} {text}"


def _spec(widths, activation, bias, loss) -> str:
    return f"widths {len(widths)} {' '.join(map(str, widths))} bias {int(bias)} activation {activation} loss {loss}"


def meta_step_case(index, widths, activation, bias, loss, steps, first_order, learned, tasks, support, query) -> str:
    model = _model(widths, activation, bias, seed=index)
    generator = torch.Generator().manual_seed(100 + index)
    sx, sy = _data(generator, tasks, support, widths, loss)
    qx, qy = _data(generator, tasks, query, widths, loss)
    params = dict(model.named_parameters())
    # α_s per parameter element in [0.02, 0.1], and step weights w_s > 0 that do not all agree.
    alphas = [{name: (0.02 + 0.08 * torch.rand(p.shape, generator=generator, dtype=torch.float64)).requires_grad_()
               for name, p in params.items()} for _ in range(steps)]
    weights = torch.linspace(0.5, 1.0, steps, dtype=torch.float64)
    options = dict(inner_lr=alphas if steps else 0.0, first_order=first_order, loss=loss)
    losses = reference.task_query_losses(model, sx, sy, qx, qy, inner_steps=steps,
                                         step_weights=weights if steps else None, **options)
    meta_loss = losses.mean()
    alpha_leaves = [a for step in alphas for a in step.values()] if learned else []
    grads = torch.autograd.grad(meta_loss, [*params.values(), *alpha_leaves])
    with torch.no_grad():
        pre = reference.task_query_losses(model, sx, sy, qx, qy, inner_steps=0, **options)
    lrs = torch.stack([_flat(step.values()) for step in alphas]) if steps else torch.zeros(0, dtype=torch.float64)
    lines = [
        f"meta_step case{index}-{'-'.join(map(str, widths))}-{activation}-{loss}-S{steps}",
        _spec(widths, activation, bias, loss),
        f"steps {steps} first_order {int(first_order)} lr_grad {int(learned)} tasks {tasks} support {support} "
        f"query {query}",
        _array("theta", _flat(params.values())), _array("lrs", lrs), _array("step_weights", weights),
        _array("support_x", sx), _array("support_y", sy), _array("query_x", qx), _array("query_y", qy),
        _array("meta_loss", meta_loss), _array("task_losses", losses), _array("pre_losses", pre),
        _array("grad_theta", _flat(grads[: len(params)])), _array("grad_lrs", _flat(grads[len(params):])),
    ]
    return "\n".join(lines)


def hvp_case(index, widths, activation, bias, loss, tasks, points) -> str:
    model = _model(widths, activation, bias, seed=50 + index)
    generator = torch.Generator().manual_seed(200 + index)
    x, y = _data(generator, tasks, points, widths, loss)
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    loss_fn = pymaml.numerics.losses.resolve_loss(loss)
    thetas, vs, hvs, gradients = [], [], [], []
    for t in range(tasks):
        theta = [torch.randn(shape, generator=generator, dtype=torch.float64).requires_grad_() for shape in shapes]
        v = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]
        value = loss_fn(torch.func.functional_call(model, dict(zip(names, theta)), (x[t],)), y[t])
        g = torch.autograd.grad(value, theta, create_graph=True)
        hv = torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, v)), theta)
        thetas.append(_flat(theta)), vs.append(_flat(v)), hvs.append(_flat(hv)), gradients.append(_flat(g))
    lines = [
        f"hvp case{index}-{'-'.join(map(str, widths))}-{activation}-{loss}",
        _spec(widths, activation, bias, loss),
        f"tasks {tasks} points {points}",
        _array("theta", torch.stack(thetas)), _array("v", torch.stack(vs)), _array("x", x), _array("y", y),
        _array("hv", torch.stack(hvs)), _array("grad", torch.stack(gradients)),
    ]
    return "\n".join(lines)


def write_cases(path: Path) -> int:
    """Writes every case to `path`; returns how many."""
    cases = [meta_step_case(i, *case) for i, case in enumerate(META_STEP_CASES)]
    cases += [hvp_case(i, *case) for i, case in enumerate(HVP_CASES)]
    Path(path).write_text(f"pymaml-oracle-cases 1 {len(cases)}\n" + "\n".join(cases) + "\n")
    return len(cases)
