"""Which models the fused kernels compute exactly, and their layout: what `cpp` (and, for MLPs,
`cuda` and `triton`) accept, and what each call re-checks.

Accepted: an nn.Sequential itself (or pymaml.models.Conv4, which adds nothing to it), nested
nn.Sequential containers flattened, of these layers, the classes themselves:
  nn.Linear, nn.Conv2d (square kernel, stride and padding, zero padding, dilation 1, groups 1),
  nn.BatchNorm1d on vectors and nn.BatchNorm2d on images (batch statistics: track_running_stats=False),
  pymaml.nn.PerStepBatchNorm2d in training mode (batch statistics; row min(s, steps) of its per-step
  weight and bias at inner step s; its running statistics are not read),
  nn.MaxPool2d and nn.AvgPool2d (kernel = stride, no padding, floor mode), nn.Flatten (start_dim 1,
  end_dim -1), nn.ReLU, nn.LeakyReLU (negative_slope ≥ 0), nn.ELU (alpha ≥ 0), nn.Tanh,
  nn.Sigmoid, nn.Identity;
float32 or float64 parameters, all of one dtype and device, every parameter trainable. A model of
Linear layers (all with bias or all without) with one kind of ReLU, Tanh, Sigmoid or Identity
between them is an MLP, which every fused backend takes; the other networks run on `cpp`.
Refused, with the reason (auto then falls back to `func`, or to `reference` for hooks torch.func
cannot run; an explicit fused backend raises): subclasses of these modules, a forward or __call__
set on an instance, parametrizations (torch.nn.utils.parametrize), module hooks of any kind that
run in a forward or backward pass (forward, forward pre-, backward and backward pre-hooks, on a
layer, on a container or registered globally), hooks on a parameter (register_hook or
register_post_accumulate_grad_hook: the kernel computes every gradient itself, so they would not
run), parameters or buffers beyond the layers' own weights and biases, and tied layers.
Accepted, since they leave the computation as it is: state-dict and load hooks, hooks since
removed, inplace activations, non-contiguous parameters, Module.compile().

A model can change after the backend was chosen. Every call re-checks it cheaply (the hook
dicts, the classes, the instance attributes, the parameters and buffers of each module, and the
settings of each layer that has any, such as a convolution's stride; see NetworkLayout.unchanged)
and runs the full acceptance again when anything moved.
"""

from __future__ import annotations

import math
import operator
import weakref

import torch
from torch import nn
from torch.nn.modules import module as torch_module
from torch.nn.utils import parametrize

from ..nn import PerStepBatchNorm2d
from ..ops.meta_step.network import LayerSpec, encode

MLP_ACTIVATIONS = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.Identity: "none"}
ACTIVATION_NAMES = {**MLP_ACTIVATIONS, nn.LeakyReLU: "leaky_relu", nn.ELU: "elu"}
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
POOLS = {nn.MaxPool2d: "max_pool", nn.AvgPool2d: "avg_pool"}
# The layer classes the fused kernel computes, and their parameters.
FUSED_LAYERS = {nn.Linear: ("weight", "bias"), nn.Conv2d: ("weight", "bias"), nn.BatchNorm1d: ("weight", "bias"),
                nn.BatchNorm2d: ("weight", "bias"), PerStepBatchNorm2d: ("weight", "bias"), nn.MaxPool2d: (),
                nn.AvgPool2d: (), nn.Flatten: (), **{activation: () for activation in ACTIVATION_NAMES}}
# BatchNorm's buffers, which must all be None (batch statistics only).
BATCH_NORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
# PerStepBatchNorm2d's buffers: its per-step running statistics, which training mode does not read.
PER_STEP_BATCH_NORM_BUFFERS = ("running_mean", "running_var")
MAX_LAYERS = 16  # Linear layers of an MLP
MAX_NETWORK_LAYERS = 2 * MAX_LAYERS  # csrc/core/network.h kMaxNetworkLayers
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


def _sequential_types() -> tuple[type, ...]:
    """The container classes taken as nn.Sequential: itself, and pymaml's Conv4 (which only builds one)."""
    from ..models import Conv4

    return (nn.Sequential, Conv4)


def global_hook_reason() -> str | None:
    """Why the fused kernels cannot run while global module hooks are registered, or None."""
    for attribute, register in GLOBAL_HOOKS:
        if getattr(torch_module, attribute):
            return (f"a global module hook is registered (torch.nn.modules.module.{register}); it runs in "
                    f"every module call, and the fused kernel makes none")
    return None


def module_override_reason(module: nn.Module, what: str) -> str | None:
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


def _pair(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def layer_settings(module: nn.Module) -> tuple:
    """The attributes of a layer that change what it computes (beyond its parameters)."""
    kind = type(module)
    if kind is nn.Conv2d:
        return (module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                module.dilation, module.groups, module.padding_mode, module.transposed, module.output_padding)
    if kind in BATCH_NORMS:
        return (module.num_features, module.eps, module.affine, module.track_running_stats)
    if kind is PerStepBatchNorm2d:
        return (module.num_features, module.steps, module.eps, module.per_step_affine, module.training,
                tuple(module._buffers))
    if kind is nn.MaxPool2d:
        return (module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode,
                module.return_indices)
    if kind is nn.AvgPool2d:
        return (module.kernel_size, module.stride, module.padding, module.ceil_mode, module.count_include_pad,
                module.divisor_override)
    if kind is nn.Flatten:
        return (module.start_dim, module.end_dim)
    if kind is nn.LeakyReLU:
        return (module.negative_slope,)
    if kind is nn.ELU:
        return (module.alpha,)
    return ()


def _settings_reason(what: str, module: nn.Module) -> str | None:
    """Why the settings of a layer of a fused class are not ones the kernel computes."""
    kind = type(module)
    if kind is nn.Conv2d:
        if isinstance(module.padding, str):
            if module.padding != "valid":
                return f"{what} has padding={module.padding!r}; the fused kernel takes numeric padding"
        elif len(set(_pair(module.padding))) != 1:
            return f"{what} has padding {module.padding}; the fused kernel takes the same padding on both axes"
        if len(set(_pair(module.kernel_size))) != 1 or len(set(_pair(module.stride))) != 1:
            return (f"{what} has kernel_size {module.kernel_size} and stride {module.stride}; the fused kernel takes "
                    f"square kernels and strides")
        if _pair(module.dilation) != (1, 1) or module.groups != 1 or module.transposed:
            return f"{what} has dilation {module.dilation} and groups {module.groups}; the fused kernel takes 1 and 1"
        if module.padding_mode != "zeros":
            return f"{what} has padding_mode={module.padding_mode!r}; the fused kernel pads with zeros"
    elif kind in BATCH_NORMS:
        if module.track_running_stats or any(module._buffers.get(name) is not None for name in BATCH_NORM_BUFFERS):
            return (f"{what} tracks running statistics (track_running_stats=True); the fused kernel normalizes with "
                    f"the batch statistics of each set it sees (MAML's transductive batch norm, "
                    f"track_running_stats=False)")
        if not (isinstance(module.eps, (int, float)) and module.eps > 0):
            return f"{what} has eps={module.eps!r}; the fused kernel takes a positive eps"
    elif kind is PerStepBatchNorm2d:
        if not module.training:
            return (f"{what} is in eval mode, where it normalizes with its per-step running statistics; the fused "
                    f"kernel normalizes with the batch statistics of each set it sees (training mode)")
        if not (isinstance(module.eps, (int, float)) and module.eps > 0):
            return f"{what} has eps={module.eps!r}; the fused kernel takes a positive eps"
        if not (isinstance(module.steps, int) and module.steps >= 0):
            return f"{what} has steps={module.steps!r}; the fused kernel takes an integer >= 0"
    elif kind in POOLS:
        kernel = _pair(module.kernel_size)
        stride = _pair(module.stride) if module.stride is not None else kernel
        padding = _pair(module.padding)
        if len(set(kernel)) != 1 or kernel != stride or padding != (0, 0) or module.ceil_mode:
            return (f"{what} has kernel_size {module.kernel_size}, stride {module.stride}, padding {module.padding} "
                    f"and ceil_mode {module.ceil_mode}; the fused kernel takes square pooling with stride = kernel, "
                    f"no padding and floor mode")
        if kind is nn.MaxPool2d and (_pair(module.dilation) != (1, 1) or module.return_indices):
            return f"{what} has dilation {module.dilation} or return_indices; the fused kernel takes neither"
        if kind is nn.AvgPool2d and module.divisor_override is not None:
            return f"{what} has divisor_override={module.divisor_override}; the fused kernel divides by the window"
    elif kind is nn.Flatten:
        if (module.start_dim, module.end_dim) != (1, -1):
            return (f"{what} flattens dims {module.start_dim} to {module.end_dim}; the fused kernel takes "
                    f"nn.Flatten() (start_dim=1, end_dim=-1)")
    elif kind is nn.LeakyReLU:
        if not (isinstance(module.negative_slope, (int, float)) and module.negative_slope >= 0):
            return f"{what} has negative_slope={module.negative_slope!r}; the fused kernel takes a slope >= 0"
    elif kind is nn.ELU:
        if not (isinstance(module.alpha, (int, float)) and module.alpha >= 0):
            return f"{what} has alpha={module.alpha!r}; the fused kernel takes alpha >= 0"
    return None


def _layer_reason(name: str, module: nn.Module) -> str | None:
    """Why layer `name` of the Sequential is not exactly one of the layers the kernel computes."""
    if module is None:
        return f"layer {name} is None"
    what = f"layer {name} ({type(module).__name__})"
    reason = module_override_reason(module, what)
    if reason is not None:
        return reason
    kind = type(module)
    if kind not in FUSED_LAYERS:
        for base in FUSED_LAYERS:
            if isinstance(module, base):
                name = f"pymaml.nn.{base.__name__}" if base is PerStepBatchNorm2d else f"nn.{base.__name__}"
                return (f"{what} is a subclass of {name}; the fused kernel takes {name} itself (a subclass may "
                        f"compute something else)")
        return (f"{what} is not supported by the fused kernel (Linear, Conv2d, BatchNorm1d/2d, "
                f"pymaml.nn.PerStepBatchNorm2d, MaxPool2d, AvgPool2d, Flatten, and ReLU, LeakyReLU, ELU, Tanh, "
                f"Sigmoid or Identity)")
    known = FUSED_LAYERS[kind]
    extra = [key for key in module._parameters if key not in known]
    if extra:
        return (f"{what} holds parameters {extra} beside its own; the fused kernel takes only a "
                f"{kind.__name__}'s weight and bias")
    buffers = [key for key in module._buffers if not (kind in BATCH_NORMS and key in BATCH_NORM_BUFFERS)
               and not (kind is PerStepBatchNorm2d and key in PER_STEP_BATCH_NORM_BUFFERS)]
    if buffers:
        return f"{what} holds buffers {buffers}, which the fused kernel does not take"
    if module._modules:
        return f"{what} holds submodules {list(module._modules)}, which the fused kernel does not run"
    reason = _settings_reason(what, module)
    if reason is not None:
        return reason
    if known:
        weight, bias = module._parameters.get("weight"), module._parameters.get("bias")
        if kind is nn.Linear:
            if weight is None:
                return f"{what} has no weight"
            if weight.dim() != 2:
                return f"{what} has a weight of shape {tuple(weight.shape)}; a Linear weight is [out, in]"
        elif kind is nn.Conv2d:
            k = _pair(module.kernel_size)[0]
            expected = (module.out_channels, module.in_channels, k, k)
            if weight is None or tuple(weight.shape) != expected:
                shape = None if weight is None else tuple(weight.shape)
                return f"{what} has a weight of shape {shape}; its settings make it {expected}"
        elif kind is PerStepBatchNorm2d:
            expected = (module.steps + 1, module.num_features) if module.per_step_affine else (module.num_features,)
            for name, tensor in (("weight", weight), ("bias", bias)):
                if tensor is None or tuple(tensor.shape) != expected:
                    shape = None if tensor is None else tuple(tensor.shape)
                    return f"{what} has a {name} of shape {shape}; its settings make it {expected}"
        else:
            channels = module.num_features
            if module.affine != (weight is not None) or module.affine != (bias is not None):
                return f"{what} has affine={module.affine} but weight {weight is not None} and bias {bias is not None}"
            if weight is not None and (tuple(weight.shape) != (channels,) or tuple(bias.shape) != (channels,)):
                return f"{what} has a weight or bias not of shape ({channels},)"
        if kind in (nn.Linear, nn.Conv2d) and bias is not None and tuple(bias.shape) != (weight.shape[0],):
            return f"{what} has a bias of shape {tuple(bias.shape)} for a weight of shape {tuple(weight.shape)}"
        for tensor in (weight, bias):
            if tensor is not None and type(tensor) is not nn.Parameter:
                return (f"{what} holds a {type(tensor).__name__}, a subclass of nn.Parameter, which the fused kernel "
                        f"does not take")
    return None


def _leaves(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], list[nn.Module], str | None]:
    """The model's layers in order, nested nn.Sequential containers flattened (names as in
    named_modules), the containers, and the reason a container is not one the kernel runs."""
    leaves, containers = [], []

    def visit(prefix: str, container: nn.Module, what: str) -> str | None:
        reason = module_override_reason(container, what)
        if reason is not None:
            return reason
        if container._parameters:
            return (f"{what} holds parameters {list(container._parameters)} of its own; the fused kernel takes only "
                    f"its layers' weights and biases")
        if container._buffers:
            return f"{what} holds buffers {list(container._buffers)}, which the fused kernel does not take"
        containers.append(container)
        for name, module in container._modules.items():
            path = f"{prefix}{name}"
            if type(module) is nn.Sequential:
                reason = visit(f"{path}.", module, f"the nn.Sequential {path}")
                if reason is not None:
                    return reason
            else:
                leaves.append((path, module))
        return None

    reason = visit("", model, "the nn.Sequential")
    return leaves, containers, reason


class NetworkLayout:
    """A supported model: its layers, parameters and what a call re-checks; for an MLP also its
    widths, activation and bias (the MLP kernels' description), for any network the encoding of
    its layers for points of a given shape (network()).

    names: the parameters' names in the model, in order (weight, then bias, per layer).
    """

    def __init__(self, model: nn.Module, leaves: list[tuple[str, nn.Module]], containers: list[nn.Module],
                 mlp: tuple[list[int], str, bool] | None, names: list[str]):
        self.is_mlp = mlp is not None
        self.widths, self.activation, self.bias = mlp if mlp is not None else ([], "none", False)
        self.leaves = [module for _, module in leaves]
        self.leaf_names = [name for name, _ in leaves]
        self.param_modules = [m for m in self.leaves if FUSED_LAYERS[type(m)]]
        self.linears = [m for m in self.leaves if type(m) is nn.Linear]
        # A PerStepBatchNorm2d with a weight and bias per step: the network depends on the inner step.
        self.per_step_rows = any(type(m) is PerStepBatchNorm2d and m.per_step_affine and m.steps > 0
                                 for m in self.leaves)
        self._tables = [m._parameters for m in self.param_modules]
        self.names = names
        self._params = tuple(self.parameters())
        self.num_params = sum(p.numel() for p in self._params)
        self._networks: dict = {}
        self._batch_norm_pixels: dict = {}  # per point shape: (layer, pixels per channel) of each BatchNorm
        # What `unchanged` compares, gathered so that each comparison runs as one C loop. Nothing
        # here refers to the model itself: the caches that hold a layout are weak in the model.
        self._model_type = type(model)
        self._root_children = tuple(model._modules.values())
        self._nested = tuple(containers[1:])  # containers[0] is the model, which a layout must not hold
        self._nested_children = tuple(tuple(c._modules.values()) for c in self._nested)
        self._types = tuple(map(type, self.leaves))
        modules = (*containers, *self.leaves)
        # A forward set on an instance adds an entry to its __dict__.
        self._instance_dicts = tuple(map(vars, modules))
        self._instance_sizes = tuple(map(len, self._instance_dicts))
        # Dicts that must stay empty: every module's hooks, the buffers of all but BatchNorm, the
        # layers' submodules (a parametrization registers one), the containers' own parameters,
        # and the global module hooks (torch adds to and removes from all of these in place).
        batch_norms = [m for m in self.leaves if type(m) in BATCH_NORMS]
        self._empty_dicts = (
            *(getattr(m, attribute) for m in modules for attribute, _ in MODULE_HOOKS),
            *(m._buffers for m in (*containers, *self.leaves) if type(m) not in (*BATCH_NORMS, PerStepBatchNorm2d)),
            *(m._modules for m in self.leaves), *(c._parameters for c in containers),
            *(getattr(torch_module, attribute) for attribute, _ in GLOBAL_HOOKS))
        # BatchNorm's buffers stay None (batch statistics); the layers' settings stay as accepted.
        self._batch_norm_buffers = tuple(m._buffers for m in batch_norms)
        self._settings_modules = tuple(m for m in self.leaves if layer_settings(m))
        self._settings = tuple(map(layer_settings, self._settings_modules))

    def parameters(self) -> list[torch.Tensor]:
        """The parameters in order, read from the layers' parameter dicts, which is several times
        cheaper than Module attribute access (bench/RESULTS.md)."""
        return [t for table in self._tables for t in (table["weight"], table.get("bias")) if t is not None]

    def unchanged(self, model: nn.Module, trainable: bool = True) -> bool:
        """Whether `model` still computes what this layout describes: the same layers, of the same
        classes, with the same settings, with no hook, no new instance attribute (such as a
        forward), no buffer, submodule or parameter beyond a weight and a bias per layer that has
        them, and the same parameter objects; with `trainable`, also every parameter trainable and
        without hooks (what parameter_reason checks). False means: run the full acceptance again
        (the model may still qualify)."""
        if (any(self._empty_dicts) or type(model) is not self._model_type
                or tuple(model._modules.values()) != self._root_children
                or tuple(tuple(c._modules.values()) for c in self._nested) != self._nested_children
                or tuple(map(type, self.leaves)) != self._types
                or tuple(map(len, self._instance_dicts)) != self._instance_sizes
                or tuple(map(len, self._tables)) != _TWO_PER_LAYER[:len(self._tables)]):
            return False
        if self._batch_norm_buffers and any(v is not None for d in self._batch_norm_buffers for v in d.values()):
            return False
        if self._settings and tuple(map(layer_settings, self._settings_modules)) != self._settings:
            return False
        params = self.parameters()
        if len(params) != len(self._params) or not all(map(operator.is_, params, self._params)):
            return False
        if trainable and (not all(map(_REQUIRES_GRAD, params)) or any(map(_GRADIENT_HOOKS, params))
                          or any(map(_ACCUMULATE_HOOKS, params))):
            return False
        return True

    def network(self, point_shape: tuple[int, ...]) -> tuple[list[int], list[float]]:
        """(layers, layer_constants): the fused ops' encoding of the model for points of shape
        point_shape (x is [T, K, *point_shape]). Raises ValueError, naming the layer, where the
        points do not fit the model (as torch would fail on them)."""
        point_shape = tuple(int(n) for n in point_shape)
        if self.is_mlp and point_shape != (self.widths[0],):
            raise ValueError(f"each point must be [{self.widths[0]}] for this MLP, got {list(point_shape)}")
        cached = self._networks.get(point_shape)
        if cached is None:
            cached = self._networks[point_shape] = self._encode(point_shape)
        return cached

    def check_points(self, point_shape: tuple[int, ...], support_points: int, query_points: int, steps: int) -> None:
        """Raises ValueError where a BatchNorm would see one value per channel (torch raises
        "Expected more than 1 value per channel when training" there; the batch statistics of a
        single value are undefined)."""
        if self.is_mlp:
            return
        self.network(point_shape)
        for what, pixels in self._batch_norm_pixels[tuple(int(n) for n in point_shape)]:
            for name, points in (("support", support_points if steps > 0 else 2), ("query", query_points)):
                if points * pixels == 1:
                    raise ValueError(f"{what} gets one value per channel from each {name} set ({points} point of "
                                     f"{pixels} pixel); batch statistics need more than one (torch raises "
                                     f"'Expected more than 1 value per channel when training')")

    def _encode(self, point_shape: tuple[int, ...]):
        if len(point_shape) not in (1, 3) or min(point_shape, default=0) < 1:
            raise ValueError(f"each point must be a vector [n] or an image [C, H, W] of positive sizes for the fused "
                             f"kernel, got {list(point_shape)}")
        shape, specs, batch_norms = point_shape, [], []
        for name, module in zip(self.leaf_names, self.leaves):
            what = f"layer {name} ({type(module).__name__})"
            kind = type(module)
            if kind is nn.Linear:
                fan_out, fan_in = module._parameters["weight"].shape
                if len(shape) != 1:
                    raise ValueError(f"{what} gets images {list(shape)}; the fused kernel takes Linear layers on "
                                     f"vectors (put an nn.Flatten before it)")
                if shape[0] != fan_in:
                    raise ValueError(f"{what} takes {fan_in} inputs after a layer of {shape[0]}")
                specs.append(LayerSpec("linear", out=fan_out, bias=module._parameters["bias"] is not None))
                shape = (fan_out,)
            elif kind is nn.Conv2d:
                k, s = _pair(module.kernel_size)[0], _pair(module.stride)[0]
                p = 0 if isinstance(module.padding, str) else _pair(module.padding)[0]
                if len(shape) != 3 or shape[0] != module.in_channels:
                    raise ValueError(f"{what} takes images of {module.in_channels} channels, got {list(shape)}")
                if shape[1] + 2 * p < k or shape[2] + 2 * p < k:
                    raise ValueError(f"{what} has a {k}×{k} kernel, larger than its padded input {list(shape)}")
                specs.append(LayerSpec("conv2d", out=module.out_channels, kernel=k, stride=s, padding=p,
                                       bias=module._parameters["bias"] is not None))
                shape = (module.out_channels, (shape[1] + 2 * p - k) // s + 1, (shape[2] + 2 * p - k) // s + 1)
            elif kind in BATCH_NORMS:
                wanted = 1 if kind is nn.BatchNorm1d else 3
                if len(shape) != wanted or shape[0] != module.num_features:
                    raise ValueError(f"{what} takes {'vectors' if wanted == 1 else 'images'} of "
                                     f"{module.num_features} channels, got {list(shape)}")
                specs.append(LayerSpec("batch_norm", affine=module.affine, constant=float(module.eps)))
                batch_norms.append((what, math.prod(shape[1:])))
            elif kind is PerStepBatchNorm2d:
                if len(shape) != 3 or shape[0] != module.num_features:
                    raise ValueError(f"{what} takes images of {module.num_features} channels, got {list(shape)}")
                rows = module.steps + 1 if module.per_step_affine else 1
                specs.append(LayerSpec("batch_norm", out=rows, affine=True, constant=float(module.eps)))
                batch_norms.append((what, math.prod(shape[1:])))
            elif kind in POOLS:
                k = _pair(module.kernel_size)[0]
                if len(shape) != 3 or shape[1] < k or shape[2] < k:
                    raise ValueError(f"{what} takes images of at least {k}×{k}, got {list(shape)}")
                specs.append(LayerSpec(POOLS[kind], kernel=k, stride=k))
                shape = (shape[0], shape[1] // k, shape[2] // k)
            elif kind is nn.Flatten:
                specs.append(LayerSpec("flatten"))
                shape = (math.prod(shape),)
            else:
                constant = module.negative_slope if kind is nn.LeakyReLU else module.alpha if kind is nn.ELU else 0.0
                specs.append(LayerSpec("activation", activation=ACTIVATION_NAMES[kind], constant=float(constant)))
        if len(shape) != 1:
            raise ValueError(f"the model's output per point is {list(shape)}; the fused kernel's losses take a vector "
                             f"per point (end with nn.Flatten or a Linear)")
        if len(specs) > MAX_NETWORK_LAYERS:
            raise ValueError(f"the fused kernel takes at most {MAX_NETWORK_LAYERS} layers, got {len(specs)}")
        input_shape = point_shape if len(point_shape) == 3 else (point_shape[0], 1, 1)
        layers, constants = encode(input_shape, specs)
        self._batch_norm_pixels[point_shape] = batch_norms
        return layers, constants


MlpLayout = NetworkLayout  # the name the MLP-only code used
_TWO_PER_LAYER = (2,) * MAX_NETWORK_LAYERS  # a layer's parameter dict holds weight and bias (None without one)
_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_GRADIENT_HOOKS = operator.attrgetter("_backward_hooks")
_ACCUMULATE_HOOKS = operator.attrgetter("_post_accumulate_grad_hooks")


def _mlp_description(leaves: list[tuple[str, nn.Module]]) -> tuple[list[int], str, bool] | None:
    """(widths, activation, bias) when the layers are an MLP the MLP kernels take: Linear layers,
    all with or all without bias, with one kind of ReLU, Tanh, Sigmoid or Identity between each
    two and none after the last; else None."""
    modules = [m for _, m in leaves]
    if not modules or len(modules) % 2 == 0:
        return None
    linears, activations = modules[0::2], modules[1::2]
    if any(type(m) is not nn.Linear for m in linears) or any(type(m) not in MLP_ACTIVATIONS for m in activations):
        return None
    if len({type(m) for m in activations}) > 1 or len(linears) > MAX_LAYERS:
        return None
    if len({m._parameters.get("bias") is None for m in linears}) > 1:
        return None
    widths = [linears[0]._parameters["weight"].shape[1]]
    for m in linears:
        fan_out, fan_in = m._parameters["weight"].shape
        if fan_in != widths[-1]:
            return None
        widths.append(fan_out)
    activation = MLP_ACTIVATIONS[type(activations[0])] if activations else "none"
    return widths, activation, linears[0]._parameters.get("bias") is not None


def mlp_layout(model: nn.Module) -> tuple[NetworkLayout | None, str | None]:
    """The model's layout, or None and the reason it is not exactly a supported network (naming the
    layer). It checks the model's structure, not its parameters' trainability or hooks
    (parameter_reason)."""
    reason = global_hook_reason()
    if reason is not None:
        return None, reason
    sequential_types = _sequential_types()
    if type(model) not in sequential_types:
        if isinstance(model, nn.Sequential):
            return None, (f"the model is {type(model).__name__}, a subclass of nn.Sequential; the fused kernel "
                          f"takes nn.Sequential itself (a subclass may compute something else)")
        return None, f"the fused kernel takes an nn.Sequential, got {type(model).__name__}"
    leaves, containers, reason = _leaves(model)
    if reason is not None:
        return None, reason
    for name, module in leaves:
        reason = _layer_reason(name, module)
        if reason is not None:
            return None, reason
    if not leaves:
        return None, "the model has no layers"
    param_modules = [(name, m) for name, m in leaves if FUSED_LAYERS[type(m)]]
    tensors = [t for _, m in param_modules for t in (m._parameters["weight"], m._parameters.get("bias"))
               if t is not None]
    if not tensors:
        return None, "the model has no parameters"
    if len({id(m) for _, m in leaves if FUSED_LAYERS[type(m)]}) != len(param_modules) \
            or len({id(t) for t in tensors}) != len(tensors):
        return None, "the fused kernel takes each layer and parameter once; this model repeats one (tied weights)"
    names = [f"{name}.{key}" for name, m in param_modules for key in ("weight", "bias")
             if m._parameters.get(key) is not None]
    for name, tensor in zip(names, tensors):
        if tensor.dtype not in FUSED_DTYPES:
            return None, f"parameter {name} is {tensor.dtype}; the fused kernel takes float32 or float64 parameters"
        if tensor.dtype != tensors[0].dtype:
            return None, (f"parameter {name} is {tensor.dtype} but {names[0]} is {tensors[0].dtype}; the fused kernel "
                          f"takes parameters all of one dtype")
    if len({t.device for t in tensors}) > 1:
        return None, f"the model's parameters lie on several devices ({sorted({str(t.device) for t in tensors})})"
    if len(leaves) > MAX_NETWORK_LAYERS:
        return None, f"the fused kernel takes at most {MAX_NETWORK_LAYERS} layers, got {len(leaves)}"
    return NetworkLayout(model, leaves, containers, _mlp_description(leaves), names), None


_ACCEPTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def current_mlp_layout(model: nn.Module) -> tuple[NetworkLayout | None, str | None]:
    """mlp_layout(model), remembered per model and reused while NetworkLayout.unchanged holds."""
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


def parameter_reason(layout: NetworkLayout) -> str | None:
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
