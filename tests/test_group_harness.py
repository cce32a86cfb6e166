"""The CPU thread-group harness (csrc/tools/group_harness.cpp): meta_step_task, the HVP and the
one-launch grid (csrc/core/meta_step_grid.h) run by groups of P cooperating std::threads, with the
loops the CUDA build compiles, must be bitwise identical to SerialGroup. Built with the host g++,
torch-free; .ci/sanitize.sh runs the same driver under ThreadSanitizer."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from native_cases import write_cases

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "csrc/tools/group_harness.cpp"
# The extension's portable flags (CMakeLists.txt), C++20 for std::atomic_ref and atomic wait.
FLAGS = ["-std=c++20", "-O2", "-fno-math-errno", "-fno-trapping-math", "-pthread", "-I", str(ROOT / "csrc")]
GROUP_SIZES = [1, 2, 3, 7, 32, 128]


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler on PATH")
    binary = tmp_path_factory.mktemp("harness") / "group_harness"
    subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(binary)], check=True, capture_output=True, text=True)
    return binary


def _run(binary: Path, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *arguments], capture_output=True, text=True, timeout=600)


def test_thread_groups_are_bitwise_identical_to_serial_group(harness):
    run = _run(harness)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr
    summary = re.search(r"group_harness: (\d+) of (\d+) checks passed", run.stdout)
    assert summary and summary.group(1) == summary.group(2), run.stdout[-2000:]
    lines = run.stdout.splitlines()[:-1]
    assert len(lines) == int(summary.group(2)) and all(line.startswith("ok   ") for line in lines)
    for P in GROUP_SIZES:
        for dtype in ("f32", "f64"):
            for what in ("meta_step_task", "hvp"):
                assert any(line.startswith(f"ok   {what} ") and f" {dtype} P={P} threads" in line for line in lines), \
                    (what, dtype, P)
    # Both orders of the serialized schedule, and the grid of several groups with its counter.
    assert any(" ascending" in line for line in lines) and any(" descending" in line for line in lines)
    for blocks in (1, 2, 3, 8):
        assert any(line.startswith("ok   grid counter ") and f"blocks={blocks} " in line for line in lines), blocks
    assert sum(line.startswith("ok   labels_ok bad ") for line in lines) == 6


def test_harness_covers_every_layer_kind(harness):
    """The network of csrc/core/network.h beyond the MLP: Flatten layers, a different activation
    in each place (Tanh, ReLU, Sigmoid, Identity), Linear layers with and without bias and two
    Linear layers in a row, bitwise for every group size and in the grid; and Flatten computes
    exactly what the network without it computes."""
    run = _run(harness)
    lines = run.stdout.splitlines()
    for name in ("flatten_mixed_layers", "linear_linear_mse"):
        for P in GROUP_SIZES:
            for dtype in ("f32", "f64"):
                for what in ("meta_step_task", "hvp"):
                    assert f"ok   {what} {name} {dtype} P={P} threads" in lines, (name, what, dtype, P)
        assert any(line.startswith(f"ok   grid {name} ") for line in lines), name
    for dtype in ("f32", "f64"):
        for what in ("layout", "meta_step_task", "hvp"):
            assert f"ok   flatten {what} {dtype}" in lines, (what, dtype)


def test_harness_covers_conv2d(harness):
    """Conv2d (csrc/core/layers/conv2d.h) in the thread groups: strides 1, 2 and over the kernel,
    kernels 1 to 5, padding beyond the kernel, with and without bias, channel counts that are and
    are not multiples of the padded chunk, convolutions in a row (input gradients and their
    tangents), first and second order, and points in several chunks of the products: bitwise
    for every group size, in both serialized orders and in the grid."""
    run = _run(harness)
    lines = run.stdout.splitlines()
    names = ("conv_stride2_flatten_linear", "conv_nobias_kernels_1_2", "conv_kernel5_stride_over_kernel_first_order",
             "conv_point_chunks")
    for name in names:
        for P in GROUP_SIZES:
            for dtype in ("f32", "f64"):
                for what in ("meta_step_task", "hvp"):
                    assert f"ok   {what} {name} {dtype} P={P} threads" in lines, (name, what, dtype, P)
        assert f"ok   meta_step_task {name} f64 P=3 ascending" in lines, name
        assert f"ok   meta_step_task {name} f32 P=7 descending" in lines, name
        for blocks, P in ((1, 1), (2, 3), (3, 7), (8, 2)):
            for dtype in ("f32", "f64"):
                assert f"ok   grid {name} {dtype} blocks={blocks} P={P}" in lines, (name, dtype, blocks, P)
    assert not any(line.startswith("FAIL ") for line in lines)


def test_harness_covers_pooling_leaky_relu_and_elu(harness):
    """MaxPool2d and AvgPool2d on an image input (a row of pixels in no window, a pooling after a
    pooling), and LeakyReLU and ELU between Linear layers (ELU with curvature, so its backward is
    not in place), bitwise for every group size, in both serialized orders and in the grid."""
    run = _run(harness)
    lines = run.stdout.splitlines()
    for name in ("leaky_relu_elu", "elu_leaky_relu_mse", "max_pool_image", "avg_max_pool_image", "conv_pool_image"):
        for P in GROUP_SIZES:
            for dtype in ("f32", "f64"):
                for what in ("meta_step_task", "hvp"):
                    assert f"ok   {what} {name} {dtype} P={P} threads" in lines, (name, what, dtype, P)
        assert f"ok   meta_step_task {name} f64 P=3 ascending" in lines, name
        assert f"ok   meta_step_task {name} f32 P=7 descending" in lines, name
        assert any(line.startswith(f"ok   grid {name} ") for line in lines), name
    assert not any(line.startswith("FAIL ") for line in lines), run.stdout[-2000:]


def test_harness_covers_batch_norm(harness):
    """BatchNorm on the batch statistics of each pass (csrc/core/layers/batch_norm.h), whose sums
    over the points of a channel are taken whole by one rank: affine between Linear layers, first
    on the data with and without affine, without affine between layers, and over more values than
    one block of kPointBlock, and per-step rows of γ and β (pymaml.nn.PerStepBatchNorm2d, more inner
    steps than rows); bitwise for every group size, in both serialized orders, in the grid."""
    run = _run(harness)
    lines = run.stdout.splitlines()
    for name in ("batch_norm_affine", "batch_norm_on_data", "batch_norm_data_no_affine", "batch_norm_point_blocks",
                 "conv_batch_norm_image", "per_step_batch_norm_image"):
        for P in GROUP_SIZES:
            for dtype in ("f32", "f64"):
                for what in ("meta_step_task", "hvp"):
                    assert f"ok   {what} {name} {dtype} P={P} threads" in lines, (name, what, dtype, P)
        assert f"ok   meta_step_task {name} f64 P=32 ascending" in lines, name
        assert f"ok   hvp {name} f32 P=7 descending" in lines, name
        for blocks, P in ((1, 1), (2, 3), (3, 7), (8, 2)):
            for dtype in ("f32", "f64"):
                assert f"ok   grid {name} {dtype} blocks={blocks} P={P}" in lines, (name, dtype, blocks, P)
    assert not any(line.startswith("FAIL ") for line in lines), [line for line in lines if line.startswith("FAIL ")]


def test_harness_sees_a_missing_barrier(harness):
    """With sync() doing nothing and the ranks run one after another, no configuration matches
    SerialGroup: a pass of the harness means the barriers are where the math needs them."""
    run = _run(harness, "--schedule", "no-barrier")
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr
    lines = run.stdout.splitlines()[:-1]
    assert lines and all(line.startswith("FAIL ") for line in lines), run.stdout[-2000:]
    assert "group_harness: 0 of" in run.stdout


def test_cuda_loops_match_the_oracle_in_the_cpu_launcher(tmp_path):
    """The CPU launcher built with PYMAML_HOST_RUNS_CUDA_PATHS runs the CUDA loops on a SerialGroup
    (no register tiles are compiled in); csrc/tools/oracle_check.cpp compares them with the oracle."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler on PATH")
    cases = tmp_path / "cases.txt"
    count = write_cases(cases)
    sources = [str(ROOT / s) for s in ("csrc/tools/oracle_check.cpp", "csrc/cpu/meta_step_cpu.cpp",
                                       "csrc/cpu/kernels_baseline.cpp")]
    flags = ["-std=c++17", "-O2", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd", "-I", str(ROOT / "csrc")]
    binary = tmp_path / "oracle_check_cuda_paths"
    subprocess.run([compiler, *flags, "-DPYMAML_HOST_RUNS_CUDA_PATHS=1", *sources, "-o", str(binary)], check=True,
                   capture_output=True, text=True)
    symbols = subprocess.run(["nm", "-C", str(binary)], capture_output=True, text=True, check=True).stdout
    assert "gemm_tile" not in symbols and "pymaml::meta_step_cpu" in symbols
    run = subprocess.run([str(binary), str(cases)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"oracle_check: {count} of {count} cases within 1e-10" in run.stdout, run.stdout
