"""Per-task losses. Each is a mean over the task's points (and over output dimensions for MSE)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over points and output dimensions of (prediction - target)^2."""
    if prediction.shape != target.shape:
        # Broadcasting here would silently compute a different loss.
        raise ValueError(
            f"mse: the model's output per task has shape {tuple(prediction.shape)} but the targets "
            f"have shape {tuple(target.shape)}; they must match"
        )
    return (prediction - target).square().mean()


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over points of -log softmax(logits)[target], through log-sum-exp."""
    if logits.dim() != 2 or target.dim() != 1 or logits.shape[0] != target.shape[0]:
        raise ValueError(
            f"cross_entropy: expected per-task logits [K, classes] and labels [K], got logits "
            f"{tuple(logits.shape)} and labels {tuple(target.shape)}"
        )
    return F.cross_entropy(logits, target)


NAMED_LOSSES: dict[str, LossFn] = {"mse": mse, "cross_entropy": cross_entropy}


def resolve_loss(loss: str | LossFn) -> LossFn:
    if callable(loss):
        return loss
    try:
        return NAMED_LOSSES[loss]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown loss {loss!r}; use one of {sorted(NAMED_LOSSES)} or a callable (prediction, target) -> scalar"
        ) from None
