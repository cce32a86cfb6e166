"""What only the compiler shows about the Triton kernels, ahead of time and without a GPU.

The interpreter runs a program's threads as one, so it cannot show a thread reading a workspace
tile that another thread has not written yet. These tests read the compiled TTGIR instead:
every store into memory the kernel also reads must stand between two block barriers (no load
between the barrier before it and the store, none between the store and the barrier after it),
and the last program's handoff must be barrier, one atomic, barrier, then loads that bypass L1.
They also compile the widest configuration the backend accepts for sm_80 and sm_90 and check
its shared memory (compiled metadata) and registers (the cubin) against those architectures.
"""

import importlib.util
import os
import re
from functools import lru_cache

import pytest

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter replaces the compiled kernels"),
]

DEFINITION = re.compile(r"^\s*(%[\w.]+)(?::\d+)? = ([\w.]+)(.*)$")
VALUE = re.compile(r"%[\w.]+")
LOADS = ("tt.load", "tt.descriptor_load", "ttg.async_copy_global_to_local", "tt.atomic_rmw", "tt.atomic_cas")
BARRIERS = ("ttg.barrier", "gpu.barrier")
REGION_EDGES = ("scf.for", "scf.if", "scf.while", "scf.yield", "scf.condition", "}", "tt.return", "tt.func")


def _operation(line: str) -> str:
    match = DEFINITION.match(line)
    if match:
        return match.group(2)
    stripped = line.strip()
    return stripped.split(" ", 1)[0] if stripped else ""


class Program:
    """The kernel function of a TTGIR module as lines, with the kernel arguments each load's and
    store's pointer is computed from. MLIR reuses value names in sibling regions, so a name means
    its latest definition above the use."""

    def __init__(self, ttgir: str):
        lines = ttgir.splitlines()
        start = next(i for i, line in enumerate(lines) if "tt.func public" in line)
        self.lines = lines[start:]
        roots = {name: frozenset([name]) for name in re.findall(r"(%\w+): ", self.lines[0])}
        self.pointer_roots = {}

        def of(value):
            return roots.get(value.split("#", 1)[0], frozenset(["?"]))

        for i, line in enumerate(self.lines):
            operation = _operation(line)
            if operation in ("tt.store", *LOADS):
                rest = line.split(operation, 1)[1].split(" : ", 1)[0]
                if operation.startswith("tt.atomic"):
                    rest = rest.split(",", 3)[3]
                self.pointer_roots[i] = of(VALUE.findall(rest)[0])
            induction = re.search(r"scf\.for (%[\w.]+) = ", line)
            if induction:  # a loop index points nowhere; a loop-carried value starts from its initial value
                roots[induction.group(1)] = frozenset()
                carried = line.split("iter_args(", 1)[1] if "iter_args(" in line else ""
                for name, initial in re.findall(r"(%[\w.]+) = (%[\w.]+)", carried):
                    roots[name] = of(initial)
            match = DEFINITION.match(line)
            if match:
                operands = VALUE.findall(match.group(3).split(" : ", 1)[0])
                if induction:
                    operands = [name for name in operands if name != induction.group(1)]
                roots[match.group(1)] = frozenset().union(*(of(name) for name in operands))

    def indices(self, *operations) -> list:
        return [i for i, line in enumerate(self.lines) if _operation(line) in operations]

    def read_back_stores(self) -> list:
        """The stores into memory the kernel also loads from (through any kernel argument)."""
        loaded = frozenset().union(*(self.pointer_roots[i] for i in self.indices(*LOADS[:3])))
        return [i for i in self.indices("tt.store") if self.pointer_roots[i] & (loaded | {"?"})]

    def fenced(self, index: int, direction: int, passing=("tt.store",)) -> bool:
        """Whether a barrier comes before any load, region edge or other memory operation than
        those `passing`, walking from line `index` in `direction`."""
        i = index + direction
        while 0 <= i < len(self.lines):
            operation = _operation(self.lines[i])
            if operation in BARRIERS:
                return True
            if operation in LOADS or operation in REGION_EDGES or operation.startswith("tt.store"):
                if operation not in passing:
                    return False
            i += direction
        return False


def unfenced_stores(ttgir: str) -> list:
    """The read-back stores that a load may reach without a barrier, before or after them."""
    program = Program(ttgir)
    problems = []
    for i in program.read_back_stores():
        for direction, hazard in ((-1, "write after read"), (1, "read after write")):
            if not program.fenced(i, direction):
                problems.append(f"{hazard}: {program.lines[i].strip()}")
    return problems


def handoff_problems(ttgir: str) -> list:
    """The handoff to the last program: barrier, one atomic add, barrier, and every later load of
    another program's results (workspace, task losses) with cache modifier cg."""
    program = Program(ttgir)
    adds = [i for i in program.indices("tt.atomic_rmw") if "tt.atomic_rmw add" in program.lines[i]]
    if len(adds) != 1:
        return [f"{len(adds)} atomic adds"]
    add = adds[0]
    problems = []
    if not program.fenced(add, -1, passing=()):
        problems.append("no barrier between the results and the atomic")
    if not program.fenced(add, 1, passing=()):
        problems.append("no barrier between the atomic and the loads")
    if "acq_rel" not in program.lines[add] or ", gpu," not in program.lines[add]:
        problems.append(f"the atomic is not acq_rel at gpu scope: {program.lines[add].strip()}")
    shared = {"%workspace_ptr", "%task_losses_ptr"}
    reads = [i for i in program.indices("tt.load") if i > add and program.pointer_roots[i] & shared]
    if not reads:
        problems.append("no loads of the other programs' results after the atomic")
    problems += [f"cached load: {program.lines[i].strip()}" for i in reads if "cache_modifier = cg" not in program.lines[i]]
    return problems


# kernel, widths, activation, loss, bias, steps, first_order, lr_grad, all_step_losses
BARRIER_FAMILIES = [
    ("meta_step", (3, 17, 33, 4), "tanh", "cross_entropy", True, 2, False, True, True),
    ("meta_step", (5, 24, 2), "sigmoid", "mse", False, 3, True, False, False),
    ("meta_step", (6, 3), "relu", "mse", True, 0, False, False, True),
    ("hvp", (3, 33, 18, 3), "tanh", "cross_entropy", True, 0, False, False, True),
]


@lru_cache(maxsize=None)
def compiled(capability, kernel, widths, activation, loss, bias, steps, first_order, lr_grad, all_step_losses, points):
    from triton.backends.compiler import GPUTarget

    from pymaml.kernels.mlp_meta_step import compile_ahead

    return compile_ahead(GPUTarget("cuda", capability, 32), kernel, widths, activation=activation, loss=loss,
                         bias=bias, steps=steps, points=points, first_order=first_order, lr_grad=lr_grad,
                         all_step_losses=all_step_losses)


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path_factory.mktemp("triton-cache")))


@pytest.mark.parametrize("family", BARRIER_FAMILIES, ids=lambda f: f"{f[0]}-{f[2]}-{f[3]}-S{f[5]}")
def test_every_workspace_store_stands_between_barriers(family):
    ttgir = compiled(90, *family, 10).asm["ttgir"]
    program = Program(ttgir)
    assert program.read_back_stores(), "no stores into read-back memory found"
    assert "%workspace_ptr" in frozenset().union(*(program.pointer_roots[i] for i in program.read_back_stores()))
    assert unfenced_stores(ttgir) == []


def test_the_checker_finds_an_unfenced_store():
    """The checker itself: a store read back without a barrier, and one written over an earlier
    read without a barrier, are both reported."""
    ttgir = "\n".join([
        "  tt.func public @k(%ws: !tt.ptr<f32> loc(\"ws\"(#loc))) attributes {noinline = false} {",
        "    %p = tt.splat %ws : !tt.ptr<f32> -> tensor<16x!tt.ptr<f32>>",
        "    %x = tt.load %p : tensor<16x!tt.ptr<f32>>",
        "    tt.store %p, %x : tensor<16x!tt.ptr<f32>>",
        "    ttg.barrier all",
        "    %y = tt.load %p : tensor<16x!tt.ptr<f32>>",
        "    ttg.barrier all",
        "    tt.store %p, %y : tensor<16x!tt.ptr<f32>>",
        "    %z = tt.load %p : tensor<16x!tt.ptr<f32>>",
        "    tt.return",
        "  }",
    ])
    assert unfenced_stores(ttgir) == ["write after read: tt.store %p, %x : tensor<16x!tt.ptr<f32>>",
                                      "read after write: tt.store %p, %y : tensor<16x!tt.ptr<f32>>"]


def test_the_last_program_handoff_follows_the_pattern():
    ttgir = compiled(90, *BARRIER_FAMILIES[0], 10).asm["ttgir"]
    assert handoff_problems(ttgir) == []
    ptx = compiled(90, *BARRIER_FAMILIES[0], 10).asm["ptx"]
    assert "atom.global.gpu.acq_rel.add" in ptx and "ld.global.cg" in ptx


# The widest configuration the `triton` backend accepts: every padded width 128, 64 points, five
# inner steps, second order with learned step sizes (every workspace buffer in use) and tanh
# (the R-operator's σ'' terms); float32 is the one dtype the kernel computes in, and the labels
# of cross-entropy are int64 against MSE's float32 targets, so both losses are compiled. Two
# layers hold every tile shape of a deeper MLP of that width ([128, 128] weights, [64, 128]
# per-point tiles, a hidden layer for σ''); more layers repeat them and only lengthen the compile.
WIDEST = (128, 128, 128)
ARCH_LIMITS = {  # capability: (shared memory per block with opt-in, registers per thread, per SM)
    80: (163 * 1024, 255, 65536),
    90: (227 * 1024, 255, 65536),
}


def resource_usage(cubin: bytes, name: str, tmp_path) -> dict:
    """REG, STACK, SHARED and LOCAL of kernel `name` in a cubin, from cuobjdump -res-usage (the
    tool Triton ships): registers per thread, the per-thread stack (spills) and memory in bytes."""
    import subprocess

    from triton import knobs

    path = tmp_path / "kernel.cubin"
    path.write_bytes(cubin)
    report = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", str(path)], capture_output=True, text=True,
                            check=True).stdout
    line = report.split(f"Function {name}:", 1)[1].splitlines()[1]
    return {key: int(value) for key, value in re.findall(r"(\w+):(\d+)", line)}


# Each of these compiles takes minutes; the default run compiles the
# meta-step with MSE for both archs, PYMAML_TRITON_WIDEST_ALL=1 also its cross-entropy variant
# (int64 labels) and the HVP kernel.
WIDEST_ALL = os.environ.get("PYMAML_TRITON_WIDEST_ALL") == "1"
WIDEST_KERNELS = [("meta_step", "mse")] + [
    pytest.param(kernel, loss, marks=pytest.mark.skipif(not WIDEST_ALL, reason="set PYMAML_TRITON_WIDEST_ALL=1"))
    for kernel, loss in (("meta_step", "cross_entropy"), ("hvp", "mse"))]


@pytest.mark.parametrize("capability", sorted(ARCH_LIMITS), ids=lambda c: f"sm{c}")
@pytest.mark.parametrize("kernel, loss", WIDEST_KERNELS)
def test_the_widest_configuration_compiles_and_fits(kernel, loss, capability, tmp_path):
    from pymaml.kernels.mlp_meta_step import MAX_PADDED_POINTS, MAX_PADDED_WIDTH

    assert max(WIDEST) == MAX_PADDED_WIDTH
    result = compiled(capability, kernel, WIDEST, "tanh", loss, True, 5 if kernel == "meta_step" else 0, False, True,
                      True, MAX_PADDED_POINTS)
    shared_limit, registers_per_thread, registers_per_sm = ARCH_LIMITS[capability]
    assert f".target sm_{capability}" in result.asm["ptx"]
    threads = 32 * result.metadata.num_warps
    usage = resource_usage(result.asm["cubin"], result.metadata.name, tmp_path)
    registers = usage["REG"]
    print(f"sm_{capability} {kernel} {loss}: shared {result.metadata.shared} B, {registers} registers x {threads} "
          f"threads, stack {usage['STACK']} B per thread")
    assert 0 < result.metadata.shared + usage["SHARED"] <= shared_limit  # dynamic and static shared memory
    assert 0 < registers <= registers_per_thread
    assert registers * threads <= registers_per_sm
