"""pymaml.compat.learn2learn.MAML: learn2learn's clone()/adapt() loop gives the oracle's meta-gradient."""

import importlib
import importlib.machinery
import importlib.util
import sys
import types

import pytest
import torch
from torch import nn

from helpers import TOLERANCE, flat_grad, make_batch, make_mlp, relative_error
from pymaml import reference
from pymaml.numerics import losses
from pymaml.compat.learn2learn import MAML, clone_module, maml_update


def clone_and_adapt_loop(wrapper, batch, steps, loss_fn):
    """learn2learn's training loop over `wrapper` (MAML, MetaSGD): clone per task, adapt `steps`
    times, query loss / T backward, leaving the meta-gradient in .grad."""
    support_x, support_y, query_x, query_y = batch
    wrapper.zero_grad(set_to_none=True)
    tasks = support_x.shape[0]
    for t in range(tasks):
        learner = wrapper.clone()
        for _ in range(steps):
            learner.adapt(loss_fn(learner(support_x[t]), support_y[t]))
        (loss_fn(learner(query_x[t]), query_y[t]) / tasks).backward()


def l2l_meta_gradient(maml_class, model, batch, lr, steps, loss_fn, first_order=False, **options):
    """The meta-gradient of learn2learn's training loop (clone_and_adapt_loop) over maml_class."""
    clone_and_adapt_loop(maml_class(model, lr=lr, first_order=first_order, **options), batch, steps, loss_fn)
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])


def oracle_meta_gradient(model, batch, lr, steps, loss, first_order=False):
    meta_loss = reference.meta_loss(model, *batch, inner_lr=lr, inner_steps=steps, first_order=first_order, loss=loss)
    return flat_grad(meta_loss, [p for p in model.parameters() if p.requires_grad])


def bn_classifier(seed=0, track_running_stats=True):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8, track_running_stats=track_running_stats), nn.ReLU(),
                         nn.Linear(8, 3)).double()


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 3])
def test_mlp_meta_gradient_matches_oracle(first_order, steps):
    model = make_mlp((3, 16, 16, 2), "tanh")
    batch = make_batch(tasks=4, shots=5, in_features=3, out_features=2, loss="mse")
    expected = oracle_meta_gradient(model, batch, 0.1, steps, "mse", first_order)
    actual = l2l_meta_gradient(MAML, model, batch, 0.1, steps, losses.mse, first_order)
    assert relative_error(actual, expected) < TOLERANCE[torch.float64]


@pytest.mark.parametrize("first_order", [False, True])
def test_batchnorm_classifier_meta_gradient_matches_oracle(first_order):
    # In training mode BatchNorm normalizes with the batch's statistics, in the oracle as here.
    model = bn_classifier()
    batch = make_batch(tasks=3, shots=6, in_features=4, out_features=3, loss="cross_entropy")
    expected = oracle_meta_gradient(model, batch, 0.3, 2, "cross_entropy", first_order)
    actual = l2l_meta_gradient(MAML, model, batch, 0.3, 2, losses.cross_entropy, first_order)
    assert relative_error(actual, expected) < TOLERANCE[torch.float64]


def test_first_order_differs_from_second_order():
    # Guards the two tests above against a first_order flag that is ignored.
    model = make_mlp((3, 16, 2), "tanh")
    batch = make_batch(tasks=2, shots=5, in_features=3, out_features=2, loss="mse")
    second = l2l_meta_gradient(MAML, model, batch, 0.5, 2, losses.mse, first_order=False)
    first = l2l_meta_gradient(MAML, model, batch, 0.5, 2, losses.mse, first_order=True)
    assert relative_error(first, second) > 1e-3


def test_wrapper_exposes_the_model():
    model = make_mlp((3, 5, 2), "relu")
    maml = MAML(model, lr=0.1)
    assert [id(p) for p in maml.parameters()] == [id(p) for p in model.parameters()]
    x = torch.randn(4, 3, dtype=torch.float64)
    assert torch.equal(maml(x), model(x))
    linear = MAML(nn.Linear(3, 2), lr=0.1)
    assert linear.in_features == 3 and linear.clone().out_features == 2


def test_clone_is_a_differentiable_copy_and_adapt_is_one_sgd_step():
    model = make_mlp((3, 5, 2), "tanh")
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    learner = MAML(model, lr=0.25).clone()
    originals, clones = list(model.parameters()), list(learner.parameters())
    assert all(c is not p and torch.equal(c, p) and c.grad_fn is not None for c, p in zip(clones, originals))
    loss = losses.mse(learner(x), y)
    grads = torch.autograd.grad(loss, clones, retain_graph=True)
    learner.adapt(loss)
    for adapted, p, g in zip(learner.parameters(), originals, grads):
        assert torch.allclose(adapted, p - 0.25 * g, rtol=0, atol=1e-15)
    sum(p.sum() for p in learner.parameters()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_maml_update_on_a_cloned_module_is_adapt():
    model = make_mlp((3, 5, 2), "tanh")
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    learner = MAML(model, lr=0.25).clone()
    learner.adapt(losses.mse(learner(x), y))
    clone = clone_module(model)
    grads = torch.autograd.grad(losses.mse(clone(x), y), list(clone.parameters()), create_graph=True)
    maml_update(clone, 0.25, grads)
    assert all(torch.equal(a, b) for a, b in zip(clone.parameters(), learner.parameters()))
    with pytest.raises(ValueError, match="4 parameters but 1 gradients"):
        maml_update(clone, 0.25, grads[:1])


def test_clone_keeps_shared_parameters_shared():
    torch.manual_seed(0)
    shared = nn.Linear(4, 4).double()
    model = nn.Sequential(shared, nn.Tanh(), shared)
    learner = MAML(model, lr=0.1).clone()
    assert learner.module[0].weight is learner.module[2].weight
    x = torch.randn(5, 4, dtype=torch.float64)
    learner.adapt(learner(x).square().mean())
    assert learner.module[0].weight is learner.module[2].weight
    assert len(list(learner.parameters())) == 2


def test_frozen_parameter_needs_allow_nograd():
    model = make_mlp((3, 8, 2), "tanh")
    model[0].bias.requires_grad_(False)
    batch = make_batch(tasks=2, shots=4, in_features=3, out_features=2, loss="mse")
    with pytest.raises(RuntimeError, match=r"0\.bias.*allow_nograd=True"):
        l2l_meta_gradient(MAML, model, batch, 0.1, 1, losses.mse)
    expected = oracle_meta_gradient(model, batch, 0.1, 2, "mse")
    actual = l2l_meta_gradient(MAML, model, batch, 0.1, 2, losses.mse, allow_nograd=True)
    assert relative_error(actual, expected) < TOLERANCE[torch.float64]
    learner = MAML(model, lr=0.1, allow_nograd=True).clone()
    learner.adapt(losses.mse(learner(batch[0][0]), batch[1][0]))
    assert torch.equal(learner.module[0].bias, model[0].bias)
    assert not torch.equal(learner.module[0].weight, model[0].weight)


class WithUnusedHead(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(3, 2).double()
        self.unused = nn.Linear(2, 2).double()

    def forward(self, x):
        return self.body(x)


def test_unused_parameter_needs_allow_unused():
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    learner = MAML(WithUnusedHead(), lr=0.1).clone()
    with pytest.raises(RuntimeError, match=r"unused\.weight.*allow_unused=True"):
        learner.adapt(losses.mse(learner(x), y))
    for maml in (MAML(WithUnusedHead(), lr=0.1, allow_unused=True), MAML(WithUnusedHead(), lr=0.1, allow_nograd=True)):
        learner = maml.clone()
        learner.adapt(losses.mse(learner(x), y))
        assert torch.equal(learner.unused.weight, maml.module.unused.weight)
        assert not torch.equal(learner.body.weight, maml.module.body.weight)


def test_bad_input_raises():
    with pytest.raises(TypeError, match="nn.Module"):
        MAML(lambda x: x, lr=0.1)
    with pytest.raises(TypeError, match="lr"):
        MAML(nn.Linear(2, 2), lr="0.1")
    learner = MAML(nn.Linear(2, 2), lr=0.1).clone()
    with torch.no_grad():
        loss = learner(torch.randn(3, 2)).sum()
    with pytest.raises(RuntimeError, match="does not require grad"):
        learner.adapt(loss)
    with pytest.raises(ValueError, match="scalar"):
        learner.adapt(learner(torch.randn(3, 2)))


def test_gru_clone_uses_the_cloned_weights():
    torch.manual_seed(0)
    gru = nn.GRU(3, 4, batch_first=True).double()
    learner = MAML(gru, lr=0.1).clone()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    learner.adapt(learner(x)[0].square().mean())
    adapted = dict(learner.module.named_parameters())
    assert torch.equal(learner(x)[0], torch.func.functional_call(gru, adapted, (x,))[0])
    assert not torch.allclose(learner(x)[0], gru(x)[0], rtol=0, atol=1e-6)


def learn2learn_maml_class():
    """learn2learn.algorithms.maml.MAML, importing only that module: learn2learn's package
    __init__ files import gym, requests and torchvision (as bench/providers.py does)."""
    spec = importlib.util.find_spec("learn2learn")
    if spec is None:
        pytest.skip("learn2learn is not installed")
    root = spec.submodule_search_locations[0]
    for package, path in (("learn2learn", root), ("learn2learn.algorithms", f"{root}/algorithms")):
        if package not in sys.modules:
            stub = types.ModuleType(package)
            stub.__path__ = [path]
            stub.__spec__ = importlib.machinery.ModuleSpec(package, None, is_package=True)
            stub.__spec__.submodule_search_locations = stub.__path__
            sys.modules[package] = stub
    return importlib.import_module("learn2learn.algorithms.maml").MAML


@pytest.mark.parametrize("first_order", [False, True])
def test_matches_learn2learn(first_order):
    L2LMAML = learn2learn_maml_class()
    batch = make_batch(tasks=3, shots=6, in_features=4, out_features=3, loss="cross_entropy")
    ours_model, theirs_model = bn_classifier(), bn_classifier()
    ours = l2l_meta_gradient(MAML, ours_model, batch, 0.3, 2, losses.cross_entropy, first_order)
    theirs = l2l_meta_gradient(L2LMAML, theirs_model, batch, 0.3, 2, losses.cross_entropy, first_order)
    assert torch.equal(ours, theirs)
    # Both update the original model's BatchNorm running statistics through the clones' shared buffers.
    assert torch.equal(ours_model[1].running_mean, theirs_model[1].running_mean)
    assert ours_model[1].num_batches_tracked.item() == 3 * 3 == theirs_model[1].num_batches_tracked.item()


# learn2learn's tests/unit/algorithms/maml_test.py cases, in float64.

def l2l_test_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 20), nn.Sigmoid(), nn.Linear(20, 20),
                          nn.Softmax(dim=1)).double()
    model.register_buffer("dummy_buf", torch.zeros(1, 2, 3, 4))
    return model


def l2l_test_input():
    return torch.randn(7, 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


@pytest.mark.parametrize("first_order", [False, True])
def test_l2l_clone_module(first_order):
    model = l2l_test_model()
    maml = MAML(model, lr=0.01, first_order=first_order)
    x = l2l_test_input()
    for clone in (maml.clone(), maml.clone()):
        assert torch.equal(clone(x), model(x))


def test_l2l_first_order_adaptation():
    # First-order MAML's meta-gradient is the query gradient at the adapted parameters.
    model = l2l_test_model()
    x = l2l_test_input()
    clone = MAML(model, lr=0.01, first_order=True).clone()
    for _ in range(3):
        clone.adapt(clone(x).norm())
    at_adapted = l2l_test_model()
    with torch.no_grad():
        for target, adapted in zip(at_adapted.parameters(), clone.parameters()):
            target.copy_(adapted)
    at_adapted(x).norm().backward()
    clone(x).norm().backward()
    expected = torch.cat([p.grad.reshape(-1) for p in at_adapted.parameters()])
    actual = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert relative_error(actual, expected) < TOLERANCE[torch.float64]


def test_l2l_graph_connection_and_adaptation():
    model = l2l_test_model()
    x = l2l_test_input()
    clone = MAML(model, lr=0.01).clone()
    loss = clone(x).norm(p=2)
    clone.adapt(loss)
    new_loss = clone(x).norm(p=2)
    assert loss >= new_loss
    new_loss.backward()
    assert all(p.grad is not None and p.grad.norm(p=2).item() > 0.0 for p in model.parameters())


def test_l2l_allow_unused():
    model = l2l_test_model()
    maml = MAML(model, lr=0.01, allow_unused=True)
    clone = maml.clone()
    clone.adapt(sum(p.norm(p=2) for i, p in enumerate(clone.parameters()) if i % 2 == 0))
    sum(p.norm(p=2) for i, p in enumerate(clone.parameters()) if i % 2 == 0).backward()
    assert [p.grad is not None for p in model.parameters()] == [i % 2 == 0 for i in range(6)]


def test_l2l_allow_nograd():
    model = l2l_test_model()
    model[2].weight.requires_grad = False
    clone = MAML(model, lr=0.01, allow_unused=False, allow_nograd=False).clone()
    loss = sum(p.norm(p=2) for p in clone.parameters())
    with pytest.raises(RuntimeError, match=r"2\.weight.*allow_nograd=True"):
        clone.adapt(loss)
    clone.adapt(loss, allow_nograd=True)
    sum(p.norm(p=2) for p in clone.parameters()).backward()
    assert model[2].weight.grad is None
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    clone = MAML(model, lr=0.01, allow_nograd=True).clone()
    frozen_weight = model[2].weight.clone()
    clone.adapt(sum(p.norm(p=2) for p in clone.parameters()))
    assert torch.equal(clone.module[2].weight, frozen_weight)


def test_l2l_module_shared_params():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU())
    head = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 10, 3, 2, 1))
    module = nn.Sequential(seq, head, nn.Sequential(seq, head)).double()
    clone = MAML(module, lr=0.1).clone()
    clone.adapt(sum(p.norm(p=2) for p in clone.parameters()))
    assert clone.module[2][0] is clone.module[0] and len(list(clone.parameters())) == 8
    sum(p.norm(p=2) for p in clone.parameters()).backward()
    assert all(p.grad is not None for p in module.parameters())
