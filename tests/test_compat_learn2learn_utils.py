"""learn2learn's module utilities (tests/unit/utils_test.py of learn2learn 0.2.0, ported) from
pymaml.compat.learn2learn: clone_module, clone_parameters, update_module, detach_module."""

import copy

import pytest
import torch
from torch import nn

import pymaml
from pymaml.compat.learn2learn import (MAML, clone_module, clone_named_parameters, clone_parameters, detach_module,
                                       maml_update, update_module)


def ref_clone_module(module):
    """learn2learn's reference clone: a deepcopy whose parameters are replaced by clones of the
    original's (no parameter sharing, no RNN weight refresh)."""
    clone = copy.deepcopy(module)
    for key, param in module._parameters.items():
        if param is not None:
            clone._parameters[key] = param.clone()
    for key, buffer in module._buffers.items():
        if buffer is not None and buffer.requires_grad:
            clone._buffers[key] = buffer.clone()
    for key in clone._modules:
        clone._modules[key] = ref_clone_module(module._modules[key])
    return clone


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 2))

    def forward(self, x):
        return self.model(x)


class SharedConvModule(nn.Module):
    """learn2learn's shared-parameter test module: `net` holds the same submodules as seq and head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.seq = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU(),
                                 nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 100, 3, 2, 1))
        self.net = nn.Sequential(self.seq, self.head)

    def forward(self, x):
        return self.net(x)


INPUT = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
TARGET = torch.tensor([[0.0, 0.0]])


def optimizer_step(model, gradients):
    for param, gradient in zip(model.parameters(), gradients):
        param.data.sub_(0.01 * gradient)


def test_clone_module_basics():
    model = Model()
    original_loss = nn.functional.mse_loss(model(INPUT), TARGET)
    original_gradients = torch.autograd.grad(original_loss, model.parameters(), retain_graph=True,
                                             create_graph=True)
    cloned_model = clone_module(model)
    optimizer_step(model, original_gradients)
    cloned_loss = nn.functional.mse_loss(cloned_model(INPUT), TARGET)
    cloned_gradients = torch.autograd.grad(cloned_loss, cloned_model.parameters(), retain_graph=True,
                                           create_graph=True)
    optimizer_step(cloned_model, cloned_gradients)
    for a, b in zip(model.parameters(), cloned_model.parameters()):
        assert torch.equal(a, b)


def test_clone_module_nomodule():
    class TrickyModule(nn.Module):
        def __init__(self):
            super().__init__()
            self.tricky_modules = nn.ModuleList([nn.Linear(2, 1), None, nn.Linear(1, 1)])

    clone = clone_module(TrickyModule())
    assert [submodule is None for submodule in clone.tricky_modules] == [False, True, False]


@pytest.mark.parametrize("strided,hidden,image_size", [(True, 16, 28), (False, 8, 32)], ids=["omniglot", "pooled"])
def test_clone_module_models(strided, hidden, image_size):
    # learn2learn runs its Omniglot and MiniImagenet CNNs; these are pymaml's Conv4 variants, small.
    torch.manual_seed(0)
    ref_model = pymaml.models.Conv4(in_channels=3, ways=5, hidden=hidden, image_size=image_size, strided=strided)
    l2l_model = copy.deepcopy(ref_model)
    x = torch.randn(5, 3, image_size, image_size)
    grads = {}
    for name, model, clone_fn in (("ref", ref_model, ref_clone_module), ("l2l", l2l_model, clone_module)):
        grads[name] = []
        for _ in range(4):
            model.zero_grad()
            clone_fn(model)(x).norm(p=2).backward()
            optimizer_step(model, [p.grad for p in model.parameters()])
            grads[name].append([p.grad.clone() for p in model.parameters()])
    for ref_step, l2l_step in zip(grads["ref"], grads["l2l"]):
        assert all(torch.equal(r, l) for r, l in zip(ref_step, l2l_step))
    assert all(torch.equal(r, l) for r, l in zip(ref_model.parameters(), l2l_model.parameters()))


@pytest.mark.parametrize("rnn_class", [nn.RNN, nn.LSTM, nn.GRU])
def test_rnn_clone(rnn_class):
    # Cloned and adapted recurrent layers run on the new weights (learn2learn issue 139).
    torch.manual_seed(1234)
    maml = MAML(rnn_class(2, 1), lr=1e-3, allow_unused=False)
    optim = torch.optim.SGD(maml.parameters(), lr=0.001)
    data = torch.randn(30, 50, 2)

    def adapted_loss():
        learner = maml.clone()
        for _ in range(3):
            learner.adapt(learner(data)[0].norm(p=2))
        return learner(data)[0].norm(p=2)

    first_loss = adapted_loss()
    optim.zero_grad()
    first_loss.backward()
    optim.step()
    assert first_loss.item() > adapted_loss().item()


def test_module_clone_shared_params():
    original = SharedConvModule()
    clone = clone_module(original)
    assert len(list(clone.parameters())) == len(list(original.parameters()))
    original_pointers = [p.data_ptr() for p in original.parameters()]
    assert not any(p.data_ptr() in original_pointers for p in clone.parameters())
    assert clone.net[0] is clone.seq and clone.net[1] is clone.head


def test_module_update_shared_params():
    original = SharedConvModule()
    clone = clone_module(original)
    torch.manual_seed(1)
    updates = [torch.randn_like(p) for p in clone.parameters()]
    update_module(clone, updates)
    assert len(list(clone.parameters())) == len(list(original.parameters()))
    for p, c, u in zip(original.parameters(), clone.parameters(), updates):
        assert torch.equal(c, p + u)
    original_pointers = [p.data_ptr() for p in original.parameters()]
    assert not any(p.data_ptr() in original_pointers for p in clone.parameters())
    assert clone.net[0][0].weight is clone.seq[0].weight


def test_update_module_from_update_attributes():
    # learn2learn's protocol without `updates`: each tensor's .update is added, then reset to None.
    model = clone_module(Model())
    first, second = model.model[0].weight, model.model[2].bias
    first_update, second_update = torch.full_like(first, 0.5), torch.full_like(second, -2.0)
    first.update, second.update = first_update, second_update
    update_module(model)
    assert torch.equal(model.model[0].weight, first + first_update)
    assert torch.equal(model.model[2].bias, second + second_update)
    assert model.model[0].bias is not None and first.update is None and second.update is None


def test_update_module_is_differentiable():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    clone = clone_module(model)
    scale = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    update_module(clone, [scale * torch.ones_like(p) for p in clone.parameters()])
    clone(torch.ones(1, 3, dtype=torch.float64)).sum().backward()
    # out = Σ_j (W_j + s)·1 + (b_j + s): ∂/∂W = 1, ∂/∂b = 1, ∂/∂s = 2·3 + 2.
    assert torch.equal(model.weight.grad, torch.ones_like(model.weight))
    assert torch.equal(model.bias.grad, torch.ones_like(model.bias))
    assert scale.grad.item() == 8.0


def test_module_detach():
    model = Model()
    original_loss = nn.functional.mse_loss(model(INPUT), TARGET)
    original_gradients = torch.autograd.grad(original_loss, model.parameters(), retain_graph=True,
                                             create_graph=True)
    detach_module(model)
    optimizer_step(model, original_gradients)
    severed_loss = nn.functional.mse_loss(model(INPUT), TARGET)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(severed_loss, model.parameters())


def test_module_detach_keep_requires_grad():
    model = Model()
    detach_module(model, keep_requires_grad=True)
    assert all(p.requires_grad for p in model.parameters())
    detach_module(model)
    assert all(not p.requires_grad for p in model.parameters())


def test_detached_clone_no_longer_reaches_the_original():
    model = Model()
    clone = clone_module(model)
    detach_module(clone, keep_requires_grad=True)
    assert all(p.requires_grad and p.grad_fn is None for p in clone.parameters())
    clone(INPUT).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in clone.parameters())


def test_detach_module_replaces_views_and_keeps_them_shared():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    base = torch.randn(2, 2, 2, requires_grad=True)
    shared = base[0]
    model[0]._parameters["weight"] = shared
    model[1]._parameters["weight"] = shared
    detach_module(model, keep_requires_grad=True)
    assert model[0].weight is model[1].weight
    assert model[0].weight.grad_fn is None and model[0].weight.requires_grad
    assert torch.equal(model[0].weight, base[0].detach())


def test_clone_parameters():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2, 2))]
    clones = clone_parameters(params)
    assert all(c is not p and torch.equal(c, p) and c.grad_fn is not None for c, p in zip(clones, params))
    sum(c.sum() for c in clones).backward()
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in params)
    named = clone_named_parameters({"a": params[0]})
    assert list(named) == ["a"] and torch.equal(named["a"], params[0]) and named["a"] is not params[0]


def test_maml_update_without_gradients_applies_update_attributes():
    model = clone_module(Model())
    weight = model.model[0].weight
    weight.update = torch.full_like(weight, 0.25)
    maml_update(model, lr=0.1)
    assert torch.equal(model.model[0].weight, weight + 0.25)


def test_utilities_reject_bad_input():
    model = Model()
    with pytest.raises(TypeError, match="nn.Module"):
        update_module([torch.zeros(1)], [torch.zeros(1)])
    with pytest.raises(ValueError, match="4 parameters but 3 updates"):
        update_module(model, [torch.zeros(1)] * 3)
    updates = [torch.zeros_like(p) for p in model.parameters()]
    updates[1] = torch.zeros(64, 1)
    with pytest.raises(ValueError, match=r"model\.0\.bias has shape \(64, 1\).*\(64,\)"):
        update_module(model, updates)
    updates[1] = "0.5"
    with pytest.raises(TypeError, match=r"model\.0\.bias must be a tensor or a number, got str"):
        update_module(model, updates)
    with pytest.raises(TypeError, match="nn.Module"):
        detach_module(torch.zeros(2))
    with pytest.raises(TypeError, match="entry 1 is a float"):
        clone_parameters([torch.zeros(1), 1.0])
    with pytest.raises(TypeError, match="'b' is a int"):
        clone_named_parameters({"b": 3})
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), Model().parameters()))
