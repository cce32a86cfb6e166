"""The Omniglot job (pymaml.jobs.omniglot) end to end on a generated miniature of the dataset."""

import json

import pytest
import torch

from pymaml.jobs.omniglot import PAPER_ACCURACY, OmniglotConfig, paper_defaults, run, summary, train
from pymaml.data import Omniglot
from test_omniglot import write_tree


def config_for(root, **changes):
    # First order keeps these runs short; the second-order meta-gradient is tested elsewhere.
    settings = dict(root=str(root), ways=5, shots=1, iterations=3, meta_batch=3, eval_tasks=7, image_size=14,
                    train_characters=4, first_order=True, progress=False)
    return OmniglotConfig(**{**settings, **changes})


def test_paper_defaults():
    five, twenty = OmniglotConfig(root="x"), OmniglotConfig(root="x", ways=20, shots=5)
    assert (five.inner_lr, five.inner_steps, five.test_steps, five.meta_batch, five.queries) == (0.4, 1, 3, 32, 1)
    assert (twenty.inner_lr, twenty.inner_steps, twenty.test_steps, twenty.meta_batch) == (0.1, 5, 5, 16)
    assert paper_defaults(5)["inner_lr"] == 0.4 and five.iterations == 60000 and five.eval_tasks == 600


def test_job_trains_evaluates_and_reports(tmp_path):
    write_tree(tmp_path / "data")
    report = run(config_for(tmp_path / "data"), tmp_path / "out")
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert written == json.loads(json.dumps(report))
    assert report["iterations"] == 3 and report["train_classes"] == 16 and report["test_classes"] == 12
    assert report["evaluation"]["tasks"] == 7 and 0 <= report["evaluation"]["accuracy"] <= 100
    assert report["paper_maml_accuracy"] == {"accuracy": PAPER_ACCURACY[(5, 1)][0], "ci95": PAPER_ACCURACY[(5, 1)][1]}
    assert "paper (MAML, Table 1): 98.7%" in summary(report)


def test_resumed_run_ends_with_the_same_weights(tmp_path):
    write_tree(tmp_path / "data")
    data = Omniglot(tmp_path / "data", "train", image_size=14, train_characters=4)
    whole = train(config_for(tmp_path / "data", iterations=4), data)
    checkpoint = tmp_path / "run.pt"
    train(config_for(tmp_path / "data", iterations=2, checkpoint=str(checkpoint), checkpoint_every=1), data)
    resumed = train(config_for(tmp_path / "data", iterations=4, checkpoint=str(checkpoint)), data)
    assert resumed.resumed_from == 2 and resumed.iterations_done == 4
    for a, b in zip(whole.maml.module.state_dict().values(), resumed.maml.module.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="differ from this run's"):
        train(config_for(tmp_path / "data", iterations=5, checkpoint=str(checkpoint), inner_lr=0.2), data)


COMMAND = ["omniglot", "--ways", "5", "--shots", "1", "--iterations", "3", "--meta-batch", "4", "--eval-tasks", "6",
           "--image-size", "14", "--train-characters", "4", "--first-order", "--threads", "1", "--no-progress"]


def test_command_end_to_end_and_under_torchrun(tmp_path):
    """`pymaml omniglot` in this process, then split over 2 torchrun processes: the same training
    losses, one report from rank 0."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from pymaml.jobs import cli

    write_tree(tmp_path / "data")
    assert cli.main([*COMMAND, "--root", str(tmp_path / "data"), "--out", str(tmp_path / "one")]) == 0
    single = json.loads((tmp_path / "one" / "report.json").read_text())
    assert single["world_size"] == 1 and single["iterations"] == 3
    repository = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(repository), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "pymaml", *COMMAND, "--root", str(tmp_path / "data"),
                             "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    split = json.loads((tmp_path / "two" / "report.json").read_text())
    assert split["world_size"] == 2 and split["distributed_backend"] == "gloo"
    assert abs(split["final_running_loss"] - single["final_running_loss"]) <= 1e-5 * abs(single["final_running_loss"])
    assert result.stdout.count("paper (MAML, Table 1)") == 1
