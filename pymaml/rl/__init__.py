"""MAML for reinforcement learning (Finn et al. 2017, section 5.3): vectorised task families,
the Gaussian MLP policy, and MAML-TRPO batched over tasks."""

from .halfcheetah import HalfCheetahDirection, HalfCheetahVelocity, simulator_missing_reason
from .navigation import Navigation2D
from .policy import GaussianMLPPolicy
from .trajectories import PolicyBatch, Trajectories, advantages, sample
from .trpo import IterationStats, MetaTRPO, TRPOSettings, returns_after_steps

# The half-cheetah families need the optional extra (gymnasium, mujoco); simulator_missing_reason says why not.
ENVIRONMENTS = {"navigation2d": Navigation2D, "halfcheetah-vel": HalfCheetahVelocity,
                "halfcheetah-dir": HalfCheetahDirection}

__all__ = ["ENVIRONMENTS", "GaussianMLPPolicy", "HalfCheetahDirection", "HalfCheetahVelocity", "IterationStats",
           "MetaTRPO", "Navigation2D", "PolicyBatch", "TRPOSettings", "Trajectories", "advantages",
           "returns_after_steps", "sample", "simulator_missing_reason"]
