"""What the training jobs (pymaml.jobs.sinusoid, pymaml.jobs.fewshot) share: the result of a training run,
checkpoints that are written atomically and refused when damaged or when their settings differ,
the checks that the outputs can be written before any training, and reports in strict JSON."""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ..algorithms.maml import MAML
from ..distributed import DistributedContext, load_on_main

# Where the progress bar's stream is not a terminal (a log file, a pipe), it is redrawn at most
# this often: every redraw there is one more carriage-return line in the log.
NON_TERMINAL_REFRESH_SECONDS = 20.0
# What every checkpoint of train_loop's callers holds, besides the keys of its job.
CHECKPOINT_KEYS = ("model", "optimizer", "iteration", "trajectory")
START_OVER = "delete it or pass another --checkpoint path to start over"


class JobError(ValueError):
    """A job cannot start or resume as asked (an unwritable output, a damaged or mismatched
    checkpoint); the message names the path and what to do. The command line prints it alone."""


class TrajectorySettings:
    """A job config whose TRAJECTORY_FIELDS (the settings that change the training trajectory) a
    checkpoint must agree on."""

    TRAJECTORY_FIELDS: tuple[str, ...] = ()

    def trajectory(self) -> dict:
        return {name: getattr(self, name) for name in self.TRAJECTORY_FIELDS}


@dataclass
class TrainResult:
    maml: MAML
    iterations_done: int
    resumed_from: int
    final_loss: float
    seconds: float
    losses: list[float] = field(default_factory=list)

    @property
    def iterations_run(self) -> int:
        """The iterations this process ran (none when it resumed a finished run)."""
        return self.iterations_done - self.resumed_from

    @property
    def ms_per_iteration(self) -> float | None:
        """Milliseconds an iteration over the iterations this process ran; None when it ran none."""
        return 1e3 * self.seconds / self.iterations_run if self.iterations_run > 0 else None


def finite_or_none(value: float) -> float | None:
    """`value`, or None where it is NaN or infinite (JSON has no such numbers)."""
    value = float(value)
    return value if math.isfinite(value) else None


def write_report(path: Path, report: dict) -> None:
    """Strict JSON (a NaN or an infinity raises rather than writing what JSON parsers refuse),
    written atomically."""
    text = json.dumps(report, indent=2, allow_nan=False)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text + "\n")
    os.replace(temporary, path)


def iterations_summary(report: dict, digits: int) -> str:
    """A report's iterations, how many of them this process ran and their time, and the wall time."""
    done, resumed, ran = report["iterations"], report["resumed_from"], report["iterations_run"]
    if done == 0:
        text = "0 iterations (the initial weights)"
    elif ran == 0:
        text = f"{done} iterations, all from the checkpoint (none run in this process)"
    else:
        text = f"{done} iterations" + (f" ({ran} run in this process, resumed at {resumed})" if resumed else "")
        text += f", {report['ms_per_iteration']:.{digits}f} ms each"
    return text + f"; wall time {report['seconds']['total']:.1f} s"


def check_writable(directory: Path, what: str) -> None:
    """Create `directory` and a file in it, so that an output that cannot be written fails before
    the training rather than after it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        descriptor, name = tempfile.mkstemp(dir=directory, prefix=".pymaml-write-check-")
        os.close(descriptor)
        os.unlink(name)
    except OSError as error:
        raise JobError(f"cannot write {what} in {directory}: {error.strerror or error}") from error


def check_checkpoint_writable(path: Path) -> None:
    """The checkpoint is written as path.tmp, then renamed to path: its folder must take new files."""
    if path.is_dir():
        raise JobError(f"the checkpoint path {path} is a folder; name a file (e.g. {path / 'run.pt'})")
    check_writable(path.parent, f"the checkpoint {path.name}")


def check_checkpoint_on_main(path: Path | None, context: DistributedContext) -> None:
    """check_checkpoint_writable on rank 0, its refusal raised on every rank; nothing without a path."""
    if path is not None:
        check_on_main(context, lambda: check_checkpoint_writable(path))


def check_on_main(context: DistributedContext, check: Callable[[], None]) -> None:
    """`check()` on rank 0; its JobError is raised on every rank, so that no rank waits for rank 0."""
    error = None
    if context.is_main:
        try:
            check()
        except JobError as failure:
            if not context.is_distributed:
                raise
            error = str(failure)
    error = context.broadcast_object(error)
    if error is not None:
        raise JobError(error)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a crash leaves either the old checkpoint or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def load_checkpoint(path: Path, config: TrajectorySettings, job_keys: tuple[str, ...] = ()) -> dict:
    """The checkpoint at `path`, refused with a JobError when it cannot be read, is not a checkpoint
    of this job (CHECKPOINT_KEYS and `job_keys`), was written with other trajectory settings, or
    holds more iterations than config.iterations."""
    path = Path(path)
    try:
        handle = open(path, "rb")
    except OSError as error:
        raise JobError(f"cannot read the checkpoint {path}: {error.strerror or error}") from error
    with handle:
        try:
            state = torch.load(handle, weights_only=True)
        except Exception as error:  # an empty, truncated or foreign file fails in many ways
            detail = str(error).strip().splitlines()[0] if str(error).strip() else "no data"
            raise JobError(
                f"the checkpoint {path} is damaged or is not a pymaml checkpoint "
                f"({type(error).__name__}: {detail}); {START_OVER}"
            ) from error
    missing = [key for key in (*CHECKPOINT_KEYS, *job_keys) if not (isinstance(state, dict) and key in state)]
    if missing:
        held = f"a dict without {', '.join(missing)}" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise JobError(f"the file {path} is not a pymaml checkpoint of this job (it holds {held}); "
                       f"{START_OVER}")
    if state["trajectory"] != config.trajectory():
        raise JobError(
            f"checkpoint {path} was written with settings {state['trajectory']}, "
            f"which differ from this run's {config.trajectory()}; use another --checkpoint path"
        )
    done, asked = int(state["iteration"]), int(config.iterations)
    if done > asked:
        raise JobError(
            f"checkpoint {path} holds {done} iterations, more than the {asked} asked for (--iterations); "
            f"pass --iterations {done} to evaluate it as it is, more to continue it, or another "
            f"--checkpoint path to start over"
        )
    return state


def resume(path: Path | None, config: TrajectorySettings, context: DistributedContext,
           job_keys: tuple[str, ...] = ()) -> dict | None:
    """The checkpoint at `path` (see load_checkpoint), loaded on rank 0 and sent to every rank;
    None when there is none. A refusal is a JobError on every rank."""
    try:
        return load_on_main(path, lambda where: load_checkpoint(where, config, job_keys), context)
    except JobError:
        raise
    except ValueError as refusal:  # load_on_main re-raises rank 0's JobError as a ValueError on the others
        if context.is_distributed:
            raise JobError(str(refusal)) from refusal
        raise


def progress_bar(iterable, *, start: int, total: int, enabled: bool, description: str) -> tqdm:
    """tqdm on stderr; where stderr is not a terminal, redrawn every NON_TERMINAL_REFRESH_SECONDS
    instead of ten times a second (maxinterval bounds tqdm's monitor thread, which redraws too)."""
    stream = sys.stderr
    terminal = hasattr(stream, "isatty") and stream.isatty()
    interval = {} if terminal else dict(mininterval=NON_TERMINAL_REFRESH_SECONDS,
                                        maxinterval=NON_TERMINAL_REFRESH_SECONDS)
    return tqdm(iterable, initial=start, total=total, disable=not enabled, desc=description, smoothing=0.05,
                file=stream, **interval)


def train_loop(maml: MAML, context: DistributedContext, *, start: int, iterations: int, step: Callable,
               snapshot: Callable[[int], dict], checkpoint: Path | None, checkpoint_every: int, progress: bool,
               smoothing: float, postfix_every: int = 1) -> TrainResult:
    """Iterations start..iterations-1 of `step()` (one training step, returning its MetaOutput),
    with a progress bar and the running loss (exponential average, weight `smoothing` on the past)
    on rank 0, and checkpoints (`snapshot(iterations done)`) every checkpoint_every iterations and
    at the end, written by rank 0 alone."""
    if start > iterations:
        raise JobError(f"the run resumes at iteration {start}, past the {iterations} asked for")
    losses: list[float] = []
    running = math.nan
    began = time.perf_counter()
    ranks = f", {context.world_size} ranks" if context.is_distributed else ""
    bar = progress_bar(range(start, iterations), start=start, total=iterations,
                       enabled=progress and context.is_main, description=f"meta-train [{maml.backend}{ranks}]")
    saves = checkpoint is not None and context.is_main
    for iteration in bar:
        loss = step().loss.item()
        losses.append(loss)
        running = loss if math.isnan(running) else smoothing * running + (1 - smoothing) * loss
        if iteration % postfix_every == 0:
            bar.set_postfix(loss=f"{running:.3f}", refresh=False)
        done = iteration + 1
        if saves and done % checkpoint_every == 0:
            save_checkpoint(checkpoint, snapshot(done))
    bar.close()
    seconds = time.perf_counter() - began
    if saves:
        save_checkpoint(checkpoint, snapshot(iterations))
    return TrainResult(maml, iterations, start, running, seconds, losses)
