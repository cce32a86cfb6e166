"""The cross-library benchmark: a training step (meta-gradient plus Adam) of every provider in
bench/providers.py on W1 (the paper's sinusoid; S ∈ {1, 5}, first and second order) and W2 (the
paper's Omniglot MLP, 5-way 1-shot, T=32; S ∈ {1, 5}, second order). Each
provider's meta-gradient is first checked against pymaml's oracle; a wrong one is reported
(xfail) and not timed. Peers that are not installed are skipped with the reason. Timings are
never asserted. Run: pytest bench/test_peers.py --benchmark-only --benchmark-json=peers.json
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_bench import relative_error
from providers import PROVIDERS, omniglot_mlp, oracle_meta_gradient, sinusoid

STEPS = [1, 5]
TOLERANCE = 1e-4  # float32 providers against the float64 oracle


def run_provider(benchmark, request, provider, workload, smoke_configuration):
    chosen = PROVIDERS[provider]
    reason = chosen.unavailable_reason()
    if reason is not None:
        pytest.skip(f"{provider}: {reason}")
    if provider == "torch.compile" and request.config.getoption("benchmark_disable") and not smoke_configuration:
        pytest.skip("smoke mode compiles one configuration only")
    built = chosen.build(workload)
    batch = workload.batch(seed=1)
    error = relative_error(built.meta_gradient(batch), oracle_meta_gradient(workload, batch))
    benchmark.extra_info.update(provider=provider, workload=workload.name, oracle_error=error,
                                prepare_seconds=built.prepare_seconds)
    if not error <= TOLERANCE:
        pytest.xfail(f"{provider} gives a wrong meta-gradient (relative error {error:.2e}); not timed")
    native = built.convert(batch)
    benchmark.group = f"{workload.name}, train step"
    benchmark(built.train_step, native)


@pytest.mark.parametrize("order", ["second", "first"])
@pytest.mark.parametrize("steps", STEPS, ids=[f"S{s}" for s in STEPS])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_w1_train_step(benchmark, request, provider, steps, order):
    run_provider(benchmark, request, provider, sinusoid(steps, first_order=order == "first"),
                 (steps, order) == (1, "second"))


@pytest.mark.parametrize("steps", STEPS, ids=[f"S{s}" for s in STEPS])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_w2_train_step(benchmark, request, provider, steps):
    if provider == "pymaml-reference" and steps == 5 and not request.config.getoption("benchmark_disable"):
        pytest.skip("the oracle is not timed at S=5 on W2 (seconds per step)")
    run_provider(benchmark, request, provider, omniglot_mlp(steps), False)


SWEEP_PROVIDERS = ["pymaml-cpp", "jax", "torch.compile", "torch.func", "torchopt"]
SWEEPS = [(tasks, 1, 40) for tasks in (1, 25, 100, 400)] + [(25, steps, 40) for steps in (2, 10)] + \
    [(25, 1, width) for width in (128, 256)]


@pytest.mark.parametrize("tasks,steps,width", SWEEPS, ids=[f"T{t}-S{s}-w{w}" for t, s, w in SWEEPS])
@pytest.mark.parametrize("provider", SWEEP_PROVIDERS)
def test_w1_scaling(benchmark, request, provider, tasks, steps, width):
    """W1 second order, one dimension at a time from (T=25, S=1, width 40): T, S and width."""
    run_provider(benchmark, request, provider, sinusoid(steps, tasks=tasks, width=width), False)


@pytest.mark.parametrize("steps", STEPS, ids=[f"S{s}" for s in STEPS])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_w1_peak_memory(benchmark, request, provider, steps):
    """Peak resident memory of a training step, each provider in its own process (bench/memory.py)."""
    reason = PROVIDERS[provider].unavailable_reason()
    if reason is not None:
        pytest.skip(f"{provider}: {reason}")
    if provider == "torch.compile" and request.config.getoption("benchmark_disable"):
        pytest.skip("smoke mode compiles one configuration only")
    script = Path(__file__).with_name("memory.py")
    result = subprocess.run([sys.executable, str(script), provider, "w1", str(steps)], capture_output=True, text=True,
                            timeout=600, env=dict(os.environ, PYTHONPATH=str(script.parent)))
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    benchmark.group = f"W1 sinusoid S={steps} second order, peak memory"
    benchmark.extra_info.update(provider=provider, workload=f"W1 sinusoid memory S={steps} second order",
                                peak_rss_mb=measured["peak_rss_mb"], setup_rss_mb=measured["setup_rss_mb"])
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the figure is the memory, kept in extra_info
