"""What MAML, IMAML and Reptile check alike: the model and loss they are given, their step counts
and the tensors of a meta-batch. Each raises an error that names the problem."""

from __future__ import annotations

import torch
from torch import nn

from ..numerics.losses import NAMED_LOSSES
from ..numerics.state import adapted_parameters


def check_finite_tensor(name: str, tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def validate_inputs(inputs: dict[str, torch.Tensor], loss, dtype: torch.dtype, device: torch.device, check_finite: bool):
    """Checks a meta-batch given as name -> tensor, in the order x, y, x, y; raises an error naming the problem."""
    for name, tensor in inputs.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device} but the model's parameters are on {device}")
        if tensor.dim() == 0:
            raise ValueError(f"{name} must have a leading task dimension T, got a scalar")
    task_counts = {name: tensor.shape[0] for name, tensor in inputs.items()}
    if len(set(task_counts.values())) != 1:
        counts = ", ".join(f"{name}: {count}" for name, count in task_counts.items())
        raise ValueError(f"the task dimension (dim 0) differs between the inputs ({counts})")
    if not next(iter(task_counts.values())):
        raise ValueError(f"the meta-batch has no tasks: dim 0 (T) of {', '.join(task_counts)} is 0")
    names = list(inputs)
    for x_name, y_name in zip(names[0::2], names[1::2]):
        x, y = inputs[x_name], inputs[y_name]
        if x.dim() < 2:
            raise ValueError(f"{x_name} must be [T, K, features...] (task dim first), got shape {tuple(x.shape)}")
        if not x.is_floating_point() or x.dtype != dtype:
            raise TypeError(f"{x_name} has dtype {x.dtype}; the model's parameters are {dtype}")
        if loss == "cross_entropy":
            if y.dim() != 2:
                raise ValueError(f"{y_name} must be class labels [T, K] for cross_entropy, got shape {tuple(y.shape)}")
            if y.is_floating_point() or y.dtype == torch.bool:
                raise TypeError(f"{y_name} has dtype {y.dtype}; cross_entropy needs integer class labels")
            if y.numel() and int(y.min()) < 0:
                raise ValueError(f"{y_name} has negative class labels")
        else:
            if y.dim() < 2:
                raise ValueError(f"{y_name} must be [T, K, outputs...] (task dim first), got shape {tuple(y.shape)}")
            if loss == "mse" and (not y.is_floating_point() or y.dtype != dtype):
                raise TypeError(f"{y_name} has dtype {y.dtype}; mse needs floating targets of the model's dtype {dtype}")
        if x.shape[1] != y.shape[1]:
            raise ValueError(f"{x_name} has {x.shape[1]} points per task but {y_name} has {y.shape[1]}")
    if check_finite:
        floating = [tensor for tensor in inputs.values() if tensor.is_floating_point()]
        # One fused reduction: a NaN or Inf makes its tensor's norm non-finite. A finite tensor
        # whose norm overflows is told apart by the exact per-tensor check.
        if floating and not bool(torch.isfinite(torch.stack(torch._foreach_norm(floating))).all()):
            for name, tensor in inputs.items():
                check_finite_tensor(name, tensor)


def check_model_and_loss(model, loss, algorithm: str) -> None:
    """What every meta-learner checks of its model and loss: an nn.Module with parameters to adapt,
    on one device in one floating dtype, and a known or callable loss."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    params = adapted_parameters(model)
    if not params:
        raise ValueError(f"the model has no parameters that require grad; {algorithm} has nothing to adapt")
    names_of: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    tied = [names for names in names_of.values() if len(names) > 1]
    if tied:
        # torch 2.13's functional_call leaves such a model's parameter replaced by a plain tensor.
        raise ValueError(f"the model uses one parameter under several names (tied weights: {tied[0]}); "
                         f"{algorithm} does not support tied weights")
    devices = {p.device for p in model.parameters()}
    dtypes = {p.dtype for p in params.values()}
    if len(devices) != 1 or len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise ValueError(f"the model's parameters must share one device and one floating dtype, got {devices} and {dtypes}")
    if not (callable(loss) or loss in NAMED_LOSSES):
        raise ValueError(f"unknown loss {loss!r}; use one of {sorted(NAMED_LOSSES)} or a callable")


def check_steps(name: str, steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {steps!r}")
    return steps
