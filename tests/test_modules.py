"""Models beyond MLPs through `func`: convolutions, BatchNorm, buffers, frozen parameters."""

import pytest
import torch
from torch import nn

import pymaml
from helpers import TOLERANCE, assert_backend_matches_oracle, oracle_meta_gradient, relative_error


NORMS = {
    "batchnorm": lambda: nn.BatchNorm2d(4),
    "batchnorm-no-affine": lambda: nn.BatchNorm2d(4, affine=False),
    "batchnorm-untracked": lambda: nn.BatchNorm2d(4, track_running_stats=False),
    "layernorm": lambda: nn.LayerNorm([4, 7, 7]),
    "instancenorm": lambda: nn.InstanceNorm2d(4, affine=True),
    "instancenorm-tracked": lambda: nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
    "groupnorm": lambda: nn.GroupNorm(2, 4),
    "rmsnorm": lambda: nn.RMSNorm([4, 7, 7]),
}


def small_convnet(dtype=torch.float64, seed=0, norm="batchnorm") -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        NORMS[norm](),
        nn.ReLU(),
        nn.Conv2d(4, 3, 3, stride=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, 3),
    ).to(dtype)


def image_batch(tasks=3, shots=4, classes=3, dtype=torch.float64, seed=2):
    generator = torch.Generator().manual_seed(seed)
    images = lambda: torch.randn(tasks, shots, 1, 7, 7, generator=generator, dtype=dtype)  # noqa: E731
    labels = lambda: torch.randint(0, classes, (tasks, shots), generator=generator)  # noqa: E731
    return images(), labels(), images(), labels()


class ScaledMLP(nn.Module):
    """A model with a buffer used in its forward and a frozen parameter."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(3, 5)
        self.out = nn.Linear(5, 2)
        self.register_buffer("scale", torch.tensor([0.5, 2.0, 1.0, -1.0, 3.0]))
        self.offset = nn.Parameter(torch.randn(2), requires_grad=False)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)) * self.scale) + self.offset


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("training", [True, False], ids=["batch-stats", "running-stats"])
def test_convnet_with_batchnorm_matches_oracle(training, first_order):
    model = small_convnet()
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    model.train(training)
    before = {name: b.clone() for name, b in model.named_buffers()}
    batch = image_batch()
    assert_backend_matches_oracle(model, batch, "func", inner_lr=0.2, inner_steps=2, first_order=first_order,
                                  loss="cross_entropy")
    for name, b in model.named_buffers():
        assert torch.equal(b, before[name]), f"buffer {name} changed"


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_convnet_with_each_normalization_layer_matches_oracle(norm):
    """Second derivatives through normalization layers under vmap (see pymaml.numerics.decomposed_norms)."""
    assert_backend_matches_oracle(small_convnet(norm=norm), image_batch(), "func", inner_lr=0.2, inner_steps=2,
                                  first_order=False, loss="cross_entropy")


def test_decomposed_norms_equal_torchs_forward():
    from pymaml.numerics.decomposed_norms import DecomposedNorms

    torch.manual_seed(0)
    x = torch.randn(5, 4, 6, 3, dtype=torch.float64)
    for norm in NORMS.values():
        layer = norm().double().train()
        if isinstance(layer, nn.LayerNorm | nn.RMSNorm):
            layer = type(layer)(x.shape[1:]).double()
        with torch.no_grad():
            for p in layer.parameters():
                p.uniform_(-1, 1)
        expected = layer(x)
        with DecomposedNorms():
            actual = layer(x)
        assert relative_error(actual.detach(), expected.detach()) <= TOLERANCE[torch.float64], layer


def test_batchnorm_mode_changes_the_result():
    """Train mode normalizes with batch statistics, eval mode with running statistics: the losses differ."""
    model = small_convnet()
    with torch.no_grad():
        model[1].running_mean.fill_(3.0)
    batch = image_batch()
    maml = pymaml.MAML(model, inner_lr=0.2, loss="cross_entropy", backend="func")
    train_loss = maml(*batch).loss.item()
    maml.eval()
    assert abs(maml(*batch).loss.item() - train_loss) > 1e-3


def test_buffers_and_frozen_parameters():
    torch.manual_seed(0)
    model = ScaledMLP().double()
    generator = torch.Generator().manual_seed(3)
    batch = tuple(torch.randn(4, 5, d, generator=generator, dtype=torch.float64) for d in (3, 2, 3, 2))
    options = dict(inner_lr=0.3, inner_steps=3, first_order=False, loss="mse")
    expected_loss, expected_grad = oracle_meta_gradient(model, batch, **options)
    for backend in ("func", "reference"):
        out = pymaml.MAML(model, backend=backend, **options)(*batch)
        model.zero_grad(set_to_none=True)
        out.loss.backward()
        assert model.offset.grad is None
        grad = torch.cat([p.grad.reshape(-1) for p in (model.hidden.weight, model.hidden.bias, model.out.weight, model.out.bias)])
        assert relative_error(out.loss.detach(), expected_loss) <= TOLERANCE[torch.float64]
        assert relative_error(grad, expected_grad) <= TOLERANCE[torch.float64]


def test_conv4_shapes_and_parameter_counts():
    omniglot = pymaml.models.Conv4()
    assert omniglot(torch.rand(3, 1, 28, 28)).shape == (3, 5)
    # 640 + 3 × 36,928 (convolutions) + 4 × 128 (BatchNorm) + 256 × 5 + 5 (head)
    assert sum(p.numel() for p in omniglot.parameters()) == 113_221
    mini = pymaml.models.Conv4(3, 5, hidden=32, image_size=84, strided=False)
    assert mini(torch.rand(2, 3, 84, 84)).shape == (2, 5)
    assert isinstance(mini[3], torch.nn.MaxPool2d) and mini[-1].in_features == 32 * 5 * 5
    with pytest.raises(ValueError, match="too small"):
        pymaml.models.Conv4(image_size=8, strided=False)


def test_omniglot_mlp_layers():
    model = pymaml.models.omniglot_mlp(ways=20)
    assert [m.out_features for m in model if isinstance(m, torch.nn.Linear)] == [256, 128, 64, 64, 20]
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in model) == 4
    assert model(torch.rand(6, 1, 28, 28)).shape == (6, 20)
