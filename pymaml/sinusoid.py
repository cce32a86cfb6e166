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

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import __version__
from ._extension import build_info
from .data import Sinusoid
from .distributed import DistributedContext, DistributedMAML, load_on_main
from .jobs import TrainResult, TrajectorySettings, load_checkpoint, train_loop
from .maml import MAML
from .models import sinusoid_mlp

# The paper's schedule: about 18 s on the 2-core development machine with the fused `cpp`
# backend, about 5 minutes with `func` (4.1 ms an iteration; when the extension is not built).
DEFAULT_ITERATIONS = 70000
# A task counts as diverged when its MSE exceeds this (the targets' variance is at most 12.5).
DIVERGED_MSE = 100.0
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
    # The fused Adam costs ~40 µs a step on this model against ~130 µs for the default.
    optimizer = torch.optim.Adam(maml.parameters(), lr=config.meta_lr, fused=True)
    tasks = Sinusoid(seed=config.seed)
    start = 0
    checkpoint = Path(config.checkpoint) if config.checkpoint else None
    state = load_on_main(checkpoint, lambda path: load_checkpoint(path, config), context)
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


def evaluate(maml: MAML, seed: int, tasks: int, points: int) -> dict:
    """MSE on `points` query points per task after 0..10 steps of size α, for K = 5 and 10 support points.

    The mean over tasks is the paper's measure; the median and the count of diverged tasks show
    when a few tasks, whose support loss is too sharp for the step size, dominate the mean.
    """
    family = Sinusoid(seed=seed)
    results = {}
    with torch.no_grad():
        for shots in EVAL_SHOTS:
            batch = family.sample(tasks, shots, points)
            mean, ci95, median, diverged = {}, {}, {}, {}
            for steps in EVAL_STEPS:
                adapted = maml.adapt(batch.support_x, batch.support_y, steps=steps)
                per_task = (adapted(batch.query_x) - batch.query_y).square().mean(dim=(1, 2))
                mean[steps] = per_task.mean().item()
                ci95[steps] = 1.96 * per_task.std().item() / math.sqrt(tasks) if tasks > 1 else math.nan
                median[steps] = per_task.median().item()
                diverged[steps] = int((~(per_task <= DIVERGED_MSE)).sum())
            results[shots] = {"mse": mean, "ci95": ci95, "median": median, "diverged": diverged}
    return results


def plot(maml: MAML, evaluation: dict, path: Path, seed: int, examples: int = 3) -> None:
    """Like the paper's Figure 2: a few tasks before and after adaptation, and MSE against steps."""
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
    for task, axis in enumerate(axes[:examples]):
        axis.plot(grid[task, :, 0], truth[task, :, 0], color="red", label="ground truth")
        axis.plot(grid[task, :, 0], curves[0][task, :, 0], ":", color="lightgreen", label="pre-update")
        axis.plot(grid[task, :, 0], curves[1][task, :, 0], "--", color="darkgreen", label="1 grad step")
        axis.plot(grid[task, :, 0], curves[10][task, :, 0], "-.", color="teal", label="10 grad steps")
        axis.scatter(batch.support_x[task, :, 0], batch.support_y[task, :, 0], marker="^", color="purple",
                     zorder=5, label="used for grad")
        axis.set_title(f"K=5, A={batch.amplitude[task]:.2f}, φ={batch.phase[task]:.2f}")
        axis.set_xlim(-5, 5)
    axes[0].legend(fontsize=7, loc="lower left")
    curve_axis = axes[-1]
    for shots, result in evaluation.items():
        steps = sorted(result["mse"])
        curve_axis.errorbar(steps, [result["mse"][s] for s in steps], yerr=[result["ci95"][s] for s in steps],
                            marker="o", capsize=2, label=f"pymaml, K={shots}")
    curve_axis.scatter(list(PAPER_MSE_5SHOT), list(PAPER_MSE_5SHOT.values()), marker="x", color="black",
                       zorder=5, label="paper MAML, K=5")
    curve_axis.set_xlabel("gradient steps")
    curve_axis.set_ylabel("mean squared error")
    curve_axis.set_yscale("log")
    curve_axis.legend(fontsize=7)
    curve_axis.set_title("held-out MSE vs steps")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run(config: SinusoidConfig, out_dir: Path, context: DistributedContext | None = None) -> dict | None:
    """Train, evaluate, and write report.json and sinusoid.png into out_dir; with a distributed
    context every rank trains and rank 0 alone evaluates and writes (the other ranks return None)."""
    context = DistributedContext() if context is None else context
    if context.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = train(config, context)
    trained = time.perf_counter()
    if not context.is_main:
        return None
    eval_seed = config.seed + 1_000_003  # held-out tasks: a stream the training never draws from
    evaluation = evaluate(result.maml, eval_seed, config.eval_tasks, config.eval_points)
    evaluated = time.perf_counter()
    image = out_dir / "sinusoid.png"
    plot(result.maml, evaluation, image, seed=eval_seed + 1)
    report = {
        "job": "sinusoid",
        "config": {k: v for k, v in asdict(config).items() if k != "progress"},
        "backend": result.maml.backend,
        "backend_choice": result.maml.backend_choice,
        "iterations": result.iterations_done,
        "resumed_from": result.resumed_from,
        "final_running_loss": result.final_loss,
        "seconds": {
            "train": trained - started,
            "train_loop": result.seconds,
            "evaluate": evaluated - trained,
            "total": time.perf_counter() - started,
        },
        "ms_per_iteration": 1e3 * result.seconds / max(1, result.iterations_done - result.resumed_from),
        "evaluation": {
            f"K={shots}": {key: {str(s): v for s, v in r[key].items()} for key in ("mse", "ci95", "median", "diverged")}
            for shots, r in evaluation.items()
        },
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
    with open(out_dir / "report.json", "w") as handle:
        json.dump(report, handle, indent=2)
    return report


def summary(report: dict) -> str:
    """The evaluation beside the paper's numbers, as printed by the CLI."""
    lines = [
        f"backend: {report['backend']} ({report['backend_choice']})"
        + (f"; meta-batch split over {report['world_size']} ranks ({report['distributed_backend']})"
           if report.get("world_size", 1) > 1 else ""),
        f"{report['iterations']} iterations, {report['ms_per_iteration']:.2f} ms each; "
        f"wall time {report['seconds']['total']:.1f} s (train {report['seconds']['train']:.1f} s, "
        f"evaluate {report['seconds']['evaluate']:.1f} s)",
        f"held-out MSE over {report['eval_tasks']} tasks: mean ± 95% interval (median; tasks diverged):",
        f"  {'steps':>5}  {'K=5':>32}  {'paper K=5':>9}  {'K=10':>32}",
    ]
    k5, k10 = report["evaluation"]["K=5"], report["evaluation"]["K=10"]

    def cell(result, steps):
        text = f"{result['mse'][steps]:.3f} ± {result['ci95'][steps]:.3f} ({result['median'][steps]:.3f}; {result['diverged'][steps]})"
        return f"{text:>32}"

    for steps in ("0", "1", "5", "10"):
        paper = report["paper_maml_mse_K=5"].get(steps)
        lines.append(f"  {steps:>5}  {cell(k5, steps)}  {paper if paper is not None else '':>9}  {cell(k10, steps)}")
    return "\n".join(lines)
