"""bench/gpu_check.py's logic, checked on the CPU through its --dry-run (the GPU backends' CPU
stand-ins, tiny sizes, a fake compute-sanitizer), and bench/record_gpu_results.py on its output."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import math
import stat
import sys
import time
from pathlib import Path

import pytest
import torch

import pymaml
from pymaml.backends.cpp import CppBackend, mlp_only_reason
from pymaml.backends.reference import ReferenceBackend
from pymaml.ops.meta_step import NATIVE_IMPLEMENTATION, FusedImplementation

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


gpu_check = load("gpu_check")
record_gpu_results = load("record_gpu_results")


class ScaledLossBackend(ReferenceBackend):
    """A deliberately wrong backend: the oracle's meta-loss times 1.001, so every gradient is 0.1% off."""

    name = "wrong"

    def meta_step(self, model, config, batch, inner_lr, step_weights):
        out = super().meta_step(model, config, batch, inner_lr, step_weights)
        out.loss = out.loss * 1.001
        return out


class ScaledGradientOpBackend(CppBackend):
    """A deliberately wrong fused op: cpp's, with the meta-gradient 0.1% too large and the losses right."""

    name = "wrong_op"

    def implementation(self):
        def forward(*arguments, **options):
            meta_loss, task_losses, pre_losses, step_losses, grad_theta, grad_lrs = NATIVE_IMPLEMENTATION.forward(
                *arguments, **options)
            return meta_loss, task_losses, pre_losses, step_losses, grad_theta * 1.001, grad_lrs

        return FusedImplementation(forward, NATIVE_IMPLEMENTATION.op)


# Stands in for compute-sanitizer: skips its options, runs the command, and reports one error for
# initcheck (exit status --error-exitcode) and none for the other tools, as compute-sanitizer prints.
FAKE_SANITIZER = """#!/bin/sh
tool=""
while [ "${1#--}" != "$1" ]; do
  case "$1" in
    --tool) tool="$2"; shift 2 ;;
    --error-exitcode|--print-limit|--target-processes|--leak-check) shift 2 ;;
    *) shift ;;
  esac
done
"$@"
status=$?
if [ "$tool" = initcheck ]; then
  echo "========= Uninitialized __global__ memory read of size 4 bytes"
  echo "========= ERROR SUMMARY: 1 error"
  exit 86
fi
echo "========= ERROR SUMMARY: 0 errors"
exit $status
"""


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run with the cpp stand-in and the wrong backend, the oracle's backend as the
    baseline (func's, the default, is slow on the CPU); its exit status and JSON."""
    folder = tmp_path_factory.mktemp("gpu_check")
    sanitizer = folder / "fake-compute-sanitizer"
    sanitizer.write_text(FAKE_SANITIZER)
    sanitizer.chmod(sanitizer.stat().st_mode | stat.S_IXUSR)
    patch = pytest.MonkeyPatch()
    patch.setitem(pymaml.backends.BACKENDS, "wrong", ScaledLossBackend())
    try:
        status = gpu_check.main(["--dry-run", "--out", str(folder), "--backends", "cpp,wrong", "--baseline",
                                 "reference", "--sanitizer", str(sanitizer), "--sanitizer-tools", "memcheck,initcheck"])
    finally:
        patch.undo()
    with open(folder / gpu_check.RESULT_FILE) as f:
        return status, json.load(f)


def test_dry_run_runs_every_section_into_one_file(dry_run):
    status, data = dry_run
    assert data["schema"] == gpu_check.SCHEMA_VERSION and data["mode"] == "dry-run" and data["finished"]
    assert list(data["sections"]) == list(gpu_check.SECTIONS)
    assert {name: s["status"] for name, s in data["sections"].items()} == {name: "ok" for name in gpu_check.SECTIONS}
    assert status == 2 and data["summary"]["ok"] is False  # the wrong backend and the initcheck error
    environment = data["sections"]["environment"]["result"]
    assert environment["build_info"] == pymaml.build_info()
    assert set(environment["backends"]) >= {"cuda", "triton", "cpp", "func", "reference"}


def test_correctness_numbers_are_measured_and_a_wrong_backend_is_flagged(dry_run):
    _, data = dry_run
    sections = data["sections"]
    # cpp stands in for the compiled backend (it has warm-ups) and runs in the second section.
    assert [e["backend"] for e in sections["correctness_compiled"]["result"]["cases"]] == ["cpp"] * len(
        sections["correctness_compiled"]["result"]["cases"])
    result = {key: sections["correctness"]["result"][key] + sections["correctness_compiled"]["result"][key]
              for key in ("cases", "failures")}
    plan_cases = gpu_check.dry_plan(gpu_check.parse_arguments(["--dry-run"])).cases
    expected = {(case.name, dtype) for case in plan_cases for dtype in case.dtypes}
    by_backend = {}
    for entry in result["cases"]:
        assert entry["status"] == "ran", entry
        by_backend.setdefault(entry["backend"], {})[(entry["case"], entry["dtype"])] = entry
    assert set(by_backend) == {"reference", "cpp", "wrong"}
    for backend, entries in by_backend.items():
        assert set(entries) == expected, backend
    for (case, dtype), entry in by_backend["cpp"].items():
        assert entry["tolerance"] == gpu_check.TOLERANCE[dtype]
        assert entry["ok"] and 0 <= entry["max_error"] <= entry["tolerance"], entry
        assert entry["max_error"] == max(entry["errors"].values())
        if dtype == "float32":  # float32 against the float64 oracle: a real, non-zero rounding error
            assert entry["max_error"] > 0, entry
        assert math.isfinite(entry["baseline_max_error"])
    for entry in by_backend["wrong"].values():
        assert not entry["ok"] and entry["errors"]["loss"] == pytest.approx(1e-3, rel=1e-3), entry
        assert entry["errors"]["grads"] == pytest.approx(1e-3, rel=1e-3), entry
    assert sorted(result["failures"]) == sorted(f"wrong {case} {dtype}" for case, dtype in expected)
    assert [f for f in data["summary"]["failures"] if "oracle" in f] == [f"oracle mismatch: {f}" for f in
                                                                         result["failures"]]


def test_launches_count_every_event_of_each_call(dry_run):
    _, data = dry_run
    result = data["sections"]["launches"]["result"]
    for what in ("fused_op", "meta_gradient", "meta_train_step"):
        counted = result["cpp"][what]
        assert counted["kernels"] == sum(counted["kernel_names"].values()) > 0, counted
        assert counted["goal_one_kernel"] == (counted["kernels"] == 1)
    assert "no attribute 'implementation'" in result["wrong"]["fused_op"]["error"]  # it has no fused op
    assert result["wrong"]["meta_gradient"]["kernels"] > 0


def test_sanitizer_runs_each_tool_on_each_backend_and_reports_errors(dry_run):
    _, data = dry_run
    runs = {(r["tool"], r["backend"]): r for r in data["sections"]["sanitizer"]["result"]["runs"]}
    assert set(runs) == {(tool, backend) for tool in ("memcheck", "initcheck") for backend in ("cpp", "wrong")}
    clean = runs["memcheck", "cpp"]
    assert clean["ok"] and clean["rc"] == 0 and clean["errors"] == 0 and clean["child_ok"]
    found = runs["initcheck", "cpp"]
    assert not found["ok"] and found["rc"] == gpu_check.SANITIZER_ERROR_EXIT and found["errors"] == 1
    assert found["child_ok"] and "Uninitialized" in found["output_tail"]
    # The child process does not know the test's backend: its failure is a failed run, not a pass.
    assert not runs["memcheck", "wrong"]["ok"] and not runs["memcheck", "wrong"]["child_ok"]
    failures = data["summary"]["failures"]
    assert any(f.startswith("sanitizer initcheck cpp") for f in failures)
    assert not any(f.startswith("sanitizer memcheck cpp") for f in failures)


def test_timing_has_a_median_per_backend_and_the_ratio_to_the_baseline(dry_run):
    _, data = dry_run
    rows = data["sections"]["timing"]["result"]["rows"]
    plan = gpu_check.dry_plan(gpu_check.parse_arguments(["--dry-run"]))
    assert plan.conv_workloads
    assert [row["workload"] for row in rows] == [w.name for w in plan.workloads] + [c.name for c in
                                                                                     plan.conv_workloads]
    for row in rows:
        assert set(row["ms"]) == {"reference", "cpp", "wrong"} and all(ms > 0 for ms in row["ms"].values()), row
        assert all(reps >= 3 for reps in row["reps"].values())
        assert row["speedup_over_baseline"]["cpp"] == pytest.approx(row["ms"]["reference"] / row["ms"]["cpp"])
    # The conv rows time the first backend's fused op alone, the others through MAML.
    for row in rows[len(plan.workloads):]:
        assert row["via"] == {"cpp": "fused op (pymaml::meta_step)", "reference": "MAML.meta_gradient",
                              "wrong": "MAML.meta_gradient"}, row
        assert row["network"]["kind"] == "conv4" and row["notes"] == {}
    assert "conv rows `cpp` is timed through its fused op" in data["sections"]["timing"]["result"]["method"]


def test_occupancy_sweeps_launch_settings_and_compares_results_bitwise(dry_run):
    _, data = dry_run
    result = data["sections"]["occupancy"]["result"]
    plan = gpu_check.dry_plan(gpu_check.parse_arguments(["--dry-run"]))
    assert result["backend"] == "cpp"
    assert [row["workload"] for row in result["rows"]] == [w.name for w in plan.occupancy_workloads]
    for row in result["rows"]:
        assert list(row["settings"]) == [f"threads={n}" for n in plan.occupancy_threads]
        for setting in row["settings"].values():
            assert setting["ms"] > 0 and setting["bitwise_equal"] is True, setting


def test_warm_up_children_run_each_planned_configuration_first(dry_run):
    _, data = dry_run
    plan = gpu_check.dry_plan(gpu_check.parse_arguments(["--dry-run", "--backends", "cpp,wrong"]))
    runs = data["sections"]["warmup"]["result"]["runs"]
    assert [(r["backend"], r["key"]) for r in runs] == plan.warm
    for run in runs:
        assert run["status"] == "ok" and f"warmed {run['backend']} {run['key']}" in run["output_tail"], run
    waited = [e for e in data["sections"]["correctness_compiled"]["result"]["cases"] if e.get("warm_up") is not None]
    assert [(e["backend"], f"case/{e['case']}/{e['dtype']}") for e in waited] == [plan.warm[0]]
    assert waited[0]["warm_up"] == "ok"


def test_record_gpu_results_renders_the_dry_run(dry_run):
    _, data = dry_run
    text = record_gpu_results.markdown(data)
    assert text.startswith("## GPU check (dry run on the CPU")
    for heading in ("### Against the oracle", "### Against the oracle: the compiled backends",
                    "### Kernel launches per call", "### Kernel resources",
                    "### Launch settings", "### compute-sanitizer", "### Meta-gradient time"):
        assert heading in text
    for entry in data["sections"]["correctness"]["result"]["cases"] + \
            data["sections"]["correctness_compiled"]["result"]["cases"]:
        verdict = "ok" if entry["ok"] else "**WRONG**"
        assert f"| {entry['case']} | {entry['dtype']} | `{entry['backend']}` |" in text
        assert f"{record_gpu_results._error(entry['errors']['grads'])} | {entry['tolerance']:.1e}" in text
        assert text.count(verdict) >= 1
    assert "| initcheck | `cpp` | 86 | 1 |" in text and "**FAILED**" in text
    for row in (data["sections"]["timing"]["result"]["rows"][0], data["sections"]["timing"]["result"]["rows"][-1]):
        cells = [row["workload"], row["tasks"], row["steps"], f"{row['ms']['reference']:.3f}",
                 f"{row['ms']['cpp']:.3f}"]
        assert "| " + " | ".join(str(c) for c in cells) + " |" in text
    assert "conv_correctness: ok" in text
    assert "Verdict: " in text and "oracle mismatch: wrong" in text


def test_conv_correctness_checks_each_conv_case_through_the_fused_op_against_the_oracle(dry_run):
    _, data = dry_run
    section = data["sections"]["conv_correctness"]
    result = section["result"]
    plan = gpu_check.dry_plan(gpu_check.parse_arguments(["--dry-run"]))
    expected = [(case.name, dtype) for case in plan.conv_cases for dtype in case.dtypes]
    assert section["status"] == "ok" and result["backend"] == "cpp"  # the first backend, cuda's stand-in
    assert [(e["case"], e["dtype"]) for e in result["cases"]] == expected
    for entry in result["cases"]:
        assert entry["status"] == "ran" and entry["backend"] == "cpp", entry
        assert set(entry["errors"]) == {"loss", "task_losses", "grads"}
        assert entry["tolerance"] == gpu_check.TOLERANCE[entry["dtype"]]
        assert entry["ok"] and 0 <= entry["max_error"] <= entry["tolerance"], entry
        assert entry["max_error"] == max(entry["errors"].values()) and entry["oracle_grad_norm"] > 0
        if entry["dtype"] == "float32":  # float32 against the float64 oracle: a real, non-zero rounding error
            assert entry["max_error"] > 0, entry
        # On the CPU the device's op is the CPU kernel itself: the same numbers, bit for bit.
        assert entry["difference_from_cpu_kernel"] == 0 and entry["cpu_kernel_max_error"] == entry["max_error"]
    assert result["passed"] == [f"{case} {dtype}" for case, dtype in expected]
    assert result["failures"] == [] and result["all_passed"] is True
    assert result["verdict"] == f"{len(expected)} of {len(expected)} conv cases within tolerance on cpp's fused op"
    assert result["gate"] == {"stack": None, "conv4": None}  # cpp runs conv nets
    assert not any("conv" in f for f in data["summary"]["failures"])


def test_the_gpu_plan_checks_the_conv_networks_the_cuda_gate_waits_for():
    plan = gpu_check.gpu_plan(gpu_check.parse_arguments([]))
    cases = plan.conv_cases
    assert {c.net for c in cases} == {gpu_check.CONV_STACK, gpu_check.OMNIGLOT_CONV4}
    assert gpu_check.OMNIGLOT_CONV4 == gpu_check.ConvNet("conv4", 1, 28, 64)
    assert {(c.net.kind, c.steps, c.first_order, dtype) for c in cases for dtype in c.dtypes} == {
        (kind, steps, first_order, dtype) for kind in ("stack", "conv4") for steps in (1, 2)
        for first_order in (False, True) for dtype in ("float64", "float32")}
    for case in cases:
        assert (case.tasks, case.ways, case.shots, case.loss) == (4, 5, 1, "cross_entropy") and 2 <= case.queries <= 5
    assert [c.blocks for c in cases if c.blocks is not None] == [2]  # fewer blocks than tasks
    conv4 = next(c for c in cases if c.net.kind == "conv4")
    assert sum(p.numel() for p in gpu_check.make_conv_model(conv4, torch.float32).parameters()) == 113221
    stack = gpu_check.make_conv_model(next(c for c in cases if c.net.kind == "stack"), torch.float32)
    assert [type(m) for m in stack] == [torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.ReLU, torch.nn.MaxPool2d,
                                        torch.nn.Flatten, torch.nn.Linear]
    assert stack[0].bias is not None and stack[0].padding == (1, 1) and not stack[1].track_running_stats
    (w3,) = plan.conv_workloads
    assert (w3.net, w3.tasks, w3.queries, w3.steps, w3.first_order, w3.dtypes) == (
        gpu_check.OMNIGLOT_CONV4, 32, 15, 1, False, ("float32",))
    # The section records the backend's own verdict beside its checks: the gate is still in place.
    assert gpu_check.conv_gate("cuda", conv4, "cuda") == mlp_only_reason("cuda")
    assert gpu_check.conv_gate("cpp", conv4, "cpu") is None


def test_a_wrong_fused_op_on_a_conv_net_is_flagged(tmp_path, monkeypatch):
    monkeypatch.setitem(pymaml.backends.BACKENDS, "wrong_op", ScaledGradientOpBackend())
    plan = gpu_check.dry_plan(gpu_check.parse_arguments(["--dry-run", "--backends", "wrong_op"]))
    case = dataclasses.replace(plan.conv_cases[0], dtypes=("float64",))
    plan = dataclasses.replace(plan, conv_cases=[case])
    results = gpu_check.Results(str(tmp_path / gpu_check.RESULT_FILE), plan)
    section = results.section("conv_correctness")
    gpu_check.conv_correctness_section(plan, results, section, deadline=time.perf_counter() + 60)
    result = section["result"]
    (entry,) = result["cases"]
    assert entry["status"] == "ran" and not entry["ok"], entry
    assert entry["errors"]["grads"] == pytest.approx(1e-3, rel=1e-3) and entry["errors"]["loss"] <= 1e-10
    assert entry["cpu_kernel_max_error"] <= 1e-10 and entry["difference_from_cpu_kernel"] == pytest.approx(1e-3)
    assert result["failures"] == [f"wrong_op {case.name} float64"] and result["passed"] == []
    assert result["all_passed"] is False
    section["status"] = "ok"
    assert gpu_check.summarize(results) == [f"conv mismatch: wrong_op {case.name} float64"]


def test_a_conv_case_with_fewer_blocks_than_tasks_launches_that_many(monkeypatch):
    ops = importlib.import_module("pymaml.ops.meta_step.cuda")
    calls = []

    class FakeExtension:
        def meta_step_cuda(self, **arguments):
            calls.append(arguments)

    monkeypatch.setattr(ops, "extension", lambda: FakeExtension())
    plan = gpu_check.gpu_plan(gpu_check.parse_arguments([]))
    (case,) = [c for c in plan.conv_cases if c.blocks is not None]
    sizes = (case.tasks, 132, 4096, 64, 1 << 30)
    with gpu_check.conv_launch(plan, case.blocks):
        blocks = ops.cuda_blocks(*sizes)
        ops.extension().meta_step_cuda(blocks=blocks, threads_per_block=64)
    with gpu_check.conv_launch(plan, None):
        ops.extension().meta_step_cuda(blocks=ops.cuda_blocks(*sizes))
    # The block count is forced where the op sizes its workspace; the thread count is the op's own.
    assert case.blocks < case.tasks
    assert calls == [{"blocks": case.blocks, "threads_per_block": 64}, {"blocks": case.tasks}]
    dry = gpu_check.dry_plan(gpu_check.parse_arguments(["--dry-run"]))
    previous = torch.get_num_threads()
    with gpu_check.conv_launch(dry, 1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == previous


def test_timing_starts_no_call_that_would_end_past_the_deadline():
    plan = gpu_check.dry_plan(gpu_check.parse_arguments(["--dry-run"]))
    calls = []

    def step():
        calls.append(time.perf_counter())
        time.sleep(0.05)

    _, _, reps = gpu_check.time_calls(plan, step, deadline=time.perf_counter() + 0.12)
    assert reps == 1 and len(calls) == 2  # the first call and one repetition
    calls.clear()
    _, first, reps = gpu_check.time_calls(plan, step)
    assert reps == plan.timing_max_reps == 3 and len(calls) == 4 and first >= 0.05


def test_a_section_past_its_time_box_keeps_its_partial_results(tmp_path):
    plan = gpu_check.dry_plan(gpu_check.parse_arguments(["--dry-run"]))
    results = gpu_check.Results(str(tmp_path / gpu_check.RESULT_FILE), plan)

    def body(section):
        section["result"] = {"partial": 1}
        time.sleep(30)

    gpu_check.run_section(results, "slow", 0.2, body, time.perf_counter() + 60)
    gpu_check.run_section(results, "next", 5, lambda section: section.setdefault("result", {"ran": True}),
                          time.perf_counter() + 60)
    with open(results.path) as f:
        written = json.load(f)["sections"]
    assert written["slow"]["status"] == "timeout" and written["slow"]["result"] == {"partial": 1}
    assert written["next"] == {**written["next"], "status": "ok", "result": {"ran": True}}


def test_a_failing_section_is_recorded_and_the_next_one_runs(tmp_path):
    plan = gpu_check.dry_plan(gpu_check.parse_arguments(["--dry-run"]))
    results = gpu_check.Results(str(tmp_path / gpu_check.RESULT_FILE), plan)

    def body(section):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    gpu_check.run_section(results, "broken", 5, body, time.perf_counter() + 60)
    gpu_check.run_section(results, "next", 5, lambda section: None, time.perf_counter() + 60)
    assert results.data["sections"]["broken"]["status"] == "error"
    assert "illegal memory access" in results.data["sections"]["broken"]["error"]
    assert results.data["sections"]["next"]["status"] == "ok"


# meta_step_kernel<float> and <double> (csrc/cuda/meta_step_cuda.cu), as cuobjdump names them.
FLOAT_KERNEL = "_ZN6pymaml16meta_step_kernelIfEEvNS_7NetworkENS_13MetaStepShapeENS_9MetaBatchIT_EENS_10MetaResultIS5_EEPS5_PjPi"
DOUBLE_KERNEL = FLOAT_KERNEL.replace("kernelIf", "kernelId")


def test_cuobjdump_resource_usage_is_parsed_per_kernel_and_arch():
    text = f"""
Fatbin elf code:
================
arch = sm_80
code version = [1,7]
host = linux
compile_size = 64bit

Resource usage:
 Common:
  GLOBAL:0
 Function {FLOAT_KERNEL}:
  REG:96 STACK:16 SHARED:1 LOCAL:0 CONSTANT[0]:1544 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin elf code:
================
arch = sm_90
code version = [1,7]

Resource usage:
 Function {DOUBLE_KERNEL}:
  REG:128 STACK:32 SHARED:1 LOCAL:8 CONSTANT[0]:1544 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    kernels = gpu_check.parse_resource_usage(text)
    assert [(k["arch"], k["function"], k["reg"], k["stack"], k["shared"], k["local"]) for k in kernels] == [
        ("80", FLOAT_KERNEL, 96, 16, 1, 0),
        ("90", DOUBLE_KERNEL, 128, 32, 1, 8)]


def test_sanitizer_summaries_are_parsed():
    clean = gpu_check.parse_sanitizer_output(f"{gpu_check.CHILD_OK} cuda\n========= ERROR SUMMARY: 0 errors\n")
    assert clean == {"errors": 0, "warnings": None, "child_ok": True}
    race = gpu_check.parse_sanitizer_output("========= RACECHECK SUMMARY: 3 hazards displayed (2 errors, 1 warning)\n")
    assert race == {"errors": 2, "warnings": 1, "child_ok": False}
    assert gpu_check.parse_sanitizer_output("Segmentation fault\n")["errors"] is None


class StillCompiling:
    """A warm-up whose child has not finished by the time box."""

    def wait(self, backend, key, deadline):
        return "still compiling"


def test_a_case_whose_warm_up_is_still_compiling_is_skipped_and_reported_as_not_checked(tmp_path):
    plan = gpu_check.dry_plan(gpu_check.parse_arguments(["--dry-run"]))
    case = plan.cases[0]
    result = {"cases": [], "failures": []}
    gpu_check.correctness_case(plan, case, "float32", "cpp", result, {}, {}, StillCompiling(), time.perf_counter() + 60)
    (entry,) = result["cases"]
    assert entry["status"] == "skipped" and "still compiling" in entry["reason"] and "errors" not in entry
    results = gpu_check.Results(str(tmp_path / gpu_check.RESULT_FILE), plan)
    results.data["sections"]["correctness"] = {"status": "ok", "result": result}
    assert gpu_check.summarize(results) == [f"not checked: cpp {case.name} float32 ({entry['reason']})"]


def test_a_launch_setting_that_changes_the_results_is_a_failure(tmp_path):
    plan = gpu_check.dry_plan(gpu_check.parse_arguments(["--dry-run"]))
    results = gpu_check.Results(str(tmp_path / gpu_check.RESULT_FILE), plan)
    results.data["sections"]["occupancy"] = {"status": "ok", "result": {"rows": [
        {"workload": "w1_T25_S1", "settings": {"threads=128": {"ms": 1.0, "bitwise_equal": True},
                                               "threads=256": {"ms": 0.8, "bitwise_equal": False}}}]}}
    assert gpu_check.summarize(results) == ["occupancy: w1_T25_S1 threads=256 changed the results"]


def test_cuda_launch_overrides_the_launchers_block_size_and_count(monkeypatch):
    ops = importlib.import_module("pymaml.ops.meta_step.cuda")
    calls = []

    class FakeExtension:
        def meta_step_cuda(self, **arguments):
            calls.append(arguments)

        build_info = "passed through"

    monkeypatch.setattr(ops, "extension", lambda: FakeExtension())
    own_blocks = ops.cuda_blocks
    sizes = (25, 132, 4096, 64, 1 << 30)  # tasks, SMs, per-block and per-task bytes, limit
    with gpu_check.cuda_launch(256, 528):
        # The op sizes its workspace from cuda_blocks, so the forced count must come from there.
        assert ops.cuda_blocks(*sizes) == 528
        ops.extension().meta_step_cuda(theta="θ", blocks=528, threads_per_block=128)
        assert ops.extension().build_info == "passed through"
    assert ops.cuda_blocks is own_blocks and ops.cuda_blocks(*sizes) == 25
    with gpu_check.cuda_launch(64, None):
        assert ops.cuda_blocks is own_blocks
        ops.extension().meta_step_cuda(theta="θ", blocks=25)
    with gpu_check.cuda_launch(None, 2):
        assert ops.cuda_blocks(*sizes) == 2
        ops.extension().meta_step_cuda(theta="θ", blocks=2, threads_per_block=128)
    assert calls == [{"theta": "θ", "blocks": 528, "threads_per_block": 256},
                     {"theta": "θ", "blocks": 25, "threads_per_block": 64},
                     {"theta": "θ", "blocks": 2, "threads_per_block": 128}]
    assert isinstance(ops.extension(), FakeExtension) and ops.cuda_blocks is own_blocks  # restored


def test_bitwise_equal_compares_bits():
    x = torch.tensor([1.0, float("nan"), -0.0])
    assert gpu_check.bitwise_equal(x, x.clone()) and gpu_check.bitwise_equal(torch.tensor(2.0), torch.tensor(2.0))
    assert not gpu_check.bitwise_equal(x, torch.tensor([1.0, float("nan"), 0.0]))  # -0.0 and 0.0 differ in a bit
    assert not gpu_check.bitwise_equal(x, x.double()) and not gpu_check.bitwise_equal(x, x[:2])
