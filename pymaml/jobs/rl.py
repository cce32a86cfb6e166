"""MAML for reinforcement learning, the paper's 2D navigation and half-cheetah velocity and
direction tasks (Finn et al. 2017, section 5.3, Figure 5): meta-train with MAML-TRPO, train the
multi-task "pretrained" baseline on the same tasks, then evaluate both and a random
initialisation on new tasks after 0..3 policy-gradient steps.

Settings are the paper's: Gaussian MLP policy 2×100 ReLU, 20 trajectories per task and step,
horizon 100, one inner REINFORCE step of α = 0.1 with a linear feature baseline, TRPO with
KL ≤ 0.01, meta-batch 20 (navigation) or 40 (half-cheetah, horizon 200). The paper gives no
iteration count; DEFAULT_ITERATIONS is the count of pytorch-maml-rl's navigation configuration. The
pretrained policy starts from the same initialisation and takes one TRPO step per iteration on
the trajectories of the same tasks, without the inner step. Evaluation: 40 new tasks, returns
averaged over 20 trajectories per task, the same step size α and the same noise stream for every
policy.

Under torchrun every rank draws the same meta-batch of tasks and the same noise from the seed,
samples, adapts and differentiates its share of the tasks, and the TRPO step all-reduces the
meta-gradient, the Fisher-vector products and the line search's losses and KLs over the ranks
(pymaml.rl.trpo), so that every rank keeps the policy of a single-process run; rank 0 alone
writes the checkpoints, evaluates, and writes report.json and the figure.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..distributed import DistributedContext, broadcast_state
from ..rl import ENVIRONMENTS, GaussianMLPPolicy, MetaTRPO, TRPOSettings, returns_after_steps
from ..rl.allocator import retain_freed_memory
from .training import (JobError, TrajectorySettings, check_checkpoint_on_main, check_on_main, check_writable,
                       finite_or_none, iterations_summary, progress_bar, resume, save_checkpoint, write_report)

DEFAULT_ITERATIONS = 500
# The paper's meta-batch sizes: 20 tasks for navigation, 40 for the locomotion tasks.
DEFAULT_META_BATCH = {"navigation2d": 20, "halfcheetah-vel": 40, "halfcheetah-dir": 40}
COLORS = {"meta-learned": "tab:green", "pretrained": "tab:blue", "random": "tab:gray"}
# Held-out tasks and their noise: streams the training never draws from.
EVAL_SEED_OFFSET = 1_000_003
JOB_KEYS = ("pretrained", "task_generator", "sampling_generator", "history")


@dataclass
class RLConfig(TrajectorySettings):
    env: str = "navigation2d"
    iterations: int = DEFAULT_ITERATIONS
    meta_batch: int = 20
    trajectories: int = 20
    inner_lr: float = 0.1
    max_kl: float = 0.01
    first_order: bool = False
    seed: int = 0
    eval_tasks: int = 40
    eval_steps: int = 3
    # None: the environment's (the paper's) horizon; shorter ones make quick checks.
    horizon: int | None = None
    checkpoint: str | None = None
    checkpoint_every: int = 10
    progress: bool = True

    TRAJECTORY_FIELDS = ("env", "meta_batch", "trajectories", "inner_lr", "max_kl", "first_order", "seed",
                         "horizon")

    def __post_init__(self):
        if self.env not in ENVIRONMENTS:
            raise JobError(f"unknown environment {self.env!r}; this version has {sorted(ENVIRONMENTS)}")

    def environment(self):
        environment = ENVIRONMENTS[self.env]
        try:
            return environment() if self.horizon is None else environment(horizon=self.horizon)
        except ImportError as error:
            raise JobError(f"--env {self.env}: {error}") from error


@dataclass
class RLTrainResult:
    meta_policy: GaussianMLPPolicy
    pretrained_policy: GaussianMLPPolicy
    iterations_done: int
    resumed_from: int
    seconds: float
    history: list[dict] = field(default_factory=list)

    @property
    def iterations_run(self) -> int:
        return self.iterations_done - self.resumed_from


def initial_policy(env, seed: int) -> GaussianMLPPolicy:
    """The initialisation every policy of a run starts from (and the "random" policy itself)."""
    torch.manual_seed(seed)
    return GaussianMLPPolicy(env.observation_size, env.action_size)


def train(config: RLConfig, context: DistributedContext | None = None) -> RLTrainResult:
    """Meta-train and pretrain, one meta-batch of tasks per iteration for both; resumes from
    config.checkpoint when it exists.

    context: a distributed context (pymaml.distributed.init()) to split every meta-batch across
    its ranks; None or a single-process context trains in this process alone.
    """
    context = DistributedContext() if context is None else context
    context.check_same("the rl settings", (config.trajectory(), config.iterations))
    if config.meta_batch < context.world_size:
        raise JobError(f"the meta-batch has {config.meta_batch} tasks but there are {context.world_size} ranks; "
                       f"every rank needs at least one task (--meta-batch)")
    env = config.environment()
    checkpoint = Path(config.checkpoint) if config.checkpoint else None
    check_checkpoint_on_main(checkpoint, context)
    meta_policy, pretrained_policy = initial_policy(env, config.seed), initial_policy(env, config.seed)
    settings = TRPOSettings(inner_lr=config.inner_lr, first_order=config.first_order, max_kl=config.max_kl)
    meta = MetaTRPO(meta_policy, env, settings, config.trajectories, context=context)
    pretrain = MetaTRPO(pretrained_policy, env, settings, config.trajectories, multitask=True, context=context)
    task_generator = torch.Generator().manual_seed(config.seed)
    sampling_generator = torch.Generator().manual_seed(config.seed + 1)
    history: list[dict] = []
    start = 0
    state = resume(checkpoint, config, context, JOB_KEYS)
    if state is not None:
        meta_policy.load_state_dict(state["model"])
        pretrained_policy.load_state_dict(state["pretrained"])
        task_generator.set_state(state["task_generator"])
        sampling_generator.set_state(state["sampling_generator"])
        history = list(state["history"])
        start = int(state["iteration"])
    # Every rank starts from rank 0's policies (the same seed gives the same ones; this makes sure).
    broadcast_state(meta_policy, context)
    broadcast_state(pretrained_policy, context)

    def snapshot(done: int) -> dict:
        # TRPO keeps no optimizer state; the key is there because every job's checkpoint has it.
        return {"model": meta_policy.state_dict(), "optimizer": {}, "pretrained": pretrained_policy.state_dict(),
                "task_generator": task_generator.get_state(), "sampling_generator": sampling_generator.get_state(),
                "history": history, "iteration": done, "trajectory": config.trajectory()}

    began = time.perf_counter()
    ranks = f", {context.world_size} ranks" if context.is_distributed else ""
    bar = progress_bar(range(start, config.iterations), start=start, total=config.iterations,
                       enabled=config.progress and context.is_main, description=f"meta-train [{config.env}{ranks}]")
    saves = checkpoint is not None and context.is_main
    for iteration in bar:
        tasks = env.sample_tasks(config.meta_batch, task_generator)
        meta_stats = meta.step(tasks, sampling_generator)
        pretrain_stats = pretrain.step(tasks, sampling_generator)
        history.append({"pre_return": meta_stats.pre_return, "post_return": meta_stats.post_return,
                        "pretrained_return": pretrain_stats.post_return, "accepted": meta_stats.accepted,
                        "kl": meta_stats.kl, **{f"seconds_{k}": v for k, v in meta_stats.seconds.items()}})
        bar.set_postfix(post=f"{meta_stats.post_return:.1f}", pre=f"{meta_stats.pre_return:.1f}",
                        pretrained=f"{pretrain_stats.post_return:.1f}", refresh=False)
        done = iteration + 1
        if saves and done % config.checkpoint_every == 0:
            save_checkpoint(checkpoint, snapshot(done))
    bar.close()
    seconds = time.perf_counter() - began
    if saves:
        save_checkpoint(checkpoint, snapshot(config.iterations))
    return RLTrainResult(meta_policy, pretrained_policy, config.iterations, start, seconds, history)


def evaluate(policies: dict, env, config: RLConfig) -> dict:
    """{policy: {"mean": {steps: v}, "ci95": {steps: v}}}: the return averaged over config.eval_tasks
    new tasks after 0..eval_steps steps, with its 95% interval over the tasks."""
    seed = config.seed + EVAL_SEED_OFFSET
    tasks = env.sample_tasks(config.eval_tasks, torch.Generator().manual_seed(seed))
    results = {}
    for name, policy in policies.items():
        returns = returns_after_steps(policy, env, tasks, config.eval_steps, config.inner_lr, config.trajectories,
                                      torch.Generator().manual_seed(seed + 1))
        spread = returns.std(1) if returns.shape[1] > 1 else torch.full((returns.shape[0],), math.nan)
        results[name] = {
            "mean": {str(s): returns[s].mean().item() for s in range(returns.shape[0])},
            "ci95": {str(s): finite_or_none(1.96 * spread[s] / math.sqrt(returns.shape[1]))
                     for s in range(returns.shape[0])},
        }
    return results


def plot(report: dict, path: Path) -> None:
    """Figure 5's panel (return against policy-gradient steps) beside the training curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (steps_axis, train_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, result in report["evaluation"].items():
        steps = sorted(result["mean"], key=int)
        steps_axis.errorbar([int(s) for s in steps], [result["mean"][s] for s in steps],
                            yerr=[result["ci95"][s] or 0.0 for s in steps], marker="o", capsize=2, label=name,
                            color=COLORS[name])
    steps_axis.set_xlabel("number of gradient steps")
    steps_axis.set_ylabel("average return")
    steps_axis.set_title(f"{report['config']['env']}: {report['config']['eval_tasks']} new tasks")
    steps_axis.legend(fontsize=8)
    history = report["history"]
    if history:
        iterations = range(1, len(history) + 1)
        train_axis.plot(iterations, [h["pre_return"] for h in history], ":", color=COLORS["meta-learned"],
                        label="meta-learned, before the step")
        train_axis.plot(iterations, [h["post_return"] for h in history], color=COLORS["meta-learned"],
                        label="meta-learned, after 1 step")
        train_axis.plot(iterations, [h["pretrained_return"] for h in history], color=COLORS["pretrained"],
                        label="pretrained")
    train_axis.set_xlabel("meta-iteration")
    train_axis.set_ylabel("mean return of the meta-batch")
    train_axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run(config: RLConfig, out_dir: Path, context: DistributedContext | None = None) -> dict | None:
    """Train, evaluate, and write report.json and <env>.png into out_dir (checked writable first);
    with a distributed context every rank trains and rank 0 alone evaluates and writes (the other
    ranks return None)."""
    context = DistributedContext() if context is None else context
    check_on_main(context, lambda: check_writable(out_dir, "report.json and the figure (--out)"))
    retained = retain_freed_memory()
    started = time.perf_counter()
    result = train(config, context)
    trained = time.perf_counter()
    if not context.is_main:
        return None
    env = config.environment()
    policies = {"meta-learned": result.meta_policy, "pretrained": result.pretrained_policy,
                "random": initial_policy(env, config.seed)}
    evaluation = evaluate(policies, env, config)
    evaluated = time.perf_counter()
    image = out_dir / f"{config.env}.png"
    ran = result.history[result.resumed_from:]
    report = {
        "job": "rl",
        "config": {k: v for k, v in asdict(config).items() if k != "progress"},
        "iterations": result.iterations_done,
        "resumed_from": result.resumed_from,
        "iterations_run": result.iterations_run,
        "seconds": {
            "train": trained - started,
            "train_loop": result.seconds,
            "evaluate": evaluated - trained,
            **{f"meta_{part}": sum(h[f"seconds_{part}"] for h in ran) for part in ("sampling", "inner", "outer")},
        },
        "ms_per_iteration": 1e3 * result.seconds / result.iterations_run if result.iterations_run else None,
        "evaluation": evaluation,
        "history": result.history,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "freed_memory_retained": retained,
        "world_size": context.world_size,
        "distributed_backend": context.backend,
        "pymaml": __version__,
        "figure": image.name,
    }
    report["seconds"]["total"] = time.perf_counter() - started
    write_report(out_dir / "report.json", report)
    plot(report, image)
    return report


def summary(report: dict) -> str:
    """The Figure 5 table as printed by the CLI."""
    steps = sorted(next(iter(report["evaluation"].values()))["mean"], key=int)
    lines = [iterations_summary(report, 0) + f" (train {report['seconds']['train']:.1f} s, "
             f"evaluate {report['seconds']['evaluate']:.1f} s)"
             + (f"; meta-batch split over {report['world_size']} ranks ({report['distributed_backend']})"
                if report.get("world_size", 1) > 1 else ""),
             f"average return over {report['config']['eval_tasks']} new tasks (± 95% interval) after N "
             f"policy-gradient steps of α = {report['config']['inner_lr']:g}:",
             "  " + f"{'policy':<14}" + "".join(f"{'N=' + s:>18}" for s in steps)]
    for name, result in report["evaluation"].items():
        cells = []
        for s in steps:
            interval = result["ci95"][s]
            cells.append(f"{result['mean'][s]:.2f}" + (f" ± {interval:.2f}" if interval is not None else ""))
        lines.append("  " + f"{name:<14}" + "".join(f"{cell:>18}" for cell in cells))
    return "\n".join(lines)
