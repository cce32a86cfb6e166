"""MAML for reinforcement learning (Finn et al. 2017, section 5.3): vectorised task families,
the Gaussian MLP policy, and MAML-TRPO batched over tasks."""

from .navigation import Navigation2D
from .policy import GaussianMLPPolicy
from .trajectories import PolicyBatch, Trajectories, advantages, sample
from .trpo import IterationStats, MetaTRPO, TRPOSettings, returns_after_steps

ENVIRONMENTS = {"navigation2d": Navigation2D}

__all__ = ["ENVIRONMENTS", "GaussianMLPPolicy", "IterationStats", "MetaTRPO", "Navigation2D", "PolicyBatch",
           "TRPOSettings", "Trajectories", "advantages", "returns_after_steps", "sample"]
