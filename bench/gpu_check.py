"""The first run on a GPU machine, in one command that finishes in under five minutes and writes
one JSON file.

On the GPU machine (nvcc on the PATH, so that the build compiles the CUDA launcher):

    PYMAML_CUDA=1 pip install ".[test]"
    PYTHONUNBUFFERED=1 python bench/gpu_check.py --out gpu_check_results

Results go to gpu_check_results/gpu_check.json, rewritten after every case, so whatever ran
is on disk even if the run is stopped; a compact summary is printed last. Exit status 0 when
every check passed, 2 when one failed or was not checked, 3 when the watchdog ended the run
(10 s after --budget-s, even inside a blocking CUDA call). Then

    python bench/record_gpu_results.py gpu_check_results/gpu_check.json

prints the section for bench/RESULTS.md. A second, shorter run can take a subset:
--sections timing,warmup (for example) with --budget-s to match.

Child processes start first and run beside the sections: one per Triton configuration the run
uses (Triton compiles each configuration and integer specialization once, for a long time, into
its on-disk cache; "warm-ups"), and the compute-sanitizer runs, each backend's after the warm-ups
of its configurations.

Sections, in this order, each time-boxed, each case in its own try (a failure is recorded,
never lost):
  environment  the device, torch, Triton, pymaml.build_info() and available_backends().
  correctness  the baseline (`func`) and `cuda` against the oracle (pymaml/reference.py, float64
               on the CPU, on the same values) over both losses, S = 0..5, first and second
               order, learned step sizes (Meta-SGD, LSLR), step weights and the widest
               configuration the Triton kernel takes (padded width 128, 64 points): the
               meta-loss, the per-task losses and the gradients of every parameter of the MAML
               module. Tolerance: 1e-10 in float64, 1e-5 in float32; the baseline's error in the
               same dtype stands beside each, to tell a kernel bug from conditioning.
  occupancy    the CUDA launcher's fused op at 32..1024 threads per block and at 1, 2, 4, 8 blocks
               per SM, W1 at T = 25, 1024, 16384: time, and whether the results are bitwise those
               of the launcher's own setting (the GPU section of bench/RESULTS.md says what these decide).
  conv_correctness  convolutional networks on the first backend's fused op (cuda: the CUDA
               launcher), called directly on the device's tensors, since the `cuda` backend itself
               refuses every network but an MLP (CudaBackend._accept) until this section has passed
               on a GPU: a small conv stack (3×3 conv with bias, BatchNorm2d on batch statistics,
               ReLU, 2×2 max-pool, Linear) and Omniglot's Conv4, 4 tasks of 5-way 1-shot, S = 1, 2,
               first and second order, cross-entropy, float64 and float32, and one case whose
               blocks take several tasks each; the meta-loss, the per-task losses and the flat
               meta-gradient against the oracle (the tolerances of `correctness`, relative to the
               whole gradient: a conv bias before a BatchNorm has a true gradient of 0), the CPU
               kernel's error beside each. `passed` lists the cases within tolerance, `gate` what
               the backend says of each network: what decides whether the gate can be lifted.
  correctness_compiled  the same for `triton`, each configuration after its warm-up (skipped,
               and reported as not checked, when the warm-up is still compiling at the time box).
  launches     every kernel and memory operation the device ran, and the CUDA runtime calls,
               for one fused op call, one MAML.meta_gradient and one MAML.meta_train_step (Adam):
               all of them, whatever they are named (goal: one kernel per meta-step).
  resources    registers, shared memory, stack and spills of the compiled kernels (cuobjdump
               --dump-resource-usage of the extension; the Triton kernels' metadata).
  sanitizer    compute-sanitizer memcheck, synccheck, initcheck and racecheck, each a subprocess
               of this script (--child-meta-step: meta_gradient and meta_train_step of two
               correctness configurations at 3 tasks, in every dtype the backend takes), collected
               before the timing, which then runs on a quiet GPU. Skipped with the reason when
               compute-sanitizer is neither on the PATH nor under $CUDA_HOME/bin,
               /usr/local/cuda*/bin or /opt/nvidia/*/bin (--sanitizer names it).
  timing       MAML.meta_gradient, median ms from CUDA events: W1 (sinusoid, MLP 1-40-40-1,
               K = 10 + 10, second order, float32) at T = 25, 1024, 16384 and S = 1, 5, and the
               widest configuration at T = 1024, S = 5, for each backend and for `func`; then, as
               time allows, W3 (Omniglot Conv4, T = 32, 5-way 1-shot, 15 queries per class, S = 1,
               second order) with the first backend timed through its fused op alone (as in
               conv_correctness) and the others through MAML.meta_gradient where they take it.
  warmup       what became of each warm-up child.

Options: --budget-s (total, default 285), --sections, --backends (default cuda,triton),
--baseline (default func), --sanitizer PATH, --sanitizer-tools.

--dry-run checks this script's logic on the CPU: every section with CPU stand-ins (backend
cpp for cuda and triton, warm-ups included, and its fused op on CPU tensors for the conv
networks; tiny sizes; wall-clock timing; thread counts for the launch settings; a built-in fake
sanitizer that runs the child and reports no errors), e.g.
    python bench/gpu_check.py --dry-run --out /tmp/gpu_check_dry
tests/test_gpu_check.py runs it and checks the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import glob
import importlib
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field

import torch
from torch import nn

import pymaml

SCHEMA_VERSION = 1
RESULT_FILE = "gpu_check.json"
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}
DTYPES = {"float64": torch.float64, "float32": torch.float32}
ACTIVATIONS = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid}
# In the order they run. The compiling backends' (Triton's) oracle checks, launch counts and
# kernel metadata come after the others, to give their compiles (SanitizerRuns, WarmUps) time;
# the conv checks run in that time too.
SECTIONS = ("environment", "correctness", "occupancy", "conv_correctness", "correctness_compiled", "launches",
            "resources", "sanitizer", "timing", "warmup")
SANITIZER_TOOLS = ("memcheck", "synccheck", "initcheck", "racecheck")
CHILD_OK = "CHILD META-STEP OK"
# Returned by compute-sanitizer when it found errors (--error-exitcode), distinct from a crash.
SANITIZER_ERROR_EXIT = 86


@dataclass(frozen=True)
class Case:
    """One meta-step configuration checked against the oracle."""

    name: str
    widths: tuple
    activation: str
    loss: str
    steps: int
    first_order: bool
    tasks: int
    points: int
    dtypes: tuple = ("float64", "float32")
    learn_inner_lr: str | None = None
    step_weights: tuple | None = None
    inner_lr: float = 0.125  # a power of two, the same number in float32 and float64


@dataclass(frozen=True)
class Workload:
    """One timed meta-gradient configuration."""

    name: str
    widths: tuple
    tasks: int
    steps: int
    points: int


@dataclass(frozen=True)
class ConvNet:
    """A network of the conv checks, on images [channels, size, size]. kind "stack": one block, a
    3×3 convolution with bias and padding 1 to `hidden` channels, BatchNorm2d on batch statistics,
    ReLU and a 2×2 max-pool, then Flatten and Linear; kind "conv4": pymaml.models.Conv4's Omniglot
    variant (four blocks of a stride-2 3×3 convolution, BatchNorm2d and ReLU) with `hidden`
    filters, then Flatten and Linear."""

    kind: str
    channels: int
    size: int
    hidden: int


@dataclass(frozen=True)
class ConvCase:
    """One N-way K-shot meta-step of a ConvNet with Q queries per class, through the fused op,
    checked against the oracle or timed. blocks: the CUDA launch's block count, fewer than the
    tasks, so that a block runs several tasks in turn on the same workspace (None: the launcher's
    own, one block per task here; the CPU stand-in runs that many threads)."""

    name: str
    net: ConvNet
    steps: int
    first_order: bool
    tasks: int
    queries: int
    ways: int = 5
    shots: int = 1
    dtypes: tuple = ("float64", "float32")
    blocks: int | None = None
    inner_lr: float = 0.25  # a power of two, the same number in float32 and float64
    loss: str = "cross_entropy"


@dataclass
class Plan:
    """What a run does: the GPU plan, or the dry run's CPU stand-ins at tiny sizes."""

    device: str
    backends: list
    baseline: str
    cases: list
    workloads: list
    conv_cases: list  # ConvCase, checked against the oracle through the first backend's fused op
    conv_workloads: list  # ConvCase, timed after the workloads
    launch_case: Case
    child_case_names: tuple  # the correctness cases the sanitizer's child runs, at 3 tasks
    sanitizer_tools: list
    warm: list  # (backend, key) pairs a child process runs first, to fill Triton's cache
    budgets: dict
    timing_case_s: float
    timing_max_reps: int
    timing_warm_calls: int
    occupancy_workloads: list
    occupancy_threads: tuple
    occupancy_reps: int
    watchdog: bool
    fake_sanitizer: bool = False
    dry_run: bool = False
    notes: list = field(default_factory=list)


W1_WIDTHS = (1, 40, 40, 1)
# The widest configuration the Triton kernel takes (kernels/mlp_meta_step.py: MAX_PADDED_WIDTH,
# MAX_PADDED_POINTS); the CUDA kernel has no width limit of its own.
WIDEST_WIDTHS = (128, 128, 128, 128)
WIDEST_POINTS = 64
# The conv stack's channel count is not a multiple of the 16-value chunk, so that its convolution
# goes through the padded pixel rows; Conv4's 64 filters take the in-place path, and its later
# convolutions (whose input is not data) keep Ŵ and a transposed copy where the first keeps Ŵ^T
# alone (csrc/core/layers/conv2d.h).
CONV_STACK = ConvNet("stack", 3, 12, 6)
OMNIGLOT_CONV4 = ConvNet("conv4", 1, 28, 64)


def conv_case_grid(nets: dict, tasks: int, queries: int, blocks: int) -> list:
    """Each network at S = 1, 2, second and first order, and the last network once more at S = 2,
    second order, with `blocks` blocks taking the tasks in turn."""
    cases = [ConvCase(f"{label}_s{steps}{'_first_order' if first_order else ''}", net, steps, first_order, tasks,
                      queries)
             for label, net in nets.items() for steps in (1, 2) for first_order in (False, True)]
    label, net = list(nets.items())[-1]
    cases.append(ConvCase(f"{label}_s2_{blocks}_blocks", net, 2, False, tasks, queries, blocks=blocks))
    return cases


def gpu_plan(args) -> Plan:
    # Tasks and points follow the timed workloads where they can: Triton specializes integer
    # arguments by divisibility by 16, so T = 25 and T = 16 compile the kernels the timing reuses.
    cases = [
        Case("w1_s1", W1_WIDTHS, "relu", "mse", 1, False, 25, 10),
        Case("w1_s5", W1_WIDTHS, "relu", "mse", 5, False, 25, 10),
        Case("ce_tanh_s3", (5, 33, 17, 4), "tanh", "cross_entropy", 3, False, 9, 6),
        Case("ce_sigmoid_s2_first_order", (5, 64, 3), "sigmoid", "cross_entropy", 2, True, 9, 6),
        Case("mse_s0", (3, 7, 2), "tanh", "mse", 0, False, 7, 5),
        Case("meta_sgd_step_weights_s2", (4, 24, 3), "tanh", "mse", 2, False, 6, 5, learn_inner_lr="per_parameter",
             step_weights=(0.25, 0.75)),
        Case("lslr_ce_s3_first_order", (6, 20, 20, 5), "relu", "cross_entropy", 3, True, 6, 7,
             learn_inner_lr="per_layer_per_step"),
        Case("widest_s5", WIDEST_WIDTHS, "relu", "mse", 5, False, 16, WIDEST_POINTS, inner_lr=0.015625),
    ]
    workloads = [Workload(f"w1_T{t}_S{s}", W1_WIDTHS, t, s, 10) for t in (25, 1024, 16384) for s in (1, 5)]
    workloads.append(Workload("widest_T1024_S5", WIDEST_WIDTHS, 1024, 5, WIDEST_POINTS))
    return Plan(
        device="cuda", backends=args.backends, baseline=args.baseline, cases=cases, workloads=workloads,
        conv_cases=conv_case_grid({"stack": CONV_STACK, "omniglot_conv4": OMNIGLOT_CONV4}, tasks=4, queries=3,
                                  blocks=2),
        # W3 of bench/providers.py (omniglot_conv4): its inner step size, 5-way 1-shot, 15 queries per class.
        conv_workloads=[ConvCase("w3_omniglot_conv4_T32_S1", OMNIGLOT_CONV4, 1, False, 32, 15, dtypes=("float32",),
                                 inner_lr=0.4)],
        launch_case=Case("w1_s1", W1_WIDTHS, "relu", "mse", 1, False, 25, 10, dtypes=("float32",)),
        child_case_names=("meta_sgd_step_weights_s2", "ce_tanh_s3"), sanitizer_tools=args.sanitizer_tools,
        # Triton compiles once per configuration and integer specialization (T and K divisible by
        # 16 or not): the cases, and the timed workloads of another specialization than theirs.
        warm=[("triton", f"case/{c.name}/float32") for c in cases if "triton" in args.backends]
        + [("triton", f"workload/w1_T1024_S{s}") for s in (1, 5) if "triton" in args.backends],
        # Seconds per section; the sanitizer's is counted from the start of the run, since its
        # children run beside the other sections.
        budgets=dict(environment=20, correctness=55, occupancy=15, conv_correctness=40, correctness_compiled=70,
                     launches=15, resources=10, sanitizer=200, timing=85),
        timing_case_s=2.0, timing_max_reps=100, timing_warm_calls=2, watchdog=True,
        occupancy_workloads=[Workload(f"w1_T{t}_S{s}", W1_WIDTHS, t, s, 10) for t, s in ((25, 1), (25, 5), (1024, 1),
                                                                                       (16384, 1))],
        occupancy_threads=(32, 64, 128, 256, 512, 1024), occupancy_reps=15,
    )


def dry_plan(args) -> Plan:
    cases = [
        Case("w1_s1", W1_WIDTHS, "relu", "mse", 1, False, 3, 4),
        Case("ce_tanh_s2", (3, 9, 4), "tanh", "cross_entropy", 2, False, 3, 4),
        Case("mse_s0_first_order", (2, 5, 2), "sigmoid", "mse", 0, True, 2, 3),
        Case("meta_sgd_step_weights_s2", (2, 6, 2), "tanh", "mse", 2, False, 2, 3, learn_inner_lr="per_parameter",
             step_weights=(0.25, 0.75)),
    ]
    workloads = [Workload(f"w1_T{t}_S1", W1_WIDTHS, t, 1, 4) for t in (2, 4)]
    workloads.append(Workload("widest_T2_S2", (4, 16, 16, 3), 2, 2, 5))
    backends = args.backends if args.backends_given else ["cpp"]
    return Plan(
        device="cpu", backends=backends, baseline=args.baseline, cases=cases, workloads=workloads,
        conv_cases=conv_case_grid({"stack": ConvNet("stack", 2, 6, 3), "omniglot_conv4": ConvNet("conv4", 1, 12, 4)},
                                  tasks=2, queries=2, blocks=1),
        conv_workloads=[ConvCase("w3_omniglot_conv4_T3_S1", ConvNet("conv4", 1, 12, 4), 1, False, 3, 2,
                                 dtypes=("float32",), inner_lr=0.4)],
        launch_case=Case("w1_s1", W1_WIDTHS, "relu", "mse", 1, False, 3, 4, dtypes=("float32",)),
        child_case_names=("meta_sgd_step_weights_s2", "ce_tanh_s2"), sanitizer_tools=args.sanitizer_tools,
        warm=[(backends[0], "case/meta_sgd_step_weights_s2/float32"), (backends[0], "workload/w1_T2_S1")],
        budgets=dict(environment=30, correctness=120, occupancy=30, conv_correctness=120, correctness_compiled=120,
                     launches=60, resources=30, sanitizer=240, timing=60),
        timing_case_s=0.05, timing_max_reps=3, timing_warm_calls=0, watchdog=False,
        occupancy_workloads=[Workload("w1_T4_S1", W1_WIDTHS, 4, 1, 4)], occupancy_threads=(1, 2), occupancy_reps=3,
        fake_sanitizer=args.sanitizer is None, dry_run=True,
        notes=["dry run on the CPU: cpu stand-ins for the GPU backends, tiny sizes, wall-clock timing, "
               "fake sanitizer unless --sanitizer was given"],
    )


# ---------------------------------------------------------------------------------------------
# Results: one dict, written to one JSON file after every case.


class Results:
    def __init__(self, path: str, plan: Plan):
        self.path = path
        self.data = {
            "schema": SCHEMA_VERSION, "mode": "dry-run" if plan.dry_run else "gpu", "finished": False,
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "elapsed_s": 0.0,
            "plan": {"device": plan.device, "backends": plan.backends, "baseline": plan.baseline,
                     "budgets_s": plan.budgets, "sanitizer_tools": plan.sanitizer_tools, "notes": plan.notes},
            "sections": {},
        }
        self.began = time.perf_counter()
        self.lock = threading.Lock()

    def section(self, name: str) -> dict:
        return self.data["sections"].setdefault(name, {"status": "not run"})

    def write(self) -> None:
        with self.lock:
            self.data["elapsed_s"] = round(time.perf_counter() - self.began, 3)
            text = json.dumps(self.data, indent=1, default=str, allow_nan=True)
            temporary = self.path + ".tmp"
            with open(temporary, "w") as f:
                f.write(text)
            os.replace(temporary, self.path)


class TimeBox(Exception):
    """Raised in the main thread when a section's time box is over."""


@contextlib.contextmanager
def time_box(seconds: float):
    """Raises TimeBox after `seconds` (SIGALRM; interrupts Python code, not a blocking C call,
    which the watchdog covers)."""
    if seconds <= 0:
        raise TimeBox("no time left for this section")

    def expire(signum, frame):
        raise TimeBox(f"time box of {seconds:.0f} s is over")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def error_text(error: BaseException) -> str:
    lines = traceback.format_exception(type(error), error, error.__traceback__)
    return "".join(lines)[-2000:]


def run_section(results: Results, name: str, budget_s: float, body, deadline: float) -> None:
    """Runs body(section) under the section's time box; the section dict keeps whatever body put
    into it, whatever happens."""
    section = results.section(name)
    box = min(budget_s, deadline - time.perf_counter())
    section.update(status="running", budget_s=round(box, 1))
    results.write()
    began = time.perf_counter()
    print(f"== {name} (time box {box:.0f} s)")
    try:
        with time_box(box):
            body(section)
        section["status"] = "ok"
    except TimeBox as error:
        section["status"] = "timeout"
        section["error"] = str(error)
    except Exception as error:  # noqa: BLE001 (a section's failure is recorded, the run goes on)
        section["status"] = "error"
        section["error"] = error_text(error)
    section["elapsed_s"] = round(time.perf_counter() - began, 3)
    results.write()


def start_watchdog(results: Results, seconds: float) -> None:
    """Ends the process after `seconds` even when a CUDA call blocks, with the results on disk."""

    def fire():
        with contextlib.suppress(Exception):
            results.data["watchdog"] = f"the run was ended after {seconds:.0f} s"
            results.write()
        print(f"watchdog: ending the run after {seconds:.0f} s; results in {results.path}", flush=True)
        os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()


# ---------------------------------------------------------------------------------------------
# Models, batches and the oracle.


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_model(case, dtype: torch.dtype, seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return pymaml.models.mlp(case.widths, ACTIVATIONS[case.activation]).to(dtype)


def make_batch(case, dtype: torch.dtype, seed: int = 1) -> tuple:
    """x ~ N(0, 1); MSE targets ~ N(0, 1); labels uniform over the classes. Drawn in float64."""
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for _ in range(2):
        x = torch.randn(case.tasks, case.points, case.widths[0], generator=generator, dtype=torch.float64)
        if case.loss == "cross_entropy":
            y = torch.randint(0, case.widths[-1], (case.tasks, case.points), generator=generator)
        else:
            y = torch.randn(case.tasks, case.points, case.widths[-1], generator=generator, dtype=torch.float64)
        tensors += [x.to(dtype), y if case.loss == "cross_entropy" else y.to(dtype)]
    return tuple(tensors)


def make_maml(case, model, backend: str) -> pymaml.MAML:
    return pymaml.MAML(model, inner_lr=case.inner_lr, inner_steps=case.steps, first_order=case.first_order,
                       loss=case.loss, backend=backend, learn_inner_lr=case.learn_inner_lr,
                       step_weights=list(case.step_weights) if case.step_weights else None)


def meta_gradient_values(case, backend: str, dtype: torch.dtype, device: str, data_dtype: torch.dtype | None = None
                         ) -> dict:
    """The meta-loss, per-task losses and the gradient of every parameter of the MAML module
    (the model's, then learned step sizes) from MAML.meta_gradient, returned in float64 on the
    CPU. The weights and data are those of data_dtype (default dtype), computed in dtype: the
    oracle of a float32 run sees the float32 values exactly."""
    data_dtype = data_dtype or dtype
    model = make_model(case, data_dtype).to(device=device, dtype=dtype)
    maml = make_maml(case, model, backend)
    batch = [t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
             for t in make_batch(case, data_dtype)]
    out = maml.meta_gradient(*batch, accumulate=False)
    synchronize(device)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in maml.parameters()]
    return {
        "loss": out.loss.detach().double().cpu().reshape(1),
        "task_losses": out.task_losses.detach().double().cpu().reshape(-1),
        "grads": torch.cat([g.detach().double().cpu().reshape(-1) for g in grads]),
        "backend": maml.backend,
    }


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (the tests' measure); NaN stays NaN."""
    if actual.shape != expected.shape:
        return math.inf
    scale = expected.norm().item()
    difference = (actual - expected).norm().item()
    return difference / scale if scale > 0 else difference


def compare(values: dict, oracle: dict) -> dict:
    return {key: relative_error(values[key], oracle[key]) for key in ("loss", "task_losses", "grads")}


def worst(errors: dict) -> float:
    """The largest error; NaN counts as infinitely wrong."""
    return max((math.inf if math.isnan(e) else e) for e in errors.values())


def backend_reason(backend: str, case, dtype: torch.dtype, device: str, model=None) -> str | None:
    """Why `backend` cannot run the case here (on `model`, by default the case's MLP), or None."""
    try:
        implementation = pymaml.backends.get_backend(backend)
    except ValueError as error:
        return str(error)
    reason = implementation.unavailable_reason()
    if reason is None:
        config = pymaml.backends.MetaConfig(case.steps, case.first_order, case.loss)
        model = make_model(case, dtype) if model is None else model
        reason = implementation.unsupported_reason(model, config, torch.device(device))
    return reason


# ---------------------------------------------------------------------------------------------
# Sections.


def environment_section(plan: Plan, section: dict) -> None:
    info = section.setdefault("result", {})
    info["python"] = sys.version.split()[0]
    info["platform"] = platform.platform()
    info["cpu_count"] = os.cpu_count()
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError as error:
        info["triton"] = f"not importable: {error}"
    info["pymaml_version"] = getattr(pymaml, "__version__", None)
    info["build_info"] = pymaml.build_info()
    info["backends"] = {s.name: {"usable": s.usable, "reason": s.reason} for s in pymaml.available_backends()}
    if plan.device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device")
        properties = torch.cuda.get_device_properties(0)
        info["device"] = {
            "name": properties.name, "capability": f"{properties.major}.{properties.minor}",
            "multiprocessors": properties.multi_processor_count,
            "memory_gib": round(properties.total_memory / 2**30, 1),
            "count": torch.cuda.device_count(),
        }
        for attribute in ("shared_memory_per_block_optin", "shared_memory_per_multiprocessor",
                          "regs_per_multiprocessor", "max_threads_per_multi_processor", "L2_cache_size", "warp_size"):
            if hasattr(properties, attribute):
                info["device"][attribute] = getattr(properties, attribute)
    else:
        info["device"] = {"name": platform.processor() or platform.machine(), "cpu_level": pymaml.build_info().get(
            "cpu_levels")}
    print(f"device {info['device'].get('name')}; torch {info['torch']}; triton {info['triton']}")
    print(f"build_info {info['build_info']}")
    for name, status in info["backends"].items():
        print(f"  {name}: {'usable' if status['usable'] else 'not usable (' + str(status['reason']) + ')'}")


def compiled_backends(plan: Plan) -> list:
    """The backends whose configurations warm up in child processes first (Triton)."""
    return [b for b in plan.backends if any(backend == b for backend, _ in plan.warm)]


def correctness_section(plan: Plan, results: Results, section: dict, deadline: float, warm, backends: list,
                        oracles: dict, baseline_errors: dict) -> None:
    """Case by case, the baseline first in each, so that its error stands beside each backend's
    and a time box cuts whole cases; oracles and baseline_errors are shared by the two
    correctness sections."""
    result = section.setdefault("result", {"cases": [], "failures": []})
    for case in plan.cases:
        for dtype_name in case.dtypes:
            for backend in backends:
                if time.perf_counter() > deadline:
                    result["cases"].append({"case": case.name, "dtype": dtype_name, "backend": backend,
                                            "status": "skipped", "reason": "section time box"})
                    continue
                correctness_case(plan, case, dtype_name, backend, result, oracles, baseline_errors, warm, deadline)
                results.write()


def correctness_case(plan: Plan, case: Case, dtype_name: str, backend: str, result: dict, oracles: dict,
                     baseline_errors: dict, warm, deadline: float) -> None:
    dtype, tolerance = DTYPES[dtype_name], TOLERANCE[dtype_name]
    entry = {"case": case.name, "dtype": dtype_name, "backend": backend, "widths": list(case.widths),
             "activation": case.activation, "loss": case.loss, "steps": case.steps, "first_order": case.first_order,
             "tasks": case.tasks, "points": case.points, "learn_inner_lr": case.learn_inner_lr,
             "step_weights": list(case.step_weights) if case.step_weights else None, "tolerance": tolerance}
    key = (case.name, dtype_name)
    if key not in oracles:
        try:
            oracles[key] = meta_gradient_values(case, "reference", torch.float64, "cpu", data_dtype=dtype)
        except TimeBox:
            raise
        except Exception as error:  # noqa: BLE001
            oracles[key] = error_text(error)
            result["failures"].append(f"oracle {case.name} {dtype_name}")
    oracle = oracles[key]
    began = time.perf_counter()
    reason = backend_reason(backend, case, dtype, plan.device)
    if isinstance(oracle, str):
        entry.update(status="skipped", reason=f"the oracle failed: {oracle.strip().splitlines()[-1]}")
    elif reason is not None:
        entry.update(status="unsupported", reason=reason)
    elif (warm_up := warm.wait(backend, f"case/{case.name}/{dtype_name}", deadline)) == "still compiling":
        # Compiling here would block the run inside one long compiler call, past its time box.
        entry.update(warm_up=warm_up, status="skipped", reason="its warm-up was still compiling at the time box")
    else:
        entry["warm_up"] = warm_up
        began = time.perf_counter()
        try:
            values = meta_gradient_values(case, backend, dtype, plan.device)
            errors = compare(values, oracle)
            largest = worst(errors)
            entry.update(status="ran", errors=errors, max_error=largest, ok=largest <= tolerance)
            if backend == plan.baseline:
                baseline_errors[key] = largest
            else:
                entry["baseline_max_error"] = baseline_errors.get(key)
        except TimeBox:
            raise
        except Exception as error:  # noqa: BLE001
            entry.update(status="error", error=error_text(error), ok=False)
    entry["seconds"] = round(time.perf_counter() - began, 3)
    result["cases"].append(entry)
    if entry["status"] in ("unsupported", "skipped"):
        print(f"  {case.name:28s} {dtype_name} {backend:9s} not run: {entry['reason'][:150]}")
        return
    if not entry.get("ok"):
        result["failures"].append(f"{backend} {case.name} {dtype_name}")
    shown = f"max rel. error {entry['max_error']:.2e}" if "max_error" in entry else entry["status"]
    print(f"  {case.name:28s} {dtype_name} {backend:9s} {shown} "
          f"{'ok' if entry.get('ok') else 'WRONG'} ({entry['seconds']:.1f} s)")


# ---------------------------------------------------------------------------------------------
# Convolutional networks through the fused op itself.

def randomize(model: nn.Module, seed: int) -> nn.Module:
    """The model's parameters drawn afresh in float64: weights ~ N(0, 1/fan-in), biases ~ N(0, 0.3²),
    BatchNorm weights ~ 1 + N(0, 0.3²). torch's initial BatchNorm weight 1 and bias 0 would let a
    kernel that dropped or swapped them agree with the oracle."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 1 / max(1, p[0].numel()) ** 0.5 if p.dim() > 1 else 0.3
            p.copy_(scale * torch.randn(p.shape, generator=generator, dtype=torch.float64))
            if name.endswith("weight") and p.dim() == 1:  # a BatchNorm's γ, the only 1-D weight
                p.add_(1.0)
    return model


def make_conv_model(case: ConvCase, dtype: torch.dtype, seed: int = 0) -> nn.Sequential:
    """The case's network with randomized parameters, drawn in float64 and then rounded to dtype."""
    net = case.net
    if net.kind == "stack":
        pooled = net.size // 2
        model = nn.Sequential(nn.Conv2d(net.channels, net.hidden, 3, padding=1),
                              nn.BatchNorm2d(net.hidden, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Flatten(), nn.Linear(net.hidden * pooled * pooled, case.ways))
    elif net.kind == "conv4":
        model = pymaml.models.Conv4(in_channels=net.channels, ways=case.ways, hidden=net.hidden, image_size=net.size,
                                    strided=True)
    else:
        raise ValueError(f"unknown conv network kind {net.kind!r}")
    return randomize(model.to(torch.float64), seed).to(dtype)


def make_conv_batch(case: ConvCase, dtype: torch.dtype, seed: int = 1) -> tuple:
    """Images x ~ N(0, 1), [T, N·K, C, H, W] and [T, N·Q, C, H, W], drawn in float64, with labels
    grouped by class as bench/providers.py's image workloads have them."""
    generator = torch.Generator().manual_seed(seed)
    image = (case.net.channels, case.net.size, case.net.size)
    tensors = []
    for per_class in (case.shots, case.queries):
        x = torch.randn(case.tasks, case.ways * per_class, *image, generator=generator, dtype=torch.float64)
        y = torch.arange(case.ways).repeat_interleave(per_class).expand(case.tasks, -1).contiguous()
        tensors += [x.to(dtype), y]
    return tuple(tensors)


def conv_op_arguments(case: ConvCase, model: nn.Sequential, batch: tuple, device: str) -> tuple:
    """The fused op's arguments (pymaml::meta_step's schema) on `device` and the parameters' names
    in θ's order: θ the layout's parameters flattened, α = inner_lr for every step and parameter,
    step weights (0, ..., 0, 1), each point's image flattened to [C·H·W], and the network encoded as
    the cpp backend encodes it (NetworkLayout.network). Raises when cpp does not take the model:
    what the fused kernel computes is then not this network."""
    from pymaml.backends.layout import mlp_layout

    config = pymaml.backends.MetaConfig(case.steps, case.first_order, case.loss)
    reason = pymaml.backends.get_backend("cpp").unsupported_reason(model, config, torch.device("cpu"))
    if reason is not None:
        raise ValueError(f"the fused kernel does not take {case.name}: {reason}")
    layout, _ = mlp_layout(model)
    support_x, query_x = batch[0], batch[2]
    point_shape = tuple(support_x.shape[2:])
    layers, constants = layout.network(point_shape)
    layout.check_points(point_shape, support_x.shape[1], query_x.shape[1], case.steps)
    theta = torch.cat([p.detach().reshape(-1) for p in layout.parameters()]).to(device)
    lrs = theta.new_full((case.steps, theta.numel()), case.inner_lr)
    weights = theta.new_zeros(case.steps)
    if case.steps:
        weights[-1] = 1.0
    tensors = [t.reshape(*t.shape[:2], -1) if t.is_floating_point() else t for t in batch]
    arguments = (theta, lrs, weights, *(t.to(device) for t in tensors), layers, constants, case.loss,
                 case.first_order, False)
    return arguments, list(layout.names)


def on_cpu(arguments: tuple) -> tuple:
    return tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in arguments)


def conv_op_values(implementation, arguments: tuple, device: str) -> dict:
    """The meta-loss, per-task losses and flat meta-gradient of one call of the fused op, in float64
    on the CPU."""
    meta_loss, task_losses, _, _, grad_theta, _ = implementation.forward(*arguments)
    synchronize(device)
    return {"loss": meta_loss.detach().double().cpu().reshape(1),
            "task_losses": task_losses.detach().double().cpu().reshape(-1),
            "grads": grad_theta.detach().double().cpu().reshape(-1)}


def conv_oracle(case: ConvCase, model: nn.Sequential, batch: tuple, names: list) -> dict:
    """The oracle's meta-loss, per-task losses and flat meta-gradient (over the parameters `names`,
    in θ's order), computed in float64 on the CPU from the model's and batch's values."""
    oracle_model = copy.deepcopy(model).to(torch.float64)
    parameters = dict(oracle_model.named_parameters())
    batch = [t.to(torch.float64) if t.is_floating_point() else t for t in batch]
    task_losses = pymaml.reference.task_query_losses(oracle_model, *batch, inner_lr=case.inner_lr,
                                                     inner_steps=case.steps, first_order=case.first_order,
                                                     loss=case.loss)
    loss = task_losses.mean()
    grads = torch.autograd.grad(loss, [parameters[name] for name in names])
    return {"loss": loss.detach().reshape(1), "task_losses": task_losses.detach().reshape(-1),
            "grads": torch.cat([g.reshape(-1) for g in grads])}


def conv_launch(plan: Plan, blocks: int | None):
    """The launch a conv case asks for: `blocks` blocks of the CUDA launcher's own width, or on the
    CPU stand-in as many threads (each takes tasks in turn, as a block does); None: as it is."""
    if blocks is None:
        return contextlib.nullcontext()
    if plan.device == "cuda":
        return cuda_launch(None, blocks)
    return cpu_threads(blocks)


def conv_gate(backend: str, case: ConvCase, device: str) -> str | None:
    """What the backend itself says of the case's network on `device` (None: it runs it), its
    availability aside: for `cuda`, the gate this section decides on."""
    try:
        implementation = pymaml.backends.get_backend(backend)
    except ValueError as error:
        return str(error)
    config = pymaml.backends.MetaConfig(case.steps, case.first_order, case.loss)
    return implementation.unsupported_reason(make_conv_model(case, torch.float32), config, torch.device(device))


def conv_correctness_section(plan: Plan, results: Results, section: dict, deadline: float) -> None:
    """The conv cases on the first backend's fused op against the oracle; result["passed"] lists
    the cases within tolerance, result["all_passed"] whether every planned case ran and passed."""
    backend = plan.backends[0] if plan.backends else None
    result = section.setdefault("result", {
        "backend": backend, "gate": {}, "cases": [], "failures": [], "passed": [], "all_passed": False,
        "method": (f"pymaml::meta_step called directly on {plan.device} tensors with the network encoded as the cpp "
                   "backend encodes it, bypassing the backend's acceptance; relative errors against the float64 "
                   "oracle on the same values, over the whole flat meta-gradient")})
    if backend is None:
        result["skipped"] = "no backend"
        return
    try:
        implementation = pymaml.backends.get_backend(backend)
        unavailable = implementation.unavailable_reason()
    except ValueError as error:
        implementation, unavailable = None, str(error)
    for case in plan.conv_cases:
        if case.net.kind not in result["gate"]:
            result["gate"][case.net.kind] = conv_gate(backend, case, plan.device)
    try:
        for case in plan.conv_cases:
            for dtype_name in case.dtypes:
                if time.perf_counter() > deadline:
                    result["cases"].append({"case": case.name, "dtype": dtype_name, "backend": backend,
                                            "status": "skipped", "reason": "section time box"})
                    continue
                conv_correctness_case(plan, case, dtype_name, backend, implementation, unavailable, result)
                results.write()
    finally:
        planned = sum(len(case.dtypes) for case in plan.conv_cases)
        result["all_passed"] = planned > 0 and len(result["passed"]) == planned
        result["verdict"] = (f"{len(result['passed'])} of {planned} conv cases within tolerance on {backend}'s fused "
                             f"op" + (f"; outside tolerance or failed: {', '.join(result['failures'])}"
                                      if result["failures"] else ""))
        print(f"  {result['verdict']}")


def conv_correctness_case(plan: Plan, case: ConvCase, dtype_name: str, backend: str, implementation,
                          unavailable: str | None, result: dict) -> None:
    from pymaml.ops.meta_step import NATIVE_IMPLEMENTATION

    dtype, tolerance = DTYPES[dtype_name], TOLERANCE[dtype_name]
    entry = {"case": case.name, "dtype": dtype_name, "backend": backend, "network": dataclasses.asdict(case.net),
             "steps": case.steps, "first_order": case.first_order, "tasks": case.tasks, "ways": case.ways,
             "shots": case.shots, "queries": case.queries, "blocks": case.blocks, "inner_lr": case.inner_lr,
             "loss": case.loss, "tolerance": tolerance}
    began = time.perf_counter()
    if unavailable is not None:
        entry.update(status="unsupported", reason=unavailable)
    else:
        try:
            model = make_conv_model(case, dtype)
            batch = make_conv_batch(case, dtype)
            arguments, names = conv_op_arguments(case, model, batch, plan.device)
            oracle = conv_oracle(case, model, batch, names)
            # The backend's fused op on the device's tensors, past the backend's refusal of conv
            # nets (CudaBackend._accept): checking this op is what that refusal waits for.
            with conv_launch(plan, case.blocks):
                values = conv_op_values(implementation.implementation(), arguments, plan.device)
            # The CPU kernel (the same per-task math, csrc/core/network_task.h) on the same values:
            # an error of the same size as the device's is the problem's conditioning, not a bug.
            cpu_values = conv_op_values(NATIVE_IMPLEMENTATION, on_cpu(arguments), "cpu")
            errors, cpu_errors = compare(values, oracle), compare(cpu_values, oracle)
            largest, scale = worst(errors), oracle["grads"].norm().item()
            entry.update(status="ran", errors=errors, max_error=largest, oracle_grad_norm=scale,
                         ok=largest <= tolerance and scale > 0, cpu_kernel_errors=cpu_errors,
                         cpu_kernel_max_error=worst(cpu_errors),
                         difference_from_cpu_kernel=worst(compare(values, cpu_values)))
            if scale == 0:
                entry["reason"] = "the oracle's meta-gradient is zero, so the relative error measures nothing"
        except TimeBox:
            raise
        except Exception as error:  # noqa: BLE001
            entry.update(status="error", error=error_text(error), ok=False)
    entry["seconds"] = round(time.perf_counter() - began, 3)
    result["cases"].append(entry)
    if entry["status"] == "unsupported":
        print(f"  {case.name:30s} {dtype_name} {backend:9s} not run: {entry['reason'][:150]}")
        return
    label = f"{case.name} {dtype_name}"
    if entry["ok"]:
        result["passed"].append(label)
    else:
        result["failures"].append(f"{backend} {label}")
    shown = (f"max rel. error {entry['max_error']:.2e} (cpu kernel {entry['cpu_kernel_max_error']:.2e})"
             if "max_error" in entry else entry["status"])
    print(f"  {case.name:30s} {dtype_name} {backend:9s} {shown} {'ok' if entry['ok'] else 'WRONG'} "
          f"({entry['seconds']:.1f} s)")


class WarmUps:
    """Child processes that run the compiling backends (Triton: one compile per configuration and
    integer specialization, the better part of a minute each) once per configuration the run
    will use, all at once at the start, so that the compiles land in Triton's on-disk cache in
    parallel; the run waits for a configuration's child before using it."""

    def __init__(self, plan: Plan):
        self.plan, self.runs = plan, {}

    def start(self) -> None:
        environment = dict(os.environ, PYTHONUNBUFFERED="1")
        for backend, key in self.plan.warm:
            command = [sys.executable, os.path.abspath(__file__), "--child-warm", key, "--backends", backend,
                       *(["--dry-run"] if self.plan.dry_run else [])]
            log = tempfile.TemporaryFile(mode="w+")
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment,
                                       start_new_session=True)
            run = self.runs[backend, key] = {"process": process, "log": log, "began": time.perf_counter()}
            threading.Thread(target=SanitizerRuns._note_end, args=(run,), daemon=True).start()

    def wait(self, backend: str, key: str, deadline: float) -> str | None:
        """Waits (until `deadline`) for the child warming (backend, key); what became of it."""
        run = self.runs.get((backend, key))
        if run is None:
            return None
        try:
            rc = run["process"].wait(timeout=max(0.1, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            return "still compiling"
        return "ok" if rc == 0 else f"failed (rc {rc})"

    def collect(self, section: dict) -> None:
        result = section.setdefault("result", {"runs": []})
        for (backend, key), run in self.runs.items():
            process = run["process"]
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                status = "killed at the end of the run"
            else:
                status = "ok" if process.returncode == 0 else f"failed (rc {process.returncode})"
            run["log"].seek(0)
            output = run["log"].read()
            run["log"].close()
            ended = run.get("ended", time.perf_counter())
            result["runs"].append({"backend": backend, "key": key, "status": status,
                                   "seconds": round(ended - run["began"], 1), "output_tail": output[-1500:]})
            print(f"  {backend:9s} {key:32s} {status} ({round(ended - run['began'], 1)} s)")

    def kill(self) -> None:
        for run in self.runs.values():
            if run["process"].poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(run["process"].pid, signal.SIGKILL)


def child_warm(plan: Plan, backend: str, key: str) -> int:
    """One call of `backend` on the configuration named by key ("case/<name>/<dtype>" or
    "workload/<name>"), as the run will make it."""
    kind, name, *rest = key.split("/")
    if kind == "case":
        case = next(c for c in plan.cases if c.name == name)
        dtype = DTYPES[rest[0]]
        reason = backend_reason(backend, case, dtype, plan.device)
        if reason is not None:
            print(f"not run: {reason}")
            return 0
        meta_gradient_values(case, backend, dtype, plan.device)
    else:
        workload = next(w for w in plan.workloads if w.name == name)
        case = workload_case(workload)
        reason = backend_reason(backend, case, torch.float32, plan.device)
        if reason is not None:
            print(f"not run: {reason}")
            return 0
        maml = make_maml(case, make_model(case, torch.float32).to(plan.device), backend)
        maml.meta_gradient(*sinusoid_batch(case, plan.device), accumulate=False)
        synchronize(plan.device)
    print(f"warmed {backend} {key}")
    return 0


def profiled_events(run, device: str) -> dict:
    """What one call of `run` made the device do, counted from the torch profiler: on CUDA every
    kernel and memory operation (device events, whatever their names) and the CUDA runtime calls
    of the host; on the CPU (the dry run) the top-level operators."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    run()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as profiler:
        run()
        synchronize(device)
    events = list(profiler.events())
    kernels, memory, runtime = {}, {}, {}
    if device == "cuda":
        for event in events:
            if event.device_type == DeviceType.CUDA:
                target = memory if event.name.startswith(("Memcpy", "Memset")) else kernels
                target[event.name] = target.get(event.name, 0) + 1
            elif re.match(r"^cu(da)?[A-Z]", event.name):
                runtime[event.name] = runtime.get(event.name, 0) + 1
    else:
        for event in events:
            if event.device_type == DeviceType.CPU and event.cpu_parent is None:
                kernels[event.name] = kernels.get(event.name, 0) + 1
    return {"kernels": sum(kernels.values()), "kernel_names": kernels, "memory_operations": sum(memory.values()),
            "memory_names": memory, "runtime_calls": runtime,
            "synchronizations": sum(n for name, n in runtime.items() if "Synchronize" in name),
            "note": "the region ends with one torch.cuda.synchronize()" if device == "cuda" else
            "CPU stand-in: top-level operators"}


def launches_section(plan: Plan, results: Results, section: dict, warm, deadline: float) -> None:
    result = section.setdefault("result", {})
    case = plan.launch_case
    dtype = DTYPES[case.dtypes[0]]
    for backend in plan.backends:
        entry = result.setdefault(backend, {})
        reason = backend_reason(backend, case, dtype, plan.device)
        if reason is not None:
            entry["status"] = f"unsupported: {reason}"
            continue
        if warm.wait(backend, f"case/{case.name}/{case.dtypes[0]}", deadline) == "still compiling":
            entry["status"] = "skipped: its warm-up was still compiling at the time box"
            continue
        model = make_model(case, dtype).to(plan.device)
        batch = [t.to(plan.device) for t in make_batch(case, dtype)]
        maml = make_maml(case, model, backend)
        optimizer = torch.optim.Adam(maml.parameters(), lr=1e-3)
        calls = {
            "fused_op": lambda: fused_op_call(backend, model, case, batch),
            "meta_gradient": lambda: lambda: maml.meta_gradient(*batch, accumulate=False),
            "meta_train_step": lambda: lambda: maml.meta_train_step(*batch, optimizer),
        }
        for what, make_call in calls.items():
            try:
                call = make_call()
                counted = profiled_events(call, plan.device)
                counted["goal_one_kernel"] = counted["kernels"] == 1
                entry[what] = counted
                print(f"  {backend:9s} {what:16s} {counted['kernels']} kernels, {counted['memory_operations']} "
                      f"memory operations, {counted['synchronizations']} synchronizations: "
                      f"{sorted(counted['kernel_names'])}")
            except TimeBox:
                raise
            except Exception as error:  # noqa: BLE001
                entry[what] = {"status": "error", "error": error_text(error)}
                print(f"  {backend:9s} {what:16s} error: {error}")
            results.write()


def fused_op_call(backend: str, model, case, batch):
    """A call of the backend's fused op alone (pymaml::meta_step's schema), its arguments
    made beforehand; raises when the backend has no fused op."""
    from pymaml.ops import encode_mlp

    implementation = pymaml.backends.get_backend(backend).implementation()
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    lrs = theta.new_full((case.steps, theta.numel()), case.inner_lr)
    weights = theta.new_zeros(case.steps)
    weights[-1] = 1.0
    arguments = (theta, lrs, weights, *batch, *encode_mlp(case.widths, case.activation, True), case.loss,
                 case.first_order, False)
    return lambda: implementation.forward(*arguments)


@contextlib.contextmanager
def cuda_launch(threads: int | None, blocks: int | None):
    """The CUDA launcher run with `threads` per block and `blocks` blocks (None: its own choice of
    each): the block count replaces the op's choice (cuda_blocks), so that the workspace it
    allocates is sized for that many blocks, and the thread count is overridden on the binding's
    keyword arguments on their way from pymaml.ops, whatever else the op passes."""
    # The module whose `extension` and `cuda_blocks` the CUDA launcher calls.
    ops = importlib.import_module("pymaml.ops.meta_step.cuda")
    original_extension, original_blocks = ops.extension, ops.cuda_blocks
    real = original_extension()

    class Override:
        def __getattr__(self, name):
            return getattr(real, name)

        def meta_step_cuda(self, **arguments):
            if threads is not None:
                arguments["threads_per_block"] = threads
            return real.meta_step_cuda(**arguments)

    proxy = Override()
    ops.extension = lambda: proxy
    if blocks is not None:
        ops.cuda_blocks = lambda *sizes: blocks
    try:
        yield
    finally:
        ops.extension, ops.cuda_blocks = original_extension, original_blocks


@contextlib.contextmanager
def cpu_threads(threads: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def launch_settings(plan: Plan, tasks: int) -> list:
    """(label, context) pairs to sweep: on CUDA threads per block at the launcher's block count,
    then block counts at 128 threads; on the CPU stand-in (cpp) the thread count."""
    if plan.device != "cuda":
        return [(f"threads={n}", lambda n=n: cpu_threads(n)) for n in plan.occupancy_threads]
    processors = torch.cuda.get_device_properties(0).multi_processor_count
    settings = [(f"threads={n}", lambda n=n: cuda_launch(n, None)) for n in plan.occupancy_threads]
    for multiple in (1, 2, 4, 8):
        blocks = multiple * processors
        if blocks < tasks:
            settings.append((f"blocks={blocks}", lambda b=blocks: cuda_launch(128, b)))
    return settings


def occupancy_section(plan: Plan, results: Results, section: dict, deadline: float) -> None:
    """The fused op of the first backend (cuda) under every launch setting: CUDA-event time, and
    whether its outputs are bitwise those of the launcher's own setting (each output is the same
    ordered sum however the threads split the work, csrc/core/network_task.h). Decides the occupancy
    plan in the GPU section of bench/RESULTS.md."""
    result = section.setdefault("result", {"backend": plan.backends[0] if plan.backends else None, "rows": []})
    backend = result["backend"]
    for workload in plan.occupancy_workloads:
        case = workload_case(workload)
        row = {"workload": workload.name, "tasks": workload.tasks, "steps": workload.steps, "settings": {}}
        result["rows"].append(row)
        reason = backend_reason(backend, case, torch.float32, plan.device) if backend else "no backend"
        if reason is not None:
            row["skipped"] = reason
            continue
        model = make_model(case, torch.float32).to(plan.device)
        call = fused_op_call(backend, model, case, sinusoid_batch(case, plan.device))
        default = [t.clone() for t in call()]
        for label, setting in launch_settings(plan, workload.tasks):
            if time.perf_counter() > deadline:
                row["settings"][label] = {"status": "skipped: section time box"}
                continue
            try:
                with setting():
                    outputs = call()
                    synchronize(plan.device)
                    identical = all(bitwise_equal(a, b) for a, b in zip(outputs, default))
                    median = median_ms(plan, call, plan.occupancy_reps)
                row["settings"][label] = {"ms": median, "bitwise_equal": identical}
                print(f"  {workload.name:18s} {label:12s} {median:9.3f} ms{'' if identical else ' DIFFERENT RESULT'}")
            except TimeBox:
                raise
            except Exception as error:  # noqa: BLE001 (a setting the launcher refuses is a result too)
                row["settings"][label] = {"status": "error", "error": str(error)[:500]}
                print(f"  {workload.name:18s} {label:12s} error: {str(error)[:120]}")
            results.write()


BITS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and the same bits (a NaN equals a NaN of the same payload)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        a, b = (t.contiguous().reshape(-1).view(BITS[t.element_size()]) for t in (a, b))
    return torch.equal(a, b)


def median_ms(plan: Plan, call, reps: int) -> float:
    times = []
    for _ in range(reps):
        if plan.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            tick = time.perf_counter()
            call()
            times.append((time.perf_counter() - tick) * 1e3)
    times.sort()
    return times[len(times) // 2]


def find_cuobjdump() -> str | None:
    """The CUDA toolkit's cuobjdump, or the one Triton ships."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    candidates = sorted(glob.glob("/usr/local/cuda*/bin/cuobjdump"), reverse=True)
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if os.access(c, os.X_OK)), None)


def resources_section(plan: Plan, section: dict) -> None:
    """Registers, shared memory, stack and spills of the compiled kernels (what occupancy depends
    on, the GPU section of bench/RESULTS.md): the CUDA launcher's cubins from cuobjdump --dump-resource-usage, and
    the Triton kernels compiled in this process from their metadata."""
    result = section.setdefault("result", {})
    tool = find_cuobjdump()
    from pymaml._extension import extension as loaded_extension

    extension = loaded_extension()
    library = getattr(extension, "__file__", None)
    if tool is None or library is None:
        result["cuda"] = {"status": "skipped", "reason": "no cuobjdump" if tool is None else "no compiled extension"}
    else:
        completed = subprocess.run([tool, "--dump-resource-usage", library], capture_output=True, text=True,
                                   timeout=60, check=False)
        result["cuda"] = {"tool": tool, "rc": completed.returncode, "kernels": parse_resource_usage(completed.stdout),
                          "stderr": completed.stderr[-500:]}
    result["triton"] = triton_kernel_resources()
    for kernel in result["cuda"].get("kernels", []):
        print(f"  cuda sm_{kernel.get('arch')} {kernel['function'][:60]}: REG {kernel.get('reg')} SHARED "
              f"{kernel.get('shared')} STACK {kernel.get('stack')} LOCAL {kernel.get('local')}")
    for kernel in result["triton"]:
        print(f"  triton {kernel}")


def parse_resource_usage(text: str) -> list:
    """cuobjdump --dump-resource-usage: per function (and the arch of its cubin) REG, STACK,
    SHARED, LOCAL and the other counts it prints."""
    kernels, arch = [], None
    for line in text.splitlines():
        cubin = re.search(r"arch = sm_(\d+)", line) or re.search(r"\.sm_(\d+)\.cubin", line)
        if cubin:
            arch = cubin.group(1)
        if line.strip().startswith("Function "):
            kernels.append({"arch": arch, "function": line.strip()[len("Function "):].rstrip(":")})
        elif kernels and "REG:" in line:
            kernels[-1].update({key.lower(): int(value) for key, value in re.findall(r"\b([A-Z]+):(\d+)", line)})
    return kernels


def triton_kernel_resources() -> list:
    """n_regs, n_spills, shared memory and warps of every Triton kernel compiled in this process."""
    try:
        from triton.runtime.jit import JITFunction

        from pymaml.kernels import mlp_meta_step as module
    except ImportError as error:
        return [{"status": f"not importable: {error}"}]
    found = []
    for name, function in vars(module).items():
        if not isinstance(function, JITFunction) or not hasattr(function, "device_caches"):
            continue
        for device, caches in list(function.device_caches.items()):
            for compiled in list(caches[0].values()):
                metadata = getattr(compiled, "metadata", None)
                found.append({"kernel": name, "device": str(device), "n_regs": getattr(compiled, "n_regs", None),
                              "n_spills": getattr(compiled, "n_spills", None),
                              "shared": getattr(metadata, "shared", None),
                              "num_warps": getattr(metadata, "num_warps", None)})
    return found


def find_sanitizer(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    roots = [os.environ[v] for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    candidates = [os.path.join(root, "bin", "compute-sanitizer") for root in roots]
    candidates += sorted(glob.glob("/usr/local/cuda*/bin/compute-sanitizer"), reverse=True)
    candidates += sorted(glob.glob("/opt/nvidia/*/bin/compute-sanitizer"))
    return next((c for c in candidates if os.access(c, os.X_OK)), None)


def sanitizer_command(plan: Plan, executable: str | None, tool: str, backend: str) -> list:
    child = [sys.executable, os.path.abspath(__file__), "--child-meta-step", backend,
             *(["--dry-run"] if plan.dry_run else [])]
    options = ["--tool", tool, "--error-exitcode", str(SANITIZER_ERROR_EXIT), "--print-limit", "20",
               "--target-processes", "application-only"]
    if tool == "memcheck":
        options += ["--leak-check", "no"]
    if plan.fake_sanitizer:
        return [sys.executable, os.path.abspath(__file__), "--fake-sanitizer", *options, *child]
    return [executable, *options, *child]


class SanitizerRuns:
    """The sanitizer subprocesses, started together and collected later."""

    def __init__(self, plan: Plan, explicit: str | None):
        self.plan, self.runs = plan, []
        self.lock, self.cancelled = threading.Lock(), False
        self.unavailable = {}  # backend: why it cannot run here, so that no child runs it
        self.executable = None if plan.fake_sanitizer else find_sanitizer(explicit)
        self.skipped = None
        if not plan.fake_sanitizer and self.executable is None:
            self.skipped = ("compute-sanitizer is not on the PATH, nor under $CUDA_HOME/bin, /usr/local/cuda*/bin or "
                            "/opt/nvidia/*/bin")

    def start(self, warm: WarmUps) -> None:
        """Starts each backend's runs once the warm-up children of its configurations are done
        (a compile under the sanitizer would take its whole time box), in a thread per backend."""
        if self.skipped:
            return
        for backend in self.plan.backends:
            try:
                unavailable = pymaml.backends.get_backend(backend).unavailable_reason()
            except ValueError as error:
                unavailable = str(error)
            if unavailable is not None:
                self.unavailable[backend] = unavailable
                continue
            runs = [{"tool": tool, "backend": backend, "process": None, "started": threading.Event()}
                    for tool in self.plan.sanitizer_tools]
            self.runs += runs
            keys = [f"case/{name}/float32" for name in self.plan.child_case_names]
            threading.Thread(target=self._start_after, args=(warm, backend, keys, runs), daemon=True).start()

    def _start_after(self, warm: WarmUps, backend: str, keys: list, runs: list) -> None:
        for key in keys:
            warm.wait(backend, key, math.inf)
        environment = dict(os.environ, PYTHONUNBUFFERED="1",
                           # Without torch's caching allocator every tensor is its own allocation, so
                           # memcheck sees an access past a tensor's end (not only past a cached block's).
                           PYTORCH_NO_CUDA_MEMORY_CACHING="1")
        for run in runs:
            with self.lock:
                if self.cancelled:
                    return
                run["command"] = sanitizer_command(self.plan, self.executable, run["tool"], backend)
                run["log"] = tempfile.TemporaryFile(mode="w+")
                run["began"] = time.perf_counter()
                run["process"] = subprocess.Popen(run["command"], stdout=run["log"], stderr=subprocess.STDOUT,
                                                  env=environment, start_new_session=True)
            run["started"].set()
        for run in runs:
            threading.Thread(target=self._note_end, args=(run,), daemon=True).start()

    @staticmethod
    def _note_end(run: dict) -> None:
        run["process"].wait()
        run["ended"] = time.perf_counter()

    def collect(self, section: dict, results: Results, deadline: float) -> None:
        result = section.setdefault("result", {})
        result["executable"] = "fake (dry run)" if self.plan.fake_sanitizer else self.executable
        if self.skipped:
            result["skipped"] = self.skipped
            print(f"  skipped: {self.skipped}")
            return
        entries = result.setdefault("runs", [])
        if self.unavailable:
            result["backends_not_run"] = dict(self.unavailable)
            for backend, reason in self.unavailable.items():
                print(f"  {backend:9s} not run: {reason}")
        for run in self.runs:
            entry = {"tool": run["tool"], "backend": run["backend"]}
            try:
                started = run["started"].wait(timeout=max(0.1, deadline - time.perf_counter()))
            except TimeBox:
                started = False
            if not started:
                with self.lock:
                    self.cancelled = True
                    started = run["process"] is not None
            if not started:
                entry.update(rc=None, errors=None, warnings=None, child_ok=False, ok=False,
                             status="not started: its warm-up was still compiling at the time box")
                entries.append(entry)
                print(f"  {entry['tool']:10s} {entry['backend']:9s} {entry['status']}")
                continue
            entry["command"] = " ".join(run["command"])
            try:
                entry["rc"] = run["process"].wait(timeout=max(0.1, deadline - time.perf_counter()))
            except (subprocess.TimeoutExpired, TimeBox):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(run["process"].pid, signal.SIGKILL)
                run["process"].wait()
                entry["rc"] = None
                entry["timed_out"] = True
            entry["seconds"] = round(run.get("ended", time.perf_counter()) - run["began"], 1)
            run["log"].seek(0)
            output = run["log"].read()
            run["log"].close()
            entry.update(parse_sanitizer_output(output))
            entry["ok"] = (entry["rc"] == 0 and entry["errors"] == 0 and entry["child_ok"])
            entry["output_tail"] = output[-3000:]
            entries.append(entry)
            results.write()
            print(f"  {entry['tool']:10s} {entry['backend']:9s} rc={entry['rc']} errors={entry['errors']} "
                  f"{'ok' if entry['ok'] else 'FAILED'} ({entry['seconds']} s)")

    def kill(self) -> None:
        with self.lock:
            self.cancelled = True
        for run in self.runs:
            if run["process"] is not None and run["process"].poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(run["process"].pid, signal.SIGKILL)


def parse_sanitizer_output(output: str) -> dict:
    """compute-sanitizer's own count: 'ERROR SUMMARY: N errors', or racecheck's
    'RACECHECK SUMMARY: H hazards displayed (E errors, W warnings)'."""
    errors, warnings = None, None
    summary = re.search(r"ERROR SUMMARY: (\d+) error", output)
    if summary:
        errors = int(summary.group(1))
    race = re.search(r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) errors?, (\d+) warnings?\)", output)
    if race:
        errors, warnings = int(race.group(1)), int(race.group(2))
    return {"errors": errors, "warnings": warnings, "child_ok": CHILD_OK in output}


def timing_section(plan: Plan, results: Results, section: dict, deadline: float, warm) -> None:
    method = ("median of CUDA-event times of MAML.meta_gradient(accumulate=False), after the first call and two more"
              if plan.device == "cuda" else "median wall-clock time (CPU stand-in)")
    if plan.conv_workloads and plan.backends:
        method += (f"; in the conv rows `{plan.backends[0]}` is timed through its fused op alone (pymaml::meta_step, "
                   "as conv_correctness calls it)")
    result = section.setdefault("result", {"rows": [], "method": method})
    for workload in plan.workloads:
        row = {"workload": workload.name, "widths": list(workload.widths), "tasks": workload.tasks,
               "steps": workload.steps, "points": workload.points, "ms": {}, "first_call_s": {}, "reps": {},
               "notes": {}}
        result["rows"].append(row)
        for backend in [plan.baseline, *plan.backends]:
            if time.perf_counter() > deadline:
                row["notes"][backend] = "skipped: section time box"
                continue
            case = workload_case(workload)
            reason = backend_reason(backend, case, torch.float32, plan.device)
            if reason is not None:
                row["notes"][backend] = f"unsupported: {reason}"
                continue
            warm_up = warm.wait(backend, f"workload/{workload.name}", deadline)
            if warm_up == "still compiling":
                row["notes"][backend] = "skipped: its warm-up was still compiling at the time box"
                continue
            time_into_row(row, workload.name, backend, lambda: (*time_meta_gradient(plan, case, backend), None))
            results.write()
        add_speedups(row, plan.baseline)
    for case in plan.conv_workloads:
        conv_timing_row(plan, results, result, case, deadline)


def conv_timing_row(plan: Plan, results: Results, result: dict, case: ConvCase, deadline: float) -> None:
    """One timed conv meta-gradient in float32: the first backend through its fused op on the
    device's tensors (as conv_correctness calls it, past the backend's refusal of conv nets), the
    baseline and the other backends through MAML.meta_gradient where they take the network."""
    row = {"workload": case.name, "network": dataclasses.asdict(case.net), "tasks": case.tasks, "steps": case.steps,
           "first_order": case.first_order, "support_points": case.ways * case.shots,
           "query_points": case.ways * case.queries, "ms": {}, "first_call_s": {}, "reps": {}, "via": {}, "notes": {}}
    result["rows"].append(row)
    model = make_conv_model(case, torch.float32)
    batch = make_conv_batch(case, torch.float32)
    through_op = plan.backends[0] if plan.backends else None
    for backend in [plan.baseline, *plan.backends]:
        if time.perf_counter() > deadline:
            row["notes"][backend] = "skipped: section time box"
            continue
        if backend == through_op:
            implementation = pymaml.backends.get_backend(backend)
            reason = implementation.unavailable_reason()
        else:
            reason = backend_reason(backend, case, torch.float32, plan.device, model=model)
        if reason is not None:
            row["notes"][backend] = f"unsupported: {reason}"
            continue

        def measure(backend=backend):
            if backend == through_op:
                arguments, _ = conv_op_arguments(case, model, batch, plan.device)
                call = functools.partial(implementation.implementation().forward, *arguments)
                return (*time_calls(plan, call, deadline), "fused op (pymaml::meta_step)")
            maml = pymaml.MAML(copy.deepcopy(model).to(plan.device), inner_lr=case.inner_lr, inner_steps=case.steps,
                               first_order=case.first_order, loss=case.loss, backend=backend)
            call = functools.partial(maml.meta_gradient, *(t.to(plan.device) for t in batch), accumulate=False)
            return (*time_calls(plan, call, deadline), "MAML.meta_gradient")

        time_into_row(row, case.name, backend, measure)
        results.write()
    add_speedups(row, plan.baseline)


def time_into_row(row: dict, label: str, backend: str, measure) -> None:
    """measure() -> (median ms, first call s, reps, how it was called or None) into the row's
    entries for `backend`, or the error it raised into the row's notes."""
    try:
        median, first, reps, via = measure()
    except TimeBox:
        raise
    except Exception as error:  # noqa: BLE001
        row["notes"][backend] = f"error: {error_text(error)}"
        print(f"  {label:18s} {backend:9s} error: {error}")
        return
    row["ms"][backend], row["first_call_s"][backend], row["reps"][backend] = median, first, reps
    if via is not None:
        row["via"][backend] = via
    print(f"  {label:18s} {backend:9s} {median:9.3f} ms (first call {first:.1f} s, {reps} reps"
          f"{'; ' + via if via else ''})")


def add_speedups(row: dict, baseline_name: str) -> None:
    """The row's baseline time over each other backend's."""
    baseline = row["ms"].get(baseline_name)
    row["speedup_over_baseline"] = {b: baseline / ms for b, ms in row["ms"].items()
                                    if b != baseline_name and baseline and ms > 0}


def workload_case(workload: Workload) -> Case:
    """The meta-step a timed workload runs: ReLU, MSE, second order, float32."""
    return Case(workload.name, workload.widths, "relu", "mse", workload.steps, False, workload.tasks, workload.points,
                dtypes=("float32",), inner_lr=0.01)


def sinusoid_batch(case, device: str) -> list:
    if case.widths[0] == 1 and case.widths[-1] == 1:
        tasks = pymaml.data.Sinusoid(seed=0).sample(case.tasks, case.points).tasks
    else:
        tasks = make_batch(case, torch.float32)
    return [t.to(device=device, dtype=torch.float32) for t in tasks]


def time_meta_gradient(plan: Plan, case: Case, backend: str) -> tuple:
    """Median ms of one meta_gradient, the first call's seconds (compiles included), repetitions."""
    model = make_model(case, torch.float32).to(plan.device)
    maml = make_maml(case, model, backend)
    batch = sinusoid_batch(case, plan.device)
    return time_calls(plan, lambda: maml.meta_gradient(*batch, accumulate=False))


def time_calls(plan: Plan, step, deadline: float = math.inf) -> tuple:
    """Median ms of step(), the first call's seconds (compiles included), repetitions: after the
    first call and plan.timing_warm_calls more, until plan.timing_case_s has passed and at least 3
    ran (at most plan.timing_max_reps). No call starts that the previous one's time says would end
    past `deadline`, but for one repetition."""
    began = time.perf_counter()
    step()
    synchronize(plan.device)
    first = time.perf_counter() - began
    for _ in range(plan.timing_warm_calls):
        if time.perf_counter() + first > deadline:
            break
        step()
    synchronize(plan.device)
    times = []
    began = time.perf_counter()
    while len(times) < plan.timing_max_reps and (len(times) < 3 or time.perf_counter() - began < plan.timing_case_s):
        if times and time.perf_counter() + times[-1] / 1e3 > deadline:
            break
        if plan.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            tick = time.perf_counter()
            step()
            times.append((time.perf_counter() - tick) * 1e3)
    times.sort()
    return times[len(times) // 2], round(first, 3), len(times)


# ---------------------------------------------------------------------------------------------
# The sanitizer's child, and the dry run's fake sanitizer.


def child_cases(plan: Plan) -> list:
    """The sanitizer's small meta-steps: configurations of the correctness cases at 3 tasks (the
    same Triton specialization as theirs, so that the warm-up's compiles serve them too)."""
    return [dataclasses.replace(c, tasks=3) for c in plan.cases if c.name in plan.child_case_names]


def child_meta_step(plan: Plan, backend: str) -> int:
    """Small meta-steps of `backend`, meta_gradient and a meta_train_step (Adam) in every dtype it
    takes; prints CHILD_OK when every result is finite and at least one ran."""
    ran, reasons = 0, []
    for case in child_cases(plan):
        for dtype_name in case.dtypes:
            dtype = DTYPES[dtype_name]
            reason = backend_reason(backend, case, dtype, plan.device)
            if reason is not None:
                reasons.append(f"{case.name} {dtype_name}: {reason}")
                continue
            ran += 1
            model = make_model(case, dtype).to(plan.device)
            maml = make_maml(case, model, backend)
            batch = [t.to(plan.device) for t in make_batch(case, dtype)]
            out = maml.meta_gradient(*batch, accumulate=False)
            optimizer = torch.optim.Adam(maml.parameters(), lr=1e-3)
            out_train = maml.meta_train_step(*batch, optimizer)
            synchronize(plan.device)
            values = [out.loss, out.task_losses, out_train.loss,
                      *(p.grad for p in maml.parameters() if p.grad is not None)]
            if not all(bool(torch.isfinite(v).all()) for v in values):
                print(f"child: non-finite results on {backend} {case.name} {dtype_name}")
                return 1
            print(f"child: {backend} {case.name} {dtype_name} loss {float(out.loss):.6g}")
    if not ran:
        print(f"child: {backend} ran nothing: {'; '.join(reasons)}")
        return 1
    print(f"{CHILD_OK} {backend}")
    return 0


def fake_sanitizer(argv: list) -> int:
    """Stands in for compute-sanitizer in the dry run: skips its options, runs the command and
    prints the summary line compute-sanitizer prints, with no errors."""
    values = {"--tool", "--error-exitcode", "--print-limit", "--target-processes", "--leak-check"}
    index = 0
    while index < len(argv) and argv[index].startswith("--"):
        index += 2 if argv[index] in values else 1
    completed = subprocess.run(argv[index:], check=False)
    print("========= ERROR SUMMARY: 0 errors", flush=True)
    return completed.returncode


# ---------------------------------------------------------------------------------------------


def summarize(results: Results) -> list:
    """The failures of the run, one line each (empty when everything passed)."""
    failures = []
    sections = results.data["sections"]
    for name, section in sections.items():
        if section.get("status") not in ("ok", "not run"):
            failures.append(f"section {name}: {section.get('status')} {str(section.get('error', ''))[-200:]}")
    for name in ("correctness", "correctness_compiled"):
        correctness = sections.get(name, {}).get("result", {})
        failures += [f"oracle mismatch: {f}" for f in correctness.get("failures", [])]
        failures += [f"not checked: {e['backend']} {e['case']} {e['dtype']} ({e['reason']})"
                     for e in correctness.get("cases", []) if e.get("status") == "skipped"]
    conv = sections.get("conv_correctness", {}).get("result", {})
    failures += [f"conv mismatch: {f}" for f in conv.get("failures", [])]
    failures += [f"not checked: conv {e['backend']} {e['case']} {e['dtype']} ({e['reason']})"
                 for e in conv.get("cases", []) if e.get("status") == "skipped"]
    for backend, entry in sections.get("launches", {}).get("result", {}).items():
        op = entry.get("fused_op") if isinstance(entry, dict) else None
        if isinstance(op, dict) and "kernels" in op and results.data["mode"] == "gpu" and op["kernels"] != 1:
            failures.append(f"launches: {backend} fused op ran {op['kernels']} kernels")
    for row in sections.get("occupancy", {}).get("result", {}).get("rows", []):
        for label, setting in row.get("settings", {}).items():
            if setting.get("bitwise_equal") is False:
                failures.append(f"occupancy: {row['workload']} {label} changed the results")
    for run in sections.get("sanitizer", {}).get("result", {}).get("runs", []):
        if not run.get("ok"):
            failures.append(f"sanitizer {run['tool']} {run['backend']}: rc={run.get('rc')} errors={run.get('errors')}")
    return failures


def print_summary(results: Results, plan: Plan) -> None:
    sections = results.data["sections"]
    print("\n== summary")
    for name, section in sections.items():
        print(f"  {name:12s} {section.get('status')} ({section.get('elapsed_s', 0):.1f} s)")
    conv = sections.get("conv_correctness", {}).get("result", {})
    if "verdict" in conv:
        print(f"  conv: {conv['verdict']}")
    for backend, entry in sections.get("launches", {}).get("result", {}).items():
        counts = {k: v.get("kernels") for k, v in entry.items() if isinstance(v, dict)}
        print(f"  launches {backend}: {counts}")
    rows = sections.get("timing", {}).get("result", {}).get("rows", [])
    if rows:
        providers = [plan.baseline, *plan.backends]
        print("  | workload | " + " | ".join(f"{p} ms" for p in providers) + " | " +
              " | ".join(f"{plan.baseline} ÷ {b}" for b in plan.backends) + " |")
        for row in rows:
            cells = [f"{row['ms'][p]:.3f}" if p in row["ms"] else "-" for p in providers]
            ratios = [f"{row['speedup_over_baseline'][b]:.1f}" if b in row.get("speedup_over_baseline", {}) else "-"
                      for b in plan.backends]
            print(f"  | {row['workload']} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    failures = results.data["summary"]["failures"]
    print("  all checks passed" if not failures else "  FAILURES:\n    " + "\n    ".join(failures))
    print(f"  results: {results.path} ({results.data['elapsed_s']:.0f} s)")


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check_results", help="folder for gpu_check.json")
    parser.add_argument("--budget-s", type=float, default=285.0, help="total time box of the run")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--backends", default=None, help="comma-separated (default cuda,triton; dry run: cpp)")
    parser.add_argument("--baseline", default="func")
    parser.add_argument("--sanitizer", default=None, help="compute-sanitizer executable (default: searched)")
    parser.add_argument("--sanitizer-tools", default=",".join(SANITIZER_TOOLS))
    parser.add_argument("--dry-run", action="store_true", help="check this script on the CPU (see the docstring)")
    parser.add_argument("--child-meta-step", default=None, metavar="BACKEND", help=argparse.SUPPRESS)
    parser.add_argument("--child-warm", default=None, metavar="KEY", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.backends_given = args.backends is not None
    args.backends = [b for b in (args.backends or "cuda,triton").split(",") if b]
    args.sanitizer_tools = [t for t in args.sanitizer_tools.split(",") if t]
    unknown = [t for t in args.sanitizer_tools if t not in SANITIZER_TOOLS]
    if unknown:
        parser.error(f"unknown sanitizer tools {unknown}; choose from {SANITIZER_TOOLS}")
    args.sections = [s for s in args.sections.split(",") if s]
    if any(s not in SECTIONS for s in args.sections):
        parser.error(f"--sections takes {SECTIONS}")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--fake-sanitizer"]:
        return fake_sanitizer(argv[1:])
    args = parse_arguments(argv)
    plan = dry_plan(args) if args.dry_run else gpu_plan(args)
    if args.child_meta_step:
        return child_meta_step(plan, args.child_meta_step)
    if args.child_warm:
        return child_warm(plan, plan.backends[0], args.child_warm)
    os.makedirs(args.out, exist_ok=True)
    results = Results(os.path.join(args.out, RESULT_FILE), plan)
    results.data["command"] = " ".join([os.path.basename(__file__), *argv])
    began = time.perf_counter()
    deadline = began + args.budget_s
    if plan.watchdog:
        start_watchdog(results, args.budget_s + 10)
    warm = WarmUps(plan if "warmup" in args.sections else dataclasses.replace(plan, warm=[]))
    sanitizer = SanitizerRuns(plan, args.sanitizer) if "sanitizer" in args.sections else None
    try:
        warm.start()
        if "environment" in args.sections:
            run_section(results, "environment", plan.budgets["environment"],
                        lambda s: environment_section(plan, s), deadline)
        if sanitizer is not None:
            sanitizer.start(warm)
        oracles, baseline_errors = {}, {}
        compiled = compiled_backends(plan)
        for name, backends in (("correctness", [plan.baseline, *(b for b in plan.backends if b not in compiled)]),
                               ("occupancy", None), ("conv_correctness", None), ("correctness_compiled", compiled)):
            if name not in args.sections or (name == "correctness_compiled" and not compiled):
                continue
            box_end = min(deadline, time.perf_counter() + plan.budgets[name])
            if name == "occupancy":
                body = functools.partial(occupancy_section, plan, results, deadline=box_end - 1)
            elif name == "conv_correctness":
                body = functools.partial(conv_correctness_section, plan, results, deadline=box_end - 1)
            else:
                body = functools.partial(correctness_section, plan, results, deadline=box_end - 1, warm=warm,
                                         backends=backends, oracles=oracles, baseline_errors=baseline_errors)
            run_section(results, name, plan.budgets[name], lambda section, body=body: body(section=section),
                        deadline)
        if "launches" in args.sections:
            box_end = min(deadline, time.perf_counter() + plan.budgets["launches"])
            run_section(results, "launches", plan.budgets["launches"],
                        lambda s: launches_section(plan, results, s, warm, box_end - 1), deadline)
        if "resources" in args.sections:
            run_section(results, "resources", plan.budgets["resources"], lambda s: resources_section(plan, s), deadline)
        if sanitizer is not None:
            sanitizer_end = min(deadline, began + plan.budgets["sanitizer"])
            run_section(results, "sanitizer", max(1.0, sanitizer_end - time.perf_counter() + 5),
                        lambda s: sanitizer.collect(s, results, sanitizer_end), deadline)
        if "timing" in args.sections:
            box = min(plan.budgets["timing"], deadline - time.perf_counter())
            box_end = time.perf_counter() + box
            run_section(results, "timing", box, lambda s: timing_section(plan, results, s, box_end - 1, warm),
                        deadline)
        if "warmup" in args.sections:
            run_section(results, "warmup", 10, warm.collect, math.inf)
    finally:
        warm.kill()
        if sanitizer is not None:
            sanitizer.kill()
    failures = summarize(results)
    results.data["summary"] = {"ok": not failures, "failures": failures}
    results.data["finished"] = True
    results.write()
    print_summary(results, plan)
    return 0 if not failures else 2


if __name__ == "__main__":
    sys.exit(main())
