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

HERE = Path(__file__).parent
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


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
