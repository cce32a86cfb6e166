"""The paper's sinusoid meta-step (T=25, K=10+10, MLP 1-40-40-1 ReLU, α=0.01, fp32), per provider.

Providers: the pymaml backends (cpp, func, reference) through MAML.meta_gradient (the
meta-gradient into .grad; for cpp without an autograd graph), `cpp-autograd` (the same kernel
through maml(...).loss.backward()), and `compile`, torch.compile of the vmapped meta-gradient
assigned to .grad (its compile time is recorded apart in extra_info). Every provider leaves this
batch's meta-gradient in .grad, replacing what was there (meta_gradient(accumulate=False), or
zero_grad then backward); `train_step` adds a fused Adam step. The batch is sampled before timing.
Run: pytest bench --benchmark-only (bench/report.py then rewrites the tables in bench/RESULTS.md).
With --benchmark-disable each case runs once (CI's smoke test).
"""

import time

import pytest
import torch

import pymaml
from flops import meta_step_flops
from providers import func_meta_gradient, sinusoid

BACKENDS = [s.name for s in pymaml.available_backends() if s.usable and s.name != "cuda"]  # CPU benchmarks
PROVIDERS = BACKENDS + (["cpp-autograd"] if "cpp" in BACKENDS else []) + ["compile"]
STEPS = [1, 5]
WIDTHS = [1, 40, 40, 1]


def sinusoid_setup(steps: int):
    torch.manual_seed(0)
    model = pymaml.models.sinusoid_mlp()
    batch = pymaml.data.Sinusoid(seed=0).sample(25, 10).tasks
    return model, batch


def compiled_meta_gradient(model, steps: int, first_order: bool):
    """torch.compile of the func core's meta-gradient, as a step function that fills the .grad fields."""
    compiled = torch.compile(func_meta_gradient(model, sinusoid(steps, first_order)))

    def step(batch):
        params = {name: p.detach() for name, p in model.named_parameters()}
        grads, loss = compiled(params, *batch)
        for name, p in model.named_parameters():
            p.grad = grads[name]
        return loss

    return step


def provider_step(provider, model, batch, steps, first_order):
    """A function that leaves the meta-gradient in model's .grad, and the seconds spent preparing it."""
    began = time.perf_counter()
    if provider == "compile":
        # A cold compile, as a user's first run sees it: no in-memory or on-disk graph caches.
        torch._dynamo.reset()
        with torch._inductor.config.patch(fx_graph_cache=False, autotune_local_cache=False):
            step = compiled_meta_gradient(model, steps, first_order)
            step(batch)  # compiles
    elif provider == "cpp-autograd":
        maml = pymaml.MAML(model, inner_lr=0.01, inner_steps=steps, first_order=first_order, backend="cpp")

        def step(batch):
            model.zero_grad(set_to_none=True)
            maml(*batch).loss.backward()
    else:
        maml = pymaml.MAML(model, inner_lr=0.01, inner_steps=steps, first_order=first_order, backend=provider)

        def step(batch):
            maml.meta_gradient(*batch, accumulate=False)

        step(batch)
    return step, time.perf_counter() - began


def _check_and_record(benchmark, model, flops, provider, prepare_seconds):
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    benchmark.extra_info["provider"] = provider
    benchmark.extra_info["prepare_seconds"] = prepare_seconds
    benchmark.extra_info["flops"] = flops
    if benchmark.stats is not None and benchmark.stats.stats.rounds > 1:
        benchmark.extra_info["gflops_per_second"] = flops / benchmark.stats.stats.median / 1e9


@pytest.mark.parametrize("order", ["second", "first"])
@pytest.mark.parametrize("steps", STEPS, ids=[f"S{s}" for s in STEPS])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_meta_gradient(benchmark, request, provider, steps, order):
    if provider == "compile" and request.config.getoption("benchmark_disable") and (steps, order) != (1, "second"):
        pytest.skip("smoke mode compiles one configuration only (15-40 s each)")
    model, batch = sinusoid_setup(steps)
    step, prepare_seconds = provider_step(provider, model, batch, steps, order == "first")
    benchmark.group = f"meta-gradient S={steps} {order} order"
    benchmark(step, batch)
    _check_and_record(benchmark, model, meta_step_flops(WIDTHS, 25, 10, 10, steps, order == "first"), provider,
                      prepare_seconds)


@pytest.mark.parametrize("steps", STEPS, ids=[f"S{s}" for s in STEPS])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_train_step(benchmark, request, provider, steps):
    if provider == "compile" and request.config.getoption("benchmark_disable") and steps != 1:
        pytest.skip("smoke mode compiles one configuration only (15-40 s each)")
    model, batch = sinusoid_setup(steps)
    step, prepare_seconds = provider_step(provider, model, batch, steps, first_order=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)

    def train_step():
        step(batch)
        optimizer.step()

    benchmark.group = f"train step S={steps} second order"
    before = [p.detach().clone() for p in model.parameters()]
    benchmark(train_step)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    _check_and_record(benchmark, model, meta_step_flops(WIDTHS, 25, 10, 10, steps), provider, prepare_seconds)


def test_matmul_peak(benchmark):
    """This machine's fp32 matmul rate on the benchmark's thread count: the ceiling for the fused kernel."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    benchmark.group = "peak"
    benchmark(torch.mm, a, b)
    if benchmark.stats is not None and benchmark.stats.stats.rounds > 1:
        benchmark.extra_info["gflops_per_second"] = 2 * 1024**3 / benchmark.stats.stats.median / 1e9
