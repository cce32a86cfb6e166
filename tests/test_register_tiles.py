"""The CPU kernels' register tiles stay in registers at every ISA level: no vector register is
stored to or loaded from the stack inside a loop of any gemm_tile instantiation. Each level's
unit is compiled as the build compiles it (the flags build_info() records, the level's options
from CMakeLists.txt) and disassembled with objdump; the aarch64 baseline too where Debian's
cross compiler is installed."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import pymaml

ROOT = Path(__file__).resolve().parents[1]
LEVEL_OPTIONS = re.compile(r'set_source_files_properties\(csrc/cpu/kernels_(\w+)\.cpp\s+PROPERTIES\s+COMPILE_OPTIONS\s+"([^"]*)"')
# A vector register moved to or from the stack frame: x86 (%rsp)/(%rbp) operands, aarch64 [sp, ...].
STACK_VECTOR_MOVE = {
    "x86": re.compile(r"^v?mov\w*\s.*(%[xyz]mm\d+.*\((%rsp|%rbp)\)|\((%rsp|%rbp)\).*%[xyz]mm\d+)"),
    "aarch64": re.compile(r"^(ldr|str|ldp|stp|ldur|stur)\s+q\d+.*\[sp"),
}
BACKWARD_BRANCH = {"x86": re.compile(r"^j(?!mp)\w+\s+([0-9a-f]+)"),
                   "aarch64": re.compile(r"^(b\.\w+|cbn?z|tbn?z)\s+(?:\w+,\s*)*(?:#\d+,\s*)?([0-9a-f]+)")}


def level_units() -> list[tuple[str, str, list[str]]]:
    """(level, source, its compile options) for every x86 level unit the build compiles."""
    text = (ROOT / "CMakeLists.txt").read_text()
    units = [(level.replace("_", "-").replace("x86-64", "x86-64"), f"csrc/cpu/kernels_{level}.cpp",
              options.split(";")) for level, options in LEVEL_OPTIONS.findall(text)]
    return [("baseline", "csrc/cpu/kernels_baseline.cpp", [])] + units


def loop_spills(disassembly: str, isa: str) -> dict[str, int]:
    """{gemm_tile instantiation: vector stack moves inside its innermost loops} (a loop: the span
    from a backward conditional branch's target to the branch)."""
    spills = {}
    for function in re.split(r"\n(?=[0-9a-f]+ <)", disassembly):
        header = re.match(r"([0-9a-f]+) <(.*)>:", function)
        if not header or "gemm_tile<" not in header.group(2):
            continue
        instructions = [(int(m.group(1), 16), m.group(2).strip()) for m in
                        (re.match(r"\s*([0-9a-f]+):\s*(.*)", line) for line in function.split("\n")[1:]) if m]
        spans = []
        for address, text in instructions:
            branch = BACKWARD_BRANCH[isa].match(text)
            if branch and int(branch.groups()[-1], 16) < address:
                spans.append((int(branch.groups()[-1], 16), address))
        # The innermost loops, the k loop and its remainder: a span around another is a jump
        # back across the function (its set-up and stores), not the loop that runs Kd times.
        loops = [(lo, hi) for lo, hi in spans if not any(lo <= a and b <= hi and (a, b) != (lo, hi) for a, b in spans)]
        name = re.sub(r"\(.*", "", header.group(2).split("gemm_tile", 1)[1])
        # %rbp addresses the stack only where the function keeps a frame pointer; elsewhere
        # it is one more general register (a pointer into C).
        frame = isa != "x86" or any(text.startswith("mov") and text.endswith("%rsp,%rbp") for _, text in instructions)
        spills[name] = sum(1 for address, text in instructions
                           if STACK_VECTOR_MOVE[isa].match(text) and (frame or "(%rbp)" not in text)
                           and any(lo <= address <= hi for lo, hi in loops))
    return spills


def _disassemble(compiler: str, source: str, options: list[str], tmp_path: Path, objdump: str) -> str:
    flags = pymaml.build_info()["flags"].split()
    obj = tmp_path / (Path(source).stem + ".o")
    subprocess.run([compiler, "-std=c++17", *flags, *options, "-I", str(ROOT / "csrc"), "-c", str(ROOT / source),
                    "-o", str(obj)], check=True, capture_output=True, text=True)
    return subprocess.run([objdump, "-d", "--no-show-raw-insn", "-C", str(obj)], check=True, capture_output=True,
                          text=True).stdout


needs_gcc_build = pytest.mark.skipif(
    not pymaml.build_info()["extension"] or not pymaml.build_info()["compiler"].startswith("gcc"),
    reason="checks the GCC build of pymaml._C (its recorded flags)")


@needs_gcc_build
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the x86 level units")
@pytest.mark.parametrize("level,source,options", level_units(), ids=[unit[0] for unit in level_units()])
def test_x86_register_tiles_do_not_spill(level, source, options, tmp_path):
    compiler, objdump = shutil.which("g++") or shutil.which("c++"), shutil.which("objdump")
    if compiler is None or objdump is None:
        pytest.skip("needs g++ and objdump")
    spills = loop_spills(_disassemble(compiler, source, options, tmp_path, objdump), "x86")
    assert len(spills) >= 8, f"expected the float and double tile instantiations, found {sorted(spills)}"
    assert not {name: n for name, n in spills.items() if n}, f"{level}: vector stack moves inside tile loops"


@needs_gcc_build
def test_aarch64_register_tiles_do_not_spill(tmp_path):
    compiler, objdump = shutil.which("aarch64-linux-gnu-g++"), shutil.which("aarch64-linux-gnu-objdump")
    if compiler is None or objdump is None:
        message = "aarch64-linux-gnu-g++ is not installed (apt-get install g++-aarch64-linux-gnu)"
        if os.environ.get("PYMAML_REQUIRE_CROSS") == "1":
            pytest.fail(message + ", and PYMAML_REQUIRE_CROSS=1")
        pytest.skip(message)
    spills = loop_spills(_disassemble(compiler, "csrc/cpu/kernels_baseline.cpp", [], tmp_path, objdump), "aarch64")
    assert len(spills) >= 8, f"expected the float and double tile instantiations, found {sorted(spills)}"
    assert not {name: n for name, n in spills.items() if n}, "aarch64: vector stack moves inside tile loops"
