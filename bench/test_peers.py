"""The cross-library benchmark: every provider in bench/providers.py on W1 (the paper's
sinusoid; S ∈ {1, 5}, first and second order), W2 (the paper's Omniglot MLP, 5-way 1-shot,
T=32; S ∈ {1, 5}, second order) and W3 (the paper's Omniglot Conv4, same batch shape; S ∈ {1, 5},
second order). Two measures: the training step (meta-gradient plus Adam) and the meta-gradient
alone; and the peak memory of a training step, each provider in its own process. Each
provider's meta-gradient is first checked against pymaml's oracle; a wrong one is reported
(xfail) and not timed. Peers that are not installed, and providers that cannot run a model, are
skipped with the reason. Timings are never asserted.
Run: pytest bench/test_peers.py --benchmark-only --benchmark-json=peers.json

In smoke mode (--benchmark-disable, part of CI) W3 runs at S=1 only, without JAX (its layers are
checked apart) and, for memory, pymaml only; torch.compile compiles one W1 configuration only.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers_bench import relative_error
from flops import conv_meta_step_flops
from providers import PROVIDERS, miniimagenet_conv4, omniglot_conv4, omniglot_mlp, oracle_check, sinusoid

STEPS = [1, 5]
# float32 providers against the float64 oracle: 1e-4, or 10× the float32 oracle's own error
# where float32 rounding alone costs more on the workload.
TOLERANCE = 1e-4
FLOAT32_ERROR_FACTOR = 10
ORACLE_SEED = 1


def smoke(request) -> bool:
    return request.config.getoption("benchmark_disable")


def skip_reason(provider, workload) -> str | None:
    chosen = PROVIDERS[provider]
    reason = chosen.unavailable_reason() or chosen.unsupported_reason(workload)
    return None if reason is None else f"{provider}: {reason}"


def run_provider(benchmark, request, provider, workload, smoke_configuration, measure="train step"):
    """Checks the provider's meta-gradient against the oracle, then times `measure`: "train step"
    (meta-gradient plus Adam) or "meta-gradient" (the provider's own gradient computation alone)."""
    reason = skip_reason(provider, workload)
    if reason is not None:
        pytest.skip(reason)
    if provider == "torch.compile" and smoke(request) and not smoke_configuration:
        pytest.skip("smoke mode compiles one configuration only")
    built = PROVIDERS[provider].build(workload)
    batch = workload.batch(seed=ORACLE_SEED)
    exact, float32_error = oracle_check(workload, ORACLE_SEED)
    tolerance = max(TOLERANCE, FLOAT32_ERROR_FACTOR * float32_error)
    error = relative_error(built.meta_gradient(batch), exact)
    benchmark.extra_info.update(provider=provider, workload=workload.name, measure=measure, oracle_error=error,
                                float32_oracle_error=float32_error, tolerance=tolerance,
                                prepare_seconds=built.prepare_seconds)
    if workload.image_shape is not None and measure == "train step":
        # The nominal count of bench/flops.py, for GFLOP/s and the fraction of the matmul peak.
        benchmark.extra_info["gflop"] = conv_meta_step_flops(
            workload.make_model(), workload.image_shape, workload.tasks, batch[0].shape[1], batch[2].shape[1],
            workload.steps, workload.first_order) / 1e9
    if not error <= tolerance:
        pytest.xfail(f"{provider} gives a wrong meta-gradient (relative error {error:.2e} > {tolerance:.1e}); "
                     "not timed")
    native = built.convert(batch)
    benchmark.group = f"{workload.name}, {measure}"
    benchmark(built.train_step if measure == "train step" else built.meta_gradient_step, native)


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


def skip_slow_w3(request, provider, steps):
    """JAX's W3 step takes about 10 s at S=1 on one thread (XLA's CPU convolutions), and each of its
    two compiles about 12 s: smoke mode leaves it out, timed runs take S=1 only."""
    if provider == "jax" and smoke(request):
        pytest.skip("smoke mode leaves out JAX on W3 (two ~12 s compiles, ~10 s a step); "
                    "test_jax_layers_match_torch checks its conversion of Conv4's layers")
    if provider == "jax" and steps > 1:
        pytest.skip("JAX is not timed at S>1 on W3 (about 10 s a step at S=1 on one thread)")


@pytest.mark.parametrize("order", ["second", "first"])
@pytest.mark.parametrize("queries", [15, 1], ids=["15q", "1q"])
@pytest.mark.parametrize("steps", STEPS, ids=[f"S{s}" for s in STEPS])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_w3_train_step(benchmark, request, provider, steps, queries, order):
    if (steps, queries, order) != (1, 15, "second") and smoke(request):
        pytest.skip("smoke mode runs W3 at S=1, 15 queries, second order only")
    skip_slow_w3(request, provider, steps)
    run_provider(benchmark, request, provider, omniglot_conv4(steps, first_order=order == "first", queries=queries),
                 False)


W4_PROVIDERS = [name for name in PROVIDERS if name not in ("pymaml-reference", "jax")]


@pytest.mark.parametrize("order", ["second", "first"])
@pytest.mark.parametrize("provider", W4_PROVIDERS)
def test_w4_train_step(benchmark, request, provider, order):
    """W4, MiniImagenet Conv4 at S=5. Timed runs only: a step of the slowest peers takes several
    seconds, and the float64 oracle behind the check longer; JAX and pymaml's oracle are not timed
    (XLA's CPU convolutions and the plain loop, both far behind on W3)."""
    if smoke(request):
        pytest.skip("W4 is timed only (seconds a step); tests/bench's test_flops checks its workload")
    run_provider(benchmark, request, provider, miniimagenet_conv4(5, first_order=order == "first"), False)


@pytest.mark.parametrize("steps", STEPS, ids=[f"S{s}" for s in STEPS])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_w1_meta_gradient(benchmark, request, provider, steps):
    run_provider(benchmark, request, provider, sinusoid(steps), False, measure="meta-gradient")


@pytest.mark.parametrize("steps", STEPS, ids=[f"S{s}" for s in STEPS])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_w3_meta_gradient(benchmark, request, provider, steps):
    if smoke(request):
        pytest.skip("smoke mode checks W3's meta-gradient through test_w3_train_step")
    skip_slow_w3(request, provider, steps)
    run_provider(benchmark, request, provider, omniglot_conv4(steps), False, measure="meta-gradient")


SWEEP_PROVIDERS = ["pymaml-cpp", "jax", "torch.compile", "torch.func", "torchopt"]
SWEEPS = [(tasks, 1, 40) for tasks in (1, 25, 100, 400)] + [(25, steps, 40) for steps in (2, 10)] + \
    [(25, 1, width) for width in (128, 256)]


@pytest.mark.parametrize("tasks,steps,width", SWEEPS, ids=[f"T{t}-S{s}-w{w}" for t, s, w in SWEEPS])
@pytest.mark.parametrize("provider", SWEEP_PROVIDERS)
def test_w1_scaling(benchmark, request, provider, tasks, steps, width):
    """W1 second order, one dimension at a time from (T=25, S=1, width 40): T, S and width."""
    run_provider(benchmark, request, provider, sinusoid(steps, tasks=tasks, width=width), False)


@pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")  # a plain test beside the benchmarks
def test_jax_layers_match_torch():
    """The JAX provider's layers compute what the torch layers compute (float32, one batch each):
    the conversion W3 depends on, checked without compiling a meta-gradient."""
    if PROVIDERS["jax"].unavailable_reason() is not None:
        pytest.skip(f"jax: {PROVIDERS['jax'].unavailable_reason()}")
    import jax.numpy as jnp
    import torch
    from torch import nn

    from providers import _jax_layer, _jax_layer_reason

    torch.manual_seed(0)
    trained_norm = nn.BatchNorm2d(3).eval()
    trained_norm.running_mean.uniform_(-1, 1)
    trained_norm.running_var.uniform_(0.5, 2)
    cases = [
        (nn.Conv2d(3, 4, 3, stride=2, padding=1), (5, 3, 9, 9)),
        (nn.Conv2d(4, 6, (3, 2), stride=(1, 2), padding=(0, 1), dilation=(2, 1), groups=2, bias=False), (5, 4, 9, 9)),
        (nn.BatchNorm2d(3, track_running_stats=False), (5, 3, 4, 4)),
        (trained_norm, (5, 3, 4, 4)),
        (nn.BatchNorm1d(7, track_running_stats=False, affine=False), (5, 7)),
        (nn.MaxPool2d(2), (5, 3, 9, 9)),
        (nn.MaxPool2d(3, stride=2, padding=1), (5, 3, 8, 8)),
        (nn.Flatten(), (5, 3, 2, 2)),
        (nn.Linear(7, 3), (5, 7)),
        (nn.Linear(7, 3, bias=False), (5, 7)),
        (nn.ReLU(), (5, 7)),
    ]
    for layer, shape in cases:
        for p in layer.parameters():
            nn.init.uniform_(p, -1, 1)
        assert _jax_layer_reason(0, layer) is None
        x = torch.randn(shape)
        expected = layer(x).detach()
        params = tuple(jnp.asarray(p.detach().numpy()) for p in layer.parameters(recurse=False))
        actual = torch.from_numpy(np.array(_jax_layer(layer)(params, jnp.asarray(x.numpy()))))
        assert actual.shape == expected.shape, layer
        assert relative_error(actual, expected) < 1e-6, layer
    assert "Dropout" in _jax_layer_reason(3, nn.Dropout())
    assert "padding_mode='reflect'" in _jax_layer_reason(0, nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"))


def run_memory(benchmark, request, provider, workload_key, workload):
    """Peak resident memory of a training step, the provider in its own process (bench/memory.py)."""
    reason = skip_reason(provider, workload)
    if reason is not None:
        pytest.skip(reason)
    if provider == "torch.compile" and smoke(request):
        pytest.skip("smoke mode compiles one configuration only")
    script = Path(__file__).with_name("memory.py")
    python_path = [str(script.parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    result = subprocess.run([sys.executable, str(script), provider, workload_key, str(workload.steps)],
                            capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(python_path)))
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["workload"] == workload.name
    assert measured["peak_rss_mb"] >= measured["setup_rss_mb"] > 0
    benchmark.group = f"{workload.name}, peak memory"
    benchmark.extra_info.update(provider=provider, workload=workload.name, measure="peak memory",
                                oracle_error=None,  # the memory process does not check the gradient
                                prepare_seconds=measured["prepare_seconds"], peak_rss_mb=measured["peak_rss_mb"],
                                setup_rss_mb=measured["setup_rss_mb"],
                                **{key: measured[key] for key in ("gpu_peak_mb", "gpu_setup_mb") if key in measured})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the figure is the memory, kept in extra_info


@pytest.mark.parametrize("steps", STEPS, ids=[f"S{s}" for s in STEPS])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_w1_peak_memory(benchmark, request, provider, steps):
    run_memory(benchmark, request, provider, "w1", sinusoid(steps))


@pytest.mark.parametrize("steps", STEPS, ids=[f"S{s}" for s in STEPS])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_w3_peak_memory(benchmark, request, provider, steps):
    if smoke(request) and (steps > 1 or not provider.startswith("pymaml")):
        pytest.skip("smoke mode measures W3's memory for pymaml at S=1 only (5-15 s a process for the "
                    "torch peers, about a minute for JAX)")
    skip_slow_w3(request, provider, steps)
    run_memory(benchmark, request, provider, "w3", omniglot_conv4(steps))
