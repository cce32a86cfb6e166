"""MAML-TRPO split over 2 CPU processes (gloo, launched by torchrun) keeps the policy of the
single-process run: the meta-learned and the multi-task TRPO steps in float64, and `pymaml rl`
with its checkpoint, resume and files written by rank 0 alone.

Run as a script under torchrun (`python -m torch.distributed.run ... test_rl_distributed.py OUT`),
this file is the worker: every rank runs the cases below and saves what it holds to
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
from helpers import TOLERANCE, relative_error  # noqa: E402
from pymaml import distributed  # noqa: E402
from pymaml.rl import GaussianMLPPolicy, MetaTRPO, Navigation2D, TRPOSettings  # noqa: E402

REPOSITORY = Path(pymaml.__file__).resolve().parent.parent
WORLD_SIZE = 2
# T = 5 tasks split unequally over the ranks (3 + 2); short trajectories keep the run quick.
TASKS, TRAJECTORIES, HORIZON, ITERATIONS = 5, 3, 4, 2
# Conjugate gradient on the nearly singular Fisher matrix of the paper's damping (1e-5) amplifies
# rounding differences, here those of the sums over tasks taken in another order, far beyond the
# float64 tolerance; with this damping the system is well conditioned and the comparison tight.
CG_DAMPING = 1.0
JOB_OPTIONS = ["--iterations", "2", "--meta-batch", "3", "--trajectories", "3", "--eval-tasks", "2",
               "--eval-steps", "1", "--horizon", "4", "--checkpoint-every", "1", "--no-progress", "--threads", "1"]
FLOAT64 = TOLERANCE[torch.float64]
FLOAT32 = TOLERANCE[torch.float32]


def trpo_run(multitask: bool, context: distributed.DistributedContext | None = None) -> dict:
    """ITERATIONS TRPO steps of a small float64 policy on navigation tasks: the policy's parameters
    and every iteration's statistics."""
    torch.manual_seed(11)
    policy = GaussianMLPPolicy(2, 2, hidden=(8, 8), initial_std=0.5).double()
    env = Navigation2D(horizon=HORIZON)
    settings = TRPOSettings(max_kl=0.05, cg_iterations=5, cg_damping=CG_DAMPING)
    trainer = MetaTRPO(policy, env, settings, TRAJECTORIES, multitask=multitask, context=context)
    tasks_generator, sampling_generator = torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)
    stats = []
    for _ in range(ITERATIONS):
        step = trainer.step(env.sample_tasks(TASKS, tasks_generator, dtype=torch.float64), sampling_generator)
        stats.append((step.pre_return, step.post_return, step.accepted, step.backtracks, step.kl))
    weights = torch.cat([p.detach().reshape(-1) for p in policy.parameters()])
    return {"weights": weights, "stats": stats, "sampling_state": sampling_generator.get_state()}


def job_arguments(out: Path, name: str, rank: int, iterations: int, checkpoint: bool = True) -> list[str]:
    """`pymaml rl` options writing into folders of this rank, so that the test sees which ranks wrote."""
    options = list(JOB_OPTIONS)
    options[options.index("--iterations") + 1] = str(iterations)
    options += ["--out", str(out / f"{name}-rank{rank}")]
    return ["rl", *options, *(["--checkpoint", str(out / f"ck-rank{rank}.pt")] if checkpoint else [])]


def worker(out: Path) -> None:
    from pymaml.jobs.cli import main

    context = distributed.init(backend="gloo", device="cpu")
    torch.set_num_threads(1)
    results = {name: trpo_run(multitask, context) for name, multitask in (("meta", False), ("multitask", True))}
    # Two iterations at once; one iteration, then resumed to two from rank 0's checkpoint.
    results["exits"] = [main(job_arguments(out, "whole", context.rank, 2, checkpoint=False)),
                        main(job_arguments(out, "first", context.rank, 1)),
                        main(job_arguments(out, "resumed", context.rank, 2))]
    torch.save(results, out / f"rank{context.rank}.pt")
    context.close()


def _torchrun(arguments: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """2 processes on this machine; --standalone lets torchrun's own store take a free port."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD_SIZE),
               *arguments]
    path = os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, list[dict]]:
    out = tmp_path_factory.mktemp("rl-distributed")
    result = _torchrun([__file__, str(out)], cwd=out)
    return out, result, [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


@pytest.mark.parametrize("name,multitask", [("meta", False), ("multitask", True)])
def test_trpo_split_over_two_ranks_keeps_the_single_process_policy(ranks, name, multitask):
    """Every rank ends with the single-process policy (float64, up to the reassociation of the
    sums over tasks), reports the same statistics and leaves the noise stream where it is."""
    _, _, results = ranks
    expected = trpo_run(multitask)
    for rank in range(WORLD_SIZE):
        got = results[rank][name]
        assert relative_error(got["weights"], expected["weights"]) <= FLOAT64
        assert torch.equal(got["sampling_state"], expected["sampling_state"])
        for (pre, post, accepted, backtracks, kl), (pre_1, post_1, accepted_1, backtracks_1, kl_1) in zip(
                got["stats"], expected["stats"], strict=True):
            assert (accepted, backtracks) == (accepted_1, backtracks_1)
            for value, reference in ((pre, pre_1), (post, post_1), (kl, kl_1)):
                assert abs(value - reference) <= FLOAT64 * max(1.0, abs(reference))
    assert torch.equal(results[0][name]["weights"], results[1][name]["weights"])
    assert any(accepted for _, _, accepted, _, _ in expected["stats"])  # the policy did move


def test_rl_command_under_torchrun_resumes_and_rank_0_alone_writes(ranks, tmp_path):
    """`pymaml rl` split over 2 ranks: rank 0 alone writes the checkpoint, report.json and the
    figure and prints the summary, and the run resumed from its checkpoint equals the run in one go.
    (The job's float32 policy and the paper's CG damping make its trained policy too sensitive to
    the order of the sums for a tight comparison with one process; the float64 test above makes it.)"""
    from pymaml.jobs.rl import RLConfig, run

    out, result, results = ranks
    assert [r["exits"] for r in results] == [[0, 0, 0], [0, 0, 0]]
    assert result.stdout.count("split over 2 ranks (gloo)") == 3  # rank 0's summaries alone
    for name in ("whole", "first", "resumed"):
        assert sorted(path.name for path in (out / f"{name}-rank0").iterdir()) == ["navigation2d.png", "report.json"]
        assert not (out / f"{name}-rank1").exists()
    assert (out / "ck-rank0.pt").exists() and not (out / "ck-rank1.pt").exists()
    assert torch.load(out / "ck-rank0.pt", weights_only=True)["iteration"] == 2
    whole, resumed = (json.loads((out / f"{name}-rank0" / "report.json").read_text()) for name in ("whole", "resumed"))
    assert resumed["world_size"] == WORLD_SIZE and resumed["distributed_backend"] == "gloo"
    assert resumed["resumed_from"] == 1 and resumed["iterations_run"] == 1
    strip = lambda history: [{k: v for k, v in h.items() if not k.startswith("seconds")} for h in history]  # noqa: E731
    assert strip(resumed["history"]) == strip(whole["history"])
    assert resumed["evaluation"] == whole["evaluation"]
    # Before any TRPO step the split run samples what one process samples.
    single = run(RLConfig(iterations=1, meta_batch=3, trajectories=3, eval_tasks=2, eval_steps=1, horizon=4,
                          progress=False), tmp_path / "single")
    reference = single["history"][0]["pre_return"]
    assert abs(whole["history"][0]["pre_return"] - reference) <= FLOAT32 * max(1.0, abs(reference))
    assert whole["evaluation"]["random"] == single["evaluation"]["random"]


def test_rl_job_refuses_more_ranks_than_tasks():
    from pymaml.jobs.rl import RLConfig, train
    from pymaml.jobs.training import JobError

    context = distributed.DistributedContext(rank=0, world_size=4, backend=None)
    with pytest.raises(JobError, match="the meta-batch has 3 tasks but there are 4 ranks"):
        train(RLConfig(iterations=1, meta_batch=3, progress=False), context)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
