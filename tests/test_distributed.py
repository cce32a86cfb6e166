"""pymaml.distributed: meta-batches split over 2 CPU processes (gloo, launched by torchrun) give
the single-process meta-gradients, training trajectories and sinusoid runs.

Run as a script under torchrun (`python -m torch.distributed.run ... test_distributed.py OUT`),
this file is the worker: every rank computes the cases below and saves what it holds to
OUT/rank<r>.pt, which the tests compare with single-process runs of the same cases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import pymaml  # noqa: E402
from helpers import make_batch, make_mlp, relative_error  # noqa: E402
from pymaml import distributed  # noqa: E402
from pymaml.jobs.sinusoid import SinusoidConfig, train  # noqa: E402

REPOSITORY = Path(pymaml.__file__).resolve().parent.parent
WORLD_SIZE = 2
WIDTHS = (1, 8, 8, 1)
# Each rank builds its model from seed MODEL_SEED + rank: the wrap must broadcast rank 0's weights.
MODEL_SEED = 7
# name: (tasks T, MAML options); T = 5 splits unequally (3 + 2).
GRADIENT_CASES = {
    "even": (4, dict(inner_steps=2)),
    "uneven": (5, dict(inner_steps=2)),
    "learned_step_sizes": (5, dict(inner_steps=2, learn_inner_lr="per_layer_per_step", step_weights=[0.3, 0.7],
                                   backend="func")),
    "accumulate": (5, dict(inner_steps=1)),
}
TRAIN_STEPS, TRAIN_TASKS, TRAIN_LR = 20, 5, 1e-2
SINUSOID = dict(meta_batch=5, shots=4, inner_steps=1, progress=False, checkpoint_every=2)
# float64 through one all-reduce: the only difference from the single-process mean over tasks is
# the order of a few additions (~1e-16 each); Adam over 20 steps amplifies it little.
GRADIENT_TOLERANCE = 1e-12
TRAINING_TOLERANCE = 1e-10
# float32 sinusoid runs: the split changes the rounding of the task mean (~6e-8 relative) and a
# few Adam steps of lr 1e-3 carry it into the weights; measured ≤ 3e-8 after 20 iterations.
FLOAT32_WEIGHT_TOLERANCE = 1e-6


def _batch(tasks: int, seed: int):
    return make_batch(tasks, 4, WIDTHS[0], WIDTHS[-1], "mse", seed=seed)


def _maml(seed: int, options: dict) -> pymaml.MAML:
    return pymaml.MAML(make_mlp(WIDTHS, seed=seed), **options)


def _gradients(maml: pymaml.MAML) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in maml.parameters() if p.requires_grad])


def _weights(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in module.state_dict().values()])


def _worker(out: Path) -> None:
    context = distributed.init(device="cpu")
    assert context.is_distributed and context.backend == "gloo" and context.world_size == WORLD_SIZE
    results: dict = {"rank": context.rank}
    for name, (tasks, options) in GRADIENT_CASES.items():
        maml = _maml(MODEL_SEED + context.rank, options)
        trainer = distributed.DistributedMAML(maml, context)
        if name == "accumulate":
            for p in maml.parameters():
                p.grad = torch.ones_like(p)
        out_ = trainer.meta_gradient(*trainer.shard(_batch(tasks, seed=1)), accumulate=name == "accumulate")
        results[name] = dict(weights=_weights(maml), gradients=_gradients(maml), loss=out_.loss,
                             pre_adaptation_loss=out_.pre_adaptation_loss, num_tasks=out_.num_tasks,
                             local_tasks=out_.task_losses.numel())

    maml = _maml(MODEL_SEED + context.rank, dict(inner_steps=1))
    trainer = distributed.DistributedMAML(maml, context)
    optimizer = torch.optim.Adam(maml.parameters(), lr=TRAIN_LR)
    for step in range(TRAIN_STEPS):
        trainer.meta_train_step(*trainer.shard(_batch(TRAIN_TASKS, seed=100 + step)), optimizer)
    results["training"] = _weights(maml)

    # Each rank names its own checkpoint: rank 0 alone writes, the others get its state.
    checkpoint = out / f"checkpoint-rank{context.rank}.pt"
    train(SinusoidConfig(iterations=3, checkpoint=str(checkpoint), **SINUSOID), context)
    resumed = train(SinusoidConfig(iterations=6, checkpoint=str(checkpoint), **SINUSOID), context)
    results["sinusoid"] = dict(weights=_weights(resumed.maml.module), losses=resumed.losses,
                               resumed_from=resumed.resumed_from)
    report = pymaml.jobs.sinusoid.run(SinusoidConfig(iterations=2, eval_tasks=4, eval_points=5, **SINUSOID),
                                 out / f"run-rank{context.rank}", context)
    results["report_is_none"] = report is None

    # An error on one rank reaches every rank instead of leaving the others in a collective.
    trainer = distributed.DistributedMAML(_maml(MODEL_SEED, dict(inner_steps=1)), context)
    shard = list(trainer.shard(_batch(4, seed=3)))
    if context.rank == 1:
        shard[0] = shard[0].clone()
        shard[0][0, 0, 0] = float("nan")
    try:
        trainer.meta_gradient(*shard)
        results["nan_error"] = None
    except (ValueError, RuntimeError) as error:
        results["nan_error"] = f"{type(error).__name__}: {error}"
    damaged = out / "damaged.pt"
    if context.is_main:
        damaged.write_bytes(b"not a checkpoint")
    try:
        distributed.load_on_main(damaged, lambda path: torch.load(path, weights_only=True), context)
        results["damaged_error"] = None
    except RuntimeError as error:
        results["damaged_error"] = str(error)
    torch.save(results, out / f"rank{context.rank}.pt")
    context.close()


def _torchrun(arguments: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """2 processes on this machine; --standalone lets torchrun's own store take a free port, with no
    window in which another process could take a port probed here first."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD_SIZE),
               *arguments]
    path = os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("distributed")
    _torchrun([__file__, str(out)], cwd=out)
    return out, [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


def test_an_error_on_one_rank_reaches_every_rank(ranks):
    _, results = ranks
    assert results[1]["nan_error"].startswith("ValueError: support_x contains NaN or Inf")
    assert results[0]["nan_error"].startswith("RuntimeError: the meta-gradient failed on 1 other rank(s)")
    # rank 0 could not read the damaged checkpoint; both ranks raise its error
    assert results[0]["damaged_error"] == results[1]["damaged_error"]
    assert results[0]["damaged_error"].split(":")[0] in ("UnpicklingError", "RuntimeError", "EOFError")


@pytest.mark.parametrize("name", list(GRADIENT_CASES))
def test_meta_gradient_equals_the_single_process_one(ranks, name):
    _, results = ranks
    tasks, options = GRADIENT_CASES[name]
    maml = _maml(MODEL_SEED, options)
    initial = _weights(maml)
    if name == "accumulate":
        for p in maml.parameters():
            p.grad = torch.ones_like(p)
    out = maml.meta_gradient(*_batch(tasks, seed=1), accumulate=name == "accumulate")
    expected = _gradients(maml)
    for rank, result in enumerate(results):
        case = result[name]
        assert torch.equal(case["weights"], initial), f"rank {rank} did not get rank 0's weights"
        assert relative_error(case["gradients"], expected) <= GRADIENT_TOLERANCE, rank
        assert relative_error(case["loss"], out.loss) <= GRADIENT_TOLERANCE, rank
        assert relative_error(case["pre_adaptation_loss"], out.pre_adaptation_loss) <= GRADIENT_TOLERANCE, rank
        assert case["num_tasks"] == tasks
    # Every rank holds the same all-reduced gradient, so optimizer steps keep the weights equal.
    assert torch.equal(results[0][name]["gradients"], results[1][name]["gradients"])
    shares = [result[name]["local_tasks"] for result in results]
    assert shares == [len(distributed.shard_range(tasks, rank, WORLD_SIZE)) for rank in range(WORLD_SIZE)]


def test_learned_step_sizes_are_reduced(ranks):
    """The step sizes' gradients are part of the reduced vector: they differ from zero and from
    rank 0's own share."""
    _, results = ranks
    maml = _maml(MODEL_SEED, GRADIENT_CASES["learned_step_sizes"][1])
    step_sizes = maml.inner_lrs.numel()
    reduced = results[0]["learned_step_sizes"]["gradients"][-step_sizes:]
    maml.meta_gradient(*distributed.shard(_batch(5, seed=1), 0, WORLD_SIZE), accumulate=False)
    own_share = maml.inner_lrs.grad.reshape(-1)
    assert reduced.abs().min() > 0 and relative_error(reduced, own_share) > 1e-3


def test_twenty_adam_steps_give_the_single_process_weights(ranks):
    _, results = ranks
    maml = _maml(MODEL_SEED, dict(inner_steps=1))
    optimizer = torch.optim.Adam(maml.parameters(), lr=TRAIN_LR)
    initial = _weights(maml)
    for step in range(TRAIN_STEPS):
        maml.meta_train_step(*_batch(TRAIN_TASKS, seed=100 + step), optimizer)
    expected = _weights(maml)
    assert relative_error(expected, initial) > 1e-2  # the steps moved the weights
    for result in results:
        assert relative_error(result["training"], expected) <= TRAINING_TOLERANCE
    assert torch.equal(results[0]["training"], results[1]["training"])


def test_sinusoid_training_resumes_and_rank_zero_alone_writes(ranks):
    out, results = ranks
    expected = train(SinusoidConfig(iterations=6, **SINUSOID))
    for result in results:
        sinusoid = result["sinusoid"]
        assert sinusoid["resumed_from"] == 3 and len(sinusoid["losses"]) == 3
        assert relative_error(sinusoid["weights"], _weights(expected.maml.module)) <= FLOAT32_WEIGHT_TOLERANCE
        assert relative_error(torch.tensor(sinusoid["losses"]), torch.tensor(expected.losses[3:])) <= 1e-5
    assert torch.equal(results[0]["sinusoid"]["weights"], results[1]["sinusoid"]["weights"])
    assert (out / "checkpoint-rank0.pt").exists() and not (out / "checkpoint-rank1.pt").exists()
    assert [result["report_is_none"] for result in results] == [False, True]
    assert sorted(path.name for path in (out / "run-rank0").iterdir()) == ["report.json", "sinusoid.png"]
    assert not (out / "run-rank1").exists()
    report = json.loads((out / "run-rank0" / "report.json").read_text())
    assert report["world_size"] == WORLD_SIZE and report["distributed_backend"] == "gloo"


def test_sinusoid_command_under_torchrun_equals_the_single_process_run(tmp_path):
    options = ["--iterations", "10", "--meta-batch", "5", "--shots", "4", "--eval-tasks", "4", "--eval-points", "5",
               "--threads", "1", "--checkpoint-every", "5"]
    result = _torchrun(["-m", "pymaml", "sinusoid", *options, "--out", str(tmp_path / "out"),
                        "--checkpoint", str(tmp_path / "ck.pt")], cwd=tmp_path)
    assert result.stdout.count("paper K=5") == 1  # rank 0 alone prints the summary
    assert "split over 2 ranks (gloo)" in result.stdout
    assert result.stderr.count("meta-train [") >= 1 and "2 ranks" in result.stderr  # rank 0's progress bar
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    expected = train(SinusoidConfig(iterations=10, meta_batch=5, shots=4, progress=False))
    assert report["iterations"] == 10 and report["world_size"] == WORLD_SIZE
    assert abs(report["final_running_loss"] - expected.final_loss) <= 1e-5 * expected.final_loss
    checkpoint = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert checkpoint["iteration"] == 10
    weights = torch.cat([t.reshape(-1).double() for t in checkpoint["model"].values()])
    assert relative_error(weights, _weights(expected.maml.module)) <= FLOAT32_WEIGHT_TOLERANCE


def test_shards_cover_the_batch_once_and_differ_by_at_most_one():
    for tasks in range(1, 12):
        for world_size in range(1, tasks + 1):
            ranges = [distributed.shard_range(tasks, rank, world_size) for rank in range(world_size)]
            assert [t for r in ranges for t in r] == list(range(tasks))
            sizes = [len(r) for r in ranges]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_shard_slices_every_tensor_and_keeps_named_tuples():
    batch = pymaml.data.Sinusoid(seed=0).sample(tasks=5, shots=3)
    second = distributed.shard(batch, 1, 2)
    assert type(second) is type(batch)
    assert torch.equal(second.support_x, batch.support_x[3:]) and torch.equal(second.phase, batch.phase[3:])
    assert torch.equal(distributed.shard(batch.query_y, 0, 2), batch.query_y[:3])


def test_shard_errors():
    with pytest.raises(ValueError, match="the meta-batch has 3 tasks but there are 4 ranks"):
        distributed.shard(torch.zeros(3, 2, 1), 0, 4)
    with pytest.raises(ValueError, match="task dimension.*differs"):
        distributed.shard((torch.zeros(4, 2), torch.zeros(5, 2)), 0, 2)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\)"):
        distributed.shard_range(4, 2, 2)
    with pytest.raises(TypeError, match="batch element 1 is a list"):
        distributed.shard((torch.zeros(4, 2), [1, 2]), 0, 2)


def _without_launch(monkeypatch):
    for name in distributed.LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_without_torchrun_init_gives_a_single_process_context(monkeypatch):
    _without_launch(monkeypatch)
    context = distributed.init(device="cpu")
    assert not context.is_distributed and context.is_main and context.world_size == 1
    assert not torch.distributed.is_initialized()
    maml = _maml(MODEL_SEED, dict(inner_steps=1))
    trainer = distributed.DistributedMAML(maml, context)
    batch = _batch(5, seed=1)
    assert all(torch.equal(part, whole) for part, whole in zip(context.shard(batch), batch))
    out = trainer.meta_gradient(*batch, accumulate=False)
    gradients = _gradients(maml)
    expected = maml.meta_gradient(*batch, accumulate=False)
    assert torch.equal(gradients, _gradients(maml)) and torch.equal(out.loss, expected.loss)
    assert out.num_tasks == 5 and out.world_size == 1


def test_errors_name_the_problem(monkeypatch):
    _without_launch(monkeypatch)
    maml = _maml(MODEL_SEED, dict(inner_steps=1))
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        distributed.DistributedMAML(maml)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        distributed.meta_gradient(maml, *_batch(2, seed=1))
    with pytest.raises(ValueError, match="rank 0 has no tasks"):
        distributed.meta_gradient(maml, *[t[:0] for t in _batch(2, seed=1)], context=distributed.DistributedContext())
    with pytest.raises(ValueError, match="unknown torch.distributed backend 'mpl'"):
        distributed.init(backend="mpl")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(RuntimeError, match="lacks LOCAL_RANK, MASTER_ADDR, MASTER_PORT"):
        distributed.init(device="cpu")
    for name, value in (("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")):
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="nccl needs CUDA tensors but the device is cpu"):
        distributed.init(backend="nccl", device="cpu")
    assert not torch.distributed.is_initialized()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
