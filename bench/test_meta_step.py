"""The paper's sinusoid meta-step (T=25, K=10+10, MLP 1-40-40-1 ReLU, α=0.01, fp32), per backend.

`meta_gradient` is maml(...) plus .backward(); `train_step` adds zero_grad and a fused Adam step.
The batch is sampled before timing. Run: pytest bench --benchmark-only (add
--benchmark-json=FILE to keep the numbers); --benchmark-disable runs each case once as a smoke test.
"""

import pytest
import torch

import pymaml

BACKENDS = [status.name for status in pymaml.available_backends() if status.usable]
STEPS = [1, 5]


def sinusoid_setup(backend: str, steps: int, first_order: bool):
    torch.manual_seed(0)
    model = pymaml.models.sinusoid_mlp()
    maml = pymaml.MAML(model, inner_lr=0.01, inner_steps=steps, first_order=first_order, backend=backend)
    batch = pymaml.data.Sinusoid(seed=0).sample(25, 10).tasks
    return maml, batch


def meta_gradient(maml, batch):
    maml.zero_grad(set_to_none=True)
    maml(*batch).loss.backward()


@pytest.mark.parametrize("order", ["second", "first"])
@pytest.mark.parametrize("steps", STEPS, ids=[f"S{s}" for s in STEPS])
@pytest.mark.parametrize("backend", BACKENDS)
def test_meta_gradient(benchmark, backend, steps, order):
    maml, batch = sinusoid_setup(backend, steps, order == "first")
    benchmark.group = f"meta-gradient S={steps} {order} order"
    benchmark(meta_gradient, maml, batch)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in maml.parameters())


@pytest.mark.parametrize("steps", STEPS, ids=[f"S{s}" for s in STEPS])
@pytest.mark.parametrize("backend", BACKENDS)
def test_train_step(benchmark, backend, steps):
    maml, batch = sinusoid_setup(backend, steps, first_order=False)
    optimizer = torch.optim.Adam(maml.parameters(), lr=1e-3, fused=True)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        maml(*batch).loss.backward()
        optimizer.step()

    benchmark.group = f"train step S={steps} second order"
    before = [p.detach().clone() for p in maml.parameters()]
    benchmark(train_step)
    assert any(not torch.equal(b, p) for b, p in zip(before, maml.parameters()))
