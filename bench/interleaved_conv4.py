"""Interleaved train-step timings of the Conv4 workloads (W3, W4) for several providers in one
process: each provider is built once and warmed up, then each round times one training step
(meta-gradient + Adam) of every provider in turn; prints the median per provider with the counted
GFLOP/s (bench/flops.py). bench/RESULTS.md ("Conv4 on the fused cpp path") quotes its output.

python bench/interleaved_conv4.py THREADS w3 ROUNDS PROVIDERS STEPS QUERIES [first]
python bench/interleaved_conv4.py THREADS w4 ROUNDS PROVIDERS [first]
PROVIDERS: comma-separated names of bench/providers.py (pymaml-cpp,pymaml-func,learn2learn,...);
NAME@LEVEL (pymaml-cpp@x86-64-v3) runs that provider with the CPU kernels of one ISA level.
"""

import json
import statistics
import sys
import time

import torch

import pymaml
from flops import conv_meta_step_flops
from providers import PROVIDERS, miniimagenet_conv4, omniglot_conv4


def main(argv: list[str]) -> None:
    threads, which, rounds, names = int(argv[0]), argv[1], int(argv[2]), argv[3].split(",")
    torch.set_num_threads(threads)
    if which == "w3":
        first_order = len(argv) > 6 and argv[6] == "first"
        workload = omniglot_conv4(int(argv[4]), queries=int(argv[5]), first_order=first_order)
    else:
        workload = miniimagenet_conv4(5, first_order=len(argv) > 4 and argv[4] == "first")
    batch = workload.batch(seed=1)
    gflop = conv_meta_step_flops(workload.make_model(), workload.image_shape, workload.tasks, batch[0].shape[1],
                                 batch[2].shape[1], workload.steps, workload.first_order) / 1e9
    built, levels = {}, {}
    set_level = pymaml._extension.extension().set_cpu_level if any("@" in n for n in names) else None
    default_level = pymaml.build_info()["cpu_level"]
    for name in names:
        base, _, level = name.partition("@")
        levels[name] = level or default_level
        if set_level:
            set_level(levels[name])
        provider = PROVIDERS[base]
        reason = provider.unavailable_reason() or provider.unsupported_reason(workload)
        if reason:
            print(f"{name} skipped: {reason}")
            continue
        step = provider.build(workload)
        data = step.convert(batch)
        step.train_step(data)
        built[name] = (step, data)
    times = {name: [] for name in built}
    for _ in range(rounds):
        for name, (step, data) in built.items():
            if set_level:
                set_level(levels[name])
            start = time.perf_counter()
            step.train_step(data)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, median in medians.items():
        print(f"{workload.name} threads={threads} {name}: median {median * 1e3:.0f} ms "
              f"({gflop / median:.1f} GFLOP/s of {gflop:.1f} GFLOP), {rounds} rounds")
    print(json.dumps({"workload": workload.name, "threads": threads, "gflop": gflop, "median_s": medians}))


if __name__ == "__main__":
    main(sys.argv[1:])
