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
