"""Benchmarks run single-threaded unless PYMAML_BENCH_THREADS says otherwise, so providers compare like with like."""

import os

import pytest
import torch


def pytest_configure(config):
    torch.set_num_threads(int(os.environ.get("PYMAML_BENCH_THREADS", "1")))


@pytest.fixture(autouse=True)
def _record_threads(benchmark):
    benchmark.extra_info["threads"] = torch.get_num_threads()
