"""The `func` backend's memory-efficient meta-step (pymaml.numerics.reverse_chain) against the oracle."""

import pytest
import torch
from torch import nn

import pymaml
from helpers import TOLERANCE, flat_grad, make_batch, make_mlp, relative_error
from pymaml import reference

F64 = TOLERANCE[torch.float64]
MODES = [None, "scalar", "per_layer_per_step", "per_parameter"]


def convnet_with_batchnorm(seed=0) -> nn.Module:
    """Convolution, BatchNorm on batch statistics, a strided convolution and a linear head, float64."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU(),
        nn.Conv2d(3, 2, 3, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 2 * 2, 3),
    ).double()


def image_batch(tasks=3, shots=4, seed=2):
    generator = torch.Generator().manual_seed(seed)
    images = lambda: torch.randn(tasks, shots, 1, 6, 6, generator=generator, dtype=torch.float64)  # noqa: E731
    labels = lambda: torch.randint(0, 3, (tasks, shots), generator=generator)  # noqa: E731
    return images(), labels(), images(), labels()


class ScaledMLP(nn.Module):
    """A buffer used in the forward pass and a frozen parameter: both pass through the inner loop."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.hidden = nn.Linear(3, 5)
        self.out = nn.Linear(5, 2)
        self.register_buffer("scale", torch.tensor([0.5, 2.0, 1.0, -1.0, 3.0]))
        self.offset = nn.Parameter(torch.randn(2), requires_grad=False)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)) * self.scale) + self.offset


def make_maml(model, second_order="memory_efficient", learn_inner_lr=None, seed=7, **options):
    maml = pymaml.MAML(model, backend="func", second_order=second_order, learn_inner_lr=learn_inner_lr, **options)
    generator = torch.Generator().manual_seed(seed)
    if maml.inner_lrs is not None:
        with torch.no_grad():  # distinct values everywhere, so a misplaced α shows
            for p in maml.inner_lrs.parameters() if isinstance(maml.inner_lrs, nn.ParameterList) else [maml.inner_lrs]:
                p.copy_(0.05 + 0.3 * torch.rand(p.shape, generator=generator, dtype=p.dtype))
    return maml


def assert_matches_oracle(maml, batch):
    """Meta-loss, task losses, pre-adaptation loss and the gradient of every parameter of `maml`
    (the model's and the learned step sizes) equal the oracle's to 1e-10 relative."""
    parameters = [p for p in maml.parameters() if p.requires_grad]
    out = maml(*batch)
    actual = flat_grad(out.loss, parameters)
    options = dict(inner_lr=maml.inner_lr, inner_steps=maml.inner_steps, first_order=maml.first_order,
                   loss=maml.config.loss, step_weights=maml.step_weights)
    expected_tasks = reference.task_query_losses(maml.module, *batch, **options)
    expected = flat_grad(expected_tasks.mean(), parameters)
    expected_pre = reference.meta_loss(maml.module, *batch, inner_lr=0.1, inner_steps=0, loss=maml.config.loss)
    assert expected.abs().max() > 0
    assert relative_error(out.loss.detach(), expected_tasks.mean().detach()) <= F64
    assert relative_error(out.task_losses, expected_tasks.detach()) <= F64
    assert relative_error(out.pre_adaptation_loss, expected_pre.detach()) <= F64
    assert relative_error(actual, expected) <= F64
    return actual


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_mlp_matches_oracle(loss, first_order):
    maml = make_maml(make_mlp((3, 6, 4, 2), "tanh"), inner_lr=0.3, inner_steps=3, first_order=first_order, loss=loss)
    assert_matches_oracle(maml, make_batch(5, 4, 3, 2, loss))


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_convnet_with_batch_statistics_matches_oracle(first_order):
    model = convnet_with_batchnorm()
    maml = make_maml(model, inner_lr=0.2, inner_steps=2, first_order=first_order, loss="cross_entropy",
                     learn_inner_lr="per_parameter", step_weights=[0.4, 0.6])
    assert_matches_oracle(maml, image_batch())


def test_buffers_and_frozen_parameters_match_oracle():
    model = ScaledMLP().double()
    before = {name: b.clone() for name, b in model.named_buffers()}
    maml = make_maml(model, inner_lr=0.3, inner_steps=3)
    assert_matches_oracle(maml, make_batch(4, 5, 3, 2, "mse"))
    maml(*make_batch(4, 5, 3, 2, "mse")).loss.backward()
    assert model.offset.grad is None
    assert all(torch.equal(b, before[name]) for name, b in model.named_buffers())


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("step_weights", [None, (0.2, 0.3, 0.5)], ids=["last-step", "multi-step"])
@pytest.mark.parametrize("mode", MODES)
def test_learned_step_sizes_and_step_weights_match_oracle(mode, step_weights, first_order):
    maml = make_maml(make_mlp((3, 5, 2), "tanh"), inner_lr=0.2, inner_steps=3, first_order=first_order,
                     learn_inner_lr=mode, step_weights=step_weights)
    assert_matches_oracle(maml, make_batch(4, 5, 3, 2, "mse"))


def test_step_weights_that_require_grad_get_the_mean_query_loss_of_their_step():
    maml = make_maml(make_mlp((3, 5, 2), "tanh"), inner_lr=0.2, inner_steps=3)
    weights = torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64, requires_grad=True)
    batch = make_batch(4, 5, 3, 2, "mse")
    out = pymaml.backends.get_backend("func").meta_step(maml.module, maml.config, pymaml.backends.TaskBatch(*batch),
                                                        0.2, weights)
    (actual,) = torch.autograd.grad(out.loss, [weights])
    expected = torch.stack([reference.meta_loss(maml.module, *batch, inner_lr=0.2, inner_steps=s).detach()
                            for s in (1, 2, 3)])
    assert relative_error(actual, expected) <= F64


@pytest.mark.parametrize("mode", [None, "scalar"])
def test_zero_inner_steps(mode):
    maml = make_maml(make_mlp((3, 5, 2), "tanh"), inner_lr=0.2, inner_steps=0, learn_inner_lr=mode)
    batch = make_batch(4, 5, 3, 2, "mse")
    if mode is None:
        assert_matches_oracle(maml, batch)
    out = maml(*batch)
    out.loss.backward()
    assert relative_error(out.loss.detach(), out.pre_adaptation_loss) <= F64
    if mode == "scalar":
        assert maml.inner_lrs.grad is None or maml.inner_lrs.grad.abs().max() == 0


@pytest.mark.parametrize("task_chunk", [1, 2, 3, 5, 7, 100])
def test_chunks_that_do_not_divide_the_tasks_give_the_same_result(task_chunk):
    """Seven tasks in chunks of every size, against the oracle and against one chunk of all tasks."""
    batch = make_batch(7, 4, 3, 2, "cross_entropy")
    options = dict(inner_lr=0.2, inner_steps=2, loss="cross_entropy", learn_inner_lr="per_layer_per_step",
                   step_weights=[0.5, 1.0])
    chunked = assert_matches_oracle(make_maml(make_mlp((3, 6, 2), "tanh"), task_chunk=task_chunk, **options), batch)
    whole = make_maml(make_mlp((3, 6, 2), "tanh"), task_chunk=7, **options)
    assert relative_error(chunked, flat_grad(whole(*batch).loss, whole.parameters())) <= F64


def test_graph_mode_gives_the_same_meta_gradient():
    batch = image_batch()
    gradients = []
    for second_order in ("memory_efficient", "graph"):
        maml = make_maml(convnet_with_batchnorm(), second_order, inner_lr=0.2, inner_steps=2, loss="cross_entropy")
        gradients.append(flat_grad(maml(*batch).loss, maml.parameters()))
    assert relative_error(gradients[0], gradients[1]) <= F64


def test_meta_gradient_and_train_step_use_the_chain():
    batch = make_batch(4, 5, 3, 2, "mse")
    expected = make_maml(make_mlp((3, 6, 2), "tanh"), "graph", inner_lr=0.3, inner_steps=2)
    expected(*batch).loss.backward()
    maml = make_maml(make_mlp((3, 6, 2), "tanh"), inner_lr=0.3, inner_steps=2)
    for p in maml.parameters():
        p.grad = torch.ones_like(p)
    out = maml.meta_gradient(*batch)
    assert not out.loss.requires_grad
    for actual, wanted in zip(maml.parameters(), expected.parameters()):
        assert relative_error(actual.grad - 1, wanted.grad) <= F64


def test_create_graph_raises():
    maml = make_maml(make_mlp((3, 5, 2), "tanh"), inner_lr=0.2, inner_steps=2)
    loss = maml(*make_batch(3, 4, 3, 2, "mse")).loss
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(loss, list(maml.parameters()), create_graph=True)


def test_graph_mode_differentiates_twice():
    maml = make_maml(make_mlp((3, 5, 2), "tanh"), "graph", inner_lr=0.2, inner_steps=2)
    parameters = list(maml.parameters())
    gradients = torch.autograd.grad(maml(*make_batch(3, 4, 3, 2, "mse")).loss, parameters, create_graph=True)
    (second,) = torch.autograd.grad(sum(g.square().sum() for g in gradients), parameters[:1])
    assert second.abs().max() > 0


def test_no_grad_gives_the_losses_without_a_graph():
    maml = make_maml(make_mlp((3, 5, 2), "tanh"), inner_lr=0.2, inner_steps=2, step_weights=[0.3, 0.7])
    batch = make_batch(3, 4, 3, 2, "mse")
    with torch.no_grad():
        plain = maml(*batch)
    assert not plain.loss.requires_grad
    assert relative_error(plain.task_losses, maml(*batch).task_losses) <= F64


@pytest.mark.parametrize("bad,message", [
    (dict(second_order="hessian_free"), "second_order must be one of"),
    (dict(task_chunk=0), "task_chunk must be None or an integer >= 1"),
    (dict(task_chunk=2.5), "task_chunk must be None or an integer >= 1"),
])
def test_bad_settings(bad, message):
    with pytest.raises(ValueError, match=message):
        pymaml.MAML(make_mlp((3, 2)), backend="func", **bad)


def test_loss_without_forward_mode_derivative_falls_back_to_reverse_over_reverse():
    """huber_loss's backward has no forward-mode derivative in torch 2.13: the HVPs then use grad of grad."""
    def huber(prediction, target):
        return torch.nn.functional.huber_loss(prediction, target, delta=0.5)

    maml = make_maml(make_mlp((3, 6, 2), "tanh"), inner_lr=0.2, inner_steps=2, loss=huber)
    assert_matches_oracle(maml, make_batch(3, 4, 3, 2, "mse"))


def test_default_task_chunk_fits_the_budget():
    """Conv4 with 75 query images a task: about 61-65 MiB estimated per task, so 2 tasks a chunk;
    the sinusoid MLP: the whole meta-batch in one chunk."""
    from pymaml.numerics.reverse_chain import default_task_chunk, forward_numbers
    from pymaml.numerics.state import adapted_parameters, fixed_state

    conv = pymaml.models.Conv4()
    params, fixed = adapted_parameters(conv), fixed_state(conv)
    query = torch.zeros(32, 75, 1, 28, 28)
    # conv/BN/ReLU outputs of 64×14×14, 64×7×7, 64×4×4, 64×2×2, the flattened 256 and 5 logits, per image
    assert forward_numbers(conv, params, fixed, query[0]) == 75 * (3 * 64 * (196 + 49 + 16 + 4) + 256 + 5)
    assert [default_task_chunk(conv, params, fixed, query, steps) for steps in (1, 5, 10)] == [2, 2, 2]
    assert default_task_chunk(conv, params, fixed, query[:1], 5) == 1
    mlp = pymaml.models.mlp((1, 40, 40, 1))
    assert default_task_chunk(mlp, adapted_parameters(mlp), {}, torch.zeros(25, 10, 1), 5) == 25
