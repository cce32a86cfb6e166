"""The user-facing API: pymaml.MAML, which mirrors MAML's outer loop."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ..backends import MetaConfig, MetaOutput, TaskBatch, get_backend, resolve
from ..numerics import functional
from ..numerics.losses import LossFn
from ..numerics.state import adapted_parameters, fixed_state
from .checks import check_model_and_loss, check_steps, validate_inputs

log = logging.getLogger("pymaml")


def _adapted_names(model: nn.Module, adapt) -> frozenset[str] | None:
    """The names of the parameters the inner loop adapts (None: all of them)."""
    if adapt is None:
        return None
    names = list(adapted_parameters(model))
    if callable(adapt):
        parameters = adapted_parameters(model)
        chosen = {name for name in names if adapt(name, parameters[name])}
    else:
        requested = [adapt] if isinstance(adapt, str) else list(adapt)
        if not all(isinstance(item, str) for item in requested):
            raise TypeError(f"adapt must be parameter or module names, or a predicate (name, parameter) -> bool, "
                            f"got {adapt!r}")
        chosen = set()
        for item in requested:
            matched = {name for name in names if name == item or name.startswith(item + ".")}
            if not matched:
                raise ValueError(f"adapt names {item!r}, which is neither a trainable parameter nor a module holding "
                                 f"one; the model's trainable parameters are {names}")
            chosen |= matched
    if not chosen:
        raise ValueError("adapt selects no parameter: the inner loop would have nothing to adapt")
    return None if len(chosen) == len(names) else frozenset(chosen)


class AdaptedModel:
    """Per-task adapted weights (`params`, each [T, ...]); calling it maps x [T, K, ...] to [T, K, ...]."""

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor], fixed: dict, steps: int = 0):
        self.model = model
        self.params = params
        self.fixed = fixed
        self.steps = steps  # the inner steps taken: the step index of per-step layers (pymaml.nn)
        self.num_tasks = next(iter(params.values())).shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] != self.num_tasks:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be [T={self.num_tasks}, K, features...], got {shape}")
        return functional.batched_forward(self.model, self.params, self.fixed, x, self.steps)


class MAML(nn.Module):
    """Model-Agnostic Meta-Learning (Finn, Abbeel & Levine 2017) over a batch of tasks.

    maml = MAML(model, inner_lr=0.01, inner_steps=1, first_order=False, loss="mse", backend="auto")
    out = maml(support_x, support_y, query_x, query_y)   # leading task dim T on each
    out.loss.backward()                                  # meta-gradient into model.parameters()

    backend: "auto" (the fastest backend that supports the model and device; `maml.backend`
    names it and `maml.backend_choice` says why) or one of pymaml.available_backends().
    learn_inner_lr: None (α = inner_lr, fixed), "scalar" (one learned α), "per_layer_per_step"
        (MAML++'s LSLR: one learned α per parameter tensor and step) or "per_parameter" (Meta-SGD:
        a learned α for every parameter element). The learned step sizes start at inner_lr, are
        nn.Parameters of this module (`maml.inner_lrs`) and get exact meta-gradients.
    step_weights: None (the loss is the query loss after the last step) or S numbers w_1..w_S
        for MAML++'s multi-step loss Σ_s w_s L_query(θ_s).
    check_inputs: check shapes, dtypes, devices, NaN and Inf of every meta-batch (cheap; on by default).
    second_order: how the `func` backend computes the meta-gradient (first or second order; the
        result is the same). "memory_efficient" (default): the reverse chain of
        pymaml.numerics.reverse_chain, which keeps only the per-step weights θ_s of task_chunk tasks at a
        time, O(task_chunk · (S·|θ| + one forward's activations)) memory whatever the number of
        tasks; its meta-loss can be differentiated once (create_graph=True raises). "graph": one
        autograd graph over the whole inner loop of every task, memory growing with S and T;
        the meta-loss can be differentiated again. `reference` always builds the graph; the fused
        backends (cpp, cuda, triton) always run their own graph-free reverse chain; both ignore it.
    adapt: which parameters the inner loop adapts; None adapts all of them. Parameter or module
        names (a module name stands for all its parameters), or a predicate (name, parameter) ->
        bool. The others stay at θ in the inner loop (ANIL adapts the head only) and still get
        exact meta-gradients. Every backend runs it as a step size of zero for those parameters
        (the fused kernels through their per-parameter step sizes).
    task_chunk: tasks per chunk of the memory-efficient mode (None: the largest chunk whose estimated
        memory fits pymaml.numerics.reverse_chain.DEFAULT_CHUNK_BYTES, at most T); the
        docstring of pymaml.numerics.reverse_chain says how to pick it from a memory budget.
    """

    LEARN_INNER_LR_MODES = (None, "scalar", "per_layer_per_step", "per_parameter")

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        first_order: bool = False,
        loss: str | LossFn = "mse",
        backend: str = "auto",
        learn_inner_lr: str | None = None,
        step_weights=None,
        check_inputs: bool = True,
        second_order: str = "memory_efficient",
        task_chunk: int | None = None,
        adapt=None,
    ):
        super().__init__()
        check_model_and_loss(model, loss, "MAML")
        if not isinstance(inner_lr, (int, float)) or isinstance(inner_lr, bool) or not math.isfinite(inner_lr):
            raise ValueError(f"inner_lr must be a finite number, got {inner_lr!r}")
        if learn_inner_lr not in self.LEARN_INNER_LR_MODES:
            raise ValueError(f"learn_inner_lr must be one of {self.LEARN_INNER_LR_MODES}, got {learn_inner_lr!r}")
        self.module = model
        self.adapted_names = _adapted_names(model, adapt)
        # The trainable parameters that learned step sizes and `adapt` refer to, in order.
        self._trainable_names = tuple(adapted_parameters(model))
        self.config = MetaConfig(check_steps("inner_steps", inner_steps), bool(first_order), loss,
                                 second_order, task_chunk)
        self.base_inner_lr = float(inner_lr)
        self.learn_inner_lr = learn_inner_lr
        params = adapted_parameters(model)
        reference_param = next(iter(params.values()))
        like = dict(dtype=reference_param.dtype, device=reference_param.device)
        if learn_inner_lr == "scalar":
            self.inner_lrs = nn.Parameter(torch.tensor(self.base_inner_lr, **like))
        elif learn_inner_lr == "per_layer_per_step":
            self.inner_lrs = nn.Parameter(torch.full((self.config.inner_steps, len(params)), self.base_inner_lr, **like))
        elif learn_inner_lr == "per_parameter":
            self.inner_lrs = nn.ParameterList([nn.Parameter(torch.full_like(p.detach(), self.base_inner_lr)) for p in params.values()])
        else:
            self.inner_lrs = None
        if step_weights is None:
            self.register_buffer("step_weights", None)
        else:
            weights = torch.as_tensor(step_weights, **like).detach().clone().reshape(-1)
            if weights.numel() != self.config.inner_steps or not bool(torch.isfinite(weights).all()):
                raise ValueError(f"step_weights must be {self.config.inner_steps} finite numbers (one per inner step), "
                                 f"got {step_weights!r}")
            self.register_buffer("step_weights", weights)
        if backend != "auto":
            get_backend(backend)
        self.requested_backend = backend
        self.check_inputs = check_inputs
        self._resolved: dict[torch.device, tuple] = {}
        self._resolve(self._device())

    def _device(self) -> torch.device:
        return next(self.module.parameters()).device

    def _dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def _resolve(self, device: torch.device):
        if device not in self._resolved:
            backend, why = resolve(self.requested_backend, self.module, self.config, device)
            log.info("pymaml: %s", why)
            self._resolved[device] = (backend, why)
        self._last_device = device
        return self._resolved[device][0]

    def _backend_for_call(self, device: torch.device):
        """The chosen backend, re-checked against the model as it is now: `auto` chooses again
        when the model changed into one its backend cannot run; an explicit request raises."""
        backend = self._resolve(device)
        reason = backend.changed_reason(self.module, self.config, device)
        if reason is None:
            return backend
        if self.requested_backend != "auto":
            raise RuntimeError(f"backend {backend.name!r} cannot run this model on {device} any more: {reason}. "
                               f"The model changed after this MAML was built; backend='auto' would choose again")
        del self._resolved[device]
        return self._resolve(device)

    @property
    def backend(self) -> str:
        """Name of the backend used on the model's current device."""
        return self._resolve(self._device()).name

    @property
    def backend_choice(self) -> str:
        """Why that backend was chosen."""
        self._resolve(self._device())
        return self._resolved[self._last_device][1]

    def __getstate__(self):
        # A copy or an unpickled MAML chooses its backend again, in its own process, on first use.
        state = super().__getstate__()
        state["_resolved"] = {}
        return state

    @property
    def inner_lr(self):
        """The step sizes the inner loop uses: a number, or per step {parameter name: α}
        (pymaml.numerics.schedule); α is 0 for the parameters that `adapt` leaves out."""
        if self.inner_lrs is None and self.adapted_names is None:
            return self.base_inner_lr
        names = list(adapted_parameters(self.module))
        if tuple(names) != self._trainable_names:
            raise RuntimeError(
                f"the model's trainable parameters changed since this MAML was built (from "
                f"{list(self._trainable_names)} to {names}); learned step sizes and adapt= are per parameter, "
                f"so build a new MAML")
        if self.inner_lrs is None:
            schedule = [{name: self.base_inner_lr for name in names}]
        elif self.learn_inner_lr == "scalar":
            schedule = [{name: self.inner_lrs for name in names}]
        elif self.learn_inner_lr == "per_parameter":
            schedule = [dict(zip(names, self.inner_lrs))]
        else:
            schedule = [{name: self.inner_lrs[step, j] for j, name in enumerate(names)}
                        for step in range(self.inner_lrs.shape[0])]
        if self.adapted_names is not None:
            schedule = [{name: alpha if name in self.adapted_names else 0.0 for name, alpha in entry.items()}
                        for entry in schedule]
        return schedule

    @property
    def inner_steps(self) -> int:
        return self.config.inner_steps

    @property
    def first_order(self) -> bool:
        return self.config.first_order

    def forward(self, support_x, support_y, query_x, query_y) -> MetaOutput:
        """One meta-step over the tasks of the batch; see MetaOutput. Under torch.no_grad() every
        backend returns the same losses with no graph (the inner loop's gradients are still taken)."""
        backend, batch = self._checked_batch(support_x, support_y, query_x, query_y)
        if torch.is_grad_enabled():
            return backend.meta_step(self.module, self.config, batch, self.inner_lr, self.step_weights)
        with torch.enable_grad():
            out = backend.meta_step(self.module, self.config, batch, self.inner_lr, self.step_weights)
        out.loss = out.loss.detach()
        return out

    def meta_gradient(self, support_x, support_y, query_x, query_y, *, accumulate: bool = True) -> MetaOutput:
        """One meta-step that adds the meta-gradient to the .grad of the model's parameters (and
        of learned step sizes), exactly as `self(...).loss.backward()` does, and returns its
        output with the loss detached. accumulate=False replaces the .grad instead: the fused
        backends overwrite existing .grad tensors in place (as after zero_grad(set_to_none=False)),
        the others set new ones; missing ones are created. The fused backends write the gradients
        without building an autograd graph over the parameters, which is cheaper for small
        models (they take no model with parameter hooks). It computes the meta-gradient whatever
        the grad mode (also under torch.no_grad()), on every backend."""
        with torch.enable_grad():
            backend, batch = self._checked_batch(support_x, support_y, query_x, query_y)
            if not accumulate and self.inner_lrs is not None:
                for p in self.inner_lrs.parameters() if isinstance(self.inner_lrs, nn.ParameterList) else [self.inner_lrs]:
                    p.grad = None
            return backend.meta_gradient(self.module, self.config, batch, self.inner_lr, self.step_weights, accumulate)

    def meta_train_step(self, support_x, support_y, query_x, query_y, optimizer: torch.optim.Optimizer) -> MetaOutput:
        """One training step: the meta-gradient into .grad (replacing what was there) and
        optimizer.step(). With torch.optim.Adam over exactly the model's parameters (no learned
        step sizes), the `cpp` backend takes the Adam step inside the fused kernel call, updating
        the parameters and the optimizer's state in place; the result is the same as
        meta_gradient(..., accumulate=False) followed by optimizer.step()."""
        if self.inner_lrs is not None:
            out = self.meta_gradient(support_x, support_y, query_x, query_y, accumulate=False)
            optimizer.step()
            return out
        with torch.enable_grad():
            backend, batch = self._checked_batch(support_x, support_y, query_x, query_y)
            return backend.meta_train_step(self.module, self.config, batch, self.inner_lr, self.step_weights,
                                           optimizer)

    def _checked_batch(self, support_x, support_y, query_x, query_y):
        """The backend for the model's device and the validated batch."""
        reference_param = next(self.module.parameters())
        device = reference_param.device
        backend = self._backend_for_call(device)
        if self.check_inputs:
            inputs = dict(support_x=support_x, support_y=support_y, query_x=query_x, query_y=query_y)
            validate_inputs(inputs, self.config.loss, reference_param.dtype, device,
                             check_finite=not backend.checks_finite_inputs)
            if support_x.shape[1] == 0 and self.config.inner_steps > 0:
                raise ValueError("support_x has no points per task; the inner loop needs at least one")
            if query_x.shape[1] == 0:
                raise ValueError("query_x has no points per task")
        if torch.is_grad_enabled() and not backend.differentiates_inputs(self.config):
            for name, tensor in (("support_x", support_x), ("support_y", support_y), ("query_x", query_x),
                                 ("query_y", query_y)):
                if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                    mode = f" with second_order={self.config.second_order!r}" if backend.name == "func" else ""
                    raise ValueError(
                        f"{name} requires grad, but backend {backend.name!r}{mode} gives no gradient to the inputs; "
                        f"for gradients with respect to the meta-batch use backend='func' with "
                        f"second_order='graph' or backend='reference', or pass {name}.detach()")
        return backend, TaskBatch(support_x, support_y, query_x, query_y)

    def adapt(self, support_x, support_y, steps: int | None = None) -> AdaptedModel:
        """Adapt to each task's support set with `steps` SGD steps (default: inner_steps).

        Differentiable with respect to the model's parameters when grad mode is on (second order
        unless first_order); call under torch.no_grad() for evaluation.
        """
        steps = self.config.inner_steps if steps is None else check_steps("steps", steps)
        device = self._device()
        if self.check_inputs:
            validate_inputs(dict(support_x=support_x, support_y=support_y), self.config.loss, self._dtype(), device, True)
            if support_x.shape[1] == 0 and steps > 0:
                raise ValueError("support_x has no points per task; adaptation needs at least one")
        backend = self._backend_for_call(device)
        params = backend.adapt(self.module, self.config, support_x, support_y, steps, self.inner_lr)
        return AdaptedModel(self.module, params, fixed_state(self.module), steps)

    def extra_repr(self) -> str:
        loss = self.config.loss if isinstance(self.config.loss, str) else getattr(self.config.loss, "__name__", "callable")
        return (
            f"inner_lr={self.base_inner_lr}, inner_steps={self.config.inner_steps}, "
            f"first_order={self.config.first_order}, loss={loss}, backend={self.requested_backend!r}, "
            f"learn_inner_lr={self.learn_inner_lr!r}, second_order={self.config.second_order!r}"
            + ("" if self.adapted_names is None else f", adapt={sorted(self.adapted_names)}")
        )
