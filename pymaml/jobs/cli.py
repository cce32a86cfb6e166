"""Command line: `pymaml sinusoid ...`, `pymaml fewshot ...` (alias `pymaml omniglot` for
`--dataset omniglot`), `pymaml rl ...` and `pymaml backends`.

`torchrun --nproc_per_node N -m pymaml sinusoid|fewshot|omniglot|rl ...` splits every meta-batch over N
processes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    from .sinusoid import DEFAULT_ITERATIONS

    parser = argparse.ArgumentParser(prog="pymaml", description="Fused, exact MAML for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True)

    sinusoid = commands.add_parser("sinusoid", help="meta-train and evaluate the paper's sinusoid regression")
    sinusoid.add_argument("--iterations", type=_non_negative_int, default=DEFAULT_ITERATIONS,
                          help=f"meta-iterations (default {DEFAULT_ITERATIONS}, the paper's schedule)")
    sinusoid.add_argument("--meta-batch", type=_positive_int, default=25)
    sinusoid.add_argument("--shots", type=_positive_int, default=10, help="support and query points per task")
    sinusoid.add_argument("--inner-lr", type=float, default=0.01)
    sinusoid.add_argument("--inner-steps", type=_non_negative_int, default=1)
    sinusoid.add_argument("--meta-lr", type=float, default=1e-3)
    sinusoid.add_argument("--first-order", action="store_true")
    sinusoid.add_argument("--backend", default="auto")
    sinusoid.add_argument("--seed", type=int, default=0)
    sinusoid.add_argument("--eval-tasks", type=_positive_int, default=1000)
    sinusoid.add_argument("--eval-points", type=_positive_int, default=100, help="query points per evaluation task")
    sinusoid.add_argument("--out", type=Path, default=Path("runs/sinusoid"), help="folder for report.json and the PNG")
    sinusoid.add_argument("--checkpoint", type=Path, default=None,
                          help="save here every --checkpoint-every iterations, and resume from it if present")
    sinusoid.add_argument("--checkpoint-every", type=_positive_int, default=1000)
    sinusoid.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: torch's)")
    sinusoid.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    _add_fewshot_commands(commands)

    from .rl import BASELINE_LRS as RL_BASELINE_LRS, DEFAULT_ITERATIONS as RL_ITERATIONS, \
        DEFAULT_META_BATCH as RL_META_BATCH, SELECTIONS as RL_SELECTIONS

    rl = commands.add_parser("rl", help="meta-train and evaluate MAML-TRPO on the paper's reinforcement-learning tasks")
    rl.add_argument("--env", default="navigation2d", choices=sorted(RL_META_BATCH))
    rl.add_argument("--iterations", type=_non_negative_int, default=RL_ITERATIONS,
                    help=f"meta-iterations (default {RL_ITERATIONS}, the paper's: up to 500)")
    rl.add_argument("--meta-batch", type=_positive_int, default=None,
                    help="tasks per meta-batch (default: the paper's, 20 for navigation, 40 for half-cheetah)")
    rl.add_argument("--trajectories", type=_positive_int, default=20, help="trajectories per task and step")
    rl.add_argument("--inner-lr", type=float, default=0.1)
    rl.add_argument("--max-kl", type=float, default=0.01)
    rl.add_argument("--first-order", action="store_true")
    rl.add_argument("--seed", type=int, default=0)
    rl.add_argument("--eval-tasks", type=_positive_int, default=40)
    rl.add_argument("--eval-steps", type=_non_negative_int, default=3)
    rl.add_argument("--select", choices=RL_SELECTIONS, default="best",
                    help="evaluate each trained policy at its iteration with the best mean training return (the "
                         "paper's) or at its last parameters")
    rl.add_argument("--eval-later-lr", type=float, default=None,
                    help="the meta-learned policy's step size after the first evaluation step (default: half "
                         "--inner-lr, the paper's)")
    rl.add_argument("--baseline-lrs", type=float, nargs="+", default=list(RL_BASELINE_LRS),
                    help="step sizes tried for the pretrained and random baselines; each takes the best on tasks "
                         f"of its own (default {' '.join(map(str, RL_BASELINE_LRS))})")
    rl.add_argument("--tune-tasks", type=_positive_int, default=20, help="tasks for the baselines' step-size choice")
    rl.add_argument("--horizon", type=_positive_int, default=None, help="steps per trajectory (default: the paper's)")
    rl.add_argument("--out", type=Path, default=Path("runs/rl"), help="folder for report.json and the PNG")
    rl.add_argument("--checkpoint", type=Path, default=None,
                    help="save here every --checkpoint-every iterations, and resume from it if present")
    rl.add_argument("--checkpoint-every", type=_positive_int, default=10)
    rl.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: torch's)")
    rl.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    commands.add_parser("backends", help="list the backends and how the extension was built")
    return parser


def _rl(args) -> int:
    from .. import distributed
    from .rl import DEFAULT_META_BATCH as RL_META_BATCH, RLConfig, run, summary

    config = RLConfig(
        env=args.env, iterations=args.iterations, meta_batch=args.meta_batch or RL_META_BATCH[args.env],
        trajectories=args.trajectories, inner_lr=args.inner_lr, max_kl=args.max_kl, first_order=args.first_order,
        seed=args.seed, eval_tasks=args.eval_tasks, eval_steps=args.eval_steps, select=args.select,
        eval_later_lr=args.eval_later_lr, baseline_lrs=tuple(args.baseline_lrs), tune_tasks=args.tune_tasks,
        horizon=args.horizon,
        checkpoint=str(args.checkpoint) if args.checkpoint else None, checkpoint_every=args.checkpoint_every,
        progress=not args.no_progress)
    # Under torchrun: one process per rank, gloo (the policies and simulators live on the CPU).
    with distributed.init(device="cpu") as context:
        report = run(config, args.out, context)
    if report is not None:
        print(summary(report))
        print(f"wrote {args.out / 'report.json'} and {args.out / report['figure']}")
    return 0


def _add_fewshot_commands(commands) -> None:
    """`pymaml fewshot --dataset ...` and its alias `pymaml omniglot` (= --dataset omniglot)."""
    from .fewshot import DATASETS, DEFAULT_ITERATIONS as FEWSHOT_ITERATIONS

    fewshot = commands.add_parser(
        "fewshot", help="meta-train and evaluate Conv4 on Omniglot, MiniImagenet, CIFAR-FS or FC100",
        description="Defaults are the paper's per data set. Omniglot: 5-way α=0.4, 1 step (3 at test), meta-batch "
                    "32; 20-way α=0.1, 5 steps, meta-batch 16; 64 filters, strided, 28×28. MiniImagenet (84×84), "
                    "CIFAR-FS and FC100 (32×32): 32 filters with max-pooling, α=0.01, 5 steps (10 at test), "
                    "meta-batch 4 (1-shot) or 2 (5-shot), 15 queries per class.")
    fewshot.add_argument("--dataset", choices=DATASETS, required=True)
    omniglot = commands.add_parser("omniglot", help="meta-train and evaluate the paper's Omniglot Conv4 classifier "
                                                    "(pymaml fewshot --dataset omniglot)",
                                   description="Defaults are the paper's: 5-way α=0.4, 1 step (3 at test), "
                                               "meta-batch 32; 20-way α=0.1, 5 steps, meta-batch 16.")
    omniglot.set_defaults(dataset="omniglot")
    for parser in (fewshot, omniglot):
        parser.add_argument("--root", type=Path, required=True,
                            help="the data set's folder: Omniglot's images_background/ and images_evaluation/ "
                                 "(unzipped); MiniImagenet's images/ with train.csv, val.csv, test.csv, or its "
                                 "mini-imagenet-cache-*.pkl; CIFAR-FS's and FC100's cifar-100-python/")
        parser.add_argument("--ways", type=_positive_int, default=5)
        parser.add_argument("--shots", type=_positive_int, default=1)
        parser.add_argument("--queries", type=_positive_int, default=None,
                            help="query images per class (default: Omniglot as many as --shots, as in the paper's "
                                 "code; the others 15)")
        parser.add_argument("--iterations", type=_non_negative_int, default=FEWSHOT_ITERATIONS)
        parser.add_argument("--meta-batch", type=_positive_int, default=None, help="default: the paper's")
        parser.add_argument("--inner-lr", type=float, default=None, help="default: the paper's")
        parser.add_argument("--inner-steps", type=_non_negative_int, default=None, help="default: the paper's")
        parser.add_argument("--test-steps", type=_non_negative_int, default=None, help="default: the paper's")
        parser.add_argument("--meta-lr", type=float, default=1e-3)
        parser.add_argument("--first-order", action="store_true")
        parser.add_argument("--backend", default="auto")
        parser.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--eval-tasks", type=_positive_int, default=600, help="test tasks of the final evaluation")
        parser.add_argument("--val-every", type=_non_negative_int, default=1000,
                            help="measure the training and validation accuracy every N iterations and keep the "
                                 "best validation weights in --out/best.pt (0: never)")
        parser.add_argument("--val-tasks", type=_positive_int, default=100, help="tasks per accuracy measurement")
        parser.add_argument("--image-size", type=_positive_int, default=None,
                            help="default: 28 (Omniglot), 84 (MiniImagenet), 32 (CIFAR-FS, FC100: the only size)")
        parser.add_argument("--filters", type=_positive_int, default=None,
                            help="Conv4 filters per layer (default: 64 for Omniglot, 32 for the others)")
        parser.add_argument("--train-characters", type=_positive_int, default=None,
                            help="Omniglot: the first N characters are the meta-training split, the rest the test "
                                 "split (default 1200)")
        parser.add_argument("--val-characters", type=_non_negative_int, default=None,
                            help="Omniglot: hold the last N training characters out of the training and validate "
                                 "on them (default 0: Omniglot has no validation split, nor the paper a validation)")
        parser.add_argument("--out", type=Path, default=None,
                            help="folder for report.json, accuracy.png and best.pt (default: runs/<dataset>)")
        parser.add_argument("--checkpoint", type=Path, default=None,
                            help="save here every --checkpoint-every iterations, and resume from it if present")
        parser.add_argument("--checkpoint-every", type=_positive_int, default=1000)
        parser.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: torch's)")
        parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _fewshot(args) -> int:
    from .. import distributed
    from .fewshot import FewShotConfig, run, summary
    from .training import JobError

    out = args.out if args.out is not None else Path("runs") / args.dataset
    with distributed.init(device=args.device) as context:
        device = str(context.device)
        try:
            config = FewShotConfig(
                root=str(args.root), dataset=args.dataset, ways=args.ways, shots=args.shots, queries=args.queries,
                iterations=args.iterations, meta_batch=args.meta_batch, inner_lr=args.inner_lr,
                inner_steps=args.inner_steps, test_steps=args.test_steps, meta_lr=args.meta_lr,
                first_order=args.first_order, backend=args.backend, device=device, seed=args.seed,
                eval_tasks=args.eval_tasks, val_every=args.val_every, val_tasks=args.val_tasks,
                image_size=args.image_size, filters=args.filters, train_characters=args.train_characters,
                val_characters=args.val_characters, checkpoint=str(args.checkpoint) if args.checkpoint else None,
                checkpoint_every=args.checkpoint_every, progress=not args.no_progress)
        except ValueError as error:
            raise JobError(str(error)) from error
        report = run(config, out, context)
    if report is not None:
        print(summary(report))
        print(f"wrote {out / 'report.json'} and {out / report['figure']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs a command; a job that cannot start or resume as asked (pymaml.jobs.training.JobError: an
    unwritable --out, a damaged checkpoint, ...) prints its message alone and returns 1."""
    from .training import JobError

    args = _parser().parse_args(argv)
    try:
        return _command(args)
    except JobError as error:
        print(f"pymaml {args.command}: error: {error}", file=sys.stderr)
        return 1


def _command(args) -> int:
    if args.command == "backends":
        import pymaml

        from .._extension import cpu_level_lines

        for status in pymaml.available_backends():
            print(status)
        info = pymaml.build_info()
        for line in cpu_level_lines(info):
            print(line)
        print(json.dumps(info, indent=2))
        return 0

    import torch

    from .. import distributed
    from .sinusoid import SinusoidConfig, run, summary

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.command in ("fewshot", "omniglot"):
        return _fewshot(args)
    if args.command == "rl":
        return _rl(args)
    config = SinusoidConfig(
        iterations=args.iterations,
        meta_batch=args.meta_batch,
        shots=args.shots,
        inner_lr=args.inner_lr,
        inner_steps=args.inner_steps,
        meta_lr=args.meta_lr,
        first_order=args.first_order,
        backend=args.backend,
        seed=args.seed,
        eval_tasks=args.eval_tasks,
        eval_points=args.eval_points,
        checkpoint=str(args.checkpoint) if args.checkpoint else None,
        checkpoint_every=args.checkpoint_every,
        progress=not args.no_progress,
    )
    # Under torchrun: one process per rank, gloo (the sinusoid model lives on the CPU); without
    # it a single-process context and nothing else changes.
    with distributed.init(device="cpu") as context:
        report = run(config, args.out, context)
    if report is not None:
        print(summary(report))
        print(f"wrote {args.out / 'report.json'} and {args.out / report['figure']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
