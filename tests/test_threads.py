"""One MAML object (backend cpp) used from two Python threads at once: the fused kernel releases
the GIL, so calls overlap; each call's outputs must equal those of the same batch computed alone,
and a shared plan and optimizer must count every step."""

import sys
import threading

import pytest
import torch

import pymaml
from helpers import TOLERANCE, make_batch, make_mlp, relative_error
from pymaml._extension import extension

pytestmark = pytest.mark.skipif(extension() is None, reason="the compiled extension is not built")

ITERATIONS = 150
# Different numbers of tasks per thread, so a buffer shared across calls would show in the outputs.
BATCHES = [make_batch(tasks, 5, 3, 2, "mse", seed=tasks) for tasks in (3, 7)]


def _outputs(out):
    return out.loss.detach(), out.task_losses.detach(), out.pre_adaptation_loss.detach()


def _run_in_threads(work):
    """work(index, batch) in one thread per batch, with frequent thread switches; the errors."""
    errors = []

    def target(index):
        try:
            work(index, BATCHES[index])
        except Exception as error:  # collected, so the test reports it instead of the thread dying silently
            errors.append(f"thread {index}: {type(error).__name__}: {error}")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        threads = [threading.Thread(target=target, args=(index,)) for index in range(len(BATCHES))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    return errors


def test_concurrent_forward_and_meta_gradient_outputs():
    """maml(...) (the fused op) and meta_gradient(accumulate=False) (the held plan) from two
    threads: every call's loss, task losses and pre-adaptation loss as computed alone. The
    gradients themselves race (both calls write the same .grad, as in torch)."""
    maml = pymaml.MAML(make_mlp((3, 9, 2), "tanh"), inner_lr=0.2, inner_steps=2, backend="cpp")
    expected = {}
    for index, batch in enumerate(BATCHES):
        expected["forward", index] = _outputs(maml(*batch))
        expected["meta_gradient", index] = _outputs(maml.meta_gradient(*batch, accumulate=False))
    wrong = []

    def work(index, batch):
        for iteration in range(ITERATIONS):
            for kind in ("forward", "meta_gradient"):
                out = maml(*batch) if kind == "forward" else maml.meta_gradient(*batch, accumulate=False)
                for name, actual, want in zip(("loss", "task_losses", "pre_adaptation_loss"), _outputs(out),
                                              expected[kind, index]):
                    if actual.shape != want.shape or relative_error(actual, want) > TOLERANCE[torch.float64]:
                        wrong.append(f"{kind} {name} of thread {index}, iteration {iteration}")

    errors = _run_in_threads(work)
    assert not errors and not wrong, (errors + wrong)[:10]


def test_concurrent_meta_train_steps_share_one_optimizer():
    """meta_train_step with one Adam from two threads: the steps interleave in some order, but
    each is taken whole: the step counters count them all and the parameters stay finite."""
    maml = pymaml.MAML(make_mlp((3, 9, 2), "tanh"), inner_lr=0.2, inner_steps=2, backend="cpp")
    optimizer = torch.optim.Adam(maml.parameters(), lr=1e-3)
    maml.meta_train_step(*BATCHES[0], optimizer)

    def work(index, batch):
        for _ in range(ITERATIONS):
            out = maml.meta_train_step(*batch, optimizer)
            if out.task_losses.shape != (batch[0].shape[0],) or not torch.isfinite(out.loss):
                raise AssertionError(f"meta_train_step returned {out}")

    errors = _run_in_threads(work)
    assert not errors, errors[:10]
    steps = {float(optimizer.state[p]["step"]) for p in maml.parameters()}
    assert steps == {1.0 + len(BATCHES) * ITERATIONS}
    assert all(torch.isfinite(p).all() for p in maml.parameters())


class _ClearedByAnotherThread(dict):
    """A cache that another thread clears right after each insertion, the worst moment for a reader."""

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.clear()


def test_the_constant_cache_survives_being_cleared_between_insert_and_read(monkeypatch):
    backend = pymaml.backends.get_backend("cpp")
    monkeypatch.setattr(backend, "_constants", _ClearedByAnotherThread())
    like = torch.zeros((), dtype=torch.float64)
    lrs = backend._constant("lrs", like, 3, 4, 0.25)
    assert torch.equal(lrs, torch.full((3, 4), 0.25, dtype=torch.float64))
    assert torch.equal(backend._constant("weights", like, 3, 4), torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    model = make_mlp((3, 4, 2), "tanh")
    batch = BATCHES[0]
    out = pymaml.MAML(model, inner_lr=0.1, inner_steps=2, backend="cpp")(*batch)
    expected = pymaml.reference.meta_loss(model, *batch, inner_lr=0.1, inner_steps=2)
    assert relative_error(out.loss, expected) <= TOLERANCE[torch.float64]
