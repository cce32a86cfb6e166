"""Benchmarks run single-threaded unless PYMAML_BENCH_THREADS says otherwise, so providers compare like with like."""

import os

import pytest
import torch


@pytest.fixture(autouse=True)
def bench_threads(benchmark):
    previous = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("PYMAML_BENCH_THREADS", "1")))
    benchmark.extra_info["threads"] = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)
