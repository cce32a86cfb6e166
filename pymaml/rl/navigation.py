"""The paper's 2D navigation task family (Finn et al. 2017, section 5.3), vectorised over tasks and
trajectories: one call to `step` moves every agent of every task.

A point agent starts at the origin; its action is a velocity, clipped to [-MAX_SPEED, MAX_SPEED]²;
the new position is position + clipped action, and the reward is the negative distance from the
new position to the task's goal, -‖position' - goal‖. Goals are uniform in [-GOAL_RANGE, GOAL_RANGE]².
Every trajectory lasts HORIZON steps (the paper's; tests pass shorter ones), with no early
termination, so every batch is rectangular.
"""

from __future__ import annotations

import torch

MAX_SPEED = 0.1
GOAL_RANGE = 0.5
HORIZON = 100


class Navigation2D:
    """Observations are the positions [..., 2]; actions are velocities [..., 2]; a task is its goal [2]."""

    name = "navigation2d"
    observation_size = 2
    action_size = 2

    def __init__(self, horizon: int = HORIZON):
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise ValueError(f"horizon must be a positive integer, got {horizon!r}")
        self.horizon = horizon

    def sample_tasks(self, count: int, generator: torch.Generator, dtype=torch.float32) -> torch.Tensor:
        """`count` goals [count, 2], uniform in [-GOAL_RANGE, GOAL_RANGE]²."""
        return (torch.rand(count, 2, generator=generator, dtype=torch.float64) * 2 - 1).mul(GOAL_RANGE).to(dtype)

    def reset(self, tasks: torch.Tensor, trajectories: int, generator: torch.Generator | None = None,
              share: range | None = None) -> torch.Tensor:
        """Every agent of the tasks `share` (a range of the goals [T, 2]; all for None) at the origin:
        [len(share), N, 2] (deterministic: `generator` unused)."""
        self._check_tasks(tasks)
        count = tasks.shape[0] if share is None else len(share)
        return tasks.new_zeros(count, trajectories, 2)

    def step(self, observations: torch.Tensor, actions: torch.Tensor, tasks: torch.Tensor):
        """(next observations, rewards): observations and actions [T, N, 2], goals [T, 2]; rewards [T, N]."""
        self._check_tasks(tasks)
        if observations.shape != actions.shape or observations.dim() != 3 or observations.shape[0] != tasks.shape[0]:
            raise ValueError(f"observations and actions must both be [T, N, 2] with T = {tasks.shape[0]} goals, "
                             f"got {tuple(observations.shape)} and {tuple(actions.shape)}")
        positions = observations + actions.clamp(-MAX_SPEED, MAX_SPEED)
        rewards = -(positions - tasks[:, None, :]).norm(dim=-1)
        return positions, rewards

    @staticmethod
    def _check_tasks(tasks: torch.Tensor) -> None:
        if tasks.dim() != 2 or tasks.shape[1] != 2:
            raise ValueError(f"navigation2d tasks are goals [T, 2], got a tensor of shape {tuple(tasks.shape)}")
