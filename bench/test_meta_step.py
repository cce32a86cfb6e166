"""pymaml's own backends, per ISA level of the fused CPU kernel, beside torch.compile, in one run.

Workloads: W1, the paper's sinusoid (T=25, K=10+10, MLP 1-40-40-1 ReLU, α=0.01, fp32) at S=1 and
S=5, first and second order; W2, the Omniglot MLP (784-256-128-64-64-5) at S=1; the width sweep,
W1 with hidden width 8…256 at S=1 (the CPU kernel's GFLOP/s at every width).

Providers: `cpp@<level>`, the fused kernel at each ISA level this CPU runs
(pymaml._C.set_cpu_level; x86-64-v4, x86-64-v3, baseline) through MAML.meta_gradient (the
meta-gradient into .grad without an autograd graph); `cpp-autograd` (the kernel at the best level
through maml(...).loss.backward()); the other pymaml backends (func, reference); and `compile`,
torch.compile of the vmapped meta-gradient assigned to .grad (its compile time is recorded apart
in extra_info). Every provider leaves this batch's meta-gradient in .grad, replacing what was
there; `train_step` adds a fused Adam step. The batch is sampled before timing.
Run: pytest bench --benchmark-only (bench/report.py then rewrites the tables in bench/RESULTS.md,
one per level). With --benchmark-disable each case runs once (CI's smoke test).
"""

import dataclasses
import time

import pytest
import torch

import pymaml
from flops import meta_step_flops
from providers import func_meta_gradient, omniglot_mlp, sinusoid

LEVELS = pymaml.build_info().get("cpu_levels") or []
OTHER_BACKENDS = [s.name for s in pymaml.available_backends() if s.usable and s.name not in ("cuda", "cpp")]
PROVIDERS = [f"cpp@{level}" for level in LEVELS] + (["cpp-autograd"] if LEVELS else []) + OTHER_BACKENDS + \
    ["compile"]
STEPS = [1, 5]
SWEEP_WIDTHS = [8, 16, 17, 24, 32, 40, 64, 128, 256]
SWEEP_PROVIDERS = [f"cpp@{level}" for level in LEVELS] + ["func"]


@pytest.fixture(autouse=True)
def best_cpu_level_after():
    """Every test leaves the kernels at the CPU's best level, whichever level it timed."""
    yield
    if LEVELS:
        pymaml._extension.extension().set_cpu_level(LEVELS[0])


def compiled_meta_gradient(model, workload):
    """torch.compile of the func core's meta-gradient, as a step function that fills the .grad fields."""
    compiled = torch.compile(func_meta_gradient(model, workload))

    def step(batch):
        params = {name: p.detach() for name, p in model.named_parameters()}
        grads, loss = compiled(params, *batch)
        for name, p in model.named_parameters():
            p.grad = grads[name]
        return loss

    return step


def provider_step(provider, workload, model, batch):
    """A function that leaves the meta-gradient in model's .grad, and the seconds spent preparing it."""
    began = time.perf_counter()
    options = dict(inner_lr=workload.inner_lr, inner_steps=workload.steps, first_order=workload.first_order,
                   loss=workload.loss)
    if provider == "compile":
        # A cold compile, as a user's first run sees it: no in-memory or on-disk graph caches.
        torch._dynamo.reset()
        with torch._inductor.config.patch(fx_graph_cache=False, autotune_local_cache=False):
            step = compiled_meta_gradient(model, workload)
            step(batch)  # compiles
    elif provider == "cpp-autograd":
        maml = pymaml.MAML(model, backend="cpp", **options)

        def step(batch):
            model.zero_grad(set_to_none=True)
            maml(*batch).loss.backward()
    else:
        backend, _, level = provider.partition("@")
        if level:
            pymaml._extension.extension().set_cpu_level(level)
        maml = pymaml.MAML(model, backend=backend, **options)

        def step(batch):
            maml.meta_gradient(*batch, accumulate=False)

        step(batch)
    return step, time.perf_counter() - began


def _widths(model):
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    return [linears[0].in_features] + [m.out_features for m in linears]


def run(benchmark, provider, workload, measure):
    model = workload.make_model()
    batch = workload.batch(0)
    step, prepare_seconds = provider_step(provider, workload, model, batch)
    if measure == "train step":
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)

        def timed():
            step(batch)
            optimizer.step()

        before = [p.detach().clone() for p in model.parameters()]
        benchmark(timed)
        assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    else:
        benchmark(step, batch)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    flops = meta_step_flops(_widths(model), workload.tasks, batch[0].shape[1], batch[2].shape[1], workload.steps,
                            workload.first_order)
    name, _, rest = workload.name.partition(" S=")
    benchmark.extra_info.update(provider=provider, prepare_seconds=prepare_seconds, flops=flops, measure=measure,
                                workload=f"{name}, pymaml backends S={rest}")
    if benchmark.stats is not None and benchmark.stats.stats.rounds > 1:
        benchmark.extra_info["gflops_per_second"] = flops / benchmark.stats.stats.median / 1e9


def skip_compile_in_smoke(request, provider, first_of_its_kind):
    if provider == "compile" and request.config.getoption("benchmark_disable") and not first_of_its_kind:
        pytest.skip("smoke mode compiles one configuration only (15-40 s each)")


@pytest.mark.parametrize("order", ["second", "first"])
@pytest.mark.parametrize("steps", STEPS, ids=[f"S{s}" for s in STEPS])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_w1_meta_gradient(benchmark, request, provider, steps, order):
    skip_compile_in_smoke(request, provider, (steps, order) == (1, "second"))
    run(benchmark, provider, sinusoid(steps, order == "first"), "meta-gradient")


@pytest.mark.parametrize("steps", STEPS, ids=[f"S{s}" for s in STEPS])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_w1_train_step(benchmark, request, provider, steps):
    skip_compile_in_smoke(request, provider, False)
    run(benchmark, provider, sinusoid(steps), "train step")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_w2_meta_gradient(benchmark, request, provider):
    skip_compile_in_smoke(request, provider, False)
    run(benchmark, provider, omniglot_mlp(1), "meta-gradient")


@pytest.mark.parametrize("width", SWEEP_WIDTHS)
@pytest.mark.parametrize("provider", SWEEP_PROVIDERS)
def test_width_sweep(benchmark, provider, width):
    """W1 second order at S=1 with hidden width w (1-w-w-1): the fused kernel keeps its rate at every width."""
    workload = dataclasses.replace(sinusoid(1, width=width), name=f"W1 sinusoid T=25 width={width} S=1 second order")
    run(benchmark, provider, workload, "meta-gradient")


def test_matmul_peak(benchmark):
    """This machine's fp32 matmul rate on the benchmark's thread count: the ceiling for the fused kernel."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    benchmark.group = "peak"
    benchmark(torch.mm, a, b)
    if benchmark.stats is not None and benchmark.stats.stats.rounds > 1:
        benchmark.extra_info["gflops_per_second"] = 2 * 1024**3 / benchmark.stats.stats.median / 1e9
