"""What the sinusoid and Omniglot jobs share (pymaml.jobs): outputs checked before the training,
strict JSON reports, statistics that survive diverged tasks, refused checkpoints, and a progress
bar that stays quiet off a terminal."""

import json
import math
import os
import random
import re
from pathlib import Path

import pytest
import torch

import pymaml
from pymaml.jobs import cli
from pymaml.data import Sinusoid
from pymaml.jobs.training import NON_TERMINAL_REFRESH_SECONDS, JobError
from pymaml.jobs.sinusoid import DIVERGED_MSE, SinusoidConfig, evaluate, plot, run, summary, train
from helpers import TOLERANCE

TINY = dict(meta_batch=2, shots=2, eval_tasks=4, eval_points=5, progress=False)
TINY_COMMAND = ["sinusoid", "--meta-batch", "2", "--shots", "2", "--eval-tasks", "4", "--eval-points", "5",
                "--no-progress"]


class TrainingStarted(Exception):
    pass


@pytest.fixture
def no_training(monkeypatch):
    """Any meta-gradient raises TrainingStarted: what fails with it failed only after the training began."""
    def started(*args, **kwargs):
        raise TrainingStarted
    monkeypatch.setattr(pymaml.MAML, "meta_gradient", started)
    monkeypatch.setattr(pymaml.MAML, "meta_train_step", started)


@pytest.fixture
def unwritable_folder(tmp_path):
    """An existing folder in which no file can be created: read-only for a user, /proc for root
    (whom file modes do not stop)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o500)
        yield folder
        folder.chmod(0o700)
    else:
        if not Path("/proc/self").is_dir():
            pytest.skip("running as root without /proc: no folder refuses new files")
        yield Path("/proc")


def strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_unwritable_out_fails_before_training(unwritable_folder, no_training, capsys):
    assert cli.main([*TINY_COMMAND, "--iterations", "2", "--out", str(unwritable_folder)]) == 1
    error = capsys.readouterr().err
    assert f"cannot write report.json and sinusoid.png (--out) in {unwritable_folder}" in error
    assert "Traceback" not in error


def test_unwritable_checkpoint_fails_before_training(unwritable_folder, no_training, tmp_path, capsys):
    checkpoint = unwritable_folder / "run.pt"
    assert cli.main([*TINY_COMMAND, "--iterations", "2", "--out", str(tmp_path / "out"),
                     "--checkpoint", str(checkpoint)]) == 1
    assert f"cannot write the checkpoint run.pt in {unwritable_folder}" in capsys.readouterr().err


def test_out_below_a_file_and_a_folder_as_checkpoint_fail_before_training(tmp_path, no_training):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(JobError, match=f"cannot write report.json and sinusoid.png .* in {blocker / 'out'}"):
        run(SinusoidConfig(iterations=2, **TINY), blocker / "out")
    folder = tmp_path / "folder.pt"
    folder.mkdir()
    with pytest.raises(JobError, match=f"the checkpoint path {folder} is a folder"):
        train(SinusoidConfig(iterations=2, checkpoint=str(folder), **TINY))


def test_omniglot_unwritable_out_fails_before_training(unwritable_folder, no_training, tmp_path):
    from pymaml.jobs.omniglot import OmniglotConfig
    from pymaml.jobs.omniglot import run as run_omniglot
    from test_omniglot import write_tree

    write_tree(tmp_path / "data")
    config = OmniglotConfig(root=str(tmp_path / "data"), iterations=2, meta_batch=2, eval_tasks=2, image_size=14,
                            train_characters=4, first_order=True, progress=False)
    with pytest.raises(JobError, match=f"cannot write report.json and accuracy.png \\(--out\\) in {unwritable_folder}"):
        run_omniglot(config, unwritable_folder)


def test_omniglot_report_of_one_task_without_training_is_strict_json(tmp_path):
    """One evaluation task has no interval and no iteration a running loss or a time: null, not NaN."""
    from pymaml.jobs.omniglot import OmniglotConfig
    from pymaml.jobs.omniglot import run as run_omniglot
    from pymaml.jobs.omniglot import summary as omniglot_summary
    from test_omniglot import write_tree

    write_tree(tmp_path / "data")
    config = OmniglotConfig(root=str(tmp_path / "data"), iterations=0, eval_tasks=1, image_size=14,
                            train_characters=4, progress=False)
    report = run_omniglot(config, tmp_path / "out")
    written = strict_json((tmp_path / "out" / "report.json").read_text())
    assert written["evaluation"]["ci95"] is None and written["evaluation"]["tasks"] == 1
    assert written["final_running_loss"] is None and written["ms_per_iteration"] is None
    text = omniglot_summary(report)
    assert "0 iterations (the initial weights)" in text and "(no interval from one task)" in text


def test_report_is_written_before_the_figure(tmp_path, monkeypatch):
    def failing_plot(*args, **kwargs):
        raise RuntimeError("no figure")

    monkeypatch.setattr(pymaml.jobs.sinusoid, "plot", failing_plot)
    with pytest.raises(RuntimeError, match="no figure"):
        run(SinusoidConfig(iterations=2, **TINY), tmp_path)
    assert strict_json((tmp_path / "report.json").read_text())["iterations"] == 2


def _diverging_maml():
    """An untrained sinusoid MLP with a step size whose steps blow up some tasks, to NaN in the end."""
    torch.manual_seed(0)
    return pymaml.MAML(pymaml.models.sinusoid_mlp(), inner_lr=0.3)


def test_statistics_leave_out_diverged_tasks_and_the_median_counts_them():
    maml, seed, tasks, points = _diverging_maml(), 3, 20, 10
    evaluation = evaluate(maml, seed, tasks, points)
    family = Sinusoid(seed=seed)
    exercised = set()
    for shots in (5, 10):
        batch = family.sample(tasks, shots, points)
        result = evaluation[shots]
        for steps in range(11):
            with torch.no_grad():
                adapted = maml.adapt(batch.support_x, batch.support_y, steps=steps)
                per_task = (adapted(batch.query_x) - batch.query_y).square().mean(dim=(1, 2))
            kept = [v for v in per_task.tolist() if v <= DIVERGED_MSE]
            assert result["diverged"][steps] == tasks - len(kept)
            ranked = sorted(math.inf if math.isnan(v) else v for v in per_task.tolist())
            middle = ranked[(tasks - 1) // 2]
            if math.isfinite(middle):
                assert result["median"][steps] == pytest.approx(middle, rel=TOLERANCE[torch.float32])
                exercised.add("median" if result["diverged"][steps] else "")
            else:
                assert result["median"][steps] is None
                exercised.add("no median")
            if kept:
                mean = sum(kept) / len(kept)
                assert result["mse"][steps] == pytest.approx(mean, rel=TOLERANCE[torch.float32])
            else:
                assert result["mse"][steps] is None
            if math.isfinite(per_task.sum()):
                assert result["mse_all_tasks"][steps] == pytest.approx(per_task.double().mean().item(),
                                                                       rel=TOLERANCE[torch.float32])
            else:
                assert result["mse_all_tasks"][steps] is None
                exercised.add("NaN task")
    assert {"median", "no median", "NaN task"} <= exercised  # the model diverges enough to test each case


def test_report_of_diverged_tasks_is_strict_json_and_its_summary_has_no_nan(tmp_path, monkeypatch):
    monkeypatch.setattr(pymaml.jobs.sinusoid, "train", lambda config, context: pymaml.jobs.training.TrainResult(
        _diverging_maml(), config.iterations, 0, math.nan, 0.0))
    report = run(SinusoidConfig(iterations=0, eval_tasks=20, eval_points=10, progress=False), tmp_path)
    written = strict_json((tmp_path / "report.json").read_text())
    assert written == json.loads(json.dumps(report))
    assert written["final_running_loss"] is None and written["ms_per_iteration"] is None
    assert written["evaluation"]["K=5"]["diverged"]["10"] > 0 and written["evaluation"]["K=5"]["mse"]["10"] > 0
    text = summary(report)
    assert re.search(r"\b(nan|inf)\b", text) is None  # how Python prints a NaN or an infinity
    assert f"diverged: MSE above {DIVERGED_MSE:g} or NaN" in text


def test_figure_of_diverged_tasks_stays_readable(tmp_path, monkeypatch):
    import matplotlib.figure

    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda figure, *args, **kwargs: figures.append(figure))
    maml = _diverging_maml()
    plot(maml, evaluate(maml, 3, 20, 10), tmp_path / "figure.png", seed=4)
    (figure,) = figures
    *examples, curves = figure.axes
    for axis in examples:
        low, high = axis.get_ylim()
        assert -10 <= low < high <= 10
    notes = [text.get_text() for axis in examples for text in axis.texts]
    assert any(note.startswith("beyond ±7.5 or NaN, clipped: ") and "10 grad steps" in note for note in notes)
    low, high = curves.get_ylim()
    assert 0 < low < high <= 10 * DIVERGED_MSE
    assert "left out" in curves.get_title()
    assert any("diverged tasks left out" in text.get_text() for text in curves.get_legend().get_texts())


def test_resuming_a_finished_run_reports_no_time_per_iteration(tmp_path, monkeypatch):
    monkeypatch.setattr(pymaml.jobs.sinusoid, "plot", lambda *args, **kwargs: None)
    config = SinusoidConfig(iterations=3, checkpoint=str(tmp_path / "run.pt"), **TINY)
    first = run(config, tmp_path / "first")
    assert first["iterations_run"] == 3 and first["ms_per_iteration"] > 0
    again = run(config, tmp_path / "again")
    assert again["iterations"] == 3 and again["iterations_run"] == 0 and again["ms_per_iteration"] is None
    assert "3 iterations, all from the checkpoint (none run in this process)" in summary(again)
    more = run(SinusoidConfig(**{**vars(config), "iterations": 5}), tmp_path / "more")
    assert more["iterations_run"] == 2 and "(2 run in this process, resumed at 3)" in summary(more)


def test_fewer_iterations_than_the_checkpoint_holds_is_refused(tmp_path, capsys):
    checkpoint = tmp_path / "run.pt"
    train(SinusoidConfig(iterations=4, checkpoint=str(checkpoint), **TINY))
    with pytest.raises(JobError, match=f"checkpoint {checkpoint} holds 4 iterations, more than the 2 asked for"):
        train(SinusoidConfig(iterations=2, checkpoint=str(checkpoint), **TINY))
    assert cli.main([*TINY_COMMAND, "--iterations", "3", "--checkpoint", str(checkpoint),
                     "--out", str(tmp_path / "out")]) == 1
    assert "pass --iterations 4 to evaluate it as it is" in capsys.readouterr().err


def _damaged(kind: str, path: Path) -> None:
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        train(SinusoidConfig(iterations=1, checkpoint=str(path), **TINY))
        whole = path.read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
    elif kind == "a saved tensor":
        torch.save(torch.arange(3), path)
    elif kind == "a saved dict of something else":
        torch.save({"weights": torch.ones(2)}, path)
    elif kind == "random bytes":
        path.write_bytes(random.Random(0).randbytes(4096))


@pytest.mark.parametrize("kind", ["empty", "truncated", "a saved tensor", "a saved dict of something else",
                                  "random bytes"])
def test_damaged_or_foreign_checkpoint_is_refused_by_name(tmp_path, kind, capsys):
    checkpoint = tmp_path / "run.pt"
    _damaged(kind, checkpoint)
    with pytest.raises(JobError, match=f"{checkpoint} is (damaged or is )?not a pymaml checkpoint") as refusal:
        train(SinusoidConfig(iterations=2, checkpoint=str(checkpoint), **TINY))
    assert "delete it or pass another --checkpoint path to start over" in str(refusal.value)
    assert cli.main([*TINY_COMMAND, "--iterations", "2", "--checkpoint", str(checkpoint),
                     "--out", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert "not a pymaml checkpoint" in error and "Traceback" not in error


def test_omniglot_refuses_a_damaged_checkpoint(tmp_path):
    from pymaml.data import Omniglot
    from pymaml.jobs.omniglot import OmniglotConfig
    from pymaml.jobs.omniglot import train as train_omniglot
    from test_omniglot import write_tree

    write_tree(tmp_path / "data")
    checkpoint = tmp_path / "run.pt"
    _damaged("empty", checkpoint)
    config = OmniglotConfig(root=str(tmp_path / "data"), iterations=2, meta_batch=2, image_size=14,
                            train_characters=4, first_order=True, progress=False, checkpoint=str(checkpoint))
    with pytest.raises(JobError, match=f"the checkpoint {checkpoint} is damaged or is not a pymaml checkpoint"):
        train_omniglot(config, Omniglot(tmp_path / "data", "train", image_size=14, train_characters=4))


def test_progress_bar_off_a_terminal_redraws_rarely(monkeypatch, capsys):
    """Under a clock that advances one second per reading, a bar redrawn ten times a second would
    print a carriage return every iteration; off a terminal it redraws every
    NON_TERMINAL_REFRESH_SECONDS."""
    import tqdm.std

    clock = iter(range(10**6))
    monkeypatch.setattr(tqdm.std, "time", lambda: float(next(clock)))
    monkeypatch.setattr(tqdm.std.tqdm, "monitor_interval", 0)
    iterations = 60
    train(SinusoidConfig(iterations=iterations, **{**TINY, "progress": True}))
    bar = capsys.readouterr().err
    assert f"{iterations}/{iterations}" in bar
    # the first and the last drawing, and one per NON_TERMINAL_REFRESH_SECONDS of clock readings
    assert 2 <= bar.count("\r") <= 2 + 2 * iterations / NON_TERMINAL_REFRESH_SECONDS


def test_under_torchrun_a_damaged_checkpoint_stops_every_rank_with_its_message(tmp_path):
    """Rank 0 reads the checkpoint; its refusal reaches rank 1, and each prints it and exits 1."""
    import subprocess
    import sys

    checkpoint = tmp_path / "run.pt"
    _damaged("random bytes", checkpoint)
    repository = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(repository), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "pymaml", *TINY_COMMAND, "--iterations", "2", "--checkpoint", str(checkpoint),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert output.count(f"pymaml sinusoid: error: the checkpoint {checkpoint} is damaged") == 2, output
