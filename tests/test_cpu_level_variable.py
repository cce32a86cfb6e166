"""PYMAML_CPU_LEVEL picks the CPU kernels' ISA level at import, as pymaml._C.set_cpu_level does."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import pymaml

LEVELS = pymaml.build_info().get("cpu_levels", [])
needs_extension = pytest.mark.skipif(not pymaml.build_info()["extension"], reason="pymaml._C is not built")


TESTS = os.path.dirname(os.path.abspath(__file__))
# The package as this test process imports it: an installed one, or the source tree (editable).
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(pymaml.__file__)))


def _import_with(level: str, tmp_path) -> subprocess.CompletedProcess:
    code = (f"import sys; sys.path[:0] = [{PACKAGE_PARENT!r}, {TESTS!r}]; import pymaml, torch; "
            "from helpers import *; "
            "model = make_mlp((2, 7, 3), 'relu'); batch = make_batch(2, 5, 2, 3, 'mse'); "
            "assert_backend_matches_oracle(model, batch, 'cpp', inner_lr=0.1, inner_steps=2); "
            "print(pymaml.build_info()['cpu_level'])")
    # Run outside the checkout, whose pymaml/ folder would stand in front of an installed package.
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYMAML_CPU_LEVEL": level},
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)


@needs_extension
@pytest.mark.parametrize("level", LEVELS)
def test_the_variable_chooses_the_level_and_it_matches_the_oracle(level, tmp_path):
    run = _import_with(level, tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[-1] == level


@needs_extension
def test_an_unavailable_level_is_an_error_naming_the_levels(tmp_path):
    run = _import_with("x86-64-v9", tmp_path)
    assert run.returncode != 0
    assert "PYMAML_CPU_LEVEL=x86-64-v9" in run.stderr and LEVELS[-1] in run.stderr
