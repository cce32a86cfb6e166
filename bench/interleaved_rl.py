"""MAML-TRPO's inner and outer steps (bench/test_rl_meta_iteration.py) measured interleaved: the
batched closed forms, the batched autograd fallback and the one-task-at-a-time loop take turns
round by round in one process, so that a slow stretch of a shared machine falls on all three
alike. Meta-batch 40, 20 trajectories, one thread. Prints one JSON object: per phase, each
implementation's median seconds over the rounds, and the loop's median over each batched one's.

    python bench/interleaved_rl.py [--horizon 20] [--rounds 5]

PYMAML_BENCH_DEFAULT_ALLOCATOR=1 runs all three with glibc's default allocator thresholds
(bench/test_rl_meta_iteration.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_rl_meta_iteration import IMPLEMENTATIONS, META_BATCH, ONE_TASK, TRAJECTORIES, phase_calls  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--horizon", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--inner-calls", type=int, default=10, help="inner steps per implementation per round")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    calls = {implementation: phase_calls(args.horizon, implementation) for implementation in IMPLEMENTATIONS}
    for implementation in IMPLEMENTATIONS:  # warm-up: torch.func's first calls
        calls[implementation]["inner"]()
        calls[implementation]["outer"]()
    times = {phase: {implementation: [] for implementation in IMPLEMENTATIONS} for phase in ("inner", "outer")}
    for _ in range(args.rounds):
        for implementation in IMPLEMENTATIONS:
            began = time.perf_counter()
            for _ in range(args.inner_calls):
                calls[implementation]["inner"]()
            times["inner"][implementation].append((time.perf_counter() - began) / args.inner_calls)
            began = time.perf_counter()
            calls[implementation]["outer"]()
            times["outer"][implementation].append(time.perf_counter() - began)
    report = {"horizon": args.horizon, "freed_memory_retained": os.environ.get("PYMAML_BENCH_DEFAULT_ALLOCATOR") != "1", "meta_batch": META_BATCH, "trajectories": TRAJECTORIES, "threads": 1,
              "rounds": args.rounds, "phases": {}}
    for phase, by_implementation in times.items():
        medians = {implementation: statistics.median(values) for implementation, values in by_implementation.items()}
        report["phases"][phase] = {
            "median_s": medians,
            "loop_over": {implementation: medians[ONE_TASK] / medians[implementation]
                          for implementation in IMPLEMENTATIONS if implementation != ONE_TASK},
        }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
