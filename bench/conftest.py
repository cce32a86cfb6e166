"""Benchmarks run single-threaded unless PYMAML_BENCH_THREADS says otherwise, so providers compare like with like."""

import os

import pytest
import torch

# JAX (a peer in bench/providers.py) reads its thread settings when it is first imported.
if os.environ.get("PYMAML_BENCH_THREADS", "1") == "1":
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")


@pytest.fixture(autouse=True)
def bench_threads(benchmark):
    previous = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("PYMAML_BENCH_THREADS", "1")))
    benchmark.extra_info["threads"] = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def pytest_sessionfinish(session, exitstatus):
    """After a timed run, store its medians and rewrite bench/RESULTS.md's tables and the charts
    (bench/report.py). Smoke runs (--benchmark-disable) write nothing; so does
    PYMAML_BENCH_NO_REPORT=1."""
    benchmark_session = getattr(session.config, "_benchmarksession", None)
    if (benchmark_session is None or benchmark_session.disabled or not benchmark_session.benchmarks
            or os.environ.get("PYMAML_BENCH_NO_REPORT") == "1"):
        return
    import report

    import pymaml

    machine_info = dict(benchmark_session.get_machine_info())
    levels = pymaml.build_info().get("cpu_levels") or []
    if levels:
        machine_info["pymaml_cpu_level"] = levels[0]  # the best level this CPU runs
    output_json = session.config.hook.pytest_benchmark_generate_json(
        config=session.config, benchmarks=benchmark_session.benchmarks, include_data=False,
        machine_info=machine_info, commit_info={})
    report.record_run(output_json, report.installed_versions())
    for path in report.write_report():
        print(f"\nbench/report.py wrote {path}")
