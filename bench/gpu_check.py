"""One command for a GPU machine: every GPU backend (cuda, triton) against the oracle on fresh
random inputs, kernel launches per fused meta-step, then the sinusoid meta-step (second order,
MAML.meta_gradient) timed with CUDA events at T = 25 and 1024, S = 1 and 5, for each GPU
backend, `func` and `reference`. Prints one
table last. Builds nothing: install pymaml first (pip install . on the GPU machine builds the CUDA
launcher when nvcc is there). Run: PYTHONUNBUFFERED=1 python bench/gpu_check.py
"""

from __future__ import annotations

import sys
import time

import torch

import pymaml


def relative_error(actual, expected):
    actual, expected = actual.double().cpu(), expected.double().cpu()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def gpu_backends() -> list[str]:
    names = []
    for status in pymaml.available_backends():
        backend = pymaml.backends.get_backend(status.name)
        probe = pymaml.models.mlp((2, 3, 2))
        config = pymaml.backends.MetaConfig(1, False, "mse")
        if status.usable and status.name not in ("func", "reference") and \
                backend.unsupported_reason(probe, config, torch.device("cuda")) is None:
            names.append(status.name)
    return names


def check_against_oracle(backends) -> list[str]:
    failures = []
    generator = torch.Generator().manual_seed(int(time.time()))
    for widths, loss, steps, first_order, dtype in [
        ((1, 40, 40, 1), "mse", 1, False, torch.float32), ((1, 40, 40, 1), "mse", 5, False, torch.float64),
        ((5, 33, 17, 4), "cross_entropy", 3, False, torch.float64), ((5, 64, 3), "cross_entropy", 2, True, torch.float32),
    ]:
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
        model = pymaml.models.mlp(widths, torch.nn.Tanh).to(dtype)
        tasks, shots = 9, 6
        x = lambda: torch.randn(tasks, shots, widths[0], dtype=dtype, generator=generator)  # noqa: E731
        y = (lambda: torch.randint(0, widths[-1], (tasks, shots), generator=generator)) if loss == "cross_entropy" \
            else (lambda: torch.randn(tasks, shots, widths[-1], dtype=dtype, generator=generator))
        batch = (x(), y(), x(), y())
        options = dict(inner_lr=0.1, inner_steps=steps, first_order=first_order, loss=loss)
        oracle_model = pymaml.models.mlp(widths, torch.nn.Tanh).double()
        oracle_model.load_state_dict(model.state_dict())
        oracle_batch = tuple(t.double() if t.is_floating_point() else t for t in batch)
        expected = pymaml.reference.meta_loss(oracle_model, *oracle_batch, **options)
        expected_grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(expected, list(oracle_model.parameters()))])
        for backend in backends + ["func"]:
            gpu_model = pymaml.models.mlp(widths, torch.nn.Tanh).to(dtype).cuda()
            gpu_model.load_state_dict(model.state_dict())
            config = pymaml.backends.MetaConfig(steps, first_order, loss)
            if pymaml.backends.get_backend(backend).unsupported_reason(gpu_model, config, torch.device("cuda")):
                continue  # triton computes in float32 only
            out = pymaml.MAML(gpu_model, backend=backend, **options)(*(t.cuda() for t in batch))
            grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(out.loss, list(gpu_model.parameters()))])
            error = relative_error(grad, expected_grad)
            # The Triton kernel asks for full-fp32 tl.dot (input_precision="ieee"); its tolerance
            # is the 1e-4, the C++ kernels' the tests' 1e-5.
            tolerance = 1e-10 if dtype == torch.float64 else (1e-4 if backend == "triton" else 1e-5)
            verdict = "ok" if error <= tolerance else "WRONG"
            print(f"oracle check {backend:9s} {widths} {loss} S={steps} {'first' if first_order else 'second'} "
                  f"{str(dtype)[6:]}: relative error {error:.2e} {verdict}")
            if verdict != "ok":
                failures.append(f"{backend} {widths} {loss} S={steps}")
    return failures


def count_launches(backend: str) -> int:
    """CUDA kernels launched by one fused meta-step (the op alone), from the torch profiler."""
    from pymaml.ops.mlp_meta_step import fused_forward

    if backend == "triton":
        from pymaml.kernels.mlp_meta_step import mlp_meta_step_triton as forward
    else:
        forward = fused_forward
    model = pymaml.models.sinusoid_mlp().cuda()
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    batch = [t.cuda() for t in pymaml.data.Sinusoid(0).sample(25, 10).tasks]
    arguments = (theta, theta.new_full((1, theta.numel()), 0.01), theta.new_ones(1), *batch, [1, 40, 40, 1], "relu",
                 True, "mse", False, False)
    forward(*arguments)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        forward(*arguments)
        torch.cuda.synchronize()
    return sum(1 for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def time_meta_step(backend, tasks, steps, budget_s=4.0) -> float:
    model = pymaml.models.sinusoid_mlp().cuda()
    maml = pymaml.MAML(model, inner_lr=0.01, inner_steps=steps, backend=backend)
    batch = [t.cuda() for t in pymaml.data.Sinusoid(0).sample(tasks, 10).tasks]

    def step():
        maml.meta_gradient(*batch, accumulate=False)

    step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    began, times = time.perf_counter(), []
    while time.perf_counter() - began < budget_s and len(times) < 200:
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; build {pymaml.build_info()}")
    backends = gpu_backends()
    print("GPU backends:", backends or "none", [str(s) for s in pymaml.available_backends()])
    failures = check_against_oracle(backends)
    launches = {backend: count_launches(backend) for backend in backends}
    rows = []
    for tasks in (25, 1024):
        for steps in (1, 5):
            row = {"T": tasks, "S": steps}
            for backend in backends + ["func", "reference"]:
                budget = 2.0 if backend == "reference" else 4.0
                row[backend] = time_meta_step(backend, tasks, steps, budget)
            rows.append(row)
    providers = backends + ["func", "reference"]
    print(f"\nkernel launches per fused meta-step: {launches}")
    print("oracle check:", "all ok" if not failures else f"WRONG: {failures}")
    print("\nsinusoid meta-step, second order, median ms (CUDA events):")
    print("| T | S | " + " | ".join(providers) + " | " + " | ".join(f"func ÷ {b}" for b in backends) + " |")
    print("|---" * (2 + len(providers) + len(backends)) + "|")
    for row in rows:
        ratios = [f"{row['func'] / row[b]:.1f}" for b in backends]
        print(f"| {row['T']} | {row['S']} | " + " | ".join(f"{row[p]:.3f}" for p in providers) + " | "
              + " | ".join(ratios) + " |")
    return 0 if not failures else 2


if __name__ == "__main__":
    sys.exit(main())
