"""Trajectories of every task sampled together, and their advantages from a linear feature
baseline fitted per task (batched: one linear solve for all tasks)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .policy import batched_outputs, split

# The baseline's ridge term, raised tenfold (up to BASELINE_RETRIES times, in float64) while a task's
# solve is singular or not finite, as in rllab's LinearFeatureBaseline, which the paper's code uses.
BASELINE_RIDGE = 1e-5
BASELINE_RETRIES = 5
# Observations are clipped to this range in the baseline's features.
FEATURE_CLIP = 10.0
# The time feature is the step index divided by this.
TIME_SCALE = 100.0


@dataclass
class Trajectories:
    """N trajectories of H steps for each of T tasks: observations (before each action)
    [T, N, H, O], actions as sampled (before the environment clips them) [T, N, H, A], rewards [T, N, H]."""

    observations: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor

    @property
    def returns(self) -> torch.Tensor:
        """The undiscounted return of each task, averaged over its trajectories, [T]."""
        return self.rewards.sum(-1).mean(-1)


@dataclass
class PolicyBatch:
    """Trajectories flattened per task into K = N·H samples: observations [T, K, O], actions
    [T, K, A], advantages [T, K]."""

    observations: torch.Tensor
    actions: torch.Tensor
    advantages: torch.Tensor

    @property
    def reinforce_targets(self) -> torch.Tensor:
        """[T, K, A + 1]: the targets of policy.reinforce_loss."""
        return torch.cat([self.actions, self.advantages.unsqueeze(-1)], dim=-1)

    def surrogate_targets(self, old_log_prob: torch.Tensor) -> torch.Tensor:
        """[T, K, A + 2]: the targets of policy.surrogate_loss."""
        return torch.cat([self.actions, self.advantages.unsqueeze(-1), old_log_prob.unsqueeze(-1)], dim=-1)


def check_share(share: range | None, total: int) -> range:
    """The tasks `share` of a meta-batch of `total` (all of them for None), checked to be a
    non-empty contiguous range inside it."""
    if share is None:
        return range(total)
    if not isinstance(share, range) or share.step != 1 or len(share) == 0 or share.start < 0 or share.stop > total:
        raise ValueError(f"share must be a non-empty contiguous range of the meta-batch's {total} tasks, got {share!r}")
    return share


@torch.no_grad()
def sample(policy: nn.Module, params: dict[str, torch.Tensor], env, tasks: torch.Tensor, trajectories: int,
           generator: torch.Generator, share: range | None = None) -> Trajectories:
    """`trajectories` trajectories for each task of `share` (a range of the T tasks of `tasks`; all
    of them for None), its i-th task acting with params[name][i]; a = μ(s) + σ ε with ε ~ N(0, I)
    drawn from `generator`, one draw [T, N, A] per time step after the reset's draws. The draws
    cover all T tasks whatever the share, so that a task's trajectories and the generator's state
    afterwards do not depend on how the meta-batch is split over processes."""
    dtypes = {p.dtype for p in params.values()}
    if dtypes != {tasks.dtype}:
        raise ValueError(f"the tasks are {tasks.dtype} but the policy's parameters are {sorted(map(str, dtypes))}; "
                         f"sample the tasks in the policy's dtype (sample_tasks(..., dtype=...))")
    share = check_share(share, tasks.shape[0])
    counts = {p.shape[0] for p in params.values()}
    if counts != {len(share)}:
        raise ValueError(f"the parameters hold {sorted(counts)} tasks but the share has {len(share)}")
    observation = env.reset(tasks, trajectories, generator, share)
    local_tasks = tasks[share.start:share.stop]
    observations, actions, rewards = [], [], []
    for _ in range(env.horizon):
        mean, log_std = split(batched_outputs(policy, params, observation))
        noise = torch.randn((tasks.shape[0], *mean.shape[1:]), generator=generator, dtype=mean.dtype)
        action = mean + torch.exp(log_std) * noise[share.start:share.stop]
        observations.append(observation)
        actions.append(action)
        observation, reward = env.step(observation, action, local_tasks)
        rewards.append(reward)
    return Trajectories(torch.stack(observations, 2), torch.stack(actions, 2), torch.stack(rewards, 2))


def discounted_returns(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """R_h = Σ_{k ≥ h} γ^(k-h) r_k along the last dimension."""
    steps = rewards.shape[-1]
    index = torch.arange(steps, dtype=rewards.dtype)
    powers = index[:, None] - index[None, :]  # [k, h]: k - h
    discount = torch.where(powers >= 0, gamma ** powers.clamp(min=0), torch.zeros((), dtype=rewards.dtype))
    return rewards @ discount


def baseline_features(observations: torch.Tensor) -> torch.Tensor:
    """rllab's linear baseline features per step: [s, s², t, t², t³, 1] with s clipped to
    ±FEATURE_CLIP and t = step / TIME_SCALE; observations [..., H, O] → [..., H, 2O + 4]."""
    s = observations.clamp(-FEATURE_CLIP, FEATURE_CLIP)
    t = (torch.arange(observations.shape[-2], dtype=observations.dtype) / TIME_SCALE)
    t = t.reshape(*([1] * (observations.dim() - 2)), -1, 1).expand(*observations.shape[:-1], 1)
    return torch.cat([s, s.square(), t, t.square(), t.pow(3), torch.ones_like(t)], dim=-1)


def fit_baseline(features: torch.Tensor, returns: torch.Tensor) -> torch.Tensor:
    """Per task t, the ridge solution w_t = (X_tᵀ X_t + λ I)⁻¹ X_tᵀ R_t: features [T, K, F],
    returns [T, K] → the baseline's values X_t w_t, [T, K]. Non-finite returns or features are
    refused (FloatingPointError naming the tasks): no ridge term makes their solve finite.

    The solve is in the features' dtype. A task whose solve there is singular or not finite is
    solved again in float64, with λ raised tenfold (up to BASELINE_RETRIES times) until it is
    finite, as rllab's LinearFeatureBaseline does. In float32 λ = 1e-5 is below the rounding of a
    Gram matrix whose entries reach K·FEATURE_CLIP⁴ (observations held at the clip make their
    columns a multiple of the constant one). Whether a task is solved again depends on its own
    data alone, so a task takes the same path whatever tasks it is fitted with (a rank's share
    or the whole meta-batch)."""
    finite = torch.isfinite(returns).all(1) & torch.isfinite(features).flatten(1).all(1)
    if not bool(finite.all()):
        tasks = torch.nonzero(~finite).flatten().tolist()
        raise FloatingPointError(f"the discounted returns or the observations of task(s) {tasks} are not finite "
                                 f"(non-finite rewards or observations, or a policy whose actions diverged)")
    weights, failed = _ridge_solve(features, returns, BASELINE_RIDGE)
    if bool(failed.any()):
        weights = weights.clone()
        weights[failed] = _ridge_solve_with_retries(features[failed].double(), returns[failed].double(),
                                                    torch.nonzero(failed).flatten().tolist()).to(weights.dtype)
    return (features @ weights).squeeze(-1)


def _ridge_solve(features: torch.Tensor, returns: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(w [T, F, 1], failed [T]): the ridge solutions and which tasks' solves were singular or not finite."""
    gram = features.transpose(1, 2) @ features
    moment = features.transpose(1, 2) @ returns.unsqueeze(-1)
    identity = torch.eye(features.shape[-1], dtype=features.dtype)
    weights, info = torch.linalg.solve_ex(gram + ridge * identity, moment)
    return weights, (info != 0) | ~torch.isfinite(weights).flatten(1).all(1)


def _ridge_solve_with_retries(features: torch.Tensor, returns: torch.Tensor, tasks: list[int]) -> torch.Tensor:
    """The ridge solutions of these tasks (their indices `tasks`, for the error), each with the
    first λ of BASELINE_RIDGE·10^i, i < BASELINE_RETRIES, that solves it."""
    weights = torch.empty(features.shape[0], features.shape[-1], 1, dtype=features.dtype)
    pending = torch.ones(features.shape[0], dtype=torch.bool)
    ridge = BASELINE_RIDGE
    for _ in range(BASELINE_RETRIES):
        solved, failed = _ridge_solve(features[pending], returns[pending], ridge)
        indices = torch.nonzero(pending).flatten()
        weights[indices[~failed]] = solved[~failed]
        pending[indices[~failed]] = False
        if not bool(pending.any()):
            return weights
        ridge *= 10
    unsolved = [tasks[i] for i in torch.nonzero(pending).flatten().tolist()]
    raise FloatingPointError(f"the linear baseline of task(s) {unsolved} has no finite solution up to a ridge term "
                             f"of {ridge / 10:g}")


def advantages(trajectories: Trajectories, gamma: float, normalize: bool = True) -> PolicyBatch:
    """The policy-gradient batch of each task: advantages A = R - b(s, t), the discounted returns
    less the task's fitted linear baseline (GAE with λ = 1), normalised per task to mean 0 and
    standard deviation 1 when `normalize`."""
    tasks, count, steps, _ = trajectories.observations.shape
    returns = discounted_returns(trajectories.rewards, gamma).reshape(tasks, count * steps)
    features = baseline_features(trajectories.observations).reshape(tasks, count * steps, -1)
    advantage = returns - fit_baseline(features, returns)
    if normalize:
        advantage = (advantage - advantage.mean(1, keepdim=True)) / (advantage.std(1, keepdim=True) + 1e-8)
    return PolicyBatch(trajectories.observations.reshape(tasks, count * steps, -1),
                       trajectories.actions.reshape(tasks, count * steps, -1), advantage)
