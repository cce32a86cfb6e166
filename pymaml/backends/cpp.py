"""Backend `cpp`: the fused C++ meta-step (pymaml::meta_step) on the CPU, for MLPs and for
networks of convolutions, batch norms, pooling, linear layers and activations.

Supported: exactly what the kernel computes, nothing that merely looks like it; pymaml/backends/
layout.py lists the layers and settings, what is refused and why, and what each call re-checks.
Loss "mse" or "cross_entropy"; every parameter trainable. A model that no longer qualifies makes
`auto` choose again (maml.backend_choice then says why the fused backend was passed over), and
an explicit request raise a RuntimeError naming the layer and the reason. Each point's input is
[n] for a network that starts with a Linear or a BatchNorm1d, or [C, H, W] for one that starts with
an image layer; a network is encoded once per input shape (NetworkLayout.network).
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.utils.dlpack import to_dlpack

from .._extension import EXTENSION_ERROR, extension
from ..numerics import functional
from ..numerics.schedule import step_size
from ..numerics.state import adapted_parameters, fixed_state
from ..ops.meta_step import NATIVE_IMPLEMENTATION, FusedImplementation, meta_step_from_parts
from ..ops.meta_step.cpu import fused_cpu
from .base import Backend, MetaConfig, MetaOutput, TaskBatch
from .layout import (
    ACTIVATION_NAMES,
    FUSED_DTYPES,
    MAX_LAYERS,
    MlpLayout,
    NetworkLayout,
    current_mlp_layout,
    global_hook_reason,
    mlp_layout,
    parameter_reason,
)

# The acceptance's names, as this module has always given them (they live in layout.py).
__all__ = ["ACTIVATION_NAMES", "BACKEND", "CUDA_BACKEND", "CppBackend", "CudaBackend", "FUSED_DTYPES", "MAX_LAYERS",
           "MlpLayout", "NetworkLayout", "current_mlp_layout", "global_hook_reason", "mlp_layout", "mlp_only_reason",
           "parameter_reason"]

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
    """A native MetaStepPlan and what it was built from: the parameters, the gradient buffers it
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


def _flat_points(batch: TaskBatch) -> TaskBatch:
    """The batch with each point's input flattened: x [T, K, ...] as [T, K, n_0] (a view where x is
    contiguous), as the fused op takes it."""
    support_x, support_y, query_x, query_y = batch
    if support_x.dim() == 3 and query_x.dim() == 3:
        return batch
    return TaskBatch(support_x.reshape(*support_x.shape[:2], -1), support_y,
                     query_x.reshape(*query_x.shape[:2], -1), query_y)


def mlp_only_reason(backend: str) -> str:
    return (f"backend {backend!r} computes MLPs (Linear layers with one kind of ReLU, Tanh, Sigmoid or Identity "
            f"between them); this network runs fused on 'cpp'")


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
        value = self._constants.get(key)  # one lookup: another thread may clear the cache at any moment
        if value is None:
            if kind == "lrs":
                value = like.new_full((steps, num_params), float(inner_lr))
            else:
                value = like.new_zeros(steps)
                if steps:
                    value[-1] = 1.0
            if len(self._constants) > 64:  # settings rarely change; keep the cache small
                self._constants.clear()
            self._constants[key] = value
        return value

    @staticmethod
    def _network(layout, config: MetaConfig, batch: TaskBatch):
        """(layers, layer_constants) of the fused op for this batch's points, after checking
        that support_x and query_x are [T, K, *point] with one point shape the model takes."""
        point_shape = tuple(batch.support_x.shape[2:])
        if batch.support_x.dim() < 3:
            raise ValueError(f"support_x must be [T, K, ...], got {tuple(batch.support_x.shape)}")
        if layout.is_mlp and point_shape != (layout.widths[0],):
            width = layout.widths[0]
            raise ValueError(f"support_x must have shape [T, K, {width}] for this MLP, got "
                             f"{tuple(batch.support_x.shape)}")
        if tuple(batch.query_x.shape[2:]) != point_shape or batch.query_x.dim() < 3:
            raise ValueError(f"query_x must be [T, K, {', '.join(map(str, point_shape))}] like support_x, got "
                             f"{tuple(batch.query_x.shape)}")
        layers, constants = layout.network(point_shape)
        layout.check_points(point_shape, batch.support_x.shape[1], batch.query_x.shape[1], config.inner_steps)
        return layers, constants

    def _plan(self, model, config: MetaConfig, batch: TaskBatch, inner_lr, step_weights,
              optimizer=None) -> _Plan | None:
        """The held native plan for this model (and Adam optimizer), built or rebuilt when anything
        it holds changed; None where the call needs the general path (another backend name,
        torch.compile, learned or scheduled step sizes, step weights, a callable loss, a non-Adam
        or unfusable optimizer)."""
        if (self.name != "cpp" or torch.compiler.is_compiling() or not isinstance(inner_lr, (int, float))
                or step_weights is not None or not isinstance(config.loss, str)):
            return None
        layout = self._layout(model)
        params = layout.parameters()
        layers, constants = self._network(layout, config, batch)
        settings = (config, float(inner_lr), tuple(layers), tuple(constants))
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

        native = extension().MetaStepPlan(
            loss=config.loss, layers=layers, layer_constants=constants, first_order=config.first_order,
            steps=config.inner_steps, inner_lr=float(inner_lr),
            params=views(params), grads=views(grads),
            adam_exp_avg=None if adam is None else views(a[0] for a in adam),
            adam_exp_avg_sq=None if adam is None else views(a[1] for a in adam),
            adam_steps=None if adam is None else views(a[2] for a in adam))
        plan = self._plans[owner] = _Plan(native, settings, params, grads, adam)
        return plan

    def _run_plan(self, plan: _Plan, batch: TaskBatch, optimizer=None) -> MetaOutput:
        losses = plan.params[0].new_empty(batch.support_x.shape[0] + 2)
        capsules = [to_dlpack(t.contiguous()) for t in _flat_points(batch)]
        if optimizer is None:
            plan.native.run(*capsules, to_dlpack(losses), torch.get_num_threads())
        else:
            group = optimizer.param_groups[0]
            beta1, beta2 = group["betas"]
            plan.native.run(*capsules, to_dlpack(losses), torch.get_num_threads(), group["lr"], beta1, beta2,
                            group["eps"], group["weight_decay"])
        return MetaOutput(losses[0], losses[2:], losses[1], self.name)

    def implementation(self) -> FusedImplementation:
        """The kernel behind pymaml::meta_step this backend calls."""
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
        """The layout, the parameters, the fused op's step sizes [S, P] and step weights [S], its
        network (layers, layer_constants) and the batch with each point flattened ([T, K, n_0])."""
        layout = self._layout(model)
        params = layout.parameters()
        network = self._network(layout, config, batch)
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
        return layout, params, lrs, step_weights, network, _flat_points(batch)

    def meta_step(self, model, config: MetaConfig, batch: TaskBatch, inner_lr, step_weights) -> MetaOutput:
        layout, params, lrs, step_weights, (layers, constants), batch = self._arguments(
            model, config, batch, inner_lr, step_weights)
        meta_loss, task_losses, pre_losses, *_ = meta_step_from_parts(
            params, lrs, step_weights, *batch, layers, constants, config.loss, config.first_order, lrs.requires_grad,
            all_step_losses=False, implementation=self.implementation(),
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
            plan = self._plan(model, config, batch, inner_lr, step_weights)
            if plan is not None:
                return self._run_plan(plan, batch)
        layout, params, lrs, step_weights, (layers, constants), batch = self._arguments(
            model, config, batch, inner_lr, step_weights)
        arguments = (lrs, step_weights, *batch, layers, constants, config.loss, config.first_order, lrs.requires_grad)
        with torch.no_grad():
            # torch's C++ flatten/unflatten of a parameter list (as DDP uses), cheaper than cat,
            # split and view from Python.
            theta = _flatten_dense_tensors(params)
            if not accumulate and theta.device.type == "cpu" and self.name == "cpp" and _grads_writable(params):
                # The kernel writes each parameter's gradient into its existing .grad.
                meta_loss, task_losses, pre_losses, step_losses, _, grad_lrs = fused_cpu(
                    theta, *arguments, all_step_losses=step_weights.requires_grad, grad_out=[p.grad for p in params])
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
        plan = self._plan(model, config, batch, inner_lr, step_weights, optimizer)
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
        from ..ops.meta_step.cuda import cuda_kernel_available

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

    def _accept(self, model):
        """cpp's acceptance, for MLPs: the CUDA launcher has not been run on the other networks yet."""
        layout, reason = super()._accept(model)
        if reason is None and not layout.is_mlp:
            reason = mlp_only_reason(self.name)
        return (layout, None) if reason is None else (None, reason)


BACKEND = CppBackend()
CUDA_BACKEND = CudaBackend()
