"""MAML implementations for the cross-library benchmark, each written the way its own docs and
examples write MAML, behind one interface.

A provider is built for a workload (model factory, inner step size, S, order) and gives:
  - `meta_gradient(batch)`: the meta-gradient as one flat float64 tensor in nn.Sequential order
    (checked against pymaml's oracle before anything is timed);
  - `train_step(batch)`: meta-gradient plus an Adam step of the meta-parameters, the unit the
    benchmark times.
Peers that are not installed are reported with the reason (`unavailable_reason`).

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


def oracle_meta_gradient(workload: Workload, batch) -> torch.Tensor:
    """pymaml's oracle (a Python loop over tasks with autograd), in float64."""
    model = workload.make_model().double()
    batch64 = [t.double() if t.is_floating_point() else t for t in batch]
    loss = pymaml.reference.meta_loss(model, *batch64, inner_lr=workload.inner_lr, inner_steps=workload.steps,
                                      first_order=workload.first_order, loss=workload.loss)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])


def _flat_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.detach().double().reshape(-1) for p in model.parameters()])


class Provider:
    name: str = ""
    module: str | None = None  # the package the provider needs

    def unavailable_reason(self) -> str | None:
        if self.module and importlib.util.find_spec(self.module) is None:
            return f"{self.module} is not installed (bash bench/install_peers.sh)"
        return None

    def build(self, workload: Workload) -> "Built":
        raise NotImplementedError


def _same(batch):
    return batch


@dataclass
class Built:
    meta_gradient: Callable  # torch batch -> flat float64 gradient
    train_step: Callable  # converted batch -> None
    prepare_seconds: float = 0.0
    convert: Callable = _same  # torch batch -> the provider's own arrays, done before timing


class PymamlProvider(Provider):
    def __init__(self, backend: str):
        self.backend = backend
        self.name = f"pymaml-{backend}"

    def unavailable_reason(self):
        status = {s.name: s for s in pymaml.available_backends()}[self.backend]
        return None if status.usable else status.reason

    def build(self, workload):
        model = workload.make_model()
        maml = pymaml.MAML(model, inner_lr=workload.inner_lr, inner_steps=workload.steps,
                           first_order=workload.first_order, loss=workload.loss, backend=self.backend)
        optimizer = torch.optim.Adam(maml.parameters(), lr=META_LR, fused=True)

        def meta_gradient(batch):
            maml.meta_gradient(*batch, accumulate=False)
            return _flat_grads(model)

        def train_step(batch):  # cpp takes the Adam step inside its kernel call
            maml.meta_train_step(*batch, optimizer)

        return Built(meta_gradient, train_step)


class HigherProvider(Provider):
    """higher's MAML example: innerloop_ctx over a differentiable SGD, one task at a time."""

    name, module = "higher", "higher"

    def build(self, workload):
        import higher

        model = workload.make_model()
        inner_optimizer = torch.optim.SGD(model.parameters(), lr=workload.inner_lr)
        meta_optimizer = torch.optim.Adam(model.parameters(), lr=META_LR)
        loss_fn = workload.loss_fn

        def meta_gradient(batch):
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
            return _flat_grads(model)

        def train_step(batch):
            meta_gradient(batch)
            meta_optimizer.step()

        return Built(meta_gradient, train_step)


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

        def meta_gradient(batch):
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
            return _flat_grads(model)

        def train_step(batch):
            meta_gradient(batch)
            meta_optimizer.step()

        return Built(meta_gradient, train_step)


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

        def meta_gradient(batch):
            support_x, support_y, query_x, query_y = batch
            meta_optimizer.zero_grad()
            tasks = support_x.shape[0]
            for t in range(tasks):
                learner = maml.clone()
                for _ in range(workload.steps):
                    learner.adapt(loss_fn(learner(support_x[t]), support_y[t]))
                (loss_fn(learner(query_x[t]), query_y[t]) / tasks).backward()
            return _flat_grads(model)

        def train_step(batch):
            meta_gradient(batch)
            meta_optimizer.step()

        return Built(meta_gradient, train_step)


def func_meta_gradient(model, workload):
    """The vmapped torch.func meta-gradient (grad_and_value of the mean query loss)."""

    def meta_loss(params, sx, sy, qx, qy):
        losses = pymaml.functional.task_query_losses(
            model, params, {}, sx, sy, qx, qy, inner_lr=workload.inner_lr, inner_steps=workload.steps,
            first_order=workload.first_order, loss_fn=pymaml.losses.resolve_loss(workload.loss))
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

        def meta_gradient(batch):
            params = {name: p.detach() for name, p in model.named_parameters()}
            grads, _ = step(params, *batch)
            for name, p in model.named_parameters():
                p.grad = grads[name]
            return _flat_grads(model)

        def train_step(batch):
            meta_gradient(batch)
            meta_optimizer.step()

        built = Built(meta_gradient, train_step)
        if self.compiled:
            meta_gradient(workload.batch())  # compiles
            built.prepare_seconds = time.perf_counter() - began
        return built


class JaxProvider(Provider):
    """JAX: the whole training step (vmapped meta-gradient and optax Adam) under one jit."""

    name, module = "jax", "jax"

    def unavailable_reason(self):
        for package in ("jax", "optax"):
            if importlib.util.find_spec(package) is None:
                return f"{package} is not installed (bash bench/install_peers.sh)"
        return None

    def build(self, workload):
        import jax
        import jax.numpy as jnp
        import numpy as np
        import optax

        model = workload.make_model()
        linears = [m for m in model if isinstance(m, nn.Linear)]
        params = [(jnp.asarray(m.weight.detach().numpy()), jnp.asarray(m.bias.detach().numpy())) for m in linears]
        alpha, steps, first_order = workload.inner_lr, workload.steps, workload.first_order

        def forward(params, x):
            for i, (w, b) in enumerate(params):
                x = x @ w.T + b
                if i < len(params) - 1:
                    x = jax.nn.relu(x)
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
            return jnp.mean(jax.vmap(task_loss, in_axes=(None, 0, 0, 0, 0))(params, sx, sy, qx, qy))

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

        def meta_gradient(batch):
            grads = gradient(state["params"], *as_arrays(batch))
            return torch.from_numpy(np.concatenate([np.asarray(a, np.float64).reshape(-1)
                                                    for w, b in grads for a in (w, b)]))

        def train_step(batch):
            state["params"], state["opt"] = jitted_step(state["params"], state["opt"], *batch)
            jax.block_until_ready(state["params"])

        began = time.perf_counter()
        jax.block_until_ready(jitted_step(state["params"], state["opt"], *as_arrays(workload.batch())))  # compiles
        return Built(meta_gradient, train_step, time.perf_counter() - began, as_arrays)


PROVIDERS: dict[str, Provider] = {
    p.name: p for p in (
        PymamlProvider("cpp"), PymamlProvider("func"), PymamlProvider("reference"), Learn2LearnProvider(),
        HigherProvider(), TorchOptProvider(), TorchFuncProvider(compiled=False), TorchFuncProvider(compiled=True),
        JaxProvider(),
    )
}
