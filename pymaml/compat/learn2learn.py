"""learn2learn's MAML and MetaSGD wrappers and module utilities (version 0.2.0), without learn2learn.

Covered: learn2learn.algorithms.MAML, maml_update, MetaSGD, meta_sgd_update, and
learn2learn.utils.clone_module, clone_parameters, clone_named_parameters, update_module,
detach_module.

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
- MetaSGD (Li et al. 2017) learns one step size per parameter entry: lrs[i] has parameter i's
  shape, starts at lr, and adapt(loss) takes p_i ← p_i − lrs[i] ⊙ ∂loss/∂p_i. clone() clones the
  module and the step sizes, so the query loss differentiates into both θ and the step sizes
  (first_order drops only the Hessian terms: the step sizes still get ∂L/∂lrs = −g ⊙ ∂L/∂p′).
  MetaSGD adapts every parameter, as learn2learn's does.
Where learn2learn prints a traceback and then fails on an unbound variable (a parameter that
does not require grad, or an unused one), this module raises an error that names the parameter
and the option that allows it. Where learn2learn prints a warning and goes on with the shorter of
two lists (updates, gradients or step sizes that do not match the parameters one for one), or
would broadcast an update to a different shape than its parameter's, this module raises.
A parameter shared between modules stays shared through meta_sgd_update as through update_module
(learn2learn's meta_sgd_update updates only its first occurrence).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

__all__ = ["MAML", "MetaSGD", "clone_module", "clone_named_parameters", "clone_parameters", "detach_module",
           "maml_update", "meta_sgd_update", "update_module"]


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


def _swap_tensors(model: nn.Module, new: dict[int, torch.Tensor]) -> None:
    """Swaps every parameter and buffer t of the module tree for new[id(t)], where given."""
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for key, tensor in list(table.items()):
                if tensor is not None and id(tensor) in new:
                    table[key] = new[id(tensor)]
        _refresh_flat_weights(module)


def _unique_tensors(model: nn.Module):
    """(name, tensor) for every parameter and buffer of the tree, each tensor once (first name)."""
    seen = set()
    for module_name, module in model.named_modules(remove_duplicate=False):
        for table in (module._parameters, module._buffers):
            for key, tensor in table.items():
                if tensor is not None and id(tensor) not in seen:
                    seen.add(id(tensor))
                    yield (f"{module_name}.{key}" if module_name else key), tensor


def _check_update_shape(what: str, name: str, param: torch.Tensor, update) -> None:
    # p + u with u of another shape would broadcast p to a different shape without a word.
    if isinstance(update, (int, float)) and not isinstance(update, bool):
        return
    if not isinstance(update, torch.Tensor):
        raise TypeError(f"{what} for parameter {name} must be a tensor or a number, got {type(update).__name__}")
    try:
        shape = torch.broadcast_shapes(param.shape, update.shape)
    except RuntimeError:
        shape = None
    if shape != param.shape:
        raise ValueError(f"{what} for parameter {name} has shape {tuple(update.shape)}, which does not broadcast "
                         f"to the parameter's shape {tuple(param.shape)}")


def _check_count(function: str, what: str, params: list, values: list) -> None:
    if len(values) != len(params):
        raise ValueError(f"{function}: the model has {len(params)} parameters but {len(values)} {what} were given")


def clone_parameters(param_list) -> list[torch.Tensor]:
    """[p.clone() for p in param_list]: differentiable copies (learn2learn.utils.clone_parameters)."""
    params = list(param_list)
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"clone_parameters: entry {i} is a {type(p).__name__}, not a tensor")
    return [p.clone() for p in params]


def clone_named_parameters(param_dict) -> dict[str, torch.Tensor]:
    """{name: p.clone()} (learn2learn.utils.clone_named_parameters)."""
    for name, p in param_dict.items():
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"clone_named_parameters: {name!r} is a {type(p).__name__}, not a tensor")
    return {name: p.clone() for name, p in param_dict.items()}


def update_module(module: nn.Module, updates=None, memo=None) -> nn.Module:
    """p ← p + u for every parameter p of `module` (learn2learn.utils.update_module).

    updates: one tensor or None per parameter, in module.parameters() order; None leaves that
    parameter as it is. Without `updates`, each parameter or buffer t with a tensor `t.update`
    attribute becomes t + t.update, and the attribute is reset to None (learn2learn's protocol).
    The module is updated in place (its tensors are replaced by new ones, so the update stays
    differentiable) and returned; a parameter shared between modules is updated once and stays
    shared. `memo` is accepted for learn2learn's signature; sharing is tracked here regardless.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"update_module needs an nn.Module, got {type(module).__name__}")
    new = {}
    if updates is not None:
        named = list(module.named_parameters())
        updates = list(updates)
        _check_count("update_module", "updates", named, updates)
        for (name, p), u in zip(named, updates):
            if u is not None:
                _check_update_shape("update_module: the update", name, p, u)
                new[id(p)] = p + u
    else:
        for name, tensor in _unique_tensors(module):
            u = getattr(tensor, "update", None)
            if u is not None:
                _check_update_shape("update_module: the .update attribute", name, tensor, u)
                new[id(tensor)] = tensor + u
                tensor.update = None
    _swap_tensors(module, new)
    return module


def detach_module(module: nn.Module, keep_requires_grad: bool = False) -> None:
    """Detaches every parameter, and every buffer that requires grad, from its graph, in place
    (learn2learn.utils.detach_module): gradients no longer reach what the module was cloned
    from. The parameters then do not require grad, unless keep_requires_grad and they did."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"detach_module needs an nn.Module, got {type(module).__name__}")
    detached_views = {}
    for sub in module.modules():
        for table, only_if_grad in ((sub._parameters, False), (sub._buffers, True)):
            for key, tensor in list(table.items()):
                if tensor is None or (only_if_grad and not tensor.requires_grad):
                    continue
                requires_grad = tensor.requires_grad
                if tensor._is_view():
                    # A view cannot be detached in place; its detached copy replaces it everywhere.
                    if id(tensor) not in detached_views:
                        detached_views[id(tensor)] = tensor.detach()
                    table[key] = tensor = detached_views[id(tensor)]
                else:
                    tensor.detach_()
                if keep_requires_grad and requires_grad:
                    tensor.requires_grad_()
        _refresh_flat_weights(sub)


def maml_update(model: nn.Module, lr, grads=None) -> nn.Module:
    """p ← p − lr·g for every parameter p of `model` (in model.parameters() order) whose g is not
    None; the module is updated in place (its tensors are replaced, not modified) and returned.
    Without `grads`, update_module(model) applies the tensors' `.update` attributes."""
    if grads is None:
        return update_module(model)
    params = list(model.parameters())
    grads = list(grads)
    _check_count("maml_update", "gradients", params, grads)
    return update_module(model, [None if g is None else -lr * g for g in grads])


def _attached_grad(tensor: torch.Tensor):
    # learn2learn's protocol stores gradients in .grad, also on non-leaf tensors (the cloned ones),
    # whose .grad access otherwise warns.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return tensor.grad


def meta_sgd_update(model: nn.Module, lrs=None, grads=None) -> nn.Module:
    """p ← p − lr ⊙ g for every parameter p of `model` with its step size lr and gradient g (both
    in model.parameters() order; g None leaves p as it is), in place, returned
    (learn2learn.algorithms.meta_sgd_update). Without `lrs` and `grads`, every parameter or
    buffer t with both `t._lr` and `t.grad` set becomes t − t._lr ⊙ t.grad, and both are reset."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"meta_sgd_update needs an nn.Module, got {type(model).__name__}")
    if (lrs is None) != (grads is None):
        raise ValueError("meta_sgd_update: give both lrs and grads (one per parameter), or neither to use the "
                         "parameters' ._lr and .grad attributes")
    new = {}
    if grads is not None:
        named = list(model.named_parameters())
        lrs, grads = list(lrs), list(grads)
        _check_count("meta_sgd_update", "step sizes", named, lrs)
        _check_count("meta_sgd_update", "gradients", named, grads)
        for (name, p), lr, g in zip(named, lrs, grads):
            if g is not None:
                _check_update_shape("meta_sgd_update: the step size", name, p, lr)
                _check_update_shape("meta_sgd_update: the gradient", name, p, g)
                new[id(p)] = p - lr * g
    else:
        for name, tensor in _unique_tensors(model):
            lr = getattr(tensor, "_lr", None)
            g = _attached_grad(tensor) if lr is not None else None
            if g is not None:
                _check_update_shape("meta_sgd_update: the ._lr attribute", name, tensor, lr)
                new[id(tensor)] = tensor - lr * g
                tensor.grad = None
                tensor._lr = None
    _swap_tensors(model, new)
    return model


def _check_adaptable(caller: str, named: list, option_hint: str) -> None:
    frozen = [name for name, p in named if not p.requires_grad]
    if frozen:
        raise RuntimeError(f"{caller}: parameters {frozen} do not require grad; {option_hint}")


def _check_scalar_loss(caller: str, loss) -> None:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"{caller} needs a scalar loss tensor, got {shape}")
    if not loss.requires_grad:
        raise RuntimeError(f"{caller}: the loss does not require grad (was it computed under torch.no_grad(), "
                           "or from a learner whose parameters do not require grad?)")


class _Learner(nn.Module):
    """learn2learn's BaseLearner: forward is the wrapped module's, and so are attributes the
    wrapper lacks."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            wrapped = self.__dict__.get("_modules", {}).get("module")
            if wrapped is None:
                raise
            return getattr(wrapped, name)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _check_model_and_lr(model, lr) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float, torch.Tensor)):
        raise TypeError(f"lr must be a number or a tensor, got {type(lr).__name__}")


class MAML(_Learner):
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
        _check_model_and_lr(model, lr)
        self.module = model
        self.lr = lr
        self.first_order = first_order
        self.allow_nograd = allow_nograd
        self.allow_unused = allow_nograd if allow_unused is None else allow_unused

    def adapt(self, loss: torch.Tensor, first_order: bool | None = None, allow_unused: bool | None = None,
              allow_nograd: bool | None = None) -> None:
        """One SGD step of size lr on `loss`, replacing this learner's parameters by the adapted ones
        (differentiable functions of them; first order: their gradients are taken as constants).
        The options default to the learner's own."""
        first_order = self.first_order if first_order is None else first_order
        allow_unused = self.allow_unused if allow_unused is None else allow_unused
        allow_nograd = self.allow_nograd if allow_nograd is None else allow_nograd
        _check_scalar_loss("adapt", loss)
        named = list(self.module.named_parameters())
        if not allow_nograd:
            _check_adaptable("adapt", named, "pass allow_nograd=True to adapt only those that do")
        adapted = [(name, p) for name, p in named if p.requires_grad]
        grads = torch.autograd.grad(loss, [p for _, p in adapted], retain_graph=not first_order,
                                    create_graph=not first_order, allow_unused=True)
        unused = [name for (name, _), g in zip(adapted, grads) if g is None]
        if unused and not allow_unused:
            raise RuntimeError(f"adapt: the loss does not depend on parameters {unused}; pass allow_unused=True "
                               f"to leave them as they are")
        _swap_tensors(self.module, {id(p): p + (-self.lr * g) for (_, p), g in zip(adapted, grads) if g is not None})

    def clone(self, first_order: bool | None = None, allow_unused: bool | None = None,
              allow_nograd: bool | None = None) -> "MAML":
        """A learner: this wrapper around a clone_module() of the model, with the given options
        (default: this wrapper's)."""
        return MAML(clone_module(self.module), lr=self.lr,
                    first_order=self.first_order if first_order is None else first_order,
                    allow_unused=self.allow_unused if allow_unused is None else allow_unused,
                    allow_nograd=self.allow_nograd if allow_nograd is None else allow_nograd)


class MetaSGD(_Learner):
    """learn2learn.algorithms.MetaSGD (Li et al. 2017): MAML with a learned step size per
    parameter entry.

    model: the nn.Module to meta-learn. maml.parameters() are its parameters followed by the step
    sizes (an nn.ParameterList `lrs`, one tensor of each parameter's shape, in model.parameters()
    order), so one optimizer meta-learns both; maml(x) is model(x).
    lr: the value every step size starts at.
    first_order: adapt without differentiating through the inner gradients.
    lrs: the step sizes to use instead (one tensor per parameter, each of a shape that
    broadcasts to its parameter's); clone() passes the cloned ones.
    """

    def __init__(self, model: nn.Module, lr=1.0, first_order: bool = False, lrs=None):
        super().__init__()
        _check_model_and_lr(model, lr)
        named = list(model.named_parameters())
        if lrs is None:
            if isinstance(lr, torch.Tensor) and lr.numel() != 1:
                raise ValueError(f"lr must be a single number (the step sizes' initial value), got a tensor of "
                                 f"shape {tuple(lr.shape)}; pass lrs= for per-parameter values")
            initial = float(lr)
            lrs = nn.ParameterList([nn.Parameter(torch.full_like(p.detach(), initial)) for _, p in named])
        else:
            if isinstance(lrs, torch.Tensor):
                raise TypeError("lrs must be a list of tensors, one per parameter, not a single tensor")
            lrs = lrs if isinstance(lrs, nn.ParameterList) else list(lrs)
            _check_count("MetaSGD", "step sizes (lrs)", named, list(lrs))
            for (name, p), step in zip(named, lrs):
                # clone() clones the step sizes, so they must be tensors (as in learn2learn).
                if not isinstance(step, torch.Tensor):
                    raise TypeError(f"MetaSGD: the step size for parameter {name} must be a tensor, got "
                                    f"{type(step).__name__}")
                _check_update_shape("MetaSGD: the step size", name, p, step)
        self.module = model
        self.lrs = lrs
        self.first_order = first_order

    def clone(self) -> "MetaSGD":
        """A learner: a MetaSGD around clone_module(model) with clone_parameters(lrs), so the
        query loss differentiates into the original parameters and step sizes."""
        return MetaSGD(clone_module(self.module), lrs=clone_parameters(self.lrs), first_order=self.first_order)

    def adapt(self, loss: torch.Tensor, first_order: bool | None = None) -> None:
        """One Meta-SGD step p ← p − lr ⊙ ∂loss/∂p on every parameter, replacing this learner's
        parameters by the adapted ones (first order: the gradients are taken as constants)."""
        first_order = self.first_order if first_order is None else first_order
        _check_scalar_loss("adapt", loss)
        named = list(self.module.named_parameters())
        _check_adaptable("adapt", named, "MetaSGD adapts every parameter (wrap only the part to adapt, or "
                                         "use MAML with allow_nograd=True)")
        grads = torch.autograd.grad(loss, [p for _, p in named], retain_graph=not first_order,
                                    create_graph=not first_order, allow_unused=True)
        unused = [name for (name, _), g in zip(named, grads) if g is None]
        if unused:
            raise RuntimeError(f"adapt: the loss does not depend on parameters {unused}; MetaSGD adapts every "
                               f"parameter (use MAML with allow_unused=True to leave them as they are)")
        meta_sgd_update(self.module, self.lrs, grads)
