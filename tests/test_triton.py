"""The Triton kernels (pymaml.kernels): correctness under the interpreter, in a subprocess, and
ahead-of-time compilation for sm_80 and sm_90 without a GPU, for every configuration family
the `triton` backend launches (activation, loss, order, step-size gradients, bias, step losses;
meta-step and HVP kernels)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import make_batch, relative_error

HERE = Path(__file__).parent
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
GPU_TOLERANCE = 1e-4  # the float32 kernel against the float64 twin, as under the interpreter


@needs_triton
def test_kernels_match_the_oracle_under_the_interpreter():
    environment = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "triton_interpreter_checks.py")],
        cwd=HERE, env=environment, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1], result.stdout[-2000:]


FAMILIES = [  # kernel, widths, activation, loss, bias, steps, first_order, lr_grad, all_step_losses
    ("meta_step", (1, 40, 40, 1), "relu", "mse", True, 1, False, False, True),
    ("meta_step", (3, 17, 33, 4), "tanh", "cross_entropy", True, 2, True, True, True),
    ("meta_step", (5, 24, 2), "sigmoid", "mse", False, 3, False, False, False),
    ("meta_step", (6, 3), "none", "cross_entropy", True, 0, False, False, True),
    ("hvp", (1, 40, 40, 1), "relu", "mse", True, 0, False, False, True),
    ("hvp", (3, 33, 18, 3), "tanh", "cross_entropy", True, 0, False, False, True),
]


@needs_triton
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter replaces the compiled kernels")
@pytest.mark.parametrize("capability", [80, 90], ids=["sm80", "sm90"])
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f"{f[0]}-{f[2]}-{f[3]}-S{f[5]}")
def test_kernels_compile_ahead_of_time(family, capability, monkeypatch, tmp_path):
    from triton.backends.compiler import GPUTarget

    from pymaml.kernels.mlp_meta_step import compile_ahead

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # compile for real, not from a cache
    kernel, widths, activation, loss, bias, steps, first_order, lr_grad, all_step_losses = family
    compiled = compile_ahead(GPUTarget("cuda", capability, 32), kernel, widths, activation=activation, loss=loss,
                             bias=bias, steps=steps, points=10, first_order=first_order, lr_grad=lr_grad,
                             all_step_losses=all_step_losses)
    cubin = compiled.asm["cubin"]
    assert cubin[:4] == b"\x7fELF" and len(cubin) > 10_000
    assert f".target sm_{capability}" in compiled.asm["ptx"]
    assert compiled.metadata.target.arch == capability


def meta_step_case(tasks, seed):
    """Arguments of pymaml::meta_step for a second-order, learned-step-size tanh MLP, float64."""
    import pymaml
    from pymaml.ops import encode_mlp

    widths = (3, 24, 18, 4)
    torch.manual_seed(seed)
    model = pymaml.models.mlp(widths, torch.nn.Tanh).double()
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    generator = torch.Generator().manual_seed(seed)
    lrs = 0.05 + 0.1 * torch.rand(2, theta.numel(), generator=generator, dtype=torch.float64)
    step_weights = torch.rand(2, generator=generator, dtype=torch.float64)
    batch = make_batch(tasks, 6, widths[0], widths[-1], "cross_entropy", torch.float64, seed=seed)
    return (theta, lrs, step_weights, *batch, *encode_mlp(widths, "tanh", True), "cross_entropy", False, True)


def on(arguments, device):
    return [a.to(device, torch.float32 if a.is_floating_point() else a.dtype) if torch.is_tensor(a) else a
            for a in arguments]


def assert_matches_the_twin(got, arguments):
    from pymaml.ops import meta_step_torch

    for a, b in zip(got, meta_step_torch(*arguments)):
        assert relative_error(a.cpu(), b) <= GPU_TOLERANCE


@needs_triton
@needs_two_gpus
def test_the_kernel_runs_on_the_tensors_device_not_the_current_one():
    from pymaml.kernels.mlp_meta_step import meta_step_triton

    arguments = meta_step_case(5, seed=0)
    with torch.cuda.device(0):
        got = meta_step_triton(*on(arguments, "cuda:1"))
    torch.cuda.synchronize(1)
    assert all(t.device == torch.device("cuda:1") for t in got)
    assert_matches_the_twin(got, arguments)


@needs_triton
@needs_cuda
def test_launches_in_flight_on_two_streams_have_their_own_counters():
    from pymaml.kernels.mlp_meta_step import meta_step_triton

    cases = [meta_step_case(512, seed) for seed in (1, 2)]
    inputs = [on(case, "cuda") for case in cases]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    torch.cuda.synchronize()
    results = []
    for stream, arguments in zip(streams, inputs):
        with torch.cuda.stream(stream):
            results.append([meta_step_triton(*arguments) for _ in range(3)])
    torch.cuda.synchronize()
    for case, launches in zip(cases, results):
        for got in launches:
            assert_matches_the_twin(got, case)


@needs_triton
@needs_cuda
def test_a_captured_launch_replays_beside_direct_launches():
    """A CUDA graph's launch has its own counter: replayed on one stream while the same
    configuration runs directly on another, both stay right."""
    from pymaml.kernels.mlp_meta_step import meta_step_triton

    captured_case, direct_case = meta_step_case(512, 3), meta_step_case(512, 4)
    captured_inputs, direct_inputs = on(captured_case, "cuda"), on(direct_case, "cuda")
    capture_stream, other = torch.cuda.Stream(), torch.cuda.Stream()
    with torch.cuda.stream(capture_stream):
        meta_step_triton(*captured_inputs)  # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=capture_stream):
        captured = meta_step_triton(*captured_inputs)
    with torch.cuda.stream(other):
        graph.replay()
    with torch.cuda.stream(capture_stream):
        direct = meta_step_triton(*direct_inputs)
    torch.cuda.synchronize()
    assert_matches_the_twin(captured, captured_case)
    assert_matches_the_twin(direct, direct_case)


@needs_triton
def test_tensors_on_two_devices_are_refused_by_name():
    from pymaml.kernels.mlp_meta_step import meta_step_triton

    arguments = on(meta_step_case(2, seed=0), "cpu")
    arguments[3] = arguments[3].to("meta")
    with pytest.raises(ValueError, match="tensors on one device, got cpu and meta"):
        meta_step_triton(*arguments)
