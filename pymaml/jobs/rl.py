"""MAML for reinforcement learning, the paper's 2D navigation and half-cheetah velocity and
direction tasks (Finn et al. 2017, section 5.3, Figures 4 and 5): meta-train with MAML-TRPO, train the
multi-task "pretrained" baseline on the same tasks, then evaluate both and a random
initialisation on new tasks after 0..3 policy-gradient steps.

Settings are the paper's: Gaussian MLP policy 2×100 ReLU, 20 trajectories per task and step,
horizon 100, one inner REINFORCE step of α = 0.1 with a linear feature baseline, TRPO with
KL ≤ 0.01, meta-batch 20 (navigation) or 40 (half-cheetah, horizon 200), up to 500
meta-iterations (the paper's appendix A.2). The pretrained policy starts from the same
initialisation and takes one TRPO step per iteration on the trajectories of the same tasks,
without the inner step.

Evaluation follows the paper's appendix A.2:
- Each trained policy is evaluated at the parameters of the iteration with its best mean return
  of the meta-batch during training ("the model with the best average return during training"),
  or at the last parameters with select="last". For the meta-learned policy that return is the
  one after the inner step; for the pretrained policy, its own.
- The meta-learned policy adapts with α = 0.1 at the first step and α/2 at the later ones ("we
  found that halving the learning rate after the first gradient step produced superior
  performance").
- The baselines' step size is "manually tuned": here it is the candidate of `baseline_lrs` with
  the best mean return over steps 1..eval_steps on `tune_tasks` tasks of their own (drawn from a
  stream that neither training nor evaluation draws from), one step size for all of a baseline's
  steps.
- 40 new tasks, returns averaged over 20 trajectories per task, the same noise stream for every
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
# The baselines' step-size tuning tasks and their noise: streams neither training nor evaluation draws from.
TUNE_SEED_OFFSET = 2_000_029
# Candidate step sizes for the pretrained and random baselines.
BASELINE_LRS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
SELECTIONS = ("best", "last")
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
    # Which parameters of each trained policy to evaluate (SELECTIONS; see the module docstring).
    select: str = "best"
    # The meta-learned policy's step size after the first evaluation step; None: inner_lr / 2.
    eval_later_lr: float | None = None
    baseline_lrs: tuple[float, ...] = BASELINE_LRS
    tune_tasks: int = 20
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
        if self.select not in SELECTIONS:
            raise JobError(f"select must be one of {SELECTIONS}, got {self.select!r}")
        self.baseline_lrs = tuple(float(lr) for lr in self.baseline_lrs)
        rates = (self.inner_lr, *self.baseline_lrs, *(() if self.eval_later_lr is None else (self.eval_later_lr,)))
        if not self.baseline_lrs or not all(lr >= 0 and math.isfinite(lr) for lr in rates):
            raise JobError("inner_lr, eval_later_lr and baseline_lrs must be finite numbers >= 0 "
                           f"(and baseline_lrs not empty), got {self.inner_lr}, {self.eval_later_lr}, "
                           f"{self.baseline_lrs}")
        if self.tune_tasks < 2:
            raise JobError(f"tune_tasks must be at least 2, got {self.tune_tasks}")
        if not (self.max_kl > 0 and math.isfinite(self.max_kl)):
            raise JobError(f"max_kl must be a finite number > 0, got {self.max_kl}")
        if self.trajectories < 2:
            raise JobError(f"trajectories must be at least 2 (the advantages are normalised over them), "
                           f"got {self.trajectories}")

    def meta_step_sizes(self) -> list[float]:
        """The meta-learned policy's evaluation step sizes: α, then eval_later_lr (α/2 by default)."""
        later = self.inner_lr / 2 if self.eval_later_lr is None else self.eval_later_lr
        return [self.inner_lr] + [later] * (self.eval_steps - 1) if self.eval_steps else []

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
    # Per trained policy ("meta-learned", "pretrained"): the iteration with the best mean return of
    # the meta-batch, that return, and the parameters it was sampled with (see new_best).
    best: dict = field(default_factory=dict)

    @property
    def iterations_run(self) -> int:
        return self.iterations_done - self.resumed_from


def initial_policy(env, seed: int) -> GaussianMLPPolicy:
    """The initialisation every policy of a run starts from (and the "random" policy itself)."""
    torch.manual_seed(seed)
    return GaussianMLPPolicy(env.observation_size, env.action_size)


def new_best(tracked_from: int = 0) -> dict:
    """No iteration yet: "iteration" is the 1-based meta-iteration whose meta-batch had the best
    mean return, "trpo_steps" the TRPO steps its parameters "state" had taken (iteration - 1);
    "tracked_from" the iterations done before the tracking began (0: it covers the whole run)."""
    return {name: {"iteration": 0, "trpo_steps": 0, "return": -math.inf, "state": None, "tracked_from": tracked_from}
            for name in ("meta-learned", "pretrained")}


def keep_if_best(best: dict, iteration: int, value: float, state: dict) -> None:
    """Keep `state` (the parameters that sampled iteration `iteration`, 1-based) when its mean
    return `value` beats the best so far; the first of equal returns stays, a NaN never wins."""
    if value > best["return"]:
        best.update(iteration=iteration, trpo_steps=iteration - 1, **{"return": value},
                    state={name: tensor.clone() for name, tensor in state.items()})


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
    best = new_best()
    start = 0
    state = resume(checkpoint, config, context, JOB_KEYS)
    if state is not None:
        meta_policy.load_state_dict(state["model"])
        pretrained_policy.load_state_dict(state["pretrained"])
        task_generator.set_state(state["task_generator"])
        sampling_generator.set_state(state["sampling_generator"])
        history = list(state["history"])
        start = int(state["iteration"])
        # A checkpoint of an earlier pymaml kept no best iteration: tracking starts at the resume.
        best = state["best"] if "best" in state else new_best(tracked_from=start)
        if not (isinstance(best, dict) and set(best) == set(new_best())
                and all(isinstance(b, dict) and set(b) == set(new_best()["pretrained"]) for b in best.values())):
            raise JobError(f"the checkpoint {checkpoint} holds a best iteration this pymaml cannot read; "
                           f"pass another --checkpoint path to start over")
        partial = sorted({b["tracked_from"] for b in best.values() if b["tracked_from"] > 0})
        if config.select == "best" and partial:
            raise JobError(f"the checkpoint {checkpoint} holds no parameters of the best iteration before iteration "
                           f"{partial[0]} (an earlier pymaml wrote it), so select='best' cannot evaluate it; pass "
                           f"--select last, or another --checkpoint path to start over")
    # Every rank starts from rank 0's policies (the same seed gives the same ones; this makes sure).
    broadcast_state(meta_policy, context)
    broadcast_state(pretrained_policy, context)

    def snapshot(done: int) -> dict:
        # TRPO keeps no optimizer state; the key is there because every job's checkpoint has it.
        return {"model": meta_policy.state_dict(), "optimizer": {}, "pretrained": pretrained_policy.state_dict(),
                "task_generator": task_generator.get_state(), "sampling_generator": sampling_generator.get_state(),
                "history": history, "best": best, "iteration": done, "trajectory": config.trajectory()}

    began = time.perf_counter()
    ranks = f", {context.world_size} ranks" if context.is_distributed else ""
    bar = progress_bar(range(start, config.iterations), start=start, total=config.iterations,
                       enabled=config.progress and context.is_main, description=f"meta-train [{config.env}{ranks}]")
    saves = checkpoint is not None and context.is_main
    for iteration in bar:
        tasks = env.sample_tasks(config.meta_batch, task_generator)
        sampled_with = {"meta-learned": meta_policy.state_dict(), "pretrained": pretrained_policy.state_dict()}
        sampled_with = {name: {k: v.clone() for k, v in sd.items()} for name, sd in sampled_with.items()}
        meta_stats = meta.step(tasks, sampling_generator)
        pretrain_stats = pretrain.step(tasks, sampling_generator)
        keep_if_best(best["meta-learned"], iteration + 1, meta_stats.post_return, sampled_with["meta-learned"])
        keep_if_best(best["pretrained"], iteration + 1, pretrain_stats.post_return, sampled_with["pretrained"])
        history.append({"pre_return": meta_stats.pre_return, "post_return": meta_stats.post_return,
                        "pretrained_return": pretrain_stats.post_return, "accepted": meta_stats.accepted,
                        "kl": meta_stats.kl,
                        # The log-stds that sampled this iteration (the meta-learned policy's before its inner step).
                        "log_std": sampled_with["meta-learned"]["log_std"].tolist(),
                        "pretrained_log_std": sampled_with["pretrained"]["log_std"].tolist(),
                        **{f"seconds_{k}": v for k, v in meta_stats.seconds.items()}})
        bar.set_postfix(post=f"{meta_stats.post_return:.1f}", pre=f"{meta_stats.pre_return:.1f}",
                        pretrained=f"{pretrain_stats.post_return:.1f}", refresh=False)
        done = iteration + 1
        if saves and done % config.checkpoint_every == 0:
            save_checkpoint(checkpoint, snapshot(done))
    bar.close()
    seconds = time.perf_counter() - began
    if saves:
        save_checkpoint(checkpoint, snapshot(config.iterations))
    return RLTrainResult(meta_policy, pretrained_policy, config.iterations, start, seconds, history, best)


def selected_policies(result: RLTrainResult, env, config: RLConfig) -> dict:
    """{name: policy} to evaluate: the trained policies at their best iteration (select="best";
    the last parameters where no iteration ran) or their last parameters, and the random
    initialisation."""
    policies = {"meta-learned": result.meta_policy, "pretrained": result.pretrained_policy}
    if config.select == "best":
        for name, best in result.best.items():
            if best["state"] is not None:
                policy = initial_policy(env, config.seed)
                policy.load_state_dict(best["state"])
                policies[name] = policy
    policies["random"] = initial_policy(env, config.seed)
    return policies


def tune_step_size(policy, env, config: RLConfig) -> tuple[float, dict[str, float]]:
    """The baseline's step size: the candidate of config.baseline_lrs whose mean return over steps
    1..eval_steps, on config.tune_tasks tasks of their own, is best (the first of equals; one
    candidate, or eval_steps = 0, needs no trial). Every candidate sees the same tasks and noise.
    A candidate under which the policy diverges scores None and loses to every finite one.
    Returns (step size, {candidate: mean return or None})."""
    candidates = config.baseline_lrs
    if len(candidates) == 1 or config.eval_steps == 0:
        return candidates[0], {}
    seed = config.seed + TUNE_SEED_OFFSET
    tasks = env.sample_tasks(config.tune_tasks, torch.Generator().manual_seed(seed))
    scores = {}
    for lr in candidates:
        returns = returns_after_steps(policy, env, tasks, [lr] * config.eval_steps, config.trajectories,
                                      torch.Generator().manual_seed(seed + 1))
        scores[repr(lr)] = finite_or_none(returns[1:].mean().item())
    chosen = max(candidates, key=lambda lr: (scores[repr(lr)] is not None, scores[repr(lr)] or 0.0))
    return chosen, scores


def evaluation_step_sizes(policies: dict, env, config: RLConfig) -> tuple[dict, dict]:
    """({policy: its eval_steps step sizes}, {baseline: its tuning scores}): the meta-learned
    policy's schedule (RLConfig.meta_step_sizes), the baselines' tuned step size (tune_step_size)."""
    sizes, tuning = {}, {}
    for name, policy in policies.items():
        if name == "meta-learned":
            sizes[name] = config.meta_step_sizes()
        else:
            chosen, tuning[name] = tune_step_size(policy, env, config)
            sizes[name] = [chosen] * config.eval_steps
    return sizes, tuning


def evaluate(policies: dict, env, config: RLConfig, step_sizes: dict) -> dict:
    """{policy: {"mean": {steps: v}, "ci95": {steps: v}}}: the return averaged over config.eval_tasks
    new tasks after 0..eval_steps steps of step_sizes[policy], with its 95% interval over the tasks."""
    seed = config.seed + EVAL_SEED_OFFSET
    tasks = env.sample_tasks(config.eval_tasks, torch.Generator().manual_seed(seed))
    results = {}
    for name, policy in policies.items():
        returns = returns_after_steps(policy, env, tasks, step_sizes[name], config.trajectories,
                                      torch.Generator().manual_seed(seed + 1))
        spread = returns.std(1) if returns.shape[1] > 1 else torch.full((returns.shape[0],), math.nan)
        results[name] = {
            # None where the adapted policy diverged (returns_after_steps' NaN rows).
            "mean": {str(s): finite_or_none(returns[s].mean().item()) for s in range(returns.shape[0])},
            "ci95": {str(s): finite_or_none(1.96 * spread[s] / math.sqrt(returns.shape[1]))
                     for s in range(returns.shape[0])},
        }
    return results


def plot(report: dict, path: Path) -> None:
    """The panel of Figures 4 and 5 (return against policy-gradient steps) beside the training curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (steps_axis, train_axis, std_axis) = plt.subplots(1, 3, figsize=(14, 3.8))
    for name, result in report["evaluation"].items():
        steps = sorted(result["mean"], key=int)
        steps_axis.errorbar([int(s) for s in steps], [math.nan if result["mean"][s] is None else result["mean"][s]
                                                      for s in steps],
                            yerr=[result["ci95"][s] or 0.0 for s in steps], marker="o", capsize=2, label=name,
                            color=COLORS[name])
    steps_axis.set_xlabel("number of gradient steps")
    steps_axis.set_xticks(range(report["config"]["eval_steps"] + 1))
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
        for name, chosen in report["selection"].items():
            if name != "rule" and chosen["iteration"] is not None:
                train_axis.plot([chosen["iteration"]], [chosen["training_return"]], marker="*", markersize=11,
                                linestyle="none", color=COLORS[name], markeredgecolor="black",
                                label=f"{name}: evaluated (iteration {chosen['iteration']})")
        # (Iterations from a checkpoint of an earlier pymaml have no log-stds: gaps in the curve.)
        for name, key in (("meta-learned", "log_std"), ("pretrained", "pretrained_log_std")):
            std_axis.plot(iterations, [math.exp(sum(h[key]) / len(h[key])) if h.get(key) else math.nan
                                       for h in history], color=COLORS[name], label=name)
        train_axis.legend(fontsize=8)
        std_axis.legend(fontsize=8)
        std_axis.set_yscale("log")
        std_axis.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        std_axis.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    train_axis.set_xlabel("meta-iteration")
    train_axis.set_ylabel("mean return of the meta-batch")
    std_axis.set_xlabel("meta-iteration")
    std_axis.set_ylabel("σ of θ (geometric mean over actions)")
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
    policies = selected_policies(result, env, config)
    step_sizes, tuning = evaluation_step_sizes(policies, env, config)
    tuned = time.perf_counter()
    evaluation = evaluate(policies, env, config, step_sizes)
    evaluated = time.perf_counter()
    selection = {name: ({"iteration": best["iteration"], "trpo_steps": best["trpo_steps"],
                         "training_return": finite_or_none(best["return"])}
                        if config.select == "best" and best["state"] is not None else
                        {"iteration": None, "trpo_steps": result.iterations_done, "training_return": None})
                 for name, best in result.best.items()}
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
            "tune_baselines": tuned - trained,
            "evaluate": evaluated - tuned,
            **{f"meta_{part}": sum(h[f"seconds_{part}"] for h in ran) for part in ("sampling", "inner", "outer")},
        },
        "ms_per_iteration": 1e3 * result.seconds / result.iterations_run if result.iterations_run else None,
        "evaluation": evaluation,
        "selection": {"rule": config.select, **selection},
        "step_sizes": step_sizes,
        "baseline_tuning": tuning,
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
    """The table of Figures 4 and 5 as printed by the CLI."""
    steps = sorted(next(iter(report["evaluation"].values()))["mean"], key=int)
    lines = [iterations_summary(report, 0) + f" (train {report['seconds']['train']:.1f} s, "
             f"tune the baselines' step sizes {report['seconds']['tune_baselines']:.1f} s, "
             f"evaluate {report['seconds']['evaluate']:.1f} s)"
             + (f"; meta-batch split over {report['world_size']} ranks ({report['distributed_backend']})"
                if report.get("world_size", 1) > 1 else ""),
             f"average return over {report['config']['eval_tasks']} new tasks (± 95% interval) after N "
             f"policy-gradient steps:",
             "  " + f"{'policy':<14}" + "".join(f"{'N=' + s:>18}" for s in steps) + "   step sizes; parameters"]
    for name, result in report["evaluation"].items():
        cells = []
        for s in steps:
            interval = result["ci95"][s]
            if result["mean"][s] is None:
                cells.append("diverged")
                continue
            cells.append(f"{result['mean'][s]:.2f}" + (f" ± {interval:.2f}" if interval is not None else ""))
        sizes = ", ".join(f"{size:g}" for size in report["step_sizes"][name]) or "none"
        chosen = report["selection"].get(name)
        if chosen is None:
            parameters = "the initialisation"
        elif chosen["iteration"] is None:
            parameters = f"last (after {chosen['trpo_steps']} TRPO steps)"
        else:
            parameters = f"best, iteration {chosen['iteration']} (return {chosen['training_return']:.2f})"
        lines.append("  " + f"{name:<14}" + "".join(f"{cell:>18}" for cell in cells) + f"   α = {sizes}; {parameters}")
    return "\n".join(lines)
