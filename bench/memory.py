"""Peak memory of one provider on one workload, measured in a process of its own: the peak
resident set size (VmHWM) after three training steps (and before the first, after imports and
set-up), printed as JSON; where CUDA is in use, also torch.cuda.max_memory_allocated over the
steps (gpu_peak_mb) and before them (gpu_setup_mb). bench/test_peers.py runs it for each provider.

python bench/memory.py PROVIDER WORKLOAD STEPS    # WORKLOAD: w1, w2 or w3
"""

import json
import resource
import sys

import torch

from providers import PROVIDERS, omniglot_conv4, omniglot_mlp, sinusoid

WORKLOADS = {"w1": sinusoid, "w2": omniglot_mlp, "w3": omniglot_conv4}


def peak_rss_mb() -> float:
    """This process's peak resident set. getrusage's ru_maxrss is not used: on Linux it keeps the
    peak of the process that forked this one (pytest's), so every provider read the same."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 1024**2)


def main(provider: str, workload_name: str, steps: int) -> None:
    torch.set_num_threads(1)
    if workload_name not in WORKLOADS:
        raise SystemExit(f"unknown workload {workload_name!r}; choose one of {sorted(WORKLOADS)}")
    workload = WORKLOADS[workload_name](steps)
    built = PROVIDERS[provider].build(workload)
    batch = built.convert(workload.batch(seed=1))
    gpu = torch.cuda.is_available() and torch.cuda.is_initialized()
    measured = {}
    if gpu:
        torch.cuda.synchronize()
        measured["gpu_setup_mb"] = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    before = peak_rss_mb()
    for _ in range(3):
        built.train_step(batch)
    if gpu:
        torch.cuda.synchronize()
        measured["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps({"provider": provider, "workload": workload.name, "setup_rss_mb": before,
                      "peak_rss_mb": peak_rss_mb(), "prepare_seconds": built.prepare_seconds, **measured}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
