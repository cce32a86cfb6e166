"""Memory and time of one second-order meta-step on the paper's Omniglot Conv4 (113,221 parameters;
5-way 1-shot, 15 queries per class, T = 32, α = 0.4, cross entropy, fp32, random images):
`reference` (the oracle's full graph), `func` with second_order="graph" and the memory-efficient
`func` (pymaml.numerics.reverse_chain, default chunking), for S ∈ {1, 5, 10}.

Peak memory is measured per provider in a process of its own (bench/conv4_memory.py: VmHWM after
set-up and after the meta-step; the growth is peak − setup). Figures are kept in extra_info and
never asserted. Smoke mode (--benchmark-disable) runs S = 1 only. Run:
pytest bench/test_conv4_memory.py --benchmark-only --benchmark-json=FILE
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conv4_memory import conv4_batch, conv4_maml

PROVIDERS = ["reference", "func-graph", "func"]
STEPS = [1, 5, 10]


@pytest.mark.parametrize("steps", STEPS, ids=[f"S{s}" for s in STEPS])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_conv4_peak_memory(benchmark, request, provider, steps):
    if request.config.getoption("benchmark_disable") and steps != 1:
        pytest.skip("smoke mode measures S=1 only")
    script = Path(__file__).with_name("conv4_memory.py")
    result = subprocess.run([sys.executable, str(script), provider, str(steps)], capture_output=True, text=True,
                            timeout=900, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                                [str(script.parent), str(script.parent.parent), os.environ.get("PYTHONPATH", "")])))
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    benchmark.group = f"Conv4 S={steps} second order, peak memory"
    benchmark.extra_info.update(provider=provider, workload=f"Conv4 meta-step memory S={steps} second order",
                                measure="peak memory", peak_rss_mb=measured["peak_rss_mb"],
                                setup_rss_mb=measured["setup_rss_mb"],
                                growth_mb=measured["peak_rss_mb"] - measured["setup_rss_mb"])
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the figure is the memory, kept in extra_info


@pytest.mark.parametrize("provider", ["func-graph", "func"])
def test_conv4_meta_gradient_time(benchmark, request, provider):
    """Seconds per meta-step (the meta-gradient into .grad) at S = 5."""
    if request.config.getoption("benchmark_disable"):
        pytest.skip("smoke mode does not time the Conv4 meta-step (seconds per call)")
    maml = conv4_maml(provider, 5)
    batch = conv4_batch()
    maml.meta_gradient(*batch, accumulate=False)
    benchmark.group = "Conv4 meta-step S=5 second order"
    benchmark.extra_info.update(provider=provider, workload="Conv4 meta-step S=5 second order",
                                measure="meta-gradient")
    benchmark.pedantic(maml.meta_gradient, args=batch, kwargs=dict(accumulate=False), rounds=5, iterations=1)
