"""What the training jobs (pymaml.sinusoid, pymaml.omniglot) share: the result of a training run
and checkpoints that are written atomically and refused when their settings differ."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .distributed import DistributedContext
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


def train_loop(maml: MAML, context: DistributedContext, *, start: int, iterations: int, step: Callable,
               snapshot: Callable[[int], dict], checkpoint: Path | None, checkpoint_every: int, progress: bool,
               smoothing: float, postfix_every: int = 1) -> TrainResult:
    """Iterations start..iterations-1 of `step()` (one training step, returning its MetaOutput),
    with a progress bar and the running loss (exponential average, weight `smoothing` on the past)
    on rank 0, and checkpoints (`snapshot(iterations done)`) every checkpoint_every iterations and
    at the end, written by rank 0 alone."""
    losses: list[float] = []
    running = math.nan
    began = time.perf_counter()
    ranks = f", {context.world_size} ranks" if context.is_distributed else ""
    bar = tqdm(range(start, iterations), initial=start, total=iterations, disable=not (progress and context.is_main),
               desc=f"meta-train [{maml.backend}{ranks}]", smoothing=0.05)
    saves = checkpoint is not None and context.is_main
    for iteration in bar:
        loss = step().loss.item()
        losses.append(loss)
        running = loss if math.isnan(running) else smoothing * running + (1 - smoothing) * loss
        if iteration % postfix_every == 0:
            bar.set_postfix(loss=f"{running:.3f}", refresh=False)
        done = iteration + 1
        if saves and done % checkpoint_every == 0:
            save_checkpoint(checkpoint, snapshot(done))
    seconds = time.perf_counter() - began
    done = max(start, iterations)
    if saves:
        save_checkpoint(checkpoint, snapshot(done))
    return TrainResult(maml, done, start, running, seconds, losses)
