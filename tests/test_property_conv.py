"""Property: on random conv stacks (depth 1 to 3 of conv → optional BatchNorm2d → activation →
optional pool, then Flatten → Linear), with random shapes that fit, the fused `cpp` backend's
meta-loss and flat meta-gradient are the oracle's within the float64 tolerance.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import pymaml
from helpers import TOLERANCE, backend_meta_gradient, oracle_meta_gradient, relative_error

FUSED_BACKEND = "cpp"
ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.2), "elu": lambda: nn.ELU(0.7),
               "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "identity": nn.Identity}
pytestmark = pytest.mark.skipif(not pymaml.build_info()["extension"], reason="pymaml._C is not built")


@st.composite
def conv_stacks(draw):
    """(blocks, image, head outputs, loss, options, batch sizes, seed): each block is (out channels,
    kernel, stride, padding, bias, norm, activation, pool) and fits the image the block before leaves."""
    channels, size = draw(st.integers(1, 3)), draw(st.integers(3, 12))
    image, blocks = (channels, size, size), []
    norms = ["none", "affine", "plain"]
    pools = ["none", "max", "avg"]
    activations = list(ACTIVATIONS)
    for _ in range(draw(st.integers(1, 3))):
        padding = draw(st.integers(0, 2))
        kernel = draw(st.sampled_from([k for k in (1, 2, 3, 5) if k <= size + 2 * padding]))
        stride = draw(st.integers(1, 2))
        size = (size + 2 * padding - kernel) // stride + 1
        pool = draw(st.sampled_from(pools)) if size >= 2 else "none"
        pool_kernel = draw(st.integers(2, min(3, size))) if pool != "none" else 0
        if pool != "none":
            size //= pool_kernel
        blocks.append((draw(st.integers(1, 4)), kernel, stride, padding, draw(st.booleans()),
                       draw(st.sampled_from(norms)), draw(st.sampled_from(activations)), pool, pool_kernel))
    loss = draw(st.sampled_from(["mse", "cross_entropy"]))
    outputs = draw(st.integers(1, 3)) if loss == "mse" else draw(st.integers(2, 4))
    options = dict(inner_lr=draw(st.sampled_from([0.05, 0.2])), inner_steps=draw(st.integers(0, 2)),
                   first_order=draw(st.booleans()), loss=loss)
    # At least 2 points per set: BatchNorm needs more than one value per channel.
    sizes = (draw(st.integers(1, 2)), draw(st.integers(2, 3)), draw(st.integers(2, 3)))
    return blocks, image, outputs, options, sizes, draw(st.integers(0, 2**16))


def build(blocks, image, outputs, seed) -> nn.Sequential:
    torch.manual_seed(seed)
    layers, channels, size = [], image[0], image[1]
    for out, kernel, stride, padding, bias, norm, activation, pool, pool_kernel in blocks:
        layers.append(nn.Conv2d(channels, out, kernel, stride=stride, padding=padding, bias=bias))
        if norm != "none":
            layers.append(nn.BatchNorm2d(out, affine=norm == "affine", track_running_stats=False))
        layers.append(ACTIVATIONS[activation]())
        channels, size = out, (size + 2 * padding - kernel) // stride + 1
        if pool != "none":
            layers.append((nn.MaxPool2d if pool == "max" else nn.AvgPool2d)(pool_kernel))
            size //= pool_kernel
    layers += [nn.Flatten(), nn.Linear(channels * size * size, outputs)]
    model = nn.Sequential(*layers).double()
    with torch.no_grad():  # BatchNorm weights and biases away from torch's 1 and 0
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif p.dim() == 1:
                p.uniform_(-0.3, 0.3)
    return model


def batch_for(image, outputs, loss, sizes, seed):
    tasks, shots, queries = sizes
    generator = torch.Generator().manual_seed(seed + 1)
    tensors = []
    for points in (shots, queries):
        tensors.append(torch.randn(tasks, points, *image, generator=generator, dtype=torch.float64))
        if loss == "cross_entropy":
            tensors.append(torch.randint(0, outputs, (tasks, points), generator=generator))
        else:
            tensors.append(torch.randn(tasks, points, outputs, generator=generator, dtype=torch.float64))
    return tuple(tensors)


@settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
@given(case=conv_stacks())
def test_random_conv_stacks_match_the_oracle(case):
    blocks, image, outputs, options, sizes, seed = case
    model = build(blocks, image, outputs, seed)
    assert pymaml.MAML(model, **options).backend == FUSED_BACKEND
    batch = batch_for(image, outputs, options["loss"], sizes, seed)
    expected_loss, expected_grad = oracle_meta_gradient(model, batch, **options)
    actual_loss, actual_grad = backend_meta_gradient(model, batch, FUSED_BACKEND, **options)
    assert relative_error(actual_loss, expected_loss) <= TOLERANCE[torch.float64], model
    assert relative_error(actual_grad, expected_grad) <= TOLERANCE[torch.float64], model
