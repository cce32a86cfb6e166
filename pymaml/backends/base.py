"""The interface every backend implements, and the values that cross it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import nn

from ..numerics.losses import LossFn, resolve_loss
from ..numerics.schedule import InnerLR


class TaskBatch(NamedTuple):
    """A meta-batch: every tensor has a leading task dimension T."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor


SECOND_ORDER_MODES = ("memory_efficient", "graph")


@dataclass(frozen=True)
class MetaConfig:
    """What a meta-step computes, independent of how. The step sizes and step weights, which may
    be learned tensors, travel beside it (see Backend.meta_step).

    second_order and task_chunk choose how the `func` backend computes the meta-gradient (the
    result is the same): "memory_efficient" (default) runs the reverse chain of
    pymaml.numerics.reverse_chain, O(task_chunk · S · |θ|) memory, task_chunk tasks at a time (None: its
    default); "graph" differentiates one autograd graph over the whole inner loop of all tasks.
    The other backends ignore both: `reference` always builds the graph, and the fused backends
    (cpp, cuda, triton) always run their own reverse chain, which keeps no graph either.
    """

    inner_steps: int
    first_order: bool
    loss: str | LossFn
    second_order: str = "memory_efficient"
    task_chunk: int | None = None

    def __post_init__(self):
        if self.second_order not in SECOND_ORDER_MODES:
            raise ValueError(f"second_order must be one of {SECOND_ORDER_MODES}, got {self.second_order!r}")
        chunk = self.task_chunk
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"task_chunk must be None or an integer >= 1, got {chunk!r}")

    @property
    def loss_fn(self) -> LossFn:
        return resolve_loss(self.loss)


@dataclass
class MetaOutput:
    """Result of a meta-step.

    loss: the meta-loss (mean over tasks of the adapted query loss); backward() gives the meta-gradient.
    task_losses: adapted query loss per task, shape [T], detached.
    pre_adaptation_loss: mean query loss at the unadapted parameters, detached.
    backend: the backend that computed it.
    """

    loss: torch.Tensor
    task_losses: torch.Tensor
    pre_adaptation_loss: torch.Tensor
    backend: str


class Backend:
    """One way to compute MAML's meta-step. Subclasses set `name` and implement the methods."""

    name: ClassVar[str]
    # True where meta_step itself rejects a batch with NaN or Inf (naming the tensor), so that
    # MAML skips its own scan.
    checks_finite_inputs: ClassVar[bool] = False

    def __reduce__(self):
        # Backends are per-process singletons holding native plans and caches keyed by model: a
        # copy or a pickle refers to the backend by name, and the copy's models get plans of their own.
        from . import get_backend

        return get_backend, (self.name,)

    def differentiates_inputs(self, config: MetaConfig) -> bool:
        """Whether the meta-loss this backend returns carries gradients to inputs that require grad."""
        return False

    def changed_reason(self, model: nn.Module, config: MetaConfig, device: torch.device) -> str | None:
        """Asked on every call of the backend chosen for `model`: why it can no longer compute
        what the model computes (the model changed since: a hook, a parametrization, a new
        layer), or None. Cheap where nothing changed."""
        return None

    def unavailable_reason(self) -> str | None:
        """None if this backend can run in this process, else why not (missing extension, no GPU, ...)."""
        return None

    def auto_skip_reason(self, device: torch.device) -> str | None:
        """Why `auto` passes over this backend on `device` even where it could run, or None."""
        return None

    def unsupported_reason(self, model: nn.Module, config: MetaConfig, device: torch.device) -> str | None:
        """None if this backend computes `config` for `model` on `device`, else why not (naming the layer)."""
        raise NotImplementedError

    def meta_step(
        self, model: nn.Module, config: MetaConfig, batch: TaskBatch, inner_lr: InnerLR,
        step_weights: torch.Tensor | None,
    ) -> MetaOutput:
        """The meta-loss with α_s = inner_lr (pymaml.numerics.schedule) and loss Σ_s w_s L_query(θ_s) when
        step_weights w is given, else L_query(θ_S); gradients reach the model, and inner_lr and
        step_weights where they require grad."""
        raise NotImplementedError

    def meta_gradient(
        self, model: nn.Module, config: MetaConfig, batch: TaskBatch, inner_lr: InnerLR,
        step_weights: torch.Tensor | None, accumulate: bool = True,
    ) -> MetaOutput:
        """meta_step followed by loss.backward(): the meta-gradient is added to the .grad of the
        model's parameters (and of learned step sizes or weights), or replaces the model's
        .grad when not accumulate; the loss comes back detached. Backends that compute the
        gradient inside the forward pass override this to skip the autograd graph."""
        if not accumulate:
            model.zero_grad(set_to_none=True)
        out = self.meta_step(model, config, batch, inner_lr, step_weights)
        if out.loss.requires_grad:  # else no parameter that requires grad reaches it: a zero meta-gradient
            out.loss.backward()
        out.loss = out.loss.detach()
        return out

    def meta_train_step(
        self, model: nn.Module, config: MetaConfig, batch: TaskBatch, inner_lr: InnerLR,
        step_weights: torch.Tensor | None, optimizer: torch.optim.Optimizer,
    ) -> MetaOutput:
        """meta_gradient(accumulate=False) then optimizer.step(); backends may fuse the two."""
        out = self.meta_gradient(model, config, batch, inner_lr, step_weights, accumulate=False)
        optimizer.step()
        return out

    def adapt(
        self, model: nn.Module, config: MetaConfig, support_x: torch.Tensor, support_y: torch.Tensor, steps: int,
        inner_lr: InnerLR,
    ) -> dict[str, torch.Tensor]:
        """Adapted parameters per task, each with a leading dimension T."""
        raise NotImplementedError
