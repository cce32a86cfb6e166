"""The CPU launcher's per-task math without Python or torch: csrc/tools/oracle_check.cpp runs the
meta-step and the HVP on cases exported from the oracle (tests/native_cases.py), compiled for
this machine and cross-compiled for aarch64 and run under qemu-aarch64 (Debian's
g++-aarch64-linux-gnu and qemu-user), where the portable baseline kernels are the only level.

PYMAML_REQUIRE_CROSS=1 (set by .ci/run) turns a missing cross toolchain or emulator into a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from native_cases import write_cases

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["csrc/tools/oracle_check.cpp", "csrc/cpu/meta_step_cpu.cpp", "csrc/cpu/kernels_baseline.cpp"]
# The extension's portable flags (CMakeLists.txt), no ISA beyond each target's baseline.
FLAGS = ["-std=c++17", "-O2", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd", "-I", str(ROOT / "csrc")]
CROSS_COMPILER, EMULATOR = "aarch64-linux-gnu-g++", "qemu-aarch64"
AARCH64_SYSROOT = "/usr/aarch64-linux-gnu"


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    path = tmp_path_factory.mktemp("oracle") / "cases.txt"
    return path, write_cases(path)


def _build(compiler: str, output: Path) -> Path:
    subprocess.run([compiler, *FLAGS, *[str(ROOT / s) for s in SOURCES], "-o", str(output)], check=True,
                   capture_output=True, text=True)
    return output


def _check(command: list[str], count: int):
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"oracle_check: {count} of {count} cases within 1e-10" in run.stdout, run.stdout
    # Every output of every case was compared: five per meta-step, two per HVP.
    assert run.stdout.count("\nok  ") + run.stdout.startswith("ok  ") == run.stdout.count("relative error")
    assert "FAIL" not in run.stdout


@pytest.fixture(scope="module")
def host_driver(tmp_path_factory):
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler on PATH")
    return _build(compiler, tmp_path_factory.mktemp("host") / "oracle_check")


def _require(tool: str):
    if shutil.which(tool) is None:
        message = f"{tool} is not installed (apt-get install g++-aarch64-linux-gnu qemu-user)"
        if os.environ.get("PYMAML_REQUIRE_CROSS") == "1":
            pytest.fail(message + ", and PYMAML_REQUIRE_CROSS=1")
        pytest.skip(message)


def test_driver_matches_the_oracle_on_this_machine(cases, host_driver):
    path, count = cases
    _check([str(host_driver), str(path)], count)


def test_driver_matches_the_oracle_on_aarch64_under_qemu(cases, tmp_path):
    _require(CROSS_COMPILER)
    _require(EMULATOR)
    path, count = cases
    binary = _build(CROSS_COMPILER, tmp_path / "oracle_check_aarch64")
    assert b"\x7fELF" == binary.read_bytes()[:4] and binary.read_bytes()[18] == 183  # e_machine EM_AARCH64
    _check([EMULATOR, "-L", AARCH64_SYSROOT, str(binary), str(path)], count)


def test_driver_reports_a_wrong_result(cases, host_driver, tmp_path):
    """The driver fails a case whose expected value is off, so a pass means agreement."""
    path, _ = cases
    text = path.read_text()
    start = text.index("meta_loss 1 ") + len("meta_loss 1 ")
    end = text.index("\n", start)
    damaged = tmp_path / "damaged.txt"
    damaged.write_text(text[:start] + float.hex(float.fromhex(text[start:end]) * (1 + 1e-8)) + text[end:])
    run = subprocess.run([str(host_driver), str(damaged)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 1 and "FAIL case0" in run.stdout and "meta_loss" in run.stdout
