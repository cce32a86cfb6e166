"""pymaml.compat.learn2learn.MetaSGD: learn2learn's Meta-SGD clone()/adapt() loop gives the
oracle's meta-gradient, for the parameters and the learned step sizes alike; learn2learn's
tests/unit/algorithms/metasgd_test.py cases, ported."""

import importlib

import pytest
import torch
from torch import nn

from helpers import TOLERANCE, flat_grad, make_batch, make_mlp, relative_error
from pymaml import reference
from pymaml.numerics import losses
from pymaml.compat.learn2learn import MetaSGD, clone_module, meta_sgd_update
from test_compat_learn2learn import WithUnusedHead, bn_classifier, clone_and_adapt_loop, learn2learn_maml_class


def randomize_lrs(meta, seed=7):
    """Distinct step sizes everywhere, so a step size applied to the wrong entry shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lr in meta.lrs:
            lr.copy_(0.05 + 0.3 * torch.rand(lr.shape, generator=generator, dtype=torch.float64).to(lr.dtype))
    return meta


def metasgd_meta_gradient(meta, batch, steps, loss_fn):
    """learn2learn's Meta-SGD loop: clone per task, adapt `steps` times, query loss / T backward;
    the meta-gradient of the parameters followed by that of the step sizes."""
    clone_and_adapt_loop(meta, batch, steps, loss_fn)
    return torch.cat([p.grad.reshape(-1) for p in meta.parameters()])


def oracle_meta_gradient(meta, batch, steps, loss, first_order):
    names = [name for name, _ in meta.module.named_parameters()]
    inner_lr = [dict(zip(names, meta.lrs))]
    meta_loss = reference.meta_loss(meta.module, *batch, inner_lr=inner_lr, inner_steps=steps,
                                    first_order=first_order, loss=loss)
    return flat_grad(meta_loss, list(meta.module.parameters()) + list(meta.lrs))


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("steps", [1, 3])
def test_mlp_meta_gradient_matches_oracle(first_order, steps):
    meta = randomize_lrs(MetaSGD(make_mlp((3, 6, 4, 2), "tanh"), lr=0.2, first_order=first_order))
    batch = make_batch(tasks=4, shots=5, in_features=3, out_features=2, loss="mse")
    expected = oracle_meta_gradient(meta, batch, steps, "mse", first_order)
    actual = metasgd_meta_gradient(meta, batch, steps, losses.mse)
    assert relative_error(actual, expected) < TOLERANCE[torch.float64]
    step_size_grads = actual[sum(p.numel() for p in meta.module.parameters()):]
    assert step_size_grads.numel() == sum(lr.numel() for lr in meta.lrs) and step_size_grads.norm() > 0


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_batchnorm_classifier_meta_gradient_matches_oracle(first_order):
    meta = randomize_lrs(MetaSGD(bn_classifier(), lr=0.3, first_order=first_order))
    batch = make_batch(tasks=3, shots=6, in_features=4, out_features=3, loss="cross_entropy")
    expected = oracle_meta_gradient(meta, batch, 2, "cross_entropy", first_order)
    actual = metasgd_meta_gradient(meta, batch, 2, losses.cross_entropy)
    assert relative_error(actual, expected) < TOLERANCE[torch.float64]


def test_first_order_differs_from_second_order():
    # Guards the tests above against a first_order flag that is ignored.
    batch = make_batch(tasks=2, shots=5, in_features=3, out_features=2, loss="mse")
    second = metasgd_meta_gradient(MetaSGD(make_mlp((3, 8, 2), "tanh"), lr=0.3), batch, 2, losses.mse)
    first = metasgd_meta_gradient(MetaSGD(make_mlp((3, 8, 2), "tanh"), lr=0.3, first_order=True), batch, 2,
                                  losses.mse)
    assert relative_error(first, second) > 1e-3


def test_adapt_option_overrides_first_order():
    batch = make_batch(tasks=1, shots=5, in_features=3, out_features=2, loss="mse")
    grads = []
    for first_order in (False, True):
        meta = MetaSGD(make_mlp((3, 8, 2), "tanh"), lr=0.3, first_order=not first_order)
        learner = meta.clone()
        learner.adapt(losses.mse(learner(batch[0][0]), batch[1][0]), first_order=first_order)
        losses.mse(learner(batch[2][0]), batch[3][0]).backward()
        expected = oracle_meta_gradient(meta, tuple(b[:1] for b in batch), 1, "mse", first_order)
        actual = torch.cat([p.grad.reshape(-1) for p in meta.parameters()])
        assert relative_error(actual, expected) < TOLERANCE[torch.float64]
        grads.append(actual)
    assert relative_error(grads[0], grads[1]) > 1e-3


def test_adapt_is_one_meta_sgd_step():
    meta = randomize_lrs(MetaSGD(make_mlp((3, 5, 2), "tanh"), lr=0.25))
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    learner = meta.clone()
    loss = losses.mse(learner(x), y)
    grads = torch.autograd.grad(loss, list(learner.parameters()), retain_graph=True)
    learner.adapt(loss)
    for adapted, p, lr, g in zip(learner.parameters(), meta.module.parameters(), meta.lrs, grads):
        assert torch.allclose(adapted, p - lr * g, rtol=0, atol=1e-15)


def test_meta_sgd_update_on_a_cloned_module_is_adapt():
    meta = randomize_lrs(MetaSGD(make_mlp((3, 5, 2), "tanh"), lr=0.25))
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    learner = meta.clone()
    learner.adapt(losses.mse(learner(x), y))
    clone = clone_module(meta.module)
    grads = torch.autograd.grad(losses.mse(clone(x), y), list(clone.parameters()), create_graph=True)
    meta_sgd_update(clone, list(meta.lrs), grads)
    assert all(torch.equal(a, b) for a, b in zip(clone.parameters(), learner.parameters()))
    # learn2learn's attribute protocol: ._lr and .grad on each tensor, reset after the update.
    attributed = clone_module(meta.module)
    grads = torch.autograd.grad(losses.mse(attributed(x), y), list(attributed.parameters()))
    before = list(attributed.parameters())
    for p, lr, g in zip(before, meta.lrs, grads):
        p._lr, p.grad = lr, g
    meta_sgd_update(attributed)
    assert all(torch.equal(a, b) for a, b in zip(attributed.parameters(), learner.parameters()))
    assert all(p._lr is None for p in before)


def test_shared_parameter_stays_shared():
    torch.manual_seed(0)
    shared = nn.Linear(4, 4).double()
    meta = randomize_lrs(MetaSGD(nn.Sequential(shared, nn.Tanh(), shared), lr=0.1))
    assert len(meta.lrs) == 2
    learner = meta.clone()
    x = torch.randn(5, 4, dtype=torch.float64)
    learner.adapt(learner(x).square().mean())
    assert learner.module[0].weight is learner.module[2].weight
    assert not torch.equal(learner.module[0].weight, shared.weight)


# learn2learn's metasgd_test.py cases.

def l2l_test_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 20), nn.Sigmoid(), nn.Linear(20, 20),
                          nn.Softmax(dim=1))
    model.register_buffer("dummy_buf", torch.zeros(1, 2, 3, 4))
    return model


@pytest.mark.parametrize("first_order", [False, True])
def test_clone_module(first_order):
    model = l2l_test_model()
    meta = MetaSGD(model, lr=0.1, first_order=first_order)
    x = torch.randn(7, 10)
    reference_output = model(x)
    for clone in (meta.clone(), meta.clone()):
        assert torch.equal(clone(x), reference_output)


def test_graph_connection():
    model = l2l_test_model()
    clone = MetaSGD(model, lr=0.1).clone()
    clone(torch.randn(7, 10)).norm(p=2).backward()
    assert all(p.grad is not None and p.grad.norm(p=2).item() > 0.0 for p in model.parameters())


def test_meta_lr():
    model = l2l_test_model()
    meta = MetaSGD(model, lr=0.1)
    assert sum(p.numel() for p in meta.parameters()) == 2 * sum(p.numel() for p in model.parameters())
    assert all(lr.shape == p.shape and torch.equal(lr, torch.full_like(p, 0.1))
               for lr, p in zip(meta.lrs, model.parameters()))


def test_adaptation():
    meta = MetaSGD(l2l_test_model(), lr=0.1)
    x = torch.randn(7, 10)
    clone = meta.clone()
    loss = clone(x).norm(p=2)
    clone.adapt(loss)
    new_loss = clone(x).norm(p=2)
    assert loss >= new_loss
    new_loss.backward()
    assert all(p.grad is not None and p.grad.norm(p=2).item() > 0.0 for p in meta.parameters())


def test_bad_input_raises():
    model = make_mlp((3, 4, 2), "tanh")
    with pytest.raises(TypeError, match="nn.Module"):
        MetaSGD(lambda x: x, lr=0.1)
    with pytest.raises(TypeError, match="lr must be a number"):
        MetaSGD(model, lr="0.1")
    with pytest.raises(ValueError, match="single number"):
        MetaSGD(model, lr=torch.ones(3))
    with pytest.raises(ValueError, match="4 parameters but 3 step sizes"):
        MetaSGD(model, lrs=[torch.ones(1)] * 3)
    with pytest.raises(ValueError, match=r"0\.bias has shape \(4, 1\)"):
        MetaSGD(model, lrs=[torch.ones(4, 3), torch.ones(4, 1), torch.ones(2, 4), torch.ones(2)])
    with pytest.raises(TypeError, match=r"0\.bias must be a tensor, got float"):
        MetaSGD(model, lrs=[torch.ones(1), 0.1, torch.ones(1), torch.ones(1)])
    with pytest.raises(TypeError, match="not a single tensor"):
        MetaSGD(model, lrs=torch.ones(4))
    learner = MetaSGD(model, lr=0.1).clone()
    x = torch.randn(3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="scalar"):
        learner.adapt(learner(x))
    with torch.no_grad():
        loss = learner(x).sum()
    with pytest.raises(RuntimeError, match="does not require grad"):
        learner.adapt(loss)
    with pytest.raises(ValueError, match="both lrs and grads"):
        meta_sgd_update(learner.module, lrs=list(learner.lrs))
    with pytest.raises(ValueError, match="4 parameters but 1 gradients"):
        meta_sgd_update(learner.module, list(learner.lrs), [torch.zeros(4, 3)])
    frozen = make_mlp((3, 4, 2), "tanh")
    frozen[0].bias.requires_grad_(False)
    learner = MetaSGD(frozen, lr=0.1).clone()
    with pytest.raises(RuntimeError, match=r"\['0\.bias'\] do not require grad"):
        learner.adapt(learner(x).sum())
    learner = MetaSGD(WithUnusedHead(), lr=0.1).clone()
    with pytest.raises(RuntimeError, match=r"does not depend on parameters \['unused\.weight', 'unused\.bias'\]"):
        learner.adapt(learner(x).sum())


def learn2learn_metasgd_class():
    """learn2learn.algorithms.meta_sgd.MetaSGD, importing only its modules (skips without learn2learn)."""
    learn2learn_maml_class()
    return importlib.import_module("learn2learn.algorithms.meta_sgd").MetaSGD


@pytest.mark.parametrize("first_order", [False, True])
def test_matches_learn2learn(first_order):
    L2LMetaSGD = learn2learn_metasgd_class()
    batch = make_batch(tasks=3, shots=6, in_features=4, out_features=3, loss="cross_entropy")
    ours = randomize_lrs(MetaSGD(bn_classifier(), lr=0.3, first_order=first_order))
    theirs = randomize_lrs(L2LMetaSGD(bn_classifier(), lr=0.3, first_order=first_order))
    ours_grad = metasgd_meta_gradient(ours, batch, 2, losses.cross_entropy)
    theirs_grad = metasgd_meta_gradient(theirs, batch, 2, losses.cross_entropy)
    assert torch.equal(ours_grad, theirs_grad)


def test_step_sizes_of_broadcasting_shapes():
    # lrs need not have each parameter's shape: any shape that broadcasts to it (one per layer, per row).
    model = make_mlp((3, 5, 2), "tanh")
    lrs = [torch.tensor(0.2, dtype=torch.float64, requires_grad=True),
           torch.full((1,), 0.1, dtype=torch.float64, requires_grad=True),
           torch.full((2, 1), 0.3, dtype=torch.float64, requires_grad=True),
           torch.full((2,), 0.4, dtype=torch.float64, requires_grad=True)]
    meta = MetaSGD(model, lrs=lrs)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    learner = meta.clone()
    loss = losses.mse(learner(x), y)
    grads = torch.autograd.grad(loss, list(learner.parameters()), retain_graph=True)
    learner.adapt(loss)
    for adapted, p, lr, g in zip(learner.parameters(), model.parameters(), lrs, grads):
        assert adapted.shape == p.shape and torch.allclose(adapted, p - lr * g, rtol=0, atol=1e-15)
    learner(x).sum().backward()
    assert all(lr.grad is not None and lr.grad.shape == lr.shape for lr in lrs)


def test_meta_sgd_update_takes_numbers_as_step_sizes():
    model = clone_module(make_mlp((3, 5, 2), "tanh"))
    before = list(model.parameters())
    grads = [torch.ones_like(p) for p in before]
    meta_sgd_update(model, [0.5, 0.25, 0.125, 1.0], grads)
    for after, p, lr in zip(model.parameters(), before, [0.5, 0.25, 0.125, 1.0]):
        assert torch.equal(after, p - lr)
