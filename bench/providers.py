"""MAML implementations for the cross-library benchmark, each written the way its own docs and
examples write MAML, behind one interface.

A provider is built for a workload (model factory, inner step size, S, order) and gives:
  - `meta_gradient(batch)`: the meta-gradient as one flat float64 tensor in
    `model.parameters()` order (checked against pymaml's oracle before anything is timed);
  - `train_step(batch)`: meta-gradient plus an Adam step of the meta-parameters, the unit the
    benchmark times;
  - `meta_gradient_step(batch)`: the provider's meta-gradient alone (no optimizer step, no
    conversion), the other measure.
Peers that are not installed are reported with the reason (`unavailable_reason`), models a
provider cannot run with the layer that stops it (`unsupported_reason`).

Peers: learn2learn (`MAML`, `clone()`/`adapt()`), higher (`innerloop_ctx`), TorchOpt (functional
API: `torchopt.sgd`, `apply_updates`), torch.func (eager), torch.compile of it, JAX
(`jit(vmap(...))` with optax Adam). Install them with `bash bench/install_peers.sh`.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

import pymaml

META_LR = 1e-3


@dataclass(frozen=True)
class Workload:
    """One MAML configuration: a model factory (seeded), step size, steps, order and batch shape."""

    name: str
    make_model: Callable[[], nn.Module]
    inner_lr: float
    steps: int
    first_order: bool
    tasks: int
    shots: int
    loss: str = "mse"
    make_batch: Callable | None = None  # seed -> (support_x, support_y, query_x, query_y)
    queries: int | None = None  # per class, for the image workloads
    image_shape: tuple[int, ...] | None = None  # (C, H, W) of the image workloads

    def batch(self, seed: int = 0):
        if self.make_batch is not None:
            return self.make_batch(seed)
        return pymaml.data.Sinusoid(seed=seed).sample(self.tasks, self.shots).tasks

    @property
    def loss_fn(self):
        return nn.functional.mse_loss if self.loss == "mse" else nn.functional.cross_entropy


def sinusoid(steps: int, first_order: bool = False, tasks: int = 25, width: int = 40) -> Workload:
    """W1: the paper's sinusoid (T=25, K=10+10, MLP 1-40-40-1 ReLU, α=0.01); the scaling sweeps
    vary T and the hidden width."""

    def make_model():
        torch.manual_seed(0)
        return pymaml.models.mlp((1, width, width, 1))

    order = "first" if first_order else "second"
    variant = "" if (tasks, width) == (25, 40) else f" T={tasks} width={width}"
    return Workload(f"W1 sinusoid{variant} S={steps} {order} order", make_model, 0.01, steps, first_order, tasks, 10)


def omniglot_mlp(steps: int, first_order: bool = False, tasks: int = 32) -> Workload:
    """W2: the paper's non-convolutional Omniglot model without BatchNorm (784-256-128-64-64-5,
    ReLU), 5-way 1-shot with 15 queries per class, on random images of the right shape."""
    ways, shots, queries = 5, 1, 15

    def make_model():
        torch.manual_seed(0)
        return pymaml.models.mlp((784, 256, 128, 64, 64, ways))

    def make_batch(seed):
        generator = torch.Generator().manual_seed(seed)
        support_x = torch.rand(tasks, ways * shots, 784, generator=generator)
        query_x = torch.rand(tasks, ways * queries, 784, generator=generator)
        support_y = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).contiguous()
        query_y = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).contiguous()
        return support_x, support_y, query_x, query_y

    order = "first" if first_order else "second"
    return Workload(f"W2 Omniglot MLP S={steps} {order} order", make_model, 0.4, steps, first_order, tasks, shots,
                    "cross_entropy", make_batch)


def _image_batch(tasks, ways, shots, queries, image_shape):
    """Random images [T, N·K, *image_shape] and [T, N·Q, *image_shape], labels grouped by class."""

    def make_batch(seed):
        generator = torch.Generator().manual_seed(seed)
        support_x = torch.rand(tasks, ways * shots, *image_shape, generator=generator)
        query_x = torch.rand(tasks, ways * queries, *image_shape, generator=generator)
        support_y = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).contiguous()
        query_y = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).contiguous()
        return support_x, support_y, query_x, query_y

    return make_batch


def omniglot_conv4(steps: int, first_order: bool = False, tasks: int = 32, queries: int = 15) -> Workload:
    """W3: the paper's Omniglot Conv4 (4 × [3×3 conv stride 2, BatchNorm on batch statistics,
    ReLU], linear head; 113,221 parameters), 5-way 1-shot with `queries` per class (15, or 1 as in
    the paper's code), on random images [T, N·K, 1, 28, 28]."""
    ways, shots = 5, 1

    def make_model():
        torch.manual_seed(0)
        return pymaml.models.Conv4(in_channels=1, ways=ways)

    order = "first" if first_order else "second"
    variant = "" if queries == 15 else f" {queries} quer{'y' if queries == 1 else 'ies'} per class"
    return Workload(f"W3 Omniglot Conv4{variant} S={steps} {order} order", make_model, 0.4, steps, first_order,
                    tasks, shots, "cross_entropy", _image_batch(tasks, ways, shots, queries, (1, 28, 28)),
                    queries=queries, image_shape=(1, 28, 28))


def miniimagenet_conv4(steps: int = 5, first_order: bool = False, tasks: int = 4) -> Workload:
    """W4: the paper's MiniImagenet Conv4 (4 × [3×3 conv, BatchNorm on batch statistics, ReLU,
    2×2 max-pool], 32 filters, linear head), 5-way 1-shot with 15 queries per class, α = 0.01, on
    random images [T, N·K, 3, 84, 84]."""
    ways, shots, queries = 5, 1, 15

    def make_model():
        torch.manual_seed(0)
        return pymaml.models.Conv4(in_channels=3, ways=ways, hidden=32, image_size=84, strided=False)

    order = "first" if first_order else "second"
    return Workload(f"W4 MiniImagenet Conv4 S={steps} {order} order", make_model, 0.01, steps, first_order, tasks,
                    shots, "cross_entropy", _image_batch(tasks, ways, shots, queries, (3, 84, 84)),
                    queries=queries, image_shape=(3, 84, 84))


def oracle_meta_gradient(workload: Workload, batch, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """pymaml's oracle (a Python loop over tasks with autograd), in float64 unless asked otherwise."""
    model = workload.make_model().to(dtype)
    batch = [t.to(dtype) if t.is_floating_point() else t for t in batch]
    loss = pymaml.reference.meta_loss(model, *batch, inner_lr=workload.inner_lr, inner_steps=workload.steps,
                                      first_order=workload.first_order, loss=workload.loss)
    return torch.cat([g.double().reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])


_ORACLES: dict[tuple, tuple[torch.Tensor, float]] = {}


def oracle_check(workload: Workload, seed: int) -> tuple[torch.Tensor, float]:
    """The float64 oracle's meta-gradient on `workload.batch(seed)` and the relative error of the
    float32 oracle against it (the rounding error float32 itself brings to this workload),
    computed once per process for every provider (W3's float64 oracle takes seconds)."""
    key = (workload.name, workload.tasks, workload.shots, seed)
    if key not in _ORACLES:
        batch = workload.batch(seed)
        exact = oracle_meta_gradient(workload, batch)
        float32_error = ((oracle_meta_gradient(workload, batch, torch.float32) - exact).norm() / exact.norm()).item()
        _ORACLES[key] = exact, float32_error
    return _ORACLES[key]


def _flat_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.detach().double().reshape(-1) for p in model.parameters()])


class Provider:
    name: str = ""
    module: str | None = None  # the package the provider needs

    def unavailable_reason(self) -> str | None:
        if self.module and importlib.util.find_spec(self.module) is None:
            return f"{self.module} is not installed (bash bench/install_peers.sh)"
        return None

    def unsupported_reason(self, workload: Workload) -> str | None:
        """None if this provider runs `workload`'s model, else why not (naming the layer)."""
        return None

    def build(self, workload: Workload) -> "Built":
        raise NotImplementedError


def _same(batch):
    return batch


@dataclass
class Built:
    meta_gradient: Callable  # torch batch -> flat float64 gradient
    train_step: Callable  # converted batch -> None
    meta_gradient_step: Callable  # converted batch -> the provider's own gradient, nothing more
    prepare_seconds: float = 0.0
    convert: Callable = _same  # torch batch -> the provider's own arrays, done before timing


class PymamlProvider(Provider):
    """A pymaml backend through MAML.meta_gradient / meta_train_step; the GPU backends (`cuda`,
    `triton`) run the model and the batch on the current CUDA device."""

    GPU_BACKENDS = ("cuda", "triton")

    def __init__(self, backend: str):
        self.backend = backend
        self.name = f"pymaml-{backend}"
        self.device = torch.device("cuda" if backend in self.GPU_BACKENDS else "cpu")

    def unavailable_reason(self):
        status = {s.name: s for s in pymaml.available_backends()}[self.backend]
        if not status.usable:
            return status.reason
        if self.device.type == "cuda" and not torch.cuda.is_available():
            return "torch sees no CUDA device"
        return None

    def unsupported_reason(self, workload):
        config = pymaml.backends.MetaConfig(workload.steps, workload.first_order, workload.loss)
        return pymaml.backends.get_backend(self.backend).unsupported_reason(workload.make_model(), config,
                                                                            self.device)

    def build(self, workload):
        model = workload.make_model().to(self.device)
        maml = pymaml.MAML(model, inner_lr=workload.inner_lr, inner_steps=workload.steps,
                           first_order=workload.first_order, loss=workload.loss, backend=self.backend)
        optimizer = torch.optim.Adam(maml.parameters(), lr=META_LR, fused=True)
        on_device = self.device.type == "cuda"

        def synchronize():
            if on_device:
                torch.cuda.synchronize()

        def convert(batch):
            return [t.to(self.device) for t in batch]

        def meta_gradient_step(batch):
            maml.meta_gradient(*batch, accumulate=False)
            synchronize()

        def meta_gradient(batch):
            meta_gradient_step(convert(batch))
            return _flat_grads(model).cpu()

        def train_step(batch):  # cpp takes the Adam step inside its kernel call
            maml.meta_train_step(*batch, optimizer)
            synchronize()

        return Built(meta_gradient, train_step, meta_gradient_step, convert=convert)


class HigherProvider(Provider):
    """higher's MAML example: innerloop_ctx over a differentiable SGD, one task at a time."""

    name, module = "higher", "higher"

    def build(self, workload):
        import higher

        model = workload.make_model()
        inner_optimizer = torch.optim.SGD(model.parameters(), lr=workload.inner_lr)
        meta_optimizer = torch.optim.Adam(model.parameters(), lr=META_LR)
        loss_fn = workload.loss_fn

        def meta_gradient_step(batch):
            support_x, support_y, query_x, query_y = batch
            meta_optimizer.zero_grad()
            tasks = support_x.shape[0]
            for t in range(tasks):
                with higher.innerloop_ctx(model, inner_optimizer, copy_initial_weights=False,
                                          track_higher_grads=not workload.first_order) as (fmodel, diffopt):
                    for _ in range(workload.steps):
                        diffopt.step(loss_fn(fmodel(support_x[t]), support_y[t]))
                    query_loss = loss_fn(fmodel(query_x[t]), query_y[t]) / tasks
                    if workload.first_order:  # higher's fast weights are detached: ∇ at θ_S by hand
                        grads = torch.autograd.grad(query_loss, list(fmodel.parameters()))
                        for p, g in zip(model.parameters(), grads):
                            p.grad = g if p.grad is None else p.grad + g
                    else:
                        query_loss.backward()

        def meta_gradient(batch):
            meta_gradient_step(batch)
            return _flat_grads(model)

        def train_step(batch):
            meta_gradient_step(batch)
            meta_optimizer.step()

        return Built(meta_gradient, train_step, meta_gradient_step)


class TorchOptProvider(Provider):
    """TorchOpt's functional API: torchopt.sgd updates applied out of place, per task."""

    name, module = "torchopt", "torchopt"

    def build(self, workload):
        import torchopt

        model = workload.make_model()
        names = [name for name, _ in model.named_parameters()]
        meta_optimizer = torch.optim.Adam(model.parameters(), lr=META_LR)
        inner_optimizer = torchopt.sgd(lr=workload.inner_lr)
        loss_fn = workload.loss_fn

        def forward(params, x):
            return torch.func.functional_call(model, dict(zip(names, params)), (x,))

        def meta_gradient_step(batch):
            support_x, support_y, query_x, query_y = batch
            meta_optimizer.zero_grad()
            tasks = support_x.shape[0]
            for t in range(tasks):
                params = tuple(model.parameters())
                state = inner_optimizer.init(params)
                for _ in range(workload.steps):
                    loss = loss_fn(forward(params, support_x[t]), support_y[t])
                    grads = torch.autograd.grad(loss, params, create_graph=not workload.first_order)
                    updates, state = inner_optimizer.update(grads, state, inplace=False)
                    params = torchopt.apply_updates(params, updates, inplace=False)
                (loss_fn(forward(params, query_x[t]), query_y[t]) / tasks).backward()

        def meta_gradient(batch):
            meta_gradient_step(batch)
            return _flat_grads(model)

        def train_step(batch):
            meta_gradient_step(batch)
            meta_optimizer.step()

        return Built(meta_gradient, train_step, meta_gradient_step)


def _learn2learn_maml():
    """learn2learn.algorithms.maml.MAML without running learn2learn's package __init__ files,
    which import gym, requests and torchvision that the benchmark does not need."""
    import sys
    import types

    root = importlib.util.find_spec("learn2learn").submodule_search_locations[0]
    for package in ("learn2learn", "learn2learn.algorithms"):
        if package not in sys.modules:
            stub = types.ModuleType(package)
            stub.__path__ = [root] if package == "learn2learn" else [f"{root}/algorithms"]
            stub.__spec__ = importlib.machinery.ModuleSpec(package, None, is_package=True)
            stub.__spec__.submodule_search_locations = stub.__path__
            sys.modules[package] = stub
    return importlib.import_module("learn2learn.algorithms.maml").MAML


class Learn2LearnProvider(Provider):
    """learn2learn's MAML wrapper: clone() per task, adapt() per inner step."""

    name, module = "learn2learn", "learn2learn"

    def build(self, workload):
        MAML = _learn2learn_maml()
        model = workload.make_model()
        maml = MAML(model, lr=workload.inner_lr, first_order=workload.first_order)
        meta_optimizer = torch.optim.Adam(maml.parameters(), lr=META_LR)
        loss_fn = workload.loss_fn

        def meta_gradient_step(batch):
            support_x, support_y, query_x, query_y = batch
            meta_optimizer.zero_grad()
            tasks = support_x.shape[0]
            for t in range(tasks):
                learner = maml.clone()
                for _ in range(workload.steps):
                    learner.adapt(loss_fn(learner(support_x[t]), support_y[t]))
                (loss_fn(learner(query_x[t]), query_y[t]) / tasks).backward()

        def meta_gradient(batch):
            meta_gradient_step(batch)
            return _flat_grads(model)

        def train_step(batch):
            meta_gradient_step(batch)
            meta_optimizer.step()

        return Built(meta_gradient, train_step, meta_gradient_step)


def func_meta_gradient(model, workload):
    """The vmapped torch.func meta-gradient (grad_and_value of the mean query loss)."""

    def meta_loss(params, sx, sy, qx, qy):
        losses = pymaml.numerics.functional.task_query_losses(
            model, params, {}, sx, sy, qx, qy, inner_lr=workload.inner_lr, inner_steps=workload.steps,
            first_order=workload.first_order, loss_fn=pymaml.numerics.losses.resolve_loss(workload.loss))
        return losses.mean()

    return torch.func.grad_and_value(meta_loss)


class TorchFuncProvider(Provider):
    """torch.func: vmap over tasks of grad through the inner loop, eager or under torch.compile."""

    def __init__(self, compiled: bool):
        self.compiled = compiled
        self.name = "torch.compile" if compiled else "torch.func"

    def build(self, workload):
        model = workload.make_model()
        meta_optimizer = torch.optim.Adam(model.parameters(), lr=META_LR, fused=True)
        step = func_meta_gradient(model, workload)
        began = time.perf_counter()
        if self.compiled:
            torch._dynamo.reset()
            step = torch.compile(step)

        def meta_gradient_step(batch):
            params = {name: p.detach() for name, p in model.named_parameters()}
            grads, _ = step(params, *batch)
            for name, p in model.named_parameters():
                p.grad = grads[name]

        def meta_gradient(batch):
            meta_gradient_step(batch)
            return _flat_grads(model)

        def train_step(batch):
            meta_gradient_step(batch)
            meta_optimizer.step()

        built = Built(meta_gradient, train_step, meta_gradient_step)
        if self.compiled:
            meta_gradient(workload.batch())  # compiles
            built.prepare_seconds = time.perf_counter() - began
        return built


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _jax_layer_reason(index: int, layer: nn.Module) -> str | None:
    """None if `_jax_layer` converts this layer of an nn.Sequential, else why not."""
    kind = f"layer {index} ({type(layer).__name__})"
    if isinstance(layer, nn.Conv2d):
        if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
            return f"{kind} pads with padding={layer.padding!r}, padding_mode={layer.padding_mode!r}; " \
                   "the JAX provider converts explicit zero padding only"
        return None
    if isinstance(layer, nn.MaxPool2d):
        if layer.ceil_mode or layer.return_indices:
            return f"{kind} uses ceil_mode or return_indices, which the JAX provider does not convert"
        return None
    if isinstance(layer, (nn.Linear, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.Flatten,
                          nn.BatchNorm1d, nn.BatchNorm2d)):
        return None
    return f"{kind} is not converted to JAX (Linear, Conv2d, BatchNorm1d/2d, MaxPool2d, Flatten, " \
           "ReLU, Tanh, Sigmoid, Identity)"


def _jax_layer(layer: nn.Module):
    """The layer as a function (its parameters in `layer.parameters()` order, x) -> y on one
    task's batch; activations and weights keep torch's NCHW and OIHW layouts between layers."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    if isinstance(layer, nn.Linear):
        if layer.bias is None:
            return lambda p, x: x @ p[0].T
        return lambda p, x: x @ p[0].T + p[1]
    if isinstance(layer, nn.Conv2d):
        stride, padding, dilation = _pair(layer.stride), _pair(layer.padding), _pair(layer.dilation)

        def conv(p, x):
            # XLA's CPU convolutions run in NHWC/HWIO: on W3 a step took half the time of the
            # same convolution in NCHW/OIHW (1.04 s against 2.02 s at T=4, S=1, one thread).
            y = lax.conv_general_dilated(x.transpose(0, 2, 3, 1), p[0].transpose(2, 3, 1, 0), window_strides=stride,
                                         padding=[(k, k) for k in padding], rhs_dilation=dilation,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         feature_group_count=layer.groups).transpose(0, 3, 1, 2)
            return y + p[1][None, :, None, None] if layer.bias is not None else y

        return conv
    if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
        # Batch statistics (biased variance) in training mode or without running statistics, as
        # torch and pymaml's inner loop do; otherwise the running statistics, as constants.
        batch_statistics = layer.training or layer.running_mean is None
        running = None if batch_statistics else (jnp.asarray(layer.running_mean.numpy()),
                                                 jnp.asarray(layer.running_var.numpy()))

        def batch_norm(p, x):
            axes = (0,) + tuple(range(2, x.ndim))
            shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
            if batch_statistics:
                mean, var = jnp.mean(x, axis=axes), jnp.var(x, axis=axes)
            else:
                mean, var = running
            y = (x - mean.reshape(shape)) / jnp.sqrt(var.reshape(shape) + layer.eps)
            return y * p[0].reshape(shape) + p[1].reshape(shape) if layer.affine else y

        return batch_norm
    if isinstance(layer, nn.MaxPool2d):
        kernel, padding, dilation = _pair(layer.kernel_size), _pair(layer.padding), _pair(layer.dilation)
        stride = _pair(layer.stride if layer.stride is not None else layer.kernel_size)
        return lambda p, x: lax.reduce_window(x, -jnp.inf, lax.max, (1, 1) + kernel, (1, 1) + stride,
                                              ((0, 0), (0, 0)) + tuple((k, k) for k in padding),
                                              window_dilation=(1, 1) + dilation)
    if isinstance(layer, nn.Flatten):
        def flatten(p, x):
            start, end = layer.start_dim % x.ndim, layer.end_dim % x.ndim
            return x.reshape(x.shape[:start] + (-1,) + x.shape[end + 1:])

        return flatten
    activation = {nn.ReLU: jax.nn.relu, nn.Tanh: jnp.tanh, nn.Sigmoid: jax.nn.sigmoid, nn.Identity: lambda x: x}
    return lambda p, x, f=activation[type(layer)]: f(x)


class JaxProvider(Provider):
    """JAX: the whole training step (meta-gradient vmapped over tasks, lax.map for convolutional
    models, and optax Adam) under one jit, on a forward pass converted layer by layer from the
    torch model (weights copied)."""

    name, module = "jax", "jax"

    def unavailable_reason(self):
        for package in ("jax", "optax"):
            if importlib.util.find_spec(package) is None:
                return f"{package} is not installed (bash bench/install_peers.sh)"
        return None

    def unsupported_reason(self, workload):
        model = workload.make_model()
        if not isinstance(model, nn.Sequential):
            return f"the JAX provider converts nn.Sequential models only, not {type(model).__name__}"
        for index, layer in enumerate(model):
            if next(layer.children(), None) is not None:
                return f"layer {index} ({type(layer).__name__}) has sub-modules; the JAX provider converts flat models"
            reason = _jax_layer_reason(index, layer)
            if reason is not None:
                return reason
        return None

    def build(self, workload):
        import jax
        import jax.numpy as jnp
        import numpy as np
        import optax

        reason = self.unsupported_reason(workload)
        if reason is not None:
            raise ValueError(reason)
        model = workload.make_model()
        layers = [_jax_layer(layer) for layer in model]
        # One tuple per layer, in model.parameters() order.
        params = [tuple(jnp.asarray(p.detach().numpy()) for p in layer.parameters(recurse=False)) for layer in model]
        alpha, steps, first_order = workload.inner_lr, workload.steps, workload.first_order
        # vmap over tasks turns the per-task weights of the inner loop into grouped convolutions,
        # which XLA's CPU backend runs slowly: on W3 (T=32, S=1, one thread) a training step took
        # about 55 s under vmap and 10.5 s under lax.map, one task after another.
        convolutional = any(isinstance(layer, nn.Conv2d) for layer in model)

        def forward(params, x):
            for layer, p in zip(layers, params):
                x = layer(p, x)
            return x

        def loss(params, x, y):
            if workload.loss == "mse":
                return jnp.mean((forward(params, x) - y) ** 2)
            logits = forward(params, x)
            picked = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
            return jnp.mean(jax.nn.logsumexp(logits, axis=1) - picked)

        def task_loss(params, sx, sy, qx, qy):
            adapted = params
            for _ in range(steps):
                g = jax.grad(loss)(adapted, sx, sy)
                if first_order:
                    g = jax.lax.stop_gradient(g)
                adapted = jax.tree_util.tree_map(lambda p, d: p - alpha * d, adapted, g)
            return loss(adapted, qx, qy)

        def meta_loss(params, sx, sy, qx, qy):
            if not convolutional:
                return jnp.mean(jax.vmap(task_loss, in_axes=(None, 0, 0, 0, 0))(params, sx, sy, qx, qy))
            return jnp.mean(jax.lax.map(lambda task: task_loss(params, *task), (sx, sy, qx, qy)))

        optimizer = optax.adam(META_LR)
        state = {"params": params, "opt": optimizer.init(params)}
        gradient = jax.jit(jax.grad(meta_loss))

        @jax.jit
        def jitted_step(params, opt_state, sx, sy, qx, qy):
            grads = jax.grad(meta_loss)(params, sx, sy, qx, qy)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        def as_arrays(batch):
            return [jnp.asarray(t.numpy()) for t in batch]

        def meta_gradient_step(batch):
            return jax.block_until_ready(gradient(state["params"], *batch))

        def meta_gradient(batch):
            grads = meta_gradient_step(as_arrays(batch))
            return torch.from_numpy(np.concatenate([np.asarray(a, np.float64).reshape(-1)
                                                    for layer in grads for a in layer]))

        def train_step(batch):
            state["params"], state["opt"] = jitted_step(state["params"], state["opt"], *batch)
            jax.block_until_ready(state["params"])

        began = time.perf_counter()
        jax.block_until_ready(jitted_step(state["params"], state["opt"], *as_arrays(workload.batch())))  # compiles
        return Built(meta_gradient, train_step, meta_gradient_step, time.perf_counter() - began, as_arrays)


PROVIDERS: dict[str, Provider] = {
    p.name: p for p in (
        PymamlProvider("cpp"), PymamlProvider("cuda"), PymamlProvider("triton"), PymamlProvider("func"),
        PymamlProvider("reference"), Learn2LearnProvider(),
        HigherProvider(), TorchOptProvider(), TorchFuncProvider(compiled=False), TorchFuncProvider(compiled=True),
        JaxProvider(),
    )
}
