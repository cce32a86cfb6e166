"""The few-shot classification job: meta-train Conv4 on a data set's training classes, follow its
accuracy on the validation classes, evaluate on the test classes.

Finn et al. (2017), section 5.2 and appendix A.1, per data set (`pymaml fewshot --dataset ...`):
  omniglot: Conv4 with stride-2 convolutions and 64 filters on 28×28 grey images, tasks from the
      1200 meta-training characters with each 90° rotation a class of its own. 5-way: α=0.4, one
      inner step in training, three at test, meta-batch 32; 20-way: α=0.1, five steps (five at
      test), meta-batch 16. As in the paper's code a class has as many query images as support ones.
  miniimagenet: Conv4 with 32 filters, stride 1 and 2×2 max-pooling on 84×84 colour images, α=0.01,
      five inner steps in training and ten at test, meta-batch 4 (1-shot) or 2 (5-shot), 15 query
      images per class.
  cifarfs, fc100: the MiniImagenet network and protocol on their 32×32 colour images (these data
      sets came after the paper, which reports no number for them).
All: Adam with 1e-3, 60,000 iterations, and the mean query accuracy over 600 test tasks with its
95% interval (1.96 standard errors).

Every --val-every iterations the accuracy of --val-tasks fixed tasks from the training classes and
from the validation classes is measured with the test protocol (test_steps steps); the weights with
the best validation accuracy are kept in best.pt in --out (a checkpoint of this job: resume or
evaluate it with --checkpoint). Omniglot has no validation classes: --val-characters N keeps the
last N of the training characters out of the training for validation (not the paper's protocol,
which trains on all 1200); without it only the training accuracy is followed.

BatchNorm keeps no running averages (pymaml.models.Conv4): every forward normalizes with the
statistics of the images it is given, task by task (the tasks of a batch are mapped one by one,
torch.func.vmap), so at test time each adaptation step uses the task's own support images and
the predictions its own N·Q query images, as the paper's code does.

Under torchrun every rank draws the same meta-batch and computes the meta-gradient of its shard
of the tasks; the all-reduce (pymaml.distributed) gives every rank the whole batch's. Rank 0
alone shows the progress bar, measures the accuracy curves, writes checkpoints, evaluates and
reports.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import __version__
from .._extension import build_info
from ..algorithms.maml import MAML
from ..data import CIFARFS, FC100, FewShot, MiniImagenet, Omniglot
from ..distributed import DistributedContext, DistributedMAML
from ..models import Conv4
from .training import (JobError, TrainResult, TrajectorySettings, check_checkpoint_on_main, check_on_main,
                       check_writable, finite_or_none, iterations_summary, resume, save_checkpoint, train_loop,
                       write_report)

DATASETS = ("omniglot", "miniimagenet", "cifarfs", "fc100")
DATASET_NAMES = {"omniglot": "Omniglot", "miniimagenet": "MiniImagenet", "cifarfs": "CIFAR-FS", "fc100": "FC100"}
# Table 1 of the paper: MAML's accuracy, (ways, shots) -> (mean %, 95% interval %). The paper gives
# the first-order approximation's numbers for MiniImagenet only.
OMNIGLOT_ACCURACY = {(5, 1): (98.7, 0.4), (5, 5): (99.9, 0.1), (20, 1): (95.8, 0.3), (20, 5): (98.9, 0.2)}
MINIIMAGENET_ACCURACY = {(5, 1): (48.70, 1.84), (5, 5): (63.11, 0.92)}
MINIIMAGENET_FIRST_ORDER_ACCURACY = {(5, 1): (48.07, 1.75), (5, 5): (63.15, 0.91)}
OMNIGLOT_ROTATIONS = (0, 90, 180, 270)
DEFAULT_ITERATIONS = 60000
FIGURE = "accuracy.png"
BEST_CHECKPOINT = "best.pt"
# What the test tasks are drawn with: seed + TEST_SEED_OFFSET; the validation and training-accuracy
# tasks likewise, so that no two of the samplers share tasks.
TEST_SEED_OFFSET, VAL_SEED_OFFSET, TRAIN_CURVE_SEED_OFFSET = 1_000_003, 2_000_003, 3_000_017
# Evaluation adapts chunks of tasks at a time, at most this many first-layer activations per chunk.
CHUNK_ACTIVATIONS = 2**26
BATCH_NORM_AT_TEST = ("batch statistics, no running averages (BatchNorm2d(track_running_stats=False)), per task: "
                      "each adaptation step normalizes with the statistics of the task's own support images and "
                      "the evaluated predictions with those of the task's own N·Q query images (the tasks of a "
                      "chunk are vmapped one by one); the paper's code likewise normalizes every batch with its "
                      "own statistics")


def paper_defaults(dataset: str, ways: int, shots: int) -> dict:
    """The paper's network, step size, inner steps in training and at test, meta-batch and queries
    per class (None: as many as shots) for `dataset` and `ways`-way `shots`-shot tasks."""
    if dataset == "omniglot":
        network = dict(image_size=28, filters=64)
        if ways >= 20:
            return dict(network, inner_lr=0.1, inner_steps=5, test_steps=5, meta_batch=16, queries=None)
        return dict(network, inner_lr=0.4, inner_steps=1, test_steps=3, meta_batch=32, queries=None)
    return dict(image_size=84 if dataset == "miniimagenet" else 32, filters=32, inner_lr=0.01, inner_steps=5,
                test_steps=10, meta_batch=4 if shots == 1 else 2, queries=15)


def paper_accuracy(dataset: str, ways: int, shots: int, first_order: bool) -> tuple[str, float, float] | None:
    """(the paper's row, mean %, 95% interval %) to print beside a run, or None where the paper has none."""
    if dataset == "omniglot" and (ways, shots) in OMNIGLOT_ACCURACY:
        return ("MAML, Table 1", *OMNIGLOT_ACCURACY[ways, shots])
    if dataset == "miniimagenet":
        table = MINIIMAGENET_FIRST_ORDER_ACCURACY if first_order else MINIIMAGENET_ACCURACY
        if (ways, shots) in table:
            return ("MAML (first order approx.), Table 1" if first_order else "MAML, Table 1", *table[ways, shots])
    return None


# The settings of `pymaml omniglot` checkpoints written before the job took other data sets: an
# Omniglot run at the defaults of the settings added since (filters, val_characters) is resumed
# from them.
OMNIGLOT_TRAJECTORY = ("ways", "shots", "queries", "meta_batch", "inner_lr", "inner_steps", "meta_lr", "first_order",
                       "seed", "image_size", "train_characters")


@dataclass
class FewShotConfig(TrajectorySettings):
    root: str
    dataset: str
    ways: int = 5
    shots: int = 1
    queries: int | None = None  # per class; None: the paper's (see paper_defaults)
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
    val_every: int = 1000  # 0: no accuracy curve
    val_tasks: int = 100
    image_size: int | None = None
    filters: int | None = None
    train_characters: int | None = None  # Omniglot: the first 1200 characters are the meta-training split
    val_characters: int | None = None  # Omniglot: the last N of them are kept for validation (default 0)
    checkpoint: str | None = None
    checkpoint_every: int = 1000
    progress: bool = True

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown few-shot data set {self.dataset!r}; use one of {DATASETS}")
        for name, value in paper_defaults(self.dataset, self.ways, self.shots).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.queries is None:
            self.queries = self.shots
        if self.dataset == "omniglot":
            self.train_characters = 1200 if self.train_characters is None else self.train_characters
            self.val_characters = 0 if self.val_characters is None else self.val_characters
            if not 0 <= self.val_characters < self.train_characters:
                raise ValueError(f"val_characters must be at least 0 and fewer than the {self.train_characters} "
                                 f"training characters, got {self.val_characters}")
        else:
            for name in ("train_characters", "val_characters"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} applies to Omniglot only; {DATASET_NAMES[self.dataset]} has its "
                                     f"own published train / val / test classes")
            if self.dataset in ("cifarfs", "fc100") and self.image_size != 32:
                raise ValueError(f"{DATASET_NAMES[self.dataset]} images are 32×32; image_size must be 32, got "
                                 f"{self.image_size}")
        for name in ("val_every", "val_tasks", "eval_tasks", "filters", "image_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "val_every" else 1):
                raise ValueError(f"{name} must be a{'n integer >= 0' if name == 'val_every' else ' positive integer'}"
                                 f", got {value!r}")

    def paper_settings(self) -> dict:
        """The paper's settings for this data set and task shape (paper_defaults, queries resolved)."""
        defaults = paper_defaults(self.dataset, self.ways, self.shots)
        return {**defaults, "queries": self.shots if defaults["queries"] is None else defaults["queries"]}

    def trajectory(self) -> dict:
        settings = {name: getattr(self, name) for name in OMNIGLOT_TRAJECTORY}
        if self.dataset == "omniglot":
            for name, default in (("filters", 64), ("val_characters", 0)):
                if getattr(self, name) != default:
                    settings[name] = getattr(self, name)
            return settings
        del settings["train_characters"]
        return {"dataset": self.dataset, **settings, "filters": self.filters}

    @property
    def rotations(self) -> tuple[int, ...] | None:
        return OMNIGLOT_ROTATIONS if self.dataset == "omniglot" else None

    @property
    def in_channels(self) -> int:
        return 1 if self.dataset == "omniglot" else 3

    @property
    def validates(self) -> bool:
        """Whether there are validation classes to measure (Omniglot: only with val_characters)."""
        return self.val_every > 0 and (self.dataset != "omniglot" or self.val_characters > 0)


@dataclass
class Splits:
    """The class-indexed image sets of a run (each an object with images and labels, or a pair)."""
    train: object
    val: object | None
    test: object
    train_classes: int
    val_classes: int | None
    test_classes: int
    val_source: str | None


def load_splits(config: FewShotConfig) -> Splits:
    """The data set's train, val and test splits; a missing, incomplete or corrupt root is a JobError
    with the loader's message (the files expected and what was found)."""
    name = DATASET_NAMES[config.dataset]
    try:
        if config.dataset == "omniglot":
            whole = Omniglot(config.root, "train", image_size=config.image_size,
                             train_characters=config.train_characters)
            test = Omniglot(config.root, "test", image_size=config.image_size, train_characters=config.train_characters)
            kept = whole.num_classes - config.val_characters
            turns = len(OMNIGLOT_ROTATIONS)
            if config.val_characters == 0:
                return Splits(whole, None, test, whole.num_classes * turns, None, test.num_classes * turns, None)
            if kept < 1:
                raise ValueError(f"--val-characters {config.val_characters} leaves none of the {whole.num_classes} "
                                 f"training characters under {config.root} for training")
            training = whole.labels < kept
            train = (whole.images[training], whole.labels[training])
            val = (whole.images[~training], whole.labels[~training])
            source = (f"characters {kept + 1}..{whole.num_classes} of the {whole.num_classes} training characters "
                      f"(--val-characters {config.val_characters}), held out of the training")
            return Splits(train, val, test, kept * turns, config.val_characters * turns, test.num_classes * turns,
                          source)
        if config.dataset == "miniimagenet":
            train, val, test = (MiniImagenet(config.root, split, image_size=config.image_size)
                                for split in ("train", "val", "test"))
        else:
            kind = CIFARFS if config.dataset == "cifarfs" else FC100
            train, val, test = (kind(config.root, split) for split in ("train", "val", "test"))
    except (FileNotFoundError, ValueError) as error:
        raise JobError(f"cannot read {name} from --root {config.root}: {error}") from error
    return Splits(train, val, test, train.num_classes, val.num_classes, test.num_classes,
                  f"the {val.num_classes} published validation classes")


def make_maml(config: FewShotConfig) -> MAML:
    torch.manual_seed(config.seed)
    model = Conv4(in_channels=config.in_channels, ways=config.ways, hidden=config.filters,
                  image_size=config.image_size, strided=config.dataset == "omniglot").to(config.device)
    return MAML(model, inner_lr=config.inner_lr, inner_steps=config.inner_steps, first_order=config.first_order,
                loss="cross_entropy", backend=config.backend)


def sampler(config: FewShotConfig, dataset, seed_offset: int, split: str = "train") -> FewShot:
    """The tasks of `dataset` (the `split` classes) drawn with seed config.seed + seed_offset; a split
    too small for the tasks asked for is a JobError naming it."""
    try:
        return FewShot(dataset, config.ways, config.shots, config.queries, rotations=config.rotations,
                       seed=config.seed + seed_offset, device=config.device)
    except ValueError as error:
        raise JobError(f"the {split} classes of {DATASET_NAMES[config.dataset]} cannot make {config.ways}-way "
                       f"{config.shots}-shot tasks with {config.queries} queries per class: {error}") from error


def accuracy(maml: MAML, config: FewShotConfig, tasks: FewShot, count: int) -> dict:
    """Query accuracy of tasks 0..count-1 of `tasks` after config.test_steps steps; mean and 95%
    interval in % (None for a single task)."""
    per_task_images = config.ways * (config.shots + config.queries)
    chunk = max(1, min(50, CHUNK_ACTIVATIONS // (per_task_images * config.filters * config.image_size ** 2)))
    accuracies = []
    with torch.no_grad():
        for first in range(0, count, chunk):
            batch = tasks.batch(range(first, min(first + chunk, count)))
            adapted = maml.adapt(batch.support_x, batch.support_y, steps=config.test_steps)
            predictions = adapted(batch.query_x).argmax(dim=-1)
            accuracies.append((predictions == batch.query_y).double().mean(dim=1))
    per_task = torch.cat(accuracies) * 100
    interval = 1.96 * per_task.std().item() / math.sqrt(count) if count > 1 else None
    return {"accuracy": per_task.mean().item(), "ci95": interval, "tasks": count}


def evaluate(maml: MAML, config: FewShotConfig, dataset) -> dict:
    """The final evaluation: config.eval_tasks tasks of the test classes."""
    return accuracy(maml, config, sampler(config, dataset, TEST_SEED_OFFSET, "test"), config.eval_tasks)


def empty_history() -> dict:
    return {"iteration": [], "train_accuracy": [], "val_accuracy": [], "best_iteration": None, "best_accuracy": None}


@dataclass
class FewShotTrainResult(TrainResult):
    """A TrainResult with the accuracy curve (`history`, resumed runs included) and the seconds this
    process spent measuring it (within `seconds`)."""
    history: dict = field(default_factory=empty_history)
    validation_seconds: float = 0.0


def train(config: FewShotConfig, dataset, context: DistributedContext | None = None, val_set=None,
          best_checkpoint: Path | None = None) -> FewShotTrainResult:
    """Meta-train on `dataset`; resumes from config.checkpoint when it exists. context: see
    pymaml.jobs.sinusoid.train. Every config.val_every iterations rank 0 measures the accuracy on
    config.val_tasks tasks of `dataset` and of `val_set` (when given) and, where the validation
    accuracy is the best so far, saves the weights to `best_checkpoint` (when given). The curve is
    result.history, kept in the checkpoint."""
    context = DistributedContext() if context is None else context
    context.check_same("the few-shot settings", (config.trajectory(), config.iterations, config.backend))
    checkpoint = Path(config.checkpoint) if config.checkpoint else None
    check_checkpoint_on_main(checkpoint, context)
    if best_checkpoint is not None:
        check_checkpoint_on_main(best_checkpoint, context)
    maml = make_maml(config)
    trainer = DistributedMAML(maml, context) if context.is_distributed else None
    optimizer = torch.optim.Adam(maml.parameters(), lr=config.meta_lr)
    tasks = sampler(config, dataset, 0)
    measured = config.val_every > 0 and context.is_main
    train_curve = sampler(config, dataset, TRAIN_CURVE_SEED_OFFSET) if measured else None
    val_curve = sampler(config, val_set, VAL_SEED_OFFSET, "validation") if measured and val_set is not None else None
    start = 0
    history = empty_history()
    validation_seconds = 0.0
    state = resume(checkpoint, config, context, job_keys=("next_task",))
    if state is not None:
        maml.module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        tasks.next_task = int(state["next_task"])
        start = int(state["iteration"])
        history = state.get("history", history)  # absent from checkpoints written before the curves

    def snapshot(iteration: int) -> dict:
        return {"model": maml.module.state_dict(), "optimizer": optimizer.state_dict(), "next_task": tasks.next_task,
                "iteration": iteration, "trajectory": config.trajectory(), "history": history}

    def measure(done: int) -> None:
        nonlocal validation_seconds
        began = time.perf_counter()
        history["iteration"].append(done)
        history["train_accuracy"].append(accuracy(maml, config, train_curve, config.val_tasks)["accuracy"])
        if val_curve is not None:
            value = accuracy(maml, config, val_curve, config.val_tasks)["accuracy"]
            history["val_accuracy"].append(value)
            if history["best_accuracy"] is None or value > history["best_accuracy"]:
                history["best_iteration"], history["best_accuracy"] = done, value
                if best_checkpoint is not None:
                    save_checkpoint(best_checkpoint, snapshot(done))
        validation_seconds += time.perf_counter() - began

    done = start

    def step():
        nonlocal done
        batch = tasks.sample(config.meta_batch).tasks
        if trainer is None:
            output = maml.meta_train_step(*batch, optimizer)
        else:
            output = trainer.meta_train_step(*context.shard(batch), optimizer)
        done += 1
        if measured and done % config.val_every == 0:
            measure(done)
        return output

    result = train_loop(maml, context, start=start, iterations=config.iterations, step=step, snapshot=snapshot,
                        checkpoint=checkpoint, checkpoint_every=config.checkpoint_every, progress=config.progress,
                        smoothing=0.98)
    return FewShotTrainResult(**vars(result), history=history, validation_seconds=validation_seconds)


def plot(report: dict, path: Path) -> None:
    """Training and validation accuracy against iterations, and the test accuracy with its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config, curve = report["config"], report["accuracy_curve"]
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    iterations = curve["iteration"]
    axis.plot(iterations, curve["train_accuracy"], marker="o", markersize=3, label="training classes")
    if curve["val_accuracy"]:
        axis.plot(iterations, curve["val_accuracy"], marker="o", markersize=3, label="validation classes")
    if curve["best_iteration"] is not None:
        axis.scatter([curve["best_iteration"]], [curve["best_accuracy"]], marker="*", s=120, color="black",
                     zorder=5, label="best validation (best.pt)")
    evaluation, paper = report["evaluation"], report["paper_maml_accuracy"]
    end = report["iterations"]
    axis.errorbar([end], [evaluation["accuracy"]], yerr=[evaluation["ci95"] or 0.0], marker="s", color="red",
                  capsize=3, label=f"test, {evaluation['tasks']} tasks")
    if paper is not None:
        axis.axhspan(paper["accuracy"] - paper["ci95"], paper["accuracy"] + paper["ci95"], color="grey", alpha=0.3,
                     label=f"paper ({report['paper_row']}), test")
    if not iterations:
        axis.text(0.5, 0.5, "no accuracy curve: fewer iterations than --val-every" if config["val_every"]
                  else "no accuracy curve (--val-every 0)", transform=axis.transAxes, ha="center", fontsize=8)
    axis.set_xlabel("meta-training iterations")
    axis.set_ylabel(f"query accuracy after {config['test_steps']} steps (%)")
    axis.set_ylim(0, 100)
    axis.set_title(f"{DATASET_NAMES[config['dataset']]} {config['ways']}-way {config['shots']}-shot"
                   f"{', first order' if config['first_order'] else ''}")
    axis.legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def deviations_from_paper(config: FewShotConfig) -> dict:
    """The protocol settings of this run that differ from the paper's: {name: [this run's, the paper's]}."""
    paper = {**config.paper_settings(), "meta_lr": 1e-3, "iterations": DEFAULT_ITERATIONS, "eval_tasks": 600}
    if config.dataset == "omniglot":
        paper.update(train_characters=1200, val_characters=0)
    return {name: [getattr(config, name), value] for name, value in paper.items() if getattr(config, name) != value}


def run(config: FewShotConfig, out_dir: Path, context: DistributedContext | None = None) -> dict | None:
    """Load the data, train, evaluate, and write report.json, then the PNG, into out_dir (and best.pt
    there while training); with a distributed context rank 0 alone evaluates and writes (the other
    ranks return None). That out_dir (and the checkpoint's folder) can be written is checked before
    the training."""
    context = DistributedContext() if context is None else context
    check_on_main(context, lambda: check_writable(out_dir, f"report.json and {FIGURE} (--out)"))
    started = time.perf_counter()
    splits = load_splits(config)
    loaded = time.perf_counter()
    best = out_dir / BEST_CHECKPOINT if config.validates else None
    result = train(config, splits.train, context, val_set=splits.val if config.validates else None,
                   best_checkpoint=best)
    trained = time.perf_counter()
    if not context.is_main:
        return None
    evaluation = evaluate(result.maml, config, splits.test)
    paper = paper_accuracy(config.dataset, config.ways, config.shots, config.first_order)
    history = result.history
    validation_seconds = result.validation_seconds
    run_seconds = result.seconds - validation_seconds
    report = {
        "job": "fewshot",
        "dataset": config.dataset,
        "config": {k: v for k, v in asdict(config).items() if k != "progress"},
        "protocol": {
            "model": (f"Conv4: 4 × [3×3 conv, {config.filters} filters, BatchNorm, ReLU, "
                      + ("stride 2]" if config.dataset == "omniglot" else "2×2 max-pool]") + ", linear head"),
            "in_channels": config.in_channels,
            "image_size": config.image_size,
            "rotations": list(config.rotations or (0,)),
            "queries_per_class": config.queries,
            "train_inner_steps": config.inner_steps,
            "test_steps": config.test_steps,
            "batch_norm_at_test": BATCH_NORM_AT_TEST,
            "evaluated_weights": "the final iteration's (the best validation weights are in best.pt)"
            if config.validates else "the final iteration's",
            "deviations_from_paper": deviations_from_paper(config),
        },
        "backend": result.maml.backend,
        "backend_choice": result.maml.backend_choice,
        "iterations": result.iterations_done,
        "resumed_from": result.resumed_from,
        "iterations_run": result.iterations_run,
        "final_running_loss": finite_or_none(result.final_loss),
        "train_classes": splits.train_classes,
        "val_classes": splits.val_classes,
        "test_classes": splits.test_classes,
        "validation": {
            "every": config.val_every, "tasks": config.val_tasks, "steps": config.test_steps,
            "classes": splits.val_source if config.validates else None,
            "note": None if config.validates else "no validation (--val-every 0)" if config.val_every == 0 else (
                "no validation: Omniglot has no validation classes (the paper validates on none); "
                "--val-characters N holds some training characters out for it"),
            "best_checkpoint": str(best) if best is not None and history["best_iteration"] is not None else None,
        },
        "accuracy_curve": {key: history[key] for key in ("iteration", "train_accuracy", "val_accuracy",
                                                         "best_iteration", "best_accuracy")},
        "seconds": {"load": loaded - started, "train_loop": run_seconds, "validation": validation_seconds,
                    "evaluate": time.perf_counter() - trained, "total": time.perf_counter() - started},
        "ms_per_iteration": 1e3 * run_seconds / result.iterations_run if result.iterations_run > 0 else None,
        "evaluation": evaluation,
        "paper_maml_accuracy": None if paper is None else {"accuracy": paper[1], "ci95": paper[2]},
        "paper_row": None if paper is None else paper[0],
        "figure": FIGURE,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "world_size": context.world_size,
        "distributed_backend": context.backend,
        "pymaml": __version__,
        "build": build_info(),
    }
    write_report(out_dir / "report.json", report)
    plot(report, out_dir / FIGURE)
    return report


def summary(report: dict) -> str:
    config, evaluation, paper = report["config"], report["evaluation"], report["paper_maml_accuracy"]
    curve, validation = report["accuracy_curve"], report["validation"]
    lines = [
        f"backend: {report['backend']} ({report['backend_choice']})"
        + (f"; meta-batch split over {report['world_size']} ranks ({report['distributed_backend']})"
           if report.get("world_size", 1) > 1 else ""),
        iterations_summary(report, 1),
    ]
    if curve["best_iteration"] is not None:
        lines.append(f"best validation accuracy {curve['best_accuracy']:.2f}% at iteration {curve['best_iteration']}"
                     f" ({validation['tasks']} tasks): {validation['best_checkpoint']}")
    elif validation["note"] is not None:
        lines.append(validation["note"])
    lines.append(
        f"{DATASET_NAMES[config['dataset']]} {config['ways']}-way {config['shots']}-shot, {evaluation['tasks']} "
        f"held-out tasks, {config['test_steps']} steps: accuracy {evaluation['accuracy']:.2f}%"
        + (f" ± {evaluation['ci95']:.2f}%" if evaluation["ci95"] is not None else " (no interval from one task)"))
    if paper is not None:
        digits = 1 if config["dataset"] == "omniglot" else 2
        lines.append(f"paper ({report['paper_row']}): {paper['accuracy']:.{digits}f}% ± {paper['ci95']:.{digits}f}%")
    else:
        lines.append(f"paper: no MAML number for {DATASET_NAMES[config['dataset']]} {config['ways']}-way "
                     f"{config['shots']}-shot")
    return "\n".join(lines)
