"""learn2learn's MAML wrapper (learn2learn.algorithms.MAML, version 0.2.0), without learn2learn.

A learn2learn script runs unchanged after one import is changed:

    from pymaml.compat.learn2learn import MAML      # was: from learn2learn.algorithms import MAML

    maml = MAML(model, lr=0.5, first_order=False)
    optimizer = torch.optim.Adam(maml.parameters())  # the model's own parameters
    for task in range(tasks):
        learner = maml.clone()                       # parameters: differentiable copies of θ
        for _ in range(steps):
            learner.adapt(loss_fn(learner(support_x[task]), support_y[task]))   # θ ← θ − lr ∇L
        loss_fn(learner(query_x[task]), query_y[task]).backward()               # meta-gradient into θ

The semantics are learn2learn's:
- clone() copies the module tree shallowly and replaces every parameter p by p.clone(), so the
  learner's parameters are functions of the original's and gradients flow back to them. A
  parameter shared between modules stays shared. Buffers are the original's own tensors (a
  BatchNorm in training mode updates the original's running statistics, as in learn2learn)
  unless they require grad, in which case they are cloned too.
- adapt(loss) takes one SGD step p ← p − lr·∂loss/∂p on every parameter, through
  torch.autograd.grad with create_graph=True (second order) or without a graph (first_order,
  which drops the Hessian terms of the meta-gradient).
- allow_nograd=False (default): every parameter must require grad. allow_nograd=True adapts
  only those that do and leaves the others as they are.
- allow_unused (default: allow_nograd): whether a parameter the loss does not depend on is
  allowed; it is then left as it is.
Where learn2learn prints a traceback and then fails on an unbound variable (a parameter that
does not require grad, or an unused one), this module raises an error that names the parameter
and the option that allows it.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MAML", "clone_module", "maml_update"]


def clone_module(module: nn.Module, memo: dict | None = None) -> nn.Module:
    """A shallow copy of `module` whose parameters (and buffers that require grad) are
    torch.clone()s of the original's: differentiable functions of them."""
    if memo is None:
        memo = {}
    if not isinstance(module, nn.Module):
        return module
    if id(module) in memo:
        return memo[id(module)]
    clone = module.__new__(type(module))
    clone.__dict__ = module.__dict__.copy()
    clone._parameters = clone._parameters.copy()
    clone._buffers = clone._buffers.copy()
    clone._modules = clone._modules.copy()
    memo[id(module)] = clone
    for key, param in module._parameters.items():
        if param is not None:
            if id(param) not in memo:
                memo[id(param)] = param.clone()
            clone._parameters[key] = memo[id(param)]
    for key, buffer in module._buffers.items():
        if buffer is not None and buffer.requires_grad:
            if id(buffer) not in memo:
                memo[id(buffer)] = buffer.clone()
            clone._buffers[key] = memo[id(buffer)]
    for key, child in module._modules.items():
        clone._modules[key] = clone_module(child, memo)
    _refresh_flat_weights(clone)
    return clone


def _refresh_flat_weights(module: nn.Module) -> None:
    # Recurrent layers read their weights from a cached list, which must follow the new tensors.
    if isinstance(module, nn.RNNBase):
        module._init_flat_weights()


def _replace_parameters(model: nn.Module, new: dict[int, torch.Tensor]) -> None:
    """Swaps every parameter p of the module tree for new[id(p)], where given."""
    for module in model.modules():
        for key, param in list(module._parameters.items()):
            if param is not None and id(param) in new:
                module._parameters[key] = new[id(param)]
        _refresh_flat_weights(module)


def maml_update(model: nn.Module, lr, grads) -> nn.Module:
    """p ← p − lr·g for every parameter p of `model` (in model.parameters() order) whose g is not
    None; the module is updated in place (its tensors are replaced, not modified) and returned."""
    params = list(model.parameters())
    grads = list(grads)
    if len(grads) != len(params):
        raise ValueError(f"maml_update: the model has {len(params)} parameters but {len(grads)} gradients were given")
    _replace_parameters(model, {id(p): p + (-lr * g) for p, g in zip(params, grads) if g is not None})
    return model


class MAML(nn.Module):
    """learn2learn.algorithms.MAML: wraps `model` with clone() and adapt(loss).

    model: the nn.Module to meta-learn; maml.parameters() are its parameters and maml(x) is model(x).
    lr: the inner-loop step size α.
    first_order: adapt without differentiating through the inner gradients (first-order MAML).
    allow_unused: allow parameters the adaptation loss does not use (default: allow_nograd).
    allow_nograd: allow parameters that do not require grad; they are not adapted.
    """

    def __init__(self, model: nn.Module, lr, first_order: bool = False, allow_unused: bool | None = None,
                 allow_nograd: bool = False):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float, torch.Tensor)):
            raise TypeError(f"lr must be a number or a tensor, got {type(lr).__name__}")
        self.module = model
        self.lr = lr
        self.first_order = first_order
        self.allow_nograd = allow_nograd
        self.allow_unused = allow_nograd if allow_unused is None else allow_unused

    def __getattr__(self, name):
        # As learn2learn's BaseLearner: attributes the wrapper lacks are the wrapped model's.
        try:
            return super().__getattr__(name)
        except AttributeError:
            wrapped = self.__dict__.get("_modules", {}).get("module")
            if wrapped is None:
                raise
            return getattr(wrapped, name)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def adapt(self, loss: torch.Tensor, first_order: bool | None = None, allow_unused: bool | None = None,
              allow_nograd: bool | None = None) -> None:
        """One SGD step of size lr on `loss`, replacing this learner's parameters by the adapted ones
        (differentiable functions of them; first order: their gradients are taken as constants).
        The options default to the learner's own."""
        first_order = self.first_order if first_order is None else first_order
        allow_unused = self.allow_unused if allow_unused is None else allow_unused
        allow_nograd = self.allow_nograd if allow_nograd is None else allow_nograd
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"adapt needs a scalar loss tensor, got {shape}")
        if not loss.requires_grad:
            raise RuntimeError("adapt: the loss does not require grad (was it computed under torch.no_grad(), "
                               "or from a learner whose parameters do not require grad?)")
        named = list(self.module.named_parameters())
        frozen = [name for name, p in named if not p.requires_grad]
        if frozen and not allow_nograd:
            raise RuntimeError(f"adapt: parameters {frozen} do not require grad; pass allow_nograd=True to "
                               f"adapt only those that do")
        adapted = [(name, p) for name, p in named if p.requires_grad]
        grads = torch.autograd.grad(loss, [p for _, p in adapted], retain_graph=not first_order,
                                    create_graph=not first_order, allow_unused=True)
        unused = [name for (name, _), g in zip(adapted, grads) if g is None]
        if unused and not allow_unused:
            raise RuntimeError(f"adapt: the loss does not depend on parameters {unused}; pass allow_unused=True "
                               f"to leave them as they are")
        _replace_parameters(self.module, {id(p): p + (-self.lr * g) for (_, p), g in zip(adapted, grads)
                                          if g is not None})

    def clone(self, first_order: bool | None = None, allow_unused: bool | None = None,
              allow_nograd: bool | None = None) -> "MAML":
        """A learner: this wrapper around a clone_module() of the model, with the given options
        (default: this wrapper's)."""
        return MAML(clone_module(self.module), lr=self.lr,
                    first_order=self.first_order if first_order is None else first_order,
                    allow_unused=self.allow_unused if allow_unused is None else allow_unused,
                    allow_nograd=self.allow_nograd if allow_nograd is None else allow_nograd)
