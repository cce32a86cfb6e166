"""The few-shot job (pymaml.jobs.fewshot, `pymaml fewshot --dataset ...`) end to end on generated
MiniImagenet pickles and CIFAR-100 archives (tiny images and models), and its Omniglot alias."""

import json

import pytest
import torch
from PIL import Image
from torch.func import functional_call

from pymaml.data import CIFARFS, MiniImagenet, cifar100
from pymaml.jobs import cli
from pymaml.jobs.fewshot import (BATCH_NORM_AT_TEST, BEST_CHECKPOINT, FIGURE, OMNIGLOT_TRAJECTORY, VAL_SEED_OFFSET,
                                 FewShotConfig, accuracy, make_maml, paper_accuracy, run, sampler, summary, train)
from pymaml.jobs.omniglot import OmniglotConfig
from pymaml.jobs.training import JobError, load_checkpoint, save_checkpoint
from helpers import TOLERANCE
import test_datasets
from test_datasets import write_cifar100, write_pickles
from test_omniglot import write_tree

# Tiny runs: 16-pixel MiniImagenet, 4 filters, one inner step, one query per class (the generated
# data sets have 2 or 3 images per class).
TINY = dict(ways=5, shots=1, queries=1, meta_batch=2, inner_steps=1, test_steps=2, filters=4, eval_tasks=5,
            val_tasks=3, progress=False)
TINY_FLAGS = ["--ways", "5", "--shots", "1", "--queries", "1", "--meta-batch", "2", "--inner-steps", "1",
              "--test-steps", "2", "--filters", "4", "--eval-tasks", "5", "--val-tasks", "3", "--threads", "1",
              "--no-progress"]


@pytest.fixture
def mini_root(tmp_path, monkeypatch):
    monkeypatch.setattr(MiniImagenet, "IMAGES_PER_CLASS", test_datasets.PER_CLASS)
    root = tmp_path / "miniimagenet"
    root.mkdir()
    write_pickles(root)
    return root


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar100._CIFAR100Split, "IMAGES_PER_CLASS",
                        {"train": test_datasets.TRAIN_PER_CLASS, "test": test_datasets.TEST_PER_CLASS})
    root = tmp_path / "cifar"
    write_cifar100(root)
    return root


def mini_config(root, **changes):
    return FewShotConfig(**{**dict(root=str(root), dataset="miniimagenet", image_size=16, **TINY), **changes})


def test_paper_protocol_per_dataset():
    one, five = FewShotConfig(root="x", dataset="miniimagenet"), FewShotConfig(root="x", dataset="miniimagenet",
                                                                                shots=5)
    assert (one.inner_lr, one.inner_steps, one.test_steps, one.meta_batch, one.queries) == (0.01, 5, 10, 4, 15)
    assert (five.meta_batch, five.queries, one.iterations, one.eval_tasks) == (2, 15, 60000, 600)
    assert (one.filters, one.image_size, one.in_channels, one.rotations) == (32, 84, 3, None)
    model = make_maml(one).module
    convolutions = [m for m in model if isinstance(m, torch.nn.Conv2d)]
    assert len(convolutions) == 4 and all(c.stride == (1, 1) and c.out_channels == 32 for c in convolutions)
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model) == 4 and convolutions[0].in_channels == 3
    assert model[-1].in_features == 32 * 5 * 5  # 84 → 42 → 21 → 10 → 5
    for dataset in ("cifarfs", "fc100"):
        config = FewShotConfig(root="x", dataset=dataset)
        assert (config.filters, config.image_size, config.inner_lr, config.test_steps, config.queries) == (
            32, 32, 0.01, 10, 15)
        assert make_maml(config).module[-1].in_features == 32 * 2 * 2
        assert paper_accuracy(dataset, 5, 1, False) is None
    omniglot = OmniglotConfig(root="x")
    assert (omniglot.filters, omniglot.image_size, omniglot.in_channels, omniglot.queries) == (64, 28, 1, 1)
    assert (omniglot.train_characters, omniglot.val_characters, omniglot.validates) == (1200, 0, False)
    assert paper_accuracy("miniimagenet", 5, 1, False) == ("MAML, Table 1", 48.70, 1.84)
    assert paper_accuracy("miniimagenet", 5, 5, False)[1:] == (63.11, 0.92)
    assert paper_accuracy("miniimagenet", 5, 1, True) == ("MAML (first order approx.), Table 1", 48.07, 1.75)
    assert paper_accuracy("miniimagenet", 5, 5, True)[1:] == (63.15, 0.91)


def test_settings_that_do_not_apply_are_refused():
    with pytest.raises(ValueError, match="unknown few-shot data set 'imagenet'"):
        FewShotConfig(root="x", dataset="imagenet")
    with pytest.raises(ValueError, match="CIFAR-FS images are 32×32; image_size must be 32, got 16"):
        FewShotConfig(root="x", dataset="cifarfs", image_size=16)
    with pytest.raises(ValueError, match="val_characters applies to Omniglot only"):
        FewShotConfig(root="x", dataset="miniimagenet", val_characters=10)
    with pytest.raises(ValueError, match="val_characters must be at least 0 and fewer than the 1200"):
        OmniglotConfig(root="x", val_characters=1200)


def test_miniimagenet_command_end_to_end(mini_root, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["fewshot", "--dataset", "miniimagenet", "--root", str(mini_root), "--image-size", "16",
                     "--iterations", "4", "--val-every", "2", "--out", str(out), *TINY_FLAGS]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["dataset"] == "miniimagenet" and report["iterations"] == 4
    assert (report["train_classes"], report["val_classes"], report["test_classes"]) == (64, 16, 20)
    assert report["evaluation"]["tasks"] == 5 and 0 <= report["evaluation"]["accuracy"] <= 100
    protocol = report["protocol"]
    assert protocol["batch_norm_at_test"] == BATCH_NORM_AT_TEST and protocol["test_steps"] == 2
    assert protocol["model"].startswith("Conv4: 4 × [3×3 conv, 4 filters, BatchNorm, ReLU, 2×2 max-pool]")
    assert protocol["deviations_from_paper"]["image_size"] == [16, 84]
    assert protocol["deviations_from_paper"]["filters"] == [4, 32]
    assert protocol["deviations_from_paper"]["meta_batch"] == [2, 4]
    curve = report["accuracy_curve"]
    assert curve["iteration"] == [2, 4] and len(curve["train_accuracy"]) == len(curve["val_accuracy"]) == 2
    assert curve["best_accuracy"] == max(curve["val_accuracy"])
    assert curve["best_iteration"] == curve["iteration"][curve["val_accuracy"].index(curve["best_accuracy"])]
    assert report["validation"]["classes"] == "the 16 published validation classes"
    assert report["validation"]["best_checkpoint"] == str(out / BEST_CHECKPOINT)
    assert report["paper_maml_accuracy"] == {"accuracy": 48.70, "ci95": 1.84}
    assert "paper (MAML, Table 1): 48.70% ± 1.84%" in printed and f"wrote {out / 'report.json'}" in printed
    with Image.open(out / FIGURE) as figure:
        assert figure.format == "PNG" and figure.size[0] > 100
    best = torch.load(out / BEST_CHECKPOINT, weights_only=True)
    assert best["iteration"] == curve["best_iteration"]


def test_best_checkpoint_holds_the_weights_of_the_best_validation_accuracy(mini_root, tmp_path):
    config = mini_config(mini_root, iterations=6, val_every=1)
    train_set, val_set = (MiniImagenet(mini_root, split, image_size=16) for split in ("train", "val"))
    best_path = tmp_path / "best.pt"
    result = train(config, train_set, val_set=val_set, best_checkpoint=best_path)
    history = result.history
    assert history["iteration"] == [1, 2, 3, 4, 5, 6] and len(history["val_accuracy"]) == 6
    best = load_checkpoint(best_path, config, job_keys=("next_task",))
    first_best = history["val_accuracy"].index(max(history["val_accuracy"]))
    assert best["iteration"] == history["best_iteration"] == first_best + 1
    maml = make_maml(config)
    maml.module.load_state_dict(best["model"])
    measured = accuracy(maml, config, sampler(config, val_set, VAL_SEED_OFFSET), config.val_tasks)
    assert measured["accuracy"] == history["best_accuracy"]


@pytest.mark.parametrize("dataset", ["miniimagenet", "cifarfs"])
def test_killed_and_resumed_run_equals_the_uninterrupted_one(dataset, request, tmp_path):
    """N iterations in one go, and k iterations then a resume to N: the same weights, optimizer
    state and accuracy curve, bit for bit."""
    if dataset == "miniimagenet":
        root = request.getfixturevalue("mini_root")
        config = mini_config(root, val_every=1)
        train_set, val_set = (MiniImagenet(root, split, image_size=16) for split in ("train", "val"))
    else:
        root = request.getfixturevalue("cifar_root")
        config = FewShotConfig(root=str(root), dataset=dataset, **{**TINY, "queries": 2}, val_every=1)
        train_set, val_set = (CIFARFS(root, split) for split in ("train", "val"))

    def with_changes(**changes):
        return FewShotConfig(**{**vars(config), **changes})

    uninterrupted = tmp_path / "whole.pt"
    whole = train(with_changes(iterations=4, checkpoint=str(uninterrupted), checkpoint_every=100), train_set,
                  val_set=val_set)
    checkpoint = tmp_path / "run.pt"
    first = train(with_changes(iterations=2, checkpoint=str(checkpoint), checkpoint_every=1), train_set,
                  val_set=val_set)
    assert first.history["iteration"] == [1, 2]
    resumed = train(with_changes(iterations=4, checkpoint=str(checkpoint)), train_set, val_set=val_set)
    assert resumed.resumed_from == 2 and resumed.iterations_done == 4
    for a, b in zip(whole.maml.module.state_dict().values(), resumed.maml.module.state_dict().values()):
        assert torch.equal(a, b)
    ends = [torch.load(path, weights_only=True) for path in (uninterrupted, checkpoint)]
    assert ends[0]["iteration"] == ends[1]["iteration"] == 4 and ends[0]["next_task"] == ends[1]["next_task"]
    for a, b in zip(ends[0]["optimizer"]["state"].values(), ends[1]["optimizer"]["state"].values()):
        assert all(torch.equal(a[key], b[key]) for key in a)
    for key in ("iteration", "train_accuracy", "val_accuracy", "best_iteration", "best_accuracy"):
        assert whole.history[key] == resumed.history[key] == ends[1]["history"][key]
    with pytest.raises(JobError, match="differ from this run's"):
        train(with_changes(iterations=5, checkpoint=str(checkpoint), filters=8), train_set)


def test_cifarfs_and_fc100_commands_print_no_paper_number(cifar_root, tmp_path, capsys):
    for dataset, name, train_classes in (("cifarfs", "CIFAR-FS", 64), ("fc100", "FC100", 60)):
        out = tmp_path / dataset
        assert cli.main(["fewshot", "--dataset", dataset, "--root", str(cifar_root), "--iterations", "2",
                         "--val-every", "1", "--out", str(out), *TINY_FLAGS]) == 0
        printed = capsys.readouterr().out
        report = json.loads((out / "report.json").read_text())
        assert report["paper_maml_accuracy"] is None and report["paper_row"] is None
        assert report["train_classes"] == train_classes and report["protocol"]["image_size"] == 32
        assert f"paper: no MAML number for {name} 5-way 1-shot" in printed
        assert report["accuracy_curve"]["iteration"] == [1, 2] and (out / FIGURE).is_file()


def test_figure_draws_the_reported_curves(mini_root, tmp_path, monkeypatch):
    import matplotlib.figure

    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda figure, *args, **kwargs: figures.append(figure))
    report = run(mini_config(mini_root, iterations=3, val_every=1), tmp_path / "out")
    (figure,) = figures
    (axis,) = figure.axes
    curve = report["accuracy_curve"]
    lines = {line.get_label(): line for line in axis.get_lines()}
    assert list(lines["training classes"].get_xdata()) == curve["iteration"] == [1, 2, 3]
    assert list(lines["training classes"].get_ydata()) == curve["train_accuracy"]
    assert list(lines["validation classes"].get_ydata()) == curve["val_accuracy"]
    labels = [text.get_text() for text in axis.get_legend().get_texts()]
    assert "paper (MAML, Table 1), test" in labels and "test, 5 tasks" in labels


def test_batch_norm_at_test_takes_each_tasks_own_query_statistics(mini_root):
    """The adapted predictions of a chunk of tasks equal those of each task adapted alone and of the
    plain model (BatchNorm on batch statistics) on that task's query images: each task is normalized
    with its own images' statistics, as report.json states."""
    config = mini_config(mini_root)
    maml = make_maml(config)
    batch = sampler(config, MiniImagenet(mini_root, "test", image_size=16), 0).batch(range(3))
    tolerance = TOLERANCE[torch.float32]
    with torch.no_grad():
        adapted = maml.adapt(batch.support_x, batch.support_y, steps=2)
        together = adapted(batch.query_x)
        for task in range(3):
            alone = maml.adapt(batch.support_x[task:task + 1], batch.support_y[task:task + 1], steps=2)
            torch.testing.assert_close(together[task:task + 1], alone(batch.query_x[task:task + 1]),
                                       rtol=tolerance, atol=tolerance)
            weights = {name: value[task] for name, value in adapted.params.items()}
            plain = functional_call(maml.module, weights, (batch.query_x[task],))
            torch.testing.assert_close(together[task], plain, rtol=tolerance, atol=tolerance)
        pooled = functional_call(maml.module, {name: value[0] for name, value in adapted.params.items()},
                                 (batch.query_x.flatten(0, 1),))[: batch.query_x.shape[1]]
    assert not torch.allclose(pooled, together[0], rtol=tolerance, atol=tolerance), \
        "statistics over all tasks' queries would give other predictions: the check above tells them apart"


def test_missing_roots_are_clear_errors_without_a_traceback(tmp_path, capsys):
    absent = tmp_path / "absent"
    for command, expected in ((["fewshot", "--dataset", "miniimagenet"], "mini-imagenet-cache-train.pkl"),
                              (["fewshot", "--dataset", "cifarfs"], "cifar-100-python"),
                              (["fewshot", "--dataset", "fc100"], "cifar-100-python"),
                              (["omniglot"], "images_background")):
        assert cli.main([*command, "--root", str(absent), "--iterations", "1", "--out", str(tmp_path / "out"),
                         "--no-progress"]) == 1
        error = capsys.readouterr().err
        assert f"pymaml {command[0]}: error: cannot read " in error and f"from --root {absent}" in error
        assert expected in error and "Traceback" not in error
    assert cli.main(["fewshot", "--dataset", "cifarfs", "--root", str(absent), "--image-size", "16"]) == 1
    assert "image_size must be 32, got 16" in capsys.readouterr().err


OMNIGLOT = dict(ways=5, shots=1, iterations=2, meta_batch=2, eval_tasks=3, image_size=14, train_characters=4,
                first_order=True, val_tasks=2, progress=False)


def test_omniglot_has_no_validation_unless_characters_are_held_out(tmp_path):
    write_tree(tmp_path / "data")
    plain = run(OmniglotConfig(root=str(tmp_path / "data"), val_every=1, **OMNIGLOT), tmp_path / "plain")
    assert plain["validation"]["classes"] is None and plain["validation"]["best_checkpoint"] is None
    assert "Omniglot has no validation classes" in plain["validation"]["note"]
    assert plain["accuracy_curve"]["iteration"] == [1, 2] and plain["accuracy_curve"]["val_accuracy"] == []
    assert not (tmp_path / "plain" / BEST_CHECKPOINT).exists() and plain["val_classes"] is None
    assert "Omniglot has no validation classes" in summary(plain)
    with pytest.raises(JobError, match="the validation classes of Omniglot cannot make 5-way 1-shot tasks with 1 "
                                       "queries per class: ways=5 exceeds the 4 classes"):
        run(OmniglotConfig(root=str(tmp_path / "data"), val_every=1, val_characters=1, **OMNIGLOT), tmp_path / "one")
    held = run(OmniglotConfig(root=str(tmp_path / "data"), val_every=1, val_characters=2, **OMNIGLOT),
               tmp_path / "held")
    assert (held["train_classes"], held["val_classes"], held["test_classes"]) == (8, 8, 12)
    assert held["validation"]["classes"].startswith("characters 3..4 of the 4 training characters")
    assert len(held["accuracy_curve"]["val_accuracy"]) == 2 and (tmp_path / "held" / BEST_CHECKPOINT).is_file()
    assert held["protocol"]["deviations_from_paper"]["val_characters"] == [2, 0]
    off = run(OmniglotConfig(root=str(tmp_path / "data"), val_every=0, val_characters=2, **OMNIGLOT), tmp_path / "off")
    assert off["validation"]["note"] == "no validation (--val-every 0)" and off["accuracy_curve"]["iteration"] == []


def test_omniglot_alias_is_fewshot_omniglot(tmp_path):
    write_tree(tmp_path / "data")
    flags = ["--root", str(tmp_path / "data"), "--iterations", "3", "--meta-batch", "2", "--eval-tasks", "4",
             "--image-size", "14", "--train-characters", "4", "--first-order", "--threads", "1", "--no-progress"]
    assert cli.main(["omniglot", *flags, "--out", str(tmp_path / "alias")]) == 0
    assert cli.main(["fewshot", "--dataset", "omniglot", *flags, "--out", str(tmp_path / "fewshot")]) == 0
    alias, fewshot = (json.loads((tmp_path / name / "report.json").read_text()) for name in ("alias", "fewshot"))
    assert alias["config"] == fewshot["config"] and alias["evaluation"] == fewshot["evaluation"]
    assert alias["final_running_loss"] == fewshot["final_running_loss"]
    assert alias["paper_row"] == "MAML, Table 1" and alias["paper_maml_accuracy"] == {"accuracy": 98.7, "ci95": 0.4}


def test_omniglot_checkpoints_of_before_the_curves_resume(tmp_path):
    """A `pymaml omniglot` checkpoint holds the settings it always held and, from before the
    accuracy curves, no history: it is resumed, and the run goes on as if uninterrupted."""
    write_tree(tmp_path / "data")
    from pymaml.data import Omniglot

    data = Omniglot(tmp_path / "data", "train", image_size=14, train_characters=4)
    config = OmniglotConfig(root=str(tmp_path / "data"), **{**OMNIGLOT, "iterations": 4})
    assert list(config.trajectory()) == list(OMNIGLOT_TRAJECTORY)
    whole = train(config, data)
    checkpoint = tmp_path / "run.pt"
    train(OmniglotConfig(**{**vars(config), "iterations": 2, "checkpoint": str(checkpoint)}), data)
    state = torch.load(checkpoint, weights_only=True)
    del state["history"]
    save_checkpoint(checkpoint, state)
    resumed = train(OmniglotConfig(**{**vars(config), "checkpoint": str(checkpoint)}), data)
    assert resumed.resumed_from == 2
    for a, b in zip(whole.maml.module.state_dict().values(), resumed.maml.module.state_dict().values()):
        assert torch.equal(a, b)


def test_validation_under_torchrun_is_rank_0s(tmp_path):
    """Split over 2 torchrun processes, rank 0 alone measures the curve and writes best.pt and the
    report; the run trains as the single-process one does."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    write_tree(tmp_path / "data")
    command = ["fewshot", "--dataset", "omniglot", "--root", str(tmp_path / "data"), "--iterations", "2",
               "--meta-batch", "4", "--eval-tasks", "3", "--image-size", "14", "--train-characters", "4",
               "--val-characters", "2", "--val-every", "1", "--val-tasks", "2", "--first-order", "--threads", "1",
               "--no-progress"]
    assert cli.main([*command, "--out", str(tmp_path / "one")]) == 0
    single = json.loads((tmp_path / "one" / "report.json").read_text())
    repository = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(repository), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "pymaml", *command, "--out", str(tmp_path / "two")], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    split = json.loads((tmp_path / "two" / "report.json").read_text())
    assert split["world_size"] == 2 and result.stdout.count("best validation accuracy") == 1
    assert split["accuracy_curve"]["iteration"] == single["accuracy_curve"]["iteration"] == [1, 2]
    assert len(split["accuracy_curve"]["val_accuracy"]) == 2 and (tmp_path / "two" / BEST_CHECKPOINT).is_file()
    assert abs(split["final_running_loss"] - single["final_running_loss"]) <= 1e-5 * abs(single["final_running_loss"])
