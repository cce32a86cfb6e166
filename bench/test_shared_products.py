"""Whether sharing θ_0 across the meta-batch pays (bench/native/shared_products.cpp): step 0's
support products for all tasks as one product, and the rank-K form of an inner update, at every
ISA level this CPU runs, W1's shapes (T=25, K=10, width 40). The driver times itself (best of its
repeats) and prints JSON, which goes to extra_info; bench/RESULTS.md quotes it."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import pymaml

ROOT = Path(__file__).resolve().parents[1]
LEVELS = pymaml.build_info().get("cpu_levels") or []
LEVEL_OPTIONS = dict((level.replace("_", "-"), options.split(";")) for level, options in re.findall(
    r'set_source_files_properties\(csrc/cpu/kernels_(\w+)\.cpp\s+PROPERTIES\s+COMPILE_OPTIONS\s+"([^"]*)"',
    (ROOT / "CMakeLists.txt").read_text()))


@pytest.mark.skipif(not LEVELS or shutil.which("g++") is None, reason="needs pymaml._C's flags and g++")
@pytest.mark.parametrize("level", LEVELS)
def test_shared_step0_and_rank_k_update(benchmark, level, tmp_path):
    binary = tmp_path / "shared_products"
    subprocess.run(["g++", "-std=c++17", *pymaml.build_info()["flags"].split(), *LEVEL_OPTIONS.get(level, []),
                    "-I", str(ROOT / "csrc"), str(ROOT / "bench/native/shared_products.cpp"), "-o", str(binary)],
                   check=True, capture_output=True, text=True)
    repeats = 1 if benchmark.disabled else 200

    def run():
        return json.loads(subprocess.run([str(binary), "25", "10", "40", str(repeats)], check=True,
                                         capture_output=True, text=True).stdout)

    result = benchmark.pedantic(run, rounds=1, iterations=1)
    assert result["step0_per_task_us"] > 0 and result["step0_shared_us"] > 0
    benchmark.extra_info.update(level=level, **result)
