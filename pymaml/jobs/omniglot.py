"""The paper's Omniglot few-shot classification job: meta-train Conv4, evaluate on held-out characters.

Finn et al. (2017), section 5.2 and appendix A.1: the convolutional model (pymaml.models.Conv4,
strided, 64 filters), tasks from the 1200 meta-training characters with each 90° rotation a
class of its own, Adam with 1e-3, 60,000 iterations. 5-way: α=0.4, one inner step in training,
meta-batch 32. 20-way: α=0.1, five inner steps, meta-batch 16. Evaluation adapts with three
steps (5-way) or five (20-way) on tasks from the other 423 characters, and reports the mean query
accuracy over 600 tasks with its 95% interval. As in the paper's code, every class of a task
has as many query images as support images unless --queries says otherwise.

Under torchrun every rank draws the same meta-batch and computes the meta-gradient of its shard
of the tasks; the all-reduce (pymaml.distributed) gives every rank the whole batch's. Rank 0
alone shows the progress bar, writes checkpoints, evaluates and reports.
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
from ..data import FewShot, Omniglot
from ..distributed import DistributedContext, DistributedMAML
from ..models import Conv4
from .training import (TrainResult, TrajectorySettings, check_checkpoint_on_main, check_on_main, check_writable,
                       finite_or_none, iterations_summary, resume, train_loop, write_report)

# Table 1 of the paper: MAML's accuracy on Omniglot, (ways, shots) -> (mean %, 95% interval %).
PAPER_ACCURACY = {(5, 1): (98.7, 0.4), (5, 5): (99.9, 0.1), (20, 1): (95.8, 0.3), (20, 5): (98.9, 0.2)}
ROTATIONS = (0, 90, 180, 270)
DEFAULT_ITERATIONS = 60000


def paper_defaults(ways: int) -> dict:
    """Step size, inner steps in training and at test, and meta-batch of the paper for `ways`."""
    if ways >= 20:
        return dict(inner_lr=0.1, inner_steps=5, test_steps=5, meta_batch=16)
    return dict(inner_lr=0.4, inner_steps=1, test_steps=3, meta_batch=32)


@dataclass
class OmniglotConfig(TrajectorySettings):
    root: str
    ways: int = 5
    shots: int = 1
    queries: int | None = None  # per class; None: as many as shots (the paper's code)
    iterations: int = DEFAULT_ITERATIONS
    meta_batch: int | None = None
    inner_lr: float | None = None
    inner_steps: int | None = None
    test_steps: int | None = None
    meta_lr: float = 1e-3
    first_order: bool = False
    backend: str = "auto"
    device: str = "cpu"
    seed: int = 0
    eval_tasks: int = 600
    image_size: int = 28
    train_characters: int = 1200  # the meta-training split: the first 1200 characters
    checkpoint: str | None = None
    checkpoint_every: int = 1000
    progress: bool = True

    TRAJECTORY_FIELDS = ("ways", "shots", "queries", "meta_batch", "inner_lr", "inner_steps", "meta_lr",
                         "first_order", "seed", "image_size", "train_characters")

    def __post_init__(self):
        for name, value in paper_defaults(self.ways).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.queries is None:
            self.queries = self.shots


def make_maml(config: OmniglotConfig) -> MAML:
    torch.manual_seed(config.seed)
    model = Conv4(in_channels=1, ways=config.ways, image_size=config.image_size).to(config.device)
    return MAML(model, inner_lr=config.inner_lr, inner_steps=config.inner_steps, first_order=config.first_order,
                loss="cross_entropy", backend=config.backend)


def train(config: OmniglotConfig, dataset: Omniglot, context: DistributedContext | None = None) -> TrainResult:
    """Meta-train; resumes from config.checkpoint when it exists. context: see pymaml.jobs.sinusoid.train."""
    context = DistributedContext() if context is None else context
    context.check_same("the omniglot settings", (config.trajectory(), config.iterations, config.backend))
    checkpoint = Path(config.checkpoint) if config.checkpoint else None
    check_checkpoint_on_main(checkpoint, context)
    maml = make_maml(config)
    trainer = DistributedMAML(maml, context) if context.is_distributed else None
    optimizer = torch.optim.Adam(maml.parameters(), lr=config.meta_lr)
    tasks = FewShot(dataset, config.ways, config.shots, config.queries, rotations=ROTATIONS, seed=config.seed,
                    device=config.device)
    start = 0
    state = resume(checkpoint, config, context, job_keys=("next_task",))
    if state is not None:
        maml.module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        tasks.next_task = int(state["next_task"])
        start = int(state["iteration"])

    def snapshot(iteration: int) -> dict:
        return {"model": maml.module.state_dict(), "optimizer": optimizer.state_dict(), "next_task": tasks.next_task,
                "iteration": iteration, "trajectory": config.trajectory()}

    def step():
        batch = tasks.sample(config.meta_batch).tasks
        if trainer is None:
            return maml.meta_train_step(*batch, optimizer)
        return trainer.meta_train_step(*context.shard(batch), optimizer)

    return train_loop(maml, context, start=start, iterations=config.iterations, step=step, snapshot=snapshot,
                      checkpoint=checkpoint, checkpoint_every=config.checkpoint_every, progress=config.progress,
                      smoothing=0.98)


def evaluate(maml: MAML, config: OmniglotConfig, dataset: Omniglot, chunk: int = 50) -> dict:
    """Query accuracy per held-out task after config.test_steps steps; mean and 95% interval in %
    (None for a single task)."""
    tasks = FewShot(dataset, config.ways, config.shots, config.queries, rotations=ROTATIONS,
                    seed=config.seed + 1_000_003, device=config.device)
    accuracies = []
    with torch.no_grad():
        for first in range(0, config.eval_tasks, chunk):
            batch = tasks.sample(min(chunk, config.eval_tasks - first))
            adapted = maml.adapt(batch.support_x, batch.support_y, steps=config.test_steps)
            predictions = adapted(batch.query_x).argmax(dim=-1)
            accuracies.append((predictions == batch.query_y).double().mean(dim=1))
    per_task = torch.cat(accuracies) * 100
    count = per_task.numel()
    interval = 1.96 * per_task.std().item() / math.sqrt(count) if count > 1 else None
    return {"accuracy": per_task.mean().item(), "ci95": interval, "tasks": count}


def run(config: OmniglotConfig, out_dir: Path, context: DistributedContext | None = None) -> dict | None:
    """Load the data, train, evaluate, and write report.json into out_dir; with a distributed
    context rank 0 alone evaluates and writes (the other ranks return None). That out_dir (and the
    checkpoint's folder) can be written is checked before the training."""
    context = DistributedContext() if context is None else context
    check_on_main(context, lambda: check_writable(out_dir, "report.json (--out)"))
    started = time.perf_counter()
    train_set = Omniglot(config.root, "train", image_size=config.image_size, train_characters=config.train_characters)
    test_set = Omniglot(config.root, "test", image_size=config.image_size, train_characters=config.train_characters)
    loaded = time.perf_counter()
    result = train(config, train_set, context)
    trained = time.perf_counter()
    if not context.is_main:
        return None
    evaluation = evaluate(result.maml, config, test_set)
    paper = PAPER_ACCURACY.get((config.ways, config.shots))
    report = {
        "job": "omniglot",
        "config": {k: v for k, v in asdict(config).items() if k != "progress"},
        "backend": result.maml.backend,
        "backend_choice": result.maml.backend_choice,
        "iterations": result.iterations_done,
        "resumed_from": result.resumed_from,
        "iterations_run": result.iterations_run,
        "final_running_loss": finite_or_none(result.final_loss),
        "train_classes": train_set.num_classes * len(ROTATIONS),
        "test_classes": test_set.num_classes * len(ROTATIONS),
        "seconds": {"load": loaded - started, "train_loop": result.seconds, "evaluate": time.perf_counter() - trained,
                    "total": time.perf_counter() - started},
        "ms_per_iteration": result.ms_per_iteration,
        "evaluation": evaluation,
        "paper_maml_accuracy": None if paper is None else {"accuracy": paper[0], "ci95": paper[1]},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "world_size": context.world_size,
        "distributed_backend": context.backend,
        "pymaml": __version__,
        "build": build_info(),
    }
    write_report(out_dir / "report.json", report)
    return report


def summary(report: dict) -> str:
    config, evaluation, paper = report["config"], report["evaluation"], report["paper_maml_accuracy"]
    lines = [
        f"backend: {report['backend']} ({report['backend_choice']})"
        + (f"; meta-batch split over {report['world_size']} ranks ({report['distributed_backend']})"
           if report.get("world_size", 1) > 1 else ""),
        iterations_summary(report, 1),
        f"{config['ways']}-way {config['shots']}-shot, {evaluation['tasks']} held-out tasks, "
        f"{config['test_steps']} steps: accuracy {evaluation['accuracy']:.2f}%"
        + (f" ± {evaluation['ci95']:.2f}%" if evaluation["ci95"] is not None else " (no interval from one task)"),
    ]
    if paper is not None:
        lines.append(f"paper (MAML, Table 1): {paper['accuracy']:.1f}% ± {paper['ci95']:.1f}%")
    return "\n".join(lines)
