"""The issue-13 ratios measured interleaved: W1's meta-gradient (second order, S=1 and S=5, one
thread) for the fused kernel at every ISA level this CPU runs and for torch.compile, taking turns
round by round in one process, so that a slow stretch of a shared machine falls on every
provider alike. Prints one JSON object: per S, each provider's median ms over the rounds and
torch.compile's median over each level's.

    python bench/interleaved_levels.py [--rounds 40] [--calls 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pymaml  # noqa: E402
from providers import sinusoid  # noqa: E402
from test_meta_step import LEVELS, provider_step  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--calls", type=int, default=20, help="calls per provider per round")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    set_level = pymaml._extension.extension().set_cpu_level
    report = {"threads": 1, "rounds": args.rounds, "calls": args.calls, "cpu_levels": LEVELS, "steps": {}}
    for steps in (1, 5):
        workload = sinusoid(steps)
        providers = {}
        for provider in [f"cpp@{level}" for level in LEVELS] + ["compile"]:
            model = workload.make_model()
            batch = workload.batch(0)
            step, _ = provider_step(provider, workload, model, batch)
            level = provider.partition("@")[2] or LEVELS[0]
            providers[provider] = (step, batch, level)
        times = {name: [] for name in providers}
        for _ in range(args.rounds):
            for name, (step, batch, level) in providers.items():
                set_level(level)
                step(batch)
                began = time.perf_counter()
                for _ in range(args.calls):
                    step(batch)
                times[name].append((time.perf_counter() - began) / args.calls * 1e3)
        set_level(LEVELS[0])
        medians = {name: statistics.median(values) for name, values in times.items()}
        report["steps"][f"S={steps}"] = {
            "median_ms": medians,
            "compile_over": {name: medians["compile"] / medians[name] for name in medians if name != "compile"},
        }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
