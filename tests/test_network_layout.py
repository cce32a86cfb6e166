"""Networks beyond the MLP kernels' pattern on the native core: the layer encoding, which models
`cpp` takes (and `cuda`/`triton` leave to it), the per-call re-check of layer settings, and the
input-shape errors."""

import re

import pytest
import torch
from torch import nn

import pymaml
from helpers import TOLERANCE, assert_backend_matches_oracle, make_batch, relative_error
from pymaml.backends import MetaConfig, get_backend
from pymaml.backends.cpp import mlp_layout
from pymaml.ops.meta_step import network

HAS_EXTENSION = pymaml.build_info()["extension"]
needs_extension = pytest.mark.skipif(not HAS_EXTENSION, reason="pymaml._C is not built")
CONFIG = MetaConfig(2, False, "mse")
OPTIONS = dict(inner_lr=0.3, inner_steps=2)


@needs_extension
def test_the_encoding_tables_are_the_extensions():
    assert network.KINDS == pymaml._C.layer_kinds()
    assert network.LAYER_INTS == pymaml._C.LAYER_INTS


def test_encode_and_decode_are_inverse():
    specs = [network.LayerSpec("conv2d", out=4, kernel=3, stride=2, padding=1, bias=True),
             network.LayerSpec("batch_norm", affine=True, constant=1e-3),
             network.LayerSpec("activation", activation="leaky_relu", constant=0.2),
             network.LayerSpec("max_pool", kernel=2, stride=2), network.LayerSpec("flatten"),
             network.LayerSpec("linear", out=5)]
    layers, constants = network.encode((3, 9, 7), specs)
    assert len(layers) == 3 + network.LAYER_INTS * len(specs) and len(constants) == len(specs)
    assert network.decode(layers, constants) == ((3, 9, 7), specs)
    with pytest.raises(ValueError, match="one layer constant per layer"):
        network.decode(layers, constants[:-1])


def _double(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for p in model.parameters():
        p.data = torch.randn_like(p) * 0.5
    return model.double()


# Linear networks the native core computes that are not MLPs of one activation with uniform biases.
LINEAR_NETWORKS = {
    "bias-mix": lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5, bias=False), nn.Tanh(),
                                      nn.Linear(5, 2)),
    "mixed-activations": lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh(),
                                               nn.Linear(4, 2)),
    "linear-linear": lambda: nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)),
    "trailing-activation": lambda: nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2), nn.Tanh()),
    "nested": lambda: nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.Tanh(), nn.Sequential(nn.Linear(4, 4), nn.ReLU())),
                                    nn.Linear(4, 2)),
    "flatten-identity": lambda: nn.Sequential(nn.Flatten(), nn.Linear(3, 6), nn.Identity(), nn.Tanh(),
                                              nn.Linear(6, 2)),
}


@needs_extension
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("name", sorted(LINEAR_NETWORKS))
def test_cpp_computes_linear_networks_the_mlp_kernels_leave(name, first_order, loss):
    model = _double(LINEAR_NETWORKS[name]())
    layout, reason = mlp_layout(model)
    assert reason is None and not layout.is_mlp
    assert pymaml.MAML(model, **OPTIONS).backend == "cpp"
    batch = make_batch(3, 5, 3, 2, loss)
    assert_backend_matches_oracle(model, batch, "cpp", first_order=first_order, loss=loss, **OPTIONS)


@pytest.mark.parametrize("name", sorted(LINEAR_NETWORKS))
def test_the_mlp_kernels_leave_other_networks_to_cpp(name):
    model = _double(LINEAR_NETWORKS[name]())
    for backend, device in (("cuda", "cuda"), ("triton", "cuda")):
        why = get_backend(backend).unsupported_reason(model, CONFIG, torch.device(device))
        assert why is not None and "this network runs fused on 'cpp'" in why, (backend, why)


@needs_extension
def test_a_nested_mlp_is_an_mlp():
    model = _double(nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.Tanh(), nn.Sequential(nn.Linear(4, 2)))))
    layout, reason = mlp_layout(model)
    assert reason is None and layout.is_mlp and layout.widths == [3, 4, 2]
    assert layout.names == ["0.weight", "0.bias", "1.1.0.weight", "1.1.0.bias"]
    assert_backend_matches_oracle(model, make_batch(3, 5, 3, 2, "mse"), "cpp", loss="mse", **OPTIONS)


@needs_extension
def test_nested_parameter_names_follow_named_parameters():
    model = _double(LINEAR_NETWORKS["nested"]())
    layout, _ = mlp_layout(model)
    assert layout.names == [name for name, _ in model.named_parameters()]


REFUSED = {
    "conv-reflect": (lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten(),
                                           nn.Linear(32, 2)), r"layer 0 \(Conv2d\) has padding_mode='reflect'"),
    "conv-groups": (lambda: nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten(), nn.Linear(8, 2)),
                    r"layer 0 \(Conv2d\) has dilation \(1, 1\) and groups 2"),
    "conv-dilation": (lambda: nn.Sequential(nn.Conv2d(1, 2, 3, dilation=2), nn.Flatten(), nn.Linear(8, 2)),
                      r"layer 0 \(Conv2d\) has dilation \(2, 2\)"),
    "conv-rectangular": (lambda: nn.Sequential(nn.Conv2d(1, 2, (3, 1)), nn.Flatten(), nn.Linear(8, 2)),
                         r"square kernels and strides"),
    "conv-same": (lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding="same"), nn.Flatten(), nn.Linear(32, 2)),
                  r"padding='same'"),
    "batch-norm-running-stats": (lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)),
                                 r"layer 1 \(BatchNorm1d\) tracks running statistics"),
    "max-pool-stride": (lambda: nn.Sequential(nn.MaxPool2d(2, stride=1), nn.Flatten(), nn.Linear(8, 2)),
                        r"layer 0 \(MaxPool2d\) has kernel_size 2, stride 1"),
    "avg-pool-ceil": (lambda: nn.Sequential(nn.AvgPool2d(2, ceil_mode=True), nn.Flatten(), nn.Linear(8, 2)),
                      r"layer 0 \(AvgPool2d\) .* ceil_mode True"),
    "flatten-dims": (lambda: nn.Sequential(nn.Flatten(2), nn.Linear(4, 2)), r"layer 0 \(Flatten\) flattens dims 2 to -1"),
    "leaky-negative": (lambda: nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(-0.5), nn.Linear(4, 2)),
                       r"layer 1 \(LeakyReLU\) has negative_slope=-0.5"),
    "conv4-subclass": (lambda: type("MyConv4", (pymaml.models.Conv4,), {})(ways=2, hidden=4),
                       r"the model is MyConv4, a subclass of nn.Sequential"),
    "nested-subclass": (lambda: nn.Sequential(nn.Linear(3, 4), type("Block", (nn.Sequential,), {})(nn.Tanh())),
                        r"layer 1 \(Block\) is not supported"),
    "nested-hook": (lambda: _with_hook(), r"the nn.Sequential 1 has a forward hook"),
}


def _with_hook():
    inner = nn.Sequential(nn.Tanh(), nn.Linear(4, 2))
    inner.register_forward_hook(lambda module, inputs, output: 2 * output)
    return nn.Sequential(nn.Linear(3, 4), inner)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_networks_name_the_layer(name):
    build, reason = REFUSED[name]
    model = build().double()
    why = get_backend("cpp").unsupported_reason(model, CONFIG, torch.device("cpu"))
    assert why is not None and re.search(reason, why), why
    if HAS_EXTENSION:
        auto = pymaml.MAML(model, **OPTIONS)
        assert auto.backend in ("func", "reference") and re.search(reason, auto.backend_choice)


@needs_extension
def test_a_layer_setting_changed_in_place_is_seen_on_the_next_call():
    """A setting is not a parameter: changing a LeakyReLU's slope between calls must not leave the
    fused kernel computing the old network."""
    model = _double(nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(0.1), nn.Linear(4, 2)))
    maml = pymaml.MAML(model, backend="cpp", **OPTIONS)
    batch = make_batch(3, 5, 3, 2, "mse")
    first = maml(*batch).loss.item()
    model[1].negative_slope = 0.7
    second = maml(*batch).loss.item()
    expected = pymaml.reference.meta_loss(model, *batch, loss="mse", **OPTIONS).item()
    assert second != first
    assert relative_error(torch.tensor(second), torch.tensor(expected)) <= TOLERANCE[torch.float64]
    model[1].negative_slope = -1.0
    with pytest.raises(RuntimeError, match="negative_slope=-1.0"):
        maml(*batch)


@needs_extension
def test_batch_norm_given_running_statistics_later_is_refused_on_the_next_call():
    model = _double(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2)))
    assert mlp_layout(model)[1] is None
    layout = mlp_layout(model)[0]
    model[1].running_mean = torch.zeros(4, dtype=torch.float64)
    assert not layout.unchanged(model)
    assert "tracks running statistics" in mlp_layout(model)[1]


@needs_extension
def test_points_that_do_not_fit_the_network_raise_naming_the_layer():
    model = _double(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.Linear(2, 2)))
    layout, _ = mlp_layout(model)
    with pytest.raises(ValueError, match=r"layer 0 \(Linear\) takes 3 inputs after a layer of 5"):
        layout.network((5,))
    with pytest.raises(ValueError, match=r"layer 0 \(Linear\) gets images \[3, 2, 2\]"):
        layout.network((3, 2, 2))
    with pytest.raises(ValueError, match=r"a vector \[n\] or an image \[C, H, W\]"):
        layout.network((3, 2))
    maml = pymaml.MAML(model, backend="cpp", **OPTIONS)
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="takes 3 inputs"):
        maml(x, torch.randn(2, 4, 2, dtype=torch.float64), x, torch.randn(2, 4, 2, dtype=torch.float64))


def _twin_case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3, track_running_stats=False),
                          nn.LeakyReLU(0.1), nn.MaxPool2d(2), nn.Conv2d(3, 4, 1, bias=False), nn.ELU(0.7),
                          nn.AvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
                          nn.BatchNorm1d(5, affine=False, track_running_stats=False), nn.Sigmoid(),
                          nn.Linear(5, 3)).double()
    generator = torch.Generator().manual_seed(2)
    images = lambda: torch.randn(3, 6, 2, 9, 9, generator=generator, dtype=torch.float64)  # noqa: E731
    labels = lambda: torch.randint(0, 3, (3, 6), generator=generator)  # noqa: E731
    return model, (images(), labels(), images(), labels())


def test_the_twin_computes_the_oracles_meta_gradient_of_a_conv_network():
    """The pure-torch twin of the fused op (its fallback) on every layer kind, second order: torch's
    own batch_norm has wrong second derivatives under vmap(grad), so the twin must not use it."""
    from pymaml.ops import meta_step_torch

    model, (sx, sy, qx, qy) = _twin_case()
    layout, reason = mlp_layout(model)
    assert reason is None
    layers, constants = layout.network((2, 9, 9))
    theta = torch.cat([p.detach().reshape(-1) for p in layout.parameters()])
    lrs = torch.full((2, theta.numel()), 0.1, dtype=torch.float64)
    step_weights = torch.tensor([0.0, 1.0], dtype=torch.float64)
    out = meta_step_torch(theta, lrs, step_weights, sx.flatten(2), sy, qx.flatten(2), qy, layers, constants,
                          "cross_entropy", False, False)
    loss = pymaml.reference.meta_loss(model, sx, sy, qx, qy, inner_lr=0.1, inner_steps=2, loss="cross_entropy")
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
    assert relative_error(out[0], loss.detach()) <= TOLERANCE[torch.float64]
    assert relative_error(out[4], grad) <= TOLERANCE[torch.float64]


def test_the_hvp_twin_matches_torch_func_on_a_conv_network():
    from pymaml.ops import hvp_torch

    model, (x, y, _, _) = _twin_case()
    layout, _ = mlp_layout(model)
    layers, constants = layout.network((2, 9, 9))
    generator = torch.Generator().manual_seed(5)
    params = {name: p.detach().expand(3, *p.shape).clone() for name, p in model.named_parameters()}
    v = {name: torch.randn(p.shape, generator=generator, dtype=torch.float64) for name, p in params.items()}
    expected = pymaml.hvp(model, params, x, y, v, fused=False, loss="cross_entropy")
    flat = lambda tensors: torch.cat([tensors[n].reshape(3, -1) for n in layout.names], dim=1)  # noqa: E731
    actual = hvp_torch(flat(params), flat(v), x.flatten(2), y, layers, constants, "cross_entropy")
    assert relative_error(actual, flat(expected)) <= TOLERANCE[torch.float64]


@needs_extension
@pytest.mark.parametrize("support,query,steps", [(1, 3, 1), (3, 1, 1), (1, 3, 0)])
def test_batch_norm_of_one_value_per_channel_raises_as_torch_does(support, query, steps):
    """Batch statistics of a single value are undefined: torch raises, and so must the fused path
    (the kernel would give x̂ = 0), except for a support set that no inner step uses."""
    model = _double(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Tanh(),
                                  nn.Linear(4, 2)))
    generator = torch.Generator().manual_seed(0)
    batch = (torch.randn(2, support, 3, generator=generator, dtype=torch.float64),
             torch.randn(2, support, 2, generator=generator, dtype=torch.float64),
             torch.randn(2, query, 3, generator=generator, dtype=torch.float64),
             torch.randn(2, query, 2, generator=generator, dtype=torch.float64))
    options = dict(inner_lr=0.3, inner_steps=steps, loss="mse")
    if support == 1 and steps == 0:
        assert_backend_matches_oracle(model, batch, "cpp", **options)
        return
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        pymaml.reference.meta_loss(model, *batch, **options)
    maml = pymaml.MAML(model, backend="cpp", **options)
    with pytest.raises(ValueError, match=r"layer 1 \(BatchNorm1d\) gets one value per channel"):
        maml(*batch)
    with pytest.raises(ValueError, match=r"layer 1 \(BatchNorm1d\) gets one value per channel"):
        maml.meta_gradient(*batch, accumulate=False)
