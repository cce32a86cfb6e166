"""What the training jobs (pymaml.sinusoid, pymaml.omniglot) share: the result of a training run
and checkpoints that are written atomically and refused when their settings differ."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .maml import MAML


class TrajectorySettings:
    """A job config whose TRAJECTORY_FIELDS (the settings that change the training trajectory) a
    checkpoint must agree on."""

    TRAJECTORY_FIELDS: tuple[str, ...] = ()

    def trajectory(self) -> dict:
        return {name: getattr(self, name) for name in self.TRAJECTORY_FIELDS}


@dataclass
class TrainResult:
    maml: MAML
    iterations_done: int
    resumed_from: int
    final_loss: float
    seconds: float
    losses: list[float] = field(default_factory=list)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a crash leaves either the old checkpoint or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def load_checkpoint(path: Path, config: TrajectorySettings) -> dict:
    state = torch.load(path, weights_only=True)
    if state.get("trajectory") != config.trajectory():
        raise ValueError(
            f"checkpoint {path} was written with settings {state.get('trajectory')}, "
            f"which differ from this run's {config.trajectory()}; use another --checkpoint path"
        )
    return state
