"""The paper's sinusoid regression job: meta-train, evaluate with the Table 2 protocol, report.

Finn et al. (2017), section 5.1: MLP 1-40-40-1 with ReLU, meta-batch 25, K=10, one inner step
of α=0.01, Adam with 1e-3, 70,000 iterations. Evaluation: 5-shot MSE after 1, 5 and 10
steps of size α on held-out tasks; the paper reports 0.67, 0.38 and 0.35 for MAML.

Under torchrun every rank draws the same meta-batch from the same seed, computes the
meta-gradient of its shard of the tasks, and the all-reduce (pymaml.distributed) gives every
rank the meta-gradient of the whole batch, so the run equals the single-process one up to float
rounding. Rank 0 alone shows the progress bar, writes checkpoints, evaluates and reports.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import __version__
from .._extension import build_info
from ..algorithms.maml import MAML
from ..data import Sinusoid
from ..distributed import DistributedContext, DistributedMAML
from ..models import sinusoid_mlp
from .training import (TrainResult, TrajectorySettings, check_checkpoint_on_main, check_on_main, check_writable,
                       finite_or_none, iterations_summary, resume, train_loop, write_report)

# The paper's schedule (its run times per backend: bench/RESULTS.md, "Measurements behind the
# Python code's choices").
DEFAULT_ITERATIONS = 70000
# A task counts as diverged when its MSE exceeds this, or is NaN: the targets' variance is at most
# 12.5, so predicting zero everywhere stays below it.
DIVERGED_MSE = 100.0
# The example panels of the figure show y in ±Y_LIMIT (the targets lie in ±5); a curve that leaves
# them has diverged and is clipped, and the panel says so.
Y_LIMIT = 7.5
PAPER_MSE_5SHOT = {1: 0.67, 5: 0.38, 10: 0.35}
EVAL_STEPS = tuple(range(11))
EVAL_SHOTS = (5, 10)


@dataclass
class SinusoidConfig(TrajectorySettings):
    iterations: int = DEFAULT_ITERATIONS
    meta_batch: int = 25
    shots: int = 10
    inner_lr: float = 0.01
    inner_steps: int = 1
    meta_lr: float = 1e-3
    first_order: bool = False
    backend: str = "auto"
    seed: int = 0
    eval_tasks: int = 1000
    eval_points: int = 100
    checkpoint: str | None = None
    checkpoint_every: int = 1000
    progress: bool = True

    # Settings that change the training trajectory; a checkpoint must agree on all of them.
    TRAJECTORY_FIELDS = ("meta_batch", "shots", "inner_lr", "inner_steps", "meta_lr", "first_order", "seed")


def train(config: SinusoidConfig, context: DistributedContext | None = None) -> TrainResult:
    """Meta-train the sinusoid model; resumes from config.checkpoint when it exists.

    context: a distributed context (pymaml.distributed.init()) to split every meta-batch across
    its ranks; None or a single-process context trains in this process alone.
    """
    context = DistributedContext() if context is None else context
    context.check_same("the sinusoid settings", (config.trajectory(), config.iterations, config.backend))
    checkpoint = Path(config.checkpoint) if config.checkpoint else None
    check_checkpoint_on_main(checkpoint, context)
    torch.manual_seed(config.seed)
    model = sinusoid_mlp()
    maml = MAML(
        model,
        inner_lr=config.inner_lr,
        inner_steps=config.inner_steps,
        first_order=config.first_order,
        loss="mse",
        backend=config.backend,
    )
    trainer = DistributedMAML(maml, context) if context.is_distributed else None
    # The fused Adam: a fraction of the default Adam's cost on this model (bench/RESULTS.md).
    optimizer = torch.optim.Adam(maml.parameters(), lr=config.meta_lr, fused=True)
    tasks = Sinusoid(seed=config.seed)
    start = 0
    state = resume(checkpoint, config, context, job_keys=("task_generator",))
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        tasks.generator.set_state(state["task_generator"])
        start = int(state["iteration"])

    def snapshot(iteration: int) -> dict:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "task_generator": tasks.generator.get_state(),
            "iteration": iteration,
            "trajectory": config.trajectory(),
        }

    def step():
        batch = tasks.sample(config.meta_batch, config.shots)
        if trainer is None:
            out = maml.meta_gradient(*batch.tasks, accumulate=False)
        else:
            out = trainer.meta_gradient(*context.shard(batch.tasks), accumulate=False)
        optimizer.step()
        return out

    return train_loop(maml, context, start=start, iterations=config.iterations, step=step, snapshot=snapshot,
                      checkpoint=checkpoint, checkpoint_every=config.checkpoint_every, progress=config.progress,
                      smoothing=0.99, postfix_every=100)


def task_statistics(per_task: torch.Tensor) -> dict:
    """The statistics of the per-task MSEs of one row of the evaluation.

    mse, ci95: mean and 95% interval over the tasks that did not diverge (MSE ≤ DIVERGED_MSE);
    over all of them when none diverged, which is the paper's measure. mse_all_tasks: the mean
    over every task, None when a task's MSE is NaN or infinite. median: over every task, a NaN
    ranked above every number; None when it falls on a NaN or an infinity. diverged: the count
    of tasks above DIVERGED_MSE or NaN. None wherever a statistic has too few tasks.
    """
    diverged = ~(per_task <= DIVERGED_MSE)
    kept = per_task[~diverged]
    count = kept.numel()
    ranked = per_task.nan_to_num(nan=math.inf, posinf=math.inf).sort().values
    return {
        "mse": kept.mean().item() if count > 0 else None,
        "ci95": 1.96 * kept.std().item() / math.sqrt(count) if count > 1 else None,
        "median": finite_or_none(ranked[(ranked.numel() - 1) // 2]),  # torch.median's: the lower middle
        "diverged": int(diverged.sum()),
        "mse_all_tasks": finite_or_none(per_task.mean()),
    }


STATISTICS = ("mse", "ci95", "median", "diverged", "mse_all_tasks")


def evaluate(maml: MAML, seed: int, tasks: int, points: int) -> dict:
    """MSE on `points` query points per task after 0..10 steps of size α, for K = 5 and 10 support
    points: {K: {statistic: {steps: value}}}, the statistics of task_statistics.

    The mean over tasks is the paper's measure; the median and the count of diverged tasks show
    when a few tasks, whose support loss is too sharp for the step size, dominate the mean.
    """
    family = Sinusoid(seed=seed)
    results = {}
    with torch.no_grad():
        for shots in EVAL_SHOTS:
            batch = family.sample(tasks, shots, points)
            result = {statistic: {} for statistic in STATISTICS}
            for steps in EVAL_STEPS:
                adapted = maml.adapt(batch.support_x, batch.support_y, steps=steps)
                per_task = (adapted(batch.query_x) - batch.query_y).square().mean(dim=(1, 2))
                for statistic, value in task_statistics(per_task).items():
                    result[statistic][steps] = value
            results[shots] = result
    return results


def plot(maml: MAML, evaluation: dict, path: Path, seed: int, examples: int = 3) -> None:
    """Like the paper's Figure 2: a few tasks before and after adaptation, and MSE against steps.
    Diverged predictions are clipped to the panels and diverged tasks left out of the curves,
    and the figure says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    family = Sinusoid(seed=seed)
    batch = family.sample(examples, 5)
    grid = torch.linspace(-5, 5, 200).reshape(1, -1, 1).expand(examples, -1, -1).contiguous()
    truth = Sinusoid.function(grid.double(), batch.amplitude, batch.phase)
    figure, axes = plt.subplots(1, examples + 1, figsize=(4.2 * (examples + 1), 3.6))
    with torch.no_grad():
        curves = {steps: maml.adapt(batch.support_x, batch.support_y, steps=steps)(grid) for steps in (0, 1, 10)}
    styles = {0: (":", "lightgreen", "pre-update"), 1: ("--", "darkgreen", "1 grad step"),
              10: ("-.", "teal", "10 grad steps")}
    for task, axis in enumerate(axes[:examples]):
        axis.plot(grid[task, :, 0], truth[task, :, 0], color="red", label="ground truth")
        left = []
        for steps, (line, color, label) in styles.items():
            curve = curves[steps][task, :, 0]
            if not bool((curve.abs() <= Y_LIMIT).all()):
                left.append(label)
            axis.plot(grid[task, :, 0], curve.clamp(-2 * Y_LIMIT, 2 * Y_LIMIT),
                      line, color=color, label=label)
        axis.scatter(batch.support_x[task, :, 0], batch.support_y[task, :, 0], marker="^", color="purple",
                     zorder=5, label="used for grad")
        axis.set_title(f"K=5, A={batch.amplitude[task]:.2f}, φ={batch.phase[task]:.2f}")
        axis.set_xlim(-5, 5)
        axis.set_ylim(-Y_LIMIT, Y_LIMIT)
        if left:
            axis.text(0.02, 0.98, f"beyond ±{Y_LIMIT:g} or NaN, clipped: " + ", ".join(left),
                      transform=axis.transAxes, fontsize=7, va="top")
    axes[0].legend(fontsize=7, loc="lower left")
    curve_axis = axes[-1]
    any_diverged = False
    for shots, result in evaluation.items():
        steps = [s for s in sorted(result["mse"]) if result["mse"][s] is not None]
        worst = max(result["diverged"].values())
        any_diverged = any_diverged or worst > 0
        label = f"pymaml, K={shots}" + (f" (diverged tasks left out: up to {worst})" if worst else "")
        curve_axis.errorbar(steps, [result["mse"][s] for s in steps],
                            yerr=[result["ci95"][s] or 0.0 for s in steps], marker="o", capsize=2, label=label)
    curve_axis.scatter(list(PAPER_MSE_5SHOT), list(PAPER_MSE_5SHOT.values()), marker="x", color="black",
                       zorder=5, label="paper MAML, K=5")
    curve_axis.set_xlabel("gradient steps")
    curve_axis.set_ylabel("mean squared error")
    curve_axis.set_yscale("log")
    curve_axis.legend(fontsize=7)
    curve_axis.set_title("held-out MSE vs steps" + (f"\n(tasks with MSE > {DIVERGED_MSE:g} left out)"
                                                    if any_diverged else ""))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run(config: SinusoidConfig, out_dir: Path, context: DistributedContext | None = None) -> dict | None:
    """Train, evaluate, and write report.json, then sinusoid.png, into out_dir; with a distributed
    context every rank trains and rank 0 alone evaluates and writes (the other ranks return None).
    That out_dir (and the checkpoint's folder) can be written is checked before the training."""
    context = DistributedContext() if context is None else context
    check_on_main(context, lambda: check_writable(out_dir, "report.json and sinusoid.png (--out)"))
    started = time.perf_counter()
    result = train(config, context)
    trained = time.perf_counter()
    if not context.is_main:
        return None
    eval_seed = config.seed + 1_000_003  # held-out tasks: a stream the training never draws from
    evaluation = evaluate(result.maml, eval_seed, config.eval_tasks, config.eval_points)
    evaluated = time.perf_counter()
    image = out_dir / "sinusoid.png"
    report = {
        "job": "sinusoid",
        "config": {k: v for k, v in asdict(config).items() if k != "progress"},
        "backend": result.maml.backend,
        "backend_choice": result.maml.backend_choice,
        "iterations": result.iterations_done,
        "resumed_from": result.resumed_from,
        "iterations_run": result.iterations_run,
        "final_running_loss": finite_or_none(result.final_loss),
        "seconds": {
            "train": trained - started,
            "train_loop": result.seconds,
            "evaluate": evaluated - trained,
        },
        "ms_per_iteration": result.ms_per_iteration,
        "evaluation": {
            f"K={shots}": {key: {str(s): v for s, v in r[key].items()} for key in STATISTICS}
            for shots, r in evaluation.items()
        },
        "diverged_mse": DIVERGED_MSE,
        "paper_maml_mse_K=5": {str(s): v for s, v in PAPER_MSE_5SHOT.items()},
        "eval_tasks": config.eval_tasks,
        "eval_points_per_task": config.eval_points,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "world_size": context.world_size,
        "distributed_backend": context.backend,
        "pymaml": __version__,
        "build": build_info(),
        "figure": image.name,
    }
    report["seconds"]["total"] = time.perf_counter() - started
    write_report(out_dir / "report.json", report)
    plot(result.maml, evaluation, image, seed=eval_seed + 1)
    return report


def _number(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def summary(report: dict) -> str:
    """The evaluation beside the paper's numbers, as printed by the CLI."""
    lines = [
        f"backend: {report['backend']} ({report['backend_choice']})"
        + (f"; meta-batch split over {report['world_size']} ranks ({report['distributed_backend']})"
           if report.get("world_size", 1) > 1 else ""),
        iterations_summary(report, 2) + f" (train {report['seconds']['train']:.1f} s, "
        f"evaluate {report['seconds']['evaluate']:.1f} s)",
        f"held-out MSE over {report['eval_tasks']} tasks: mean ± 95% interval (median; tasks diverged):",
        f"  {'steps':>5}  {'K=5':>32}  {'paper K=5':>9}  {'K=10':>32}",
    ]
    k5, k10 = report["evaluation"]["K=5"], report["evaluation"]["K=10"]

    def cell(result, steps):
        text = (f"{_number(result['mse'][steps], 3)} ± {_number(result['ci95'][steps], 3)} "
                f"({_number(result['median'][steps], 3)}; {result['diverged'][steps]})")
        return f"{text:>32}"

    for steps in ("0", "1", "5", "10"):
        paper = report["paper_maml_mse_K=5"].get(steps)
        lines.append(f"  {steps:>5}  {cell(k5, steps)}  {paper if paper is not None else '':>9}  {cell(k10, steps)}")
    if any(result["diverged"][steps] for result in (k5, k10) for steps in result["diverged"]):
        lines.append(f"  diverged: MSE above {report['diverged_mse']:g} or NaN; the means and intervals leave "
                     f"those tasks out, the medians count them")
    return "\n".join(lines)
