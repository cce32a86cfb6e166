"""Backend `cpp`: the fused C++ meta-step (pymaml::mlp_meta_step) for MLPs on the CPU.

Supported: exactly what the kernel computes, nothing that merely looks like it. The model is an
nn.Sequential itself (not a subclass) of nn.Linear layers (all with bias or all without) with one
kind of activation between them (nn.ReLU, nn.Tanh, nn.Sigmoid or nn.Identity, the classes
themselves) and none after the last; float32 or float64; loss "mse" or "cross_entropy"; every
parameter trainable. Refused, with the reason (auto then falls back to `func`, or to `reference`
for hooks torch.func cannot run; an explicit backend="cpp" raises): subclasses of these
modules, a forward or __call__ set on an instance,
parametrizations (torch.nn.utils.parametrize), module hooks of any kind that run in a forward
or backward pass (forward, forward pre-, backward and backward pre-hooks, on a layer, on the
Sequential or registered globally), hooks on a parameter (register_hook or
register_post_accumulate_grad_hook: the kernel computes every gradient itself, so they would not
run), parameters or buffers beyond the Linear layers' weights and biases, and tied layers.
Accepted, since they leave the computation as it is: state-dict and load hooks, hooks since
removed, nn.ReLU(inplace=True), non-contiguous parameters, Module.compile().

A model can change after the backend was chosen. Every call re-checks it cheaply (the hook
dicts, the class, the instance attributes, the parameters and buffers of each module; see
MlpLayout.unchanged) and runs the full acceptance again when anything moved. A model that no
longer qualifies makes `auto` choose again (maml.backend_choice then says why the fused backend
was passed over), and an explicit request raise a RuntimeError naming the layer and the reason.
"""

from __future__ import annotations

import operator
import threading
import weakref

import torch
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.modules import module as torch_module
from torch.nn.utils import parametrize
from torch.utils.dlpack import to_dlpack

from .._extension import EXTENSION_ERROR, extension
from ..numerics import functional
from ..numerics.schedule import step_size
from ..numerics.state import adapted_parameters, fixed_state
from ..ops.mlp_meta_step import NATIVE_IMPLEMENTATION, FusedImplementation, _fused_cpu, mlp_meta_step_from_parts
from .base import Backend, MetaConfig, MetaOutput, TaskBatch

ACTIVATION_NAMES = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.Identity: "none"}
MAX_LAYERS = 16
FUSED_DTYPES = (torch.float32, torch.float64)

# The hook dicts nn.Module._call_impl consults: if any is non-empty the call runs more than forward.
MODULE_HOOKS = (("_forward_hooks", "a forward hook"), ("_forward_pre_hooks", "a forward pre-hook"),
                ("_backward_hooks", "a backward hook"), ("_backward_pre_hooks", "a backward pre-hook"))
GLOBAL_HOOKS = (("_global_forward_hooks", "register_module_forward_hook"),
                ("_global_forward_pre_hooks", "register_module_forward_pre_hook"),
                ("_global_backward_hooks", "register_module_full_backward_hook"),
                ("_global_backward_pre_hooks", "register_module_full_backward_pre_hook"))
# Instance attributes through which calling a module would run something other than its class's
# forward. (Module.compile() sets _compiled_call_impl to a compiled _call_impl: the same computation.)
CALL_OVERRIDES = ("forward", "__call__", "_call_impl", "_wrapped_call_impl")


def global_hook_reason() -> str | None:
    """Why the fused kernels cannot run while global module hooks are registered, or None."""
    for attribute, register in GLOBAL_HOOKS:
        if getattr(torch_module, attribute):
            return (f"a global module hook is registered (torch.nn.modules.module.{register}); it runs in "
                    f"every module call, and the fused kernel makes none")
    return None


def _module_reason(module: nn.Module, what: str) -> str | None:
    """Why `module` may compute more than its class's forward: a hook, or a call replaced on the instance."""
    for attribute, kind in MODULE_HOOKS:
        if getattr(module, attribute):
            return f"{what} has {kind}, which the fused kernel does not run"
    overridden = [name for name in CALL_OVERRIDES if name in vars(module)]
    if overridden:
        return f"{what} has its own {overridden[0]} set on the instance; the fused kernel computes the class's forward"
    if parametrize.is_parametrized(module):
        names = sorted(module.parametrizations.keys())
        return (f"{what} has parametrized {', '.join(names)} (torch.nn.utils.parametrize); the fused kernel "
                f"takes plain weights")
    return None


def _layer_reason(name: str, module: nn.Module) -> str | None:
    """Why layer `name` of the Sequential is not exactly an nn.Linear or a supported activation."""
    if module is None:
        return f"layer {name} is None"
    what = f"layer {name} ({type(module).__name__})"
    reason = _module_reason(module, what)
    if reason is not None:
        return reason
    kind = type(module)
    if kind is not nn.Linear and kind not in ACTIVATION_NAMES:
        for base in (nn.Linear, *ACTIVATION_NAMES):
            if isinstance(module, base):
                return (f"{what} is a subclass of nn.{base.__name__}; the fused kernel takes nn.{base.__name__} "
                        f"itself (a subclass may compute something else)")
        return (f"{what} is not supported by the fused MLP kernel "
                f"(Linear with ReLU, Tanh, Sigmoid or Identity between)")
    known = ("weight", "bias") if kind is nn.Linear else ()
    extra = [key for key in module._parameters if key not in known]
    if extra:
        return f"{what} holds parameters {extra} beside its own; the fused kernel takes only a Linear's weight and bias"
    if module._buffers:
        return f"{what} holds buffers {list(module._buffers)}, which the fused kernel does not take"
    if module._modules:
        return f"{what} holds submodules {list(module._modules)}, which the fused kernel does not run"
    if kind is nn.Linear:
        weight, bias = module._parameters.get("weight"), module._parameters.get("bias")
        if weight is None:
            return f"{what} has no weight"
        if weight.dim() != 2:
            return f"{what} has a weight of shape {tuple(weight.shape)}; a Linear weight is [out, in]"
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            return f"{what} has a bias of shape {tuple(bias.shape)} for a weight of shape {tuple(weight.shape)}"
        for tensor in (weight, bias):
            if tensor is not None and type(tensor) is not nn.Parameter:
                return f"{what} holds a {type(tensor).__name__}, a subclass of nn.Parameter, which the fused kernel does not take"
    return None


class MlpLayout:
    """Widths, activation and bias of a supported MLP, its Linear layers and what a call re-checks.

    names: the parameters' names in the model, in nn.Sequential order (weight, then bias, per layer).
    """

    def __init__(self, widths: list[int], activation: str, bias: bool, linears: list[nn.Linear], model: nn.Module,
                 names: list[str]):
        self.widths, self.activation, self.bias, self.linears = widths, activation, bias, linears
        self._tables = [layer._parameters for layer in linears]
        self.num_params = sum(m * n + (n if bias else 0) for m, n in zip(widths[:-1], widths[1:]))
        self.names = names
        # What `unchanged` compares, gathered so that each comparison runs as one C loop. Nothing
        # here refers to the model itself: the caches that hold a layout are weak in the model.
        self._layers = tuple(model._modules.values())
        self._types = tuple(map(type, self._layers))
        modules = (model, *self._layers)
        # A forward set on an instance adds an entry to its __dict__.
        self._instance_dicts = tuple(map(vars, modules))
        self._instance_sizes = tuple(map(len, self._instance_dicts))
        # Dicts that must stay empty: every module's hooks and buffers, the layers' submodules (a
        # parametrization registers one), the Sequential's own parameters, and the global module
        # hooks (torch adds to and removes from all of these in place).
        self._empty_dicts = (
            *(getattr(m, attribute) for m in modules for attribute, _ in MODULE_HOOKS),
            *(m._buffers for m in modules), *(m._modules for m in self._layers), model._parameters,
            *(getattr(torch_module, attribute) for attribute, _ in GLOBAL_HOOKS))
        self._params = tuple(self.parameters())

    def parameters(self) -> list[torch.Tensor]:
        """The parameters in nn.Sequential order, read from the layers' parameter dicts, which is
        several times cheaper than Module attribute access (bench/RESULTS.md)."""
        return [t for table in self._tables for t in (table["weight"], table.get("bias")) if t is not None]

    def unchanged(self, model: nn.Module, trainable: bool = True) -> bool:
        """Whether `model` still computes what this layout describes: the same layers, of the same
        classes, with no hook, no new instance attribute (such as a forward), no buffer, submodule
        or parameter beyond a weight and a bias per Linear, and the same parameter objects; with
        `trainable`, also every parameter trainable and without hooks (what parameter_reason
        checks). False means: run the full acceptance again (the model may still qualify)."""
        if (any(self._empty_dicts) or type(model) is not nn.Sequential or tuple(model._modules.values()) != self._layers
                or tuple(map(type, self._layers)) != self._types
                or tuple(map(len, self._instance_dicts)) != self._instance_sizes
                or tuple(map(len, self._tables)) != _TWO_PER_LAYER[:len(self._tables)]):
            return False
        params = self.parameters()
        if len(params) != len(self._params) or not all(map(operator.is_, params, self._params)):
            return False
        if trainable and (not all(map(_REQUIRES_GRAD, params)) or any(map(_GRADIENT_HOOKS, params))
                          or any(map(_ACCUMULATE_HOOKS, params))):
            return False
        return True


_TWO_PER_LAYER = (2,) * MAX_LAYERS  # a Linear's parameter dict holds weight and bias (None without one)
_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_GRADIENT_HOOKS = operator.attrgetter("_backward_hooks")
_ACCUMULATE_HOOKS = operator.attrgetter("_post_accumulate_grad_hooks")


def mlp_layout(model: nn.Module) -> tuple[MlpLayout | None, str | None]:
    """The model's layout, or None and the reason it is not exactly a supported MLP (naming the
    layer). It checks the model's structure, not its parameters' trainability or hooks
    (parameter_reason)."""
    reason = global_hook_reason()
    if reason is not None:
        return None, reason
    if type(model) is not nn.Sequential:
        if isinstance(model, nn.Sequential):
            return None, (f"the model is {type(model).__name__}, a subclass of nn.Sequential; the fused kernel "
                          f"takes nn.Sequential itself (a subclass may compute something else)")
        return None, f"the fused kernel takes an nn.Sequential MLP, got {type(model).__name__}"
    reason = _module_reason(model, "the nn.Sequential")
    if reason is not None:
        return None, reason
    if model._parameters:
        return None, (f"the nn.Sequential holds parameters {list(model._parameters)} of its own; the fused kernel "
                      f"takes only its Linear layers' weights and biases")
    if model._buffers:
        return None, f"the nn.Sequential holds buffers {list(model._buffers)}, which the fused kernel does not take"
    named = list(model._modules.items())
    for name, module in named:
        reason = _layer_reason(name, module)
        if reason is not None:
            return None, reason
    layers = [module for _, module in named]
    linears = [(name, m) for name, m in named if type(m) is nn.Linear]
    if not linears:
        return None, "the model has no nn.Linear layer"
    tensors = [t for _, m in linears for t in (m.weight, m.bias) if t is not None]
    if len({id(m) for _, m in linears}) != len(linears) or len({id(t) for t in tensors}) != len(tensors):
        return None, "the fused kernel takes each Linear layer and parameter once; this model repeats one (tied weights)"
    if len(linears) > MAX_LAYERS:
        return None, f"the fused kernel takes at most {MAX_LAYERS} Linear layers, got {len(linears)}"
    widths, activations, expect_linear = [linears[0][1].weight.shape[1]], set(), True
    for index, (name, module) in enumerate(named):
        if type(module) is nn.Linear:
            fan_out, fan_in = module.weight.shape
            if not expect_linear:
                return None, f"layer {name} (Linear) follows another Linear without an activation between them"
            if fan_in != widths[-1]:
                return None, f"layer {name} (Linear) takes {fan_in} inputs after a layer of {widths[-1]}"
            widths.append(fan_out)
            expect_linear = False
        else:
            if expect_linear or index == len(layers) - 1:
                return None, f"layer {name} ({type(module).__name__}) must stand between two Linear layers"
            activations.add(ACTIVATION_NAMES[type(module)])
            expect_linear = True
    if len(activations) > 1:
        return None, f"the fused kernel takes one kind of activation, got {sorted(activations)}"
    with_bias = [name for name, m in linears if m.bias is not None]
    if with_bias and len(with_bias) != len(linears):
        without = [name for name, m in linears if m.bias is None]
        return None, (f"layer {without[0]} (Linear) has no bias but layer {with_bias[0]} has one; the fused kernel "
                      f"takes Linear layers that all have a bias or all have none")
    names = [f"{name}.{key}" for name, m in linears for key in ("weight", "bias") if m._parameters.get(key) is not None]
    named_tensors = dict(zip(names, tensors))
    for name, tensor in named_tensors.items():
        if tensor.dtype not in FUSED_DTYPES:
            return None, f"parameter {name} is {tensor.dtype}; the fused kernel takes float32 or float64 parameters"
        if tensor.dtype != tensors[0].dtype:
            return None, (f"parameter {name} is {tensor.dtype} but {names[0]} is {tensors[0].dtype}; the fused kernel "
                          f"takes parameters all of one dtype")
    if len({t.device for t in tensors}) > 1:
        return None, f"the model's parameters lie on several devices ({sorted({str(t.device) for t in tensors})})"
    activation = activations.pop() if activations else "none"
    return MlpLayout(widths, activation, bool(with_bias), [m for _, m in linears], model, names), None


_ACCEPTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def current_mlp_layout(model: nn.Module) -> tuple[MlpLayout | None, str | None]:
    """mlp_layout(model), remembered per model and reused while MlpLayout.unchanged holds."""
    try:
        cached = _ACCEPTED.get(model)
    except TypeError:  # a model that cannot be weakly referenced
        return mlp_layout(model)
    if cached is not None and cached.unchanged(model, trainable=False):
        return cached, None
    layout, reason = mlp_layout(model)
    if layout is None:
        _ACCEPTED.pop(model, None)
    else:
        _ACCEPTED[model] = layout
    return layout, reason


def parameter_reason(layout: MlpLayout) -> str | None:
    """Why the fused meta-step cannot train these parameters: a frozen one (the kernel adapts every
    parameter), or one with a hook (the kernel computes every gradient itself, inner and outer,
    without autograd, so a gradient hook or a post-accumulate-grad hook would not run)."""
    for name, p in zip(layout.names, layout.parameters()):
        if not p.requires_grad:
            return f"parameter {name} is frozen (requires_grad=False); the fused kernel adapts every parameter"
        if p._backward_hooks:
            return (f"parameter {name} has a gradient hook (register_hook); the fused kernel computes its "
                    f"gradients without autograd, so the hook would not run")
        if p._post_accumulate_grad_hooks:
            return (f"parameter {name} has a post-accumulate-grad hook; the fused kernel writes .grad without "
                    f"autograd, so the hook would not run")
    return None


def _adam_fusable(optimizer, params) -> bool:
    """Whether the kernel can take this optimizer's step: torch.optim.Adam itself, one group over
    exactly these parameters in this order, plain-number hyperparameters, no amsgrad, maximize,
    capturable, differentiable or decoupled weight decay, and every parameter's state either
    empty or holding moments of its shape and one common step."""
    if type(optimizer) is not torch.optim.Adam or len(optimizer.param_groups) != 1:
        return False
    if not _adam_step_is_plain(optimizer):
        return False
    group = optimizer.param_groups[0]
    if len(group["params"]) != len(params) or any(a is not b for a, b in zip(group["params"], params)):
        return False
    if _adam_flags(group) != _FUSABLE_FLAGS:
        return False
    def number(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if not all(number(group[key]) for key in ("lr", "eps", "weight_decay")) or not all(map(number, group["betas"])):
        return False
    states = [optimizer.state.get(p) for p in params]
    if all(not state for state in states):
        return all(p.dtype == params[0].dtype and p.device.type == "cpu" for p in params)
    steps = set()
    for p, state in zip(params, states):
        if not state or set(state) != {"step", "exp_avg", "exp_avg_sq"}:
            return False
        for key in ("exp_avg", "exp_avg_sq"):
            moment = state[key]
            if moment.shape != p.shape or moment.dtype != p.dtype or not moment.is_contiguous():
                return False
        steps.add(float(state["step"]))
    return len(steps) == 1 and all(p.is_contiguous() for p in params)


def _adam_step_dtype(fused: bool) -> torch.dtype:
    """The dtype torch.optim.Adam gives a new step counter (torch's _get_scalar_dtype)."""
    return torch.float64 if not fused and torch.get_default_dtype() == torch.float64 else torch.float32


def _grads_writable(params) -> bool:
    """Whether every parameter has a .grad the kernel may overwrite: contiguous, of its shape and dtype."""
    for p in params:
        grad = p.grad
        if grad is None or grad.shape != p.shape or grad.dtype != p.dtype or not grad.is_contiguous():
            return False
    return True


_DATA_PTR, _SIZE, _IS_CONTIGUOUS = torch.Tensor.data_ptr, torch.Tensor.size, torch.Tensor.is_contiguous


def _storage_signature(tensors) -> tuple:
    """Where each tensor's data lies and its sizes (what a native plan's held buffers stand for);
    list(map(...)) over the C methods keeps this cheap."""
    return list(map(_DATA_PTR, tensors)), list(map(_SIZE, tensors))


def _laid_out_as_planned(tensors, signature) -> bool:
    """Whether the tensors still have the planned data pointers and sizes and are contiguous: a
    plan holds only contiguous buffers, and same sizes and contiguous means the same strides
    (but for dimensions of size 1, where a stride addresses nothing)."""
    return _storage_signature(tensors) == signature and all(map(_IS_CONTIGUOUS, tensors))


class _Plan:
    """A native MlpPlan and what it was built from: the parameters, the gradient buffers it
    writes, the Adam state it updates and the settings it bakes in. The native plan holds DLPack
    views of these tensors, whose memory stays allocated while it lives; a tensor that keeps its
    identity but gets new storage or strides (.data =, set_, share_memory_, a transpose) no longer
    uses that memory. So a call uses the plan only after `matches` confirms the same tensors, each
    with the data pointer, sizes and strides it had when the plan was built."""

    def __init__(self, native, settings, params, grads, adam_state):
        self.native, self.settings, self.params, self.grads = native, settings, params, grads
        self.adam_state = adam_state  # per parameter (exp_avg, exp_avg_sq, step), or None
        self.tensors = [*params, *grads, *(t for state in adam_state or () for t in state)]
        self.signature = _storage_signature(self.tensors)

    def matches(self, settings, params, optimizer) -> bool:
        if settings != self.settings or len(params) != len(self.params):
            return False
        for p, planned, grad in zip(params, self.params, self.grads):
            if p is not planned or not p.requires_grad:
                return False
            if p.grad is not grad:  # replaced, or set to None: new buffers, which the caller may not hold
                return False
        if optimizer is not None:
            if not _adam_step_is_plain(optimizer):
                return False
            groups = optimizer.param_groups
            if len(groups) != 1 or _adam_flags(groups[0]) != _FUSABLE_FLAGS:
                return False
            group_params, state = groups[0]["params"], optimizer.state
            if len(group_params) != len(params):
                return False
            for p, planned_p, (exp_avg, exp_avg_sq, step) in zip(group_params, params, self.adam_state):
                entry = state.get(p)
                if (p is not planned_p or entry is None or entry.get("exp_avg") is not exp_avg
                        or entry.get("exp_avg_sq") is not exp_avg_sq or entry.get("step") is not step):
                    return False
        return _laid_out_as_planned(self.tensors, self.signature)


_ADAM_FLAGS = ("amsgrad", "maximize", "capturable", "differentiable", "decoupled_weight_decay")
_FUSABLE_FLAGS = (False, False, False, False, False)


def _adam_step_is_plain(optimizer) -> bool:
    """Whether optimizer.step() would do nothing but the Adam update: no step hooks of its own or
    global ones, and no step replaced on the instance (as LR schedulers do to count steps)."""
    from torch.optim import optimizer as optimizer_module

    return not (optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks
                or optimizer_module._global_optimizer_pre_hooks or optimizer_module._global_optimizer_post_hooks
                or "step" in vars(optimizer))


def _adam_flags(group) -> tuple:
    return tuple(bool(group.get(flag)) for flag in _ADAM_FLAGS)


class CppBackend(Backend):
    name = "cpp"
    checks_finite_inputs = True  # the binding scans x and y before the kernel runs

    def __init__(self):
        # Per model: its layout, re-checked on every call (see _layout), and constant step sizes and weights.
        self._layouts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._constants: dict = {}
        # Native plans (see _plan): per model for meta_gradient, per optimizer for meta_train_step.
        self._plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # The (model, layout) that changed_reason has just checked in this thread: MAML checks
        # the model before every call, and the call's _layout then takes that check's result
        # once instead of checking again.
        self._checked = threading.local()

    def _layout(self, model: nn.Module) -> MlpLayout:
        """The model's layout, re-checked on every call: MlpLayout.unchanged where nothing moved,
        else the full acceptance (mlp_layout and parameter_reason); raises if the model no longer
        qualifies."""
        checked = getattr(self._checked, "entry", None)
        if checked is not None:
            self._checked.entry = None
            if checked[0] is model:
                return checked[1]
        cached = self._layouts.get(model)
        if cached is not None and cached.unchanged(model):
            return cached
        self._layouts.pop(model, None)
        layout, reason = self._accept(model)
        if reason is not None:
            raise RuntimeError(f"backend {self.name!r} cannot run this model: {reason}")
        self._layouts[model] = layout
        return layout

    def changed_reason(self, model, config, device):
        self._checked.entry = None
        cached = self._layouts.get(model)
        if cached is not None and cached.unchanged(model):
            self._checked.entry = (model, cached)
            return None
        layout, reason = self._accept(model)
        if reason is None:
            self._layouts[model] = layout
            self._checked.entry = (model, layout)
        return reason

    def _constant(self, kind: str, like: torch.Tensor, steps: int, num_params: int, inner_lr: float = 0.0):
        """Tensors that only depend on the shapes, built once and reused: kind "lrs" is α = inner_lr
        for every step and parameter ([S, P]); kind "weights" is (0, ..., 0, 1) ([S])."""
        key = (kind, steps, num_params, float(inner_lr), like.dtype, like.device)
        if key not in self._constants:
            if kind == "lrs":
                value = like.new_full((steps, num_params), float(inner_lr))
            else:
                value = like.new_zeros(steps)
                if steps:
                    value[-1] = 1.0
            if len(self._constants) > 64:  # settings rarely change; keep the cache small
                self._constants.clear()
            self._constants[key] = value
        return self._constants[key]

    def _plan(self, model, config: MetaConfig, inner_lr, step_weights, optimizer=None) -> _Plan | None:
        """The held native plan for this model (and Adam optimizer), built or rebuilt when anything
        it holds changed; None where the call needs the general path (another backend name,
        torch.compile, learned or scheduled step sizes, step weights, a callable loss, a non-Adam
        or unfusable optimizer)."""
        if (self.name != "cpp" or torch.compiler.is_compiling() or not isinstance(inner_lr, (int, float))
                or step_weights is not None or not isinstance(config.loss, str)):
            return None
        layout = self._layout(model)
        params = layout.parameters()
        settings = (config, float(inner_lr), tuple(layout.widths), layout.activation, layout.bias)
        owner = model if optimizer is None else optimizer
        plan = self._plans.get(owner)
        if plan is not None and plan.matches(settings, params, optimizer):
            return plan
        self._plans.pop(owner, None)
        if not all(p.requires_grad for p in params) or params[0].device.type != "cpu":
            return None
        if any(not p.is_contiguous() or p.dtype != params[0].dtype for p in params):
            return None
        adam = None
        if optimizer is not None:
            if not _adam_fusable(optimizer, params):
                return None
            states = [optimizer.state[p] for p in params]
            if not states[0]:
                for p, state in zip(params, states):
                    state["step"] = torch.zeros((), dtype=_adam_step_dtype(bool(optimizer.param_groups[0].get("fused"))))
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            if any(s["step"].device.type != "cpu" or s["step"].numel() != 1 for s in states):
                return None
            adam = [(s["exp_avg"], s["exp_avg_sq"], s["step"]) for s in states]
        with torch.no_grad():
            for p in params:
                if p.grad is None or p.grad.shape != p.shape or p.grad.dtype != p.dtype or not p.grad.is_contiguous():
                    p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)
        grads = [p.grad for p in params]
        # Detached views: the plan's buffers keep their storage alive even if a tensor is later
        # given new storage (the signature check then rebuilds the plan).
        def views(tensors):
            return [t.detach() for t in tensors]

        native = extension().MlpPlan(
            widths=layout.widths, activation=layout.activation, bias=layout.bias, loss=config.loss,
            first_order=config.first_order, steps=config.inner_steps, inner_lr=float(inner_lr),
            params=views(params), grads=views(grads),
            adam_exp_avg=None if adam is None else views(a[0] for a in adam),
            adam_exp_avg_sq=None if adam is None else views(a[1] for a in adam),
            adam_steps=None if adam is None else views(a[2] for a in adam))
        plan = self._plans[owner] = _Plan(native, settings, params, grads, adam)
        return plan

    def _run_plan(self, plan: _Plan, batch: TaskBatch, optimizer=None) -> MetaOutput:
        losses = plan.params[0].new_empty(batch.support_x.shape[0] + 2)
        capsules = [to_dlpack(t.contiguous()) for t in batch]
        if optimizer is None:
            plan.native.run(*capsules, to_dlpack(losses), torch.get_num_threads())
        else:
            group = optimizer.param_groups[0]
            beta1, beta2 = group["betas"]
            plan.native.run(*capsules, to_dlpack(losses), torch.get_num_threads(), group["lr"], beta1, beta2,
                            group["eps"], group["weight_decay"])
        return MetaOutput(losses[0], losses[2:], losses[1], self.name)

    def implementation(self) -> FusedImplementation:
        """The kernel behind pymaml::mlp_meta_step this backend calls."""
        return NATIVE_IMPLEMENTATION

    def unavailable_reason(self):
        return None if extension() is not None else EXTENSION_ERROR

    def unsupported_reason(self, model, config: MetaConfig, device):
        if torch.device(device).type != "cpu":
            return f"the fused C++ kernel runs on the CPU, not on {device}"
        if not isinstance(config.loss, str):
            return "the fused kernel supports loss='mse' or 'cross_entropy', not a callable"
        return self._accept(model)[1]

    def _accept(self, model: nn.Module) -> tuple[MlpLayout | None, str | None]:
        """The layout of a model this backend computes exactly, or None and why not (naming the
        layer or parameter); the device and the loss aside."""
        layout, reason = mlp_layout(model)
        if reason is None:
            reason = parameter_reason(layout)
        return (layout, None) if reason is None else (None, reason)

    def _arguments(self, model, config: MetaConfig, batch: TaskBatch, inner_lr, step_weights):
        """The layout, the parameters and the fused op's step sizes [S, P] and step weights [S]."""
        layout = self._layout(model)
        params = layout.parameters()
        width = layout.widths[0]
        if batch.support_x.dim() != 3 or batch.support_x.shape[2] != width:
            raise ValueError(f"support_x must be [T, K, {width}] for this MLP, got {tuple(batch.support_x.shape)}")
        if batch.query_x.dim() != 3 or batch.query_x.shape[2] != width:
            raise ValueError(f"query_x must be [T, K, {width}] for this MLP, got {tuple(batch.query_x.shape)}")
        like, steps = params[0], config.inner_steps  # like: the dtype and device of θ
        if isinstance(inner_lr, (int, float)):
            lrs = self._constant("lrs", like, steps, layout.num_params, inner_lr)
        else:  # α_s per parameter element, [S, P]; differentiable towards the learned step sizes
            names = list(adapted_parameters(model))
            lrs = torch.stack([
                torch.cat([torch.as_tensor(step_size(inner_lr, s, name), dtype=like.dtype).expand(p.shape).reshape(-1)
                           for name, p in zip(names, params)])
                for s in range(steps)
            ]) if steps else like.new_zeros(0, layout.num_params)
        if step_weights is None:
            step_weights = self._constant("weights", like, steps, layout.num_params)
        return layout, params, lrs, step_weights

    def meta_step(self, model, config: MetaConfig, batch: TaskBatch, inner_lr, step_weights) -> MetaOutput:
        layout, params, lrs, step_weights = self._arguments(model, config, batch, inner_lr, step_weights)
        meta_loss, task_losses, pre_losses, *_ = mlp_meta_step_from_parts(
            params, lrs, step_weights, *batch, layout.widths, layout.activation, layout.bias, config.loss,
            config.first_order, lrs.requires_grad, all_step_losses=False, implementation=self.implementation(),
        )
        return MetaOutput(meta_loss, task_losses, pre_losses.mean(), self.name)

    def meta_gradient(self, model, config: MetaConfig, batch: TaskBatch, inner_lr, step_weights,
                      accumulate: bool = True) -> MetaOutput:
        """The fused op's gradients go straight into .grad: no autograd graph over the parameters
        (on small models that is a large share of a step; bench/RESULTS.md). Learned step sizes
        and weights still receive theirs through autograd, from the op's gradients."""
        if torch.compiler.is_compiling():
            return super().meta_gradient(model, config, batch, inner_lr, step_weights, accumulate)
        if not accumulate:
            plan = self._plan(model, config, inner_lr, step_weights)
            if plan is not None:
                return self._run_plan(plan, batch)
        layout, params, lrs, step_weights = self._arguments(model, config, batch, inner_lr, step_weights)
        arguments = (lrs, step_weights, *batch, layout.widths, layout.activation, layout.bias, config.loss,
                     config.first_order, lrs.requires_grad)
        with torch.no_grad():
            # torch's C++ flatten/unflatten of a parameter list (as DDP uses), cheaper than cat,
            # split and view from Python.
            theta = _flatten_dense_tensors(params)
            if not accumulate and theta.device.type == "cpu" and self.name == "cpp" and _grads_writable(params):
                # The kernel writes each parameter's gradient into its existing .grad.
                meta_loss, task_losses, pre_losses, step_losses, _, grad_lrs = _fused_cpu(
                    theta, *arguments, step_weights.requires_grad, [p.grad for p in params])
            else:
                meta_loss, task_losses, pre_losses, step_losses, grad_theta, grad_lrs = self.implementation().forward(
                    theta, *arguments, all_step_losses=step_weights.requires_grad)
                for p, grad in zip(params, _unflatten_dense_tensors(grad_theta, params)):
                    if p.grad is None or not accumulate:
                        p.grad = grad
                    else:
                        p.grad += grad
        if lrs.requires_grad:
            torch.autograd.backward(lrs, grad_lrs)
        if step_weights.requires_grad:
            torch.autograd.backward(step_weights, step_losses)
        return MetaOutput(meta_loss, task_losses, pre_losses.mean(), self.name)

    def meta_train_step(self, model, config: MetaConfig, batch: TaskBatch, inner_lr, step_weights, optimizer):
        """With a plain torch.optim.Adam over exactly the model's parameters, the kernel takes the
        Adam step itself, in place on the parameters and the optimizer's own state (which stays
        valid for optimizer.step() and state_dict()); otherwise meta_gradient then optimizer.step().
        On small models that saves most of the cost of torch's fused Adam step (bench/RESULTS.md)."""
        plan = self._plan(model, config, inner_lr, step_weights, optimizer)
        if plan is None:
            return super().meta_train_step(model, config, batch, inner_lr, step_weights, optimizer)
        return self._run_plan(plan, batch, optimizer)

    def adapt(self, model, config, support_x, support_y, steps, inner_lr):
        return functional.adapt(
            model, adapted_parameters(model), fixed_state(model), support_x, support_y,
            inner_lr=inner_lr, steps=steps, first_order=config.first_order, loss_fn=config.loss_fn,
        )


class CudaBackend(CppBackend):
    """Backend `cuda`: the same fused meta-step, compiled with nvcc from the same per-task headers,
    one thread block per task and one kernel launch per meta-step, on CUDA tensors."""

    name = "cuda"
    checks_finite_inputs = False  # device memory is not read on the host

    def unavailable_reason(self):
        from ..ops.mlp_meta_step import cuda_kernel_available

        if extension() is None:
            return EXTENSION_ERROR
        if not cuda_kernel_available():
            return "pymaml._C was built without CUDA (no nvcc at build time, or PYMAML_CUDA=0)"
        if not torch.cuda.is_available():
            return "torch sees no CUDA device"
        return None

    def unsupported_reason(self, model, config: MetaConfig, device):
        if torch.device(device).type != "cuda":
            return f"the CUDA kernel runs on CUDA tensors, not on {device}"
        return super().unsupported_reason(model, config, torch.device("cpu"))


BACKEND = CppBackend()
CUDA_BACKEND = CudaBackend()
