"""Peak memory of one second-order meta-step (the meta-gradient) on the paper's Omniglot Conv4, in a
process of its own: 5-way 1-shot, 15 queries per class, T = 32 tasks of random 28×28 images,
α = 0.4, cross entropy, fp32, one thread. Prints JSON with the peak resident set size (VmHWM) after
set-up and after the meta-step. Set-up is the imports, the model, the batch and a warm-up
meta-step of the same provider on one task with one query per class: the library code that the
first call pages in (about 95 MB of torch for the func paths) and the allocator's first pools then
count as set-up, not as the meta-step's growth. bench/test_conv4_memory.py runs it.

python bench/conv4_memory.py PROVIDER STEPS [TASK_CHUNK]
PROVIDER: reference (the oracle's graph), func-graph (second_order="graph"), func (memory-efficient), cpp (fused)
"""

import json
import sys

import torch

import pymaml


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), as bench/memory.py reads it (without importing the peers)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status; peak memory is measured on Linux only")

WAYS, SHOTS, QUERIES, TASKS, INNER_LR = 5, 1, 15, 32, 0.4
PROVIDERS = {
    "reference": dict(backend="reference"),
    "func-graph": dict(backend="func", second_order="graph"),
    "func": dict(backend="func", second_order="memory_efficient"),
    "cpp": dict(backend="cpp"),
}


def conv4_batch(tasks: int = TASKS, seed: int = 1, queries: int = QUERIES):
    """Random tasks of the right shapes: images [T, K, 1, 28, 28] and labels [T, K] in [0, WAYS)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for points in (WAYS * SHOTS, WAYS * queries):
        tensors.append(torch.rand(tasks, points, 1, 28, 28, generator=generator))
        tensors.append(torch.arange(WAYS).repeat(points // WAYS).expand(tasks, points).contiguous())
    return tuple(tensors)


def conv4_maml(provider: str, steps: int, task_chunk: int | None = None) -> pymaml.MAML:
    torch.manual_seed(0)
    options = dict(PROVIDERS[provider])
    if task_chunk is not None:
        options["task_chunk"] = task_chunk
    return pymaml.MAML(pymaml.models.Conv4(), inner_lr=INNER_LR, inner_steps=steps, first_order=False,
                       loss="cross_entropy", **options)


def main(provider: str, steps: int, task_chunk: int | None) -> None:
    torch.set_num_threads(1)
    maml = conv4_maml(provider, steps, task_chunk)
    maml.meta_gradient(*conv4_batch(tasks=1, seed=2, queries=1), accumulate=False)
    batch = conv4_batch()
    before = peak_rss_mb()
    out = maml.meta_gradient(*batch, accumulate=False)
    peak = peak_rss_mb()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in maml.parameters())
    print(json.dumps({"provider": provider, "steps": steps, "task_chunk": task_chunk, "loss": out.loss.item(),
                      "setup_rss_mb": before, "peak_rss_mb": peak}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)
