"""Sinusoid tasks, the training job's checkpoints, and the CLI end to end."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pymaml
from pymaml.data import Sinusoid
from pymaml.jobs.sinusoid import SinusoidConfig, train


def test_sinusoid_shapes_ranges_and_function():
    batch = Sinusoid(seed=3).sample(tasks=200, shots=7, queries=11)
    assert batch.support_x.shape == (200, 7, 1) and batch.query_x.shape == (200, 11, 1)
    assert batch.support_y.shape == (200, 7, 1) and batch.query_y.shape == (200, 11, 1)
    assert batch.support_x.dtype == torch.float32
    assert 0.1 <= batch.amplitude.min() and batch.amplitude.max() <= 5.0
    assert 0.0 <= batch.phase.min() and batch.phase.max() <= math.pi
    x = torch.cat([batch.support_x, batch.query_x], 1)
    assert -5.0 <= x.min() and x.max() <= 5.0
    expected = batch.amplitude[:, None, None] * torch.sin(batch.query_x.double() - batch.phase[:, None, None])
    assert torch.allclose(batch.query_y.double(), expected, rtol=0, atol=1e-5)
    # the draws cover the ranges, not a corner of them
    assert batch.amplitude.max() - batch.amplitude.min() > 4.0 and batch.phase.max() - batch.phase.min() > 2.5


def test_sinusoid_is_seeded():
    first, second, other = Sinusoid(seed=5).sample(4, 3), Sinusoid(seed=5).sample(4, 3), Sinusoid(seed=6).sample(4, 3)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first.support_x, other.support_x)


def test_sinusoid_rejects_bad_sizes():
    with pytest.raises(ValueError, match="shots must be a positive integer"):
        Sinusoid().sample(3, 0)


def _weights(checkpoint: Path) -> dict:
    return torch.load(checkpoint, weights_only=True)["model"]


def test_resumed_run_ends_with_the_same_weights(tmp_path):
    common = dict(meta_batch=5, shots=4, inner_steps=2, progress=False, checkpoint_every=3)
    uninterrupted = tmp_path / "whole.pt"
    train(SinusoidConfig(iterations=8, checkpoint=str(uninterrupted), **common))
    resumed = tmp_path / "resumed.pt"
    first = train(SinusoidConfig(iterations=5, checkpoint=str(resumed), **common))
    assert first.iterations_done == 5
    assert torch.load(resumed, weights_only=True)["iteration"] == 5
    second = train(SinusoidConfig(iterations=8, checkpoint=str(resumed), **common))
    assert second.resumed_from == 5 and len(second.losses) == 3
    whole, parts = _weights(uninterrupted), _weights(resumed)
    assert whole.keys() == parts.keys()
    assert all(torch.equal(whole[name], parts[name]) for name in whole)
    initial = train(SinusoidConfig(iterations=0, **common)).maml.module.state_dict()
    assert not torch.equal(initial["0.weight"], whole["0.weight"])


def test_checkpoint_with_other_settings_is_refused(tmp_path):
    path = tmp_path / "run.pt"
    train(SinusoidConfig(iterations=2, meta_batch=3, shots=2, checkpoint=str(path), progress=False))
    with pytest.raises(ValueError, match="differ from this run"):
        train(SinusoidConfig(iterations=4, meta_batch=3, shots=3, checkpoint=str(path), progress=False))


def test_checkpoint_is_written_atomically(tmp_path, monkeypatch):
    """A failure while saving leaves the previous checkpoint intact."""
    path = tmp_path / "run.pt"
    config = dict(meta_batch=3, shots=2, checkpoint=str(path), progress=False, checkpoint_every=1)
    train(SinusoidConfig(iterations=2, **config))
    before = path.read_bytes()

    def failing_save(state, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        train(SinusoidConfig(iterations=3, **config))
    assert path.read_bytes() == before


def _cli(*arguments, cwd):
    command = shutil.which("pymaml")
    argv = [command] if command else [sys.executable, "-m", "pymaml"]
    return subprocess.run([*argv, *arguments], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _refuse(constant):
    raise ValueError(f"{constant} is not JSON")


def test_cli_sinusoid_end_to_end(tmp_path):
    out = tmp_path / "out"
    result = _cli("sinusoid", "--iterations", "30", "--eval-tasks", "20", "--out", str(out),
                  "--checkpoint", str(tmp_path / "ck.pt"), "--checkpoint-every", "10", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "paper K=5" in result.stdout and "0.67" in result.stdout
    assert "meta-train" in result.stderr  # the progress bar
    report = json.loads((out / "report.json").read_text(), parse_constant=_refuse)
    assert report["iterations"] == 30 and report["iterations_run"] == 30
    assert report["backend"] in report["backend_choice"]
    for shots in ("K=5", "K=10"):
        mse = report["evaluation"][shots]["mse"]
        assert set(mse) == {str(s) for s in range(11)}
        assert all(math.isfinite(v) and v > 0 for v in mse.values())
        assert mse["1"] != mse["0"]  # adaptation changed the predictions
        medians, diverged = report["evaluation"][shots]["median"], report["evaluation"][shots]["diverged"]
        assert set(medians) == set(mse) and all(0 <= diverged[s] <= 20 for s in diverged)
    png = (out / report["figure"]).read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert torch.load(tmp_path / "ck.pt", weights_only=True)["iteration"] == 30


def test_python_dash_m_and_backends_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pymaml", "backends"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "func: usable" in result.stdout and "reference: usable" in result.stdout
    assert '"extension"' in result.stdout


def test_cli_rejects_bad_arguments(tmp_path):
    result = _cli("sinusoid", "--inner-steps", "-1", cwd=tmp_path)
    assert result.returncode == 2 and "must be an integer >= 0" in result.stderr
    result = _cli("sinusoid", "--iterations", "1", "--backend", "nope", "--out", str(tmp_path), cwd=tmp_path)
    assert result.returncode != 0 and "unknown backend 'nope'" in result.stderr


def test_evaluation_counts_diverged_tasks():
    """A step size far too large for the support loss's curvature makes tasks diverge; the report says how many."""
    from pymaml.jobs.sinusoid import evaluate

    torch.manual_seed(0)
    stable = evaluate(pymaml.MAML(pymaml.models.sinusoid_mlp(), inner_lr=0.001), seed=3, tasks=20, points=10)
    unstable = evaluate(pymaml.MAML(pymaml.models.sinusoid_mlp(), inner_lr=3.0), seed=3, tasks=20, points=10)
    assert stable[5]["diverged"][10] == 0 and stable[5]["median"][10] < 50
    assert unstable[5]["diverged"][10] > 0
