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


@needs_extension
def test_build_info_lists_every_compiled_level_and_the_runnable_ones_among_them():
    info = pymaml.build_info()
    compiled = info["cpu_levels_compiled"]
    assert compiled[-1] == "baseline" and len(set(compiled)) == len(compiled)
    # The runnable levels are the compiled ones this CPU supports, in the same best-first order.
    assert [level for level in compiled if level in info["cpu_levels"]] == info["cpu_levels"]
    assert info["cpu_level"] in info["cpu_levels"]
    if sys.platform.startswith("linux") and os.uname().machine == "x86_64":
        assert compiled == ["x86-64-v4", "x86-64-v3", "baseline"]


@needs_extension
def test_a_compiled_level_this_cpu_cannot_run_is_refused_with_that_reason():
    info = pymaml.build_info()
    missing = [level for level in info["cpu_levels_compiled"] if level not in info["cpu_levels"]]
    if not missing:
        pytest.skip("this CPU runs every compiled level")
    with pytest.raises(ValueError, match=f"'{missing[0]}' is compiled in, but this CPU lacks its instructions"):
        pymaml._extension.extension().set_cpu_level(missing[0])
    assert pymaml.build_info()["cpu_level"] == info["cpu_level"]


@needs_extension
def test_an_unknown_level_is_refused_naming_the_compiled_ones():
    with pytest.raises(ValueError, match="is not one this build has .*baseline"):
        pymaml._extension.extension().set_cpu_level("x86-64-v9")


@needs_extension
@pytest.mark.parametrize("level", LEVELS)
def test_the_backends_command_says_which_level_runs_why_and_what_is_compiled(level, tmp_path):
    code = f"import sys; sys.path[:0] = [{PACKAGE_PARENT!r}]; from pymaml.jobs.cli import main; main(['backends'])"
    run = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYMAML_CPU_LEVEL": level},
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    why = "the best this CPU runs" if level == LEVELS[0] else f"chosen by PYMAML_CPU_LEVEL={level}"
    assert f"CPU kernels: {level} runs ({why})" in lines
    compiled = [entry for entry in lines if entry.startswith("CPU kernels compiled in: ")]
    assert len(compiled) == 1
    for other in pymaml.build_info()["cpu_levels_compiled"]:
        marked = f"{other} (this CPU lacks its instructions)"
        assert (marked in compiled[0]) == (other not in LEVELS) and other in compiled[0]
