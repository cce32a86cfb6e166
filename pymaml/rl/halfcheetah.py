"""The paper's half-cheetah velocity and direction task families on gymnasium's MuJoCo
HalfCheetah-v5 (the optional extra: pip install "pymaml[rl]").

A batch is T·N simulators, one per (task, trajectory), stepped by one call to `step` for all of
them. The rewards replace gymnasium's with the paper's (Finn et al. 2017, section 5.3), from the
forward velocity v of the torso and the action a clipped to the action space [-1, 1]⁶:
  velocity:  -|v - v_goal| - CONTROL_COST ‖a‖²,  v_goal uniform in [0, 2]
  direction: d · v - CONTROL_COST ‖a‖²,          d = +1 (forward) or -1 (backward), equally likely
Every trajectory lasts HORIZON steps; the cheetah never terminates. A simulator holds its own
state, so `step` must follow `reset` and the steps before it, in order.
"""

from __future__ import annotations

import warnings

import torch

HORIZON = 200
CONTROL_COST = 0.05
MAX_GOAL_VELOCITY = 2.0
EXTRA_HINT = 'the half-cheetah tasks need gymnasium and mujoco: pip install "pymaml[rl]"'


def simulator_missing_reason() -> str | None:
    """Why the half-cheetah tasks cannot run here, or None when they can."""
    try:
        import gymnasium  # noqa: F401
        import mujoco  # noqa: F401
    except ImportError as error:
        return f"{EXTRA_HINT} ({error})"
    return None


def _python_warning(message: str) -> None:
    warnings.warn(f"MuJoCo: {message}", RuntimeWarning, stacklevel=2)


class HalfCheetah:
    observation_size = 17
    action_size = 6
    name = "halfcheetah"

    def __init__(self, horizon: int = HORIZON):
        reason = simulator_missing_reason()
        if reason is not None:
            raise ImportError(reason)
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise ValueError(f"horizon must be a positive integer, got {horizon!r}")
        self.horizon = horizon
        self._simulators: list = []

    def _simulator_pool(self, count: int) -> list:
        """The first `count` simulators, created as needed. While they are created, MuJoCo's
        warnings (its compiler repeats one for every copy of the model) go to Python's warnings,
        which show each once, instead of to stderr and MUJOCO_LOG.TXT in the working folder."""
        import gymnasium
        import mujoco

        previous = mujoco.get_mju_user_warning()
        mujoco.set_mju_user_warning(_python_warning)
        try:
            while len(self._simulators) < count:
                self._simulators.append(gymnasium.make("HalfCheetah-v5", max_episode_steps=None).unwrapped)
        finally:
            mujoco.set_mju_user_warning(previous)
        return self._simulators[:count]

    def reset(self, tasks: torch.Tensor, trajectories: int, generator: torch.Generator | None = None,
              share: range | None = None) -> torch.Tensor:
        """The simulators of the tasks `share` (a range of the T tasks; all for None) reset
        (gymnasium's small random initial state, seeded from `generator`); observations
        [len(share), N, 17]. The seeds are drawn for all T·N simulators whatever the share."""
        import numpy

        self._check_tasks(tasks)
        share = range(tasks.shape[0]) if share is None else share
        count = len(share) * trajectories
        generator = torch.Generator().manual_seed(0) if generator is None else generator
        seeds = torch.randint(0, 2**31 - 1, (tasks.shape[0] * trajectories,), generator=generator)
        seeds = seeds[share.start * trajectories:share.stop * trajectories].tolist()
        observations = [simulator.reset(seed=seed)[0] for simulator, seed in zip(self._simulator_pool(count), seeds)]
        self._active = count
        return torch.from_numpy(numpy.stack(observations)).to(tasks.dtype).reshape(len(share), trajectories, -1)

    def step(self, observations: torch.Tensor, actions: torch.Tensor, tasks: torch.Tensor):
        """(next observations [T, N, 17], rewards [T, N]) for actions [T, N, 6]."""
        import numpy

        self._check_tasks(tasks)
        tasks_count, trajectories = actions.shape[:2]
        if actions.shape != (tasks_count, trajectories, self.action_size) or tasks_count * trajectories != self._active:
            raise ValueError(f"actions must be [T, N, {self.action_size}] for the T·N = {self._active} simulators "
                             f"of the last reset, got {tuple(actions.shape)}")
        clipped = actions.clamp(-1.0, 1.0)
        flat = clipped.reshape(-1, self.action_size).double().numpy()
        next_observations, velocities = [], []
        for simulator, action in zip(self._simulators[: self._active], flat):
            observation, _, _, _, info = simulator.step(action)
            next_observations.append(observation)
            velocities.append(info["x_velocity"])
        velocity = torch.tensor(velocities, dtype=actions.dtype).reshape(tasks_count, trajectories)
        control = CONTROL_COST * clipped.square().sum(-1)
        rewards = self.task_reward(velocity, tasks[:, 0:1]) - control
        next_observations = torch.from_numpy(numpy.stack(next_observations)).to(actions.dtype)
        return next_observations.reshape(tasks_count, trajectories, -1), rewards

    @staticmethod
    def _check_tasks(tasks: torch.Tensor) -> None:
        if tasks.dim() != 2 or tasks.shape[1] != 1:
            raise ValueError(f"half-cheetah tasks are [T, 1] (goal velocity or direction), got {tuple(tasks.shape)}")


class HalfCheetahVelocity(HalfCheetah):
    name = "halfcheetah-vel"

    def sample_tasks(self, count: int, generator: torch.Generator, dtype=torch.float32) -> torch.Tensor:
        return (torch.rand(count, 1, generator=generator, dtype=torch.float64) * MAX_GOAL_VELOCITY).to(dtype)

    @staticmethod
    def task_reward(velocity: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        return -(velocity - goal).abs()


class HalfCheetahDirection(HalfCheetah):
    name = "halfcheetah-dir"

    def sample_tasks(self, count: int, generator: torch.Generator, dtype=torch.float32) -> torch.Tensor:
        return (torch.randint(0, 2, (count, 1), generator=generator) * 2 - 1).to(dtype)

    @staticmethod
    def task_reward(velocity: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        return direction * velocity
