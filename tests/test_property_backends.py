"""Property: on random small models, mixes of what the fused kernel takes and what it must refuse
(Linear subclasses, hooks, parametrizations, frozen parameters, buffers, extra parameters, every
kind of activation, bias per layer), every backend `auto` can pick on the CPU, and each one named
explicitly, gives the oracle's meta-loss and meta-gradient, or refuses with a clear error; never
a different number."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import pymaml
from helpers import TOLERANCE, relative_error
from pymaml.numerics.state import adapted_parameters

LINEAR_KINDS = ("plain", "plain", "plain", "plain", "subclass", "doubled-subclass", "lora", "forward-hook",
                "forward-pre-hook", "backward-hook", "gradient-hook", "weight-norm", "parametrized", "frozen-weight",
                "frozen-bias", "buffer", "instance-forward", "extra-parameter")
ACTIVATION_KINDS = ("relu", "relu-inplace", "tanh", "sigmoid", "identity", "leaky-relu-subclass", "tanh-subclass",
                    "scaled-sigmoid-subclass", "gelu", "hooked-tanh")
MODEL_KINDS = ("plain", "plain", "plain", "residual-subclass", "forward-hook", "extra-parameter", "global-hook")
EXPLICIT_BACKENDS = ("cpp", "func")


class SameLinear(nn.Linear):
    """A subclass that computes what nn.Linear computes."""


class DoubledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class LoraLinear(nn.Linear):
    def __init__(self, fan_in, fan_out, bias):
        super().__init__(fan_in, fan_out, bias=bias)
        self.down = nn.Parameter(0.5 * torch.randn(1, fan_in))
        self.up = nn.Parameter(0.5 * torch.randn(fan_out, 1))

    def forward(self, x):
        return super().forward(x) + x @ self.down.T @ self.up.T


class LeakyReLU(nn.ReLU):
    def forward(self, x):
        return torch.relu(x) + 0.1 * x


class SameTanh(nn.Tanh):
    """A subclass that computes what nn.Tanh computes."""


class ScaledSigmoid(nn.Sigmoid):
    def forward(self, x):
        return 2 * torch.sigmoid(x)


class Residual(nn.Sequential):
    def forward(self, x):
        out = super().forward(x)
        return out + x.sum(-1, keepdim=True)


class Doubled(nn.Module):
    def forward(self, weight):
        return 2 * weight


def make_linear(kind: str, fan_in: int, fan_out: int, bias: bool) -> nn.Module:
    classes = {"subclass": SameLinear, "doubled-subclass": DoubledLinear}
    if kind == "lora":
        layer = LoraLinear(fan_in, fan_out, bias)
    else:
        layer = classes.get(kind, nn.Linear)(fan_in, fan_out, bias=bias)
    layer = layer.double()
    if kind == "forward-hook":
        layer.register_forward_hook(lambda module, inputs, output: 1.5 * output)
    elif kind == "forward-pre-hook":
        layer.register_forward_pre_hook(lambda module, inputs: (inputs[0] - 0.25,))
    elif kind == "backward-hook":
        layer.register_full_backward_hook(
            lambda module, grad_input, grad_output: None if grad_input[0] is None else (2 * grad_input[0],))
    elif kind == "gradient-hook":
        layer.weight.register_hook(lambda grad: 0.5 * grad)
    elif kind == "weight-norm":
        parametrizations.weight_norm(layer)
    elif kind == "parametrized":
        parametrize.register_parametrization(layer, "weight", Doubled())
    elif kind == "frozen-weight":
        layer.weight.requires_grad_(False)
    elif kind == "frozen-bias" and bias:
        layer.bias.requires_grad_(False)
    elif kind == "buffer":
        layer.register_buffer("scale", torch.ones(fan_out, dtype=torch.float64))
    elif kind == "instance-forward":
        linear_forward = layer.forward
        layer.forward = lambda x: 2 * linear_forward(x)
    elif kind == "extra-parameter":
        layer.register_parameter("gain", nn.Parameter(torch.ones(fan_out, dtype=torch.float64)))
    return layer


def make_activation(kind: str) -> nn.Module:
    simple = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "identity": nn.Identity, "gelu": nn.GELU,
              "leaky-relu-subclass": LeakyReLU, "tanh-subclass": SameTanh, "scaled-sigmoid-subclass": ScaledSigmoid}
    if kind == "relu-inplace":
        return nn.ReLU(inplace=True)
    if kind == "hooked-tanh":
        activation = nn.Tanh()
        activation.register_forward_hook(lambda module, inputs, output: output * output)
        return activation
    return simple[kind]()


@st.composite
def cases(draw, linear_kinds=LINEAR_KINDS, activation_kinds=ACTIVATION_KINDS, model_kinds=MODEL_KINDS,
          bias_modes=("all", "all", "none", "mixed"), mixed_activations=True):
    depth = draw(st.integers(1, 3))
    widths = [draw(st.integers(1, 3))] + [draw(st.integers(1, 4)) for _ in range(depth)]
    bias_mode = draw(st.sampled_from(bias_modes))
    biases = [True] * depth if bias_mode == "all" else [False] * depth if bias_mode == "none" else \
        [draw(st.booleans()) for _ in range(depth)]
    chosen_linears = [draw(st.sampled_from(linear_kinds)) for _ in range(depth)]
    if not mixed_activations or draw(st.booleans()):
        chosen_activations = [draw(st.sampled_from(activation_kinds))] * (depth - 1)
    else:
        chosen_activations = [draw(st.sampled_from(activation_kinds)) for _ in range(depth - 1)]
    loss = draw(st.sampled_from(["mse", "cross_entropy"])) if widths[-1] > 1 else "mse"
    return dict(
        widths=widths, biases=biases, linear_kinds=chosen_linears, activation_kinds=chosen_activations,
        model_kind=draw(st.sampled_from(model_kinds)), loss=loss, seed=draw(st.integers(0, 2**16)),
        tasks=draw(st.integers(1, 3)), shots=draw(st.integers(1, 3)), queries=draw(st.integers(1, 3)),
        options=dict(inner_steps=draw(st.integers(0, 2)), first_order=draw(st.booleans()),
                     inner_lr=draw(st.sampled_from([0.1, 0.4])), loss=loss),
    )


def build_model(case) -> nn.Module:
    torch.manual_seed(case["seed"])
    widths, layers = case["widths"], []
    for index, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(make_linear(case["linear_kinds"][index], fan_in, fan_out, case["biases"][index]))
        if index < len(widths) - 2:
            layers.append(make_activation(case["activation_kinds"][index]))
    kind = case["model_kind"]
    model = Residual(*layers) if kind == "residual-subclass" else nn.Sequential(*layers)
    if kind == "forward-hook":
        model.register_forward_hook(lambda module, inputs, output: output + 0.5)
    elif kind == "extra-parameter":
        model.offset = nn.Parameter(torch.zeros(widths[-1], dtype=torch.float64))
    return model


def make_batch(case):
    generator = torch.Generator().manual_seed(case["seed"] + 1)
    tensors, fan_in, fan_out = [], case["widths"][0], case["widths"][-1]
    for points in (case["shots"], case["queries"]):
        tensors.append(torch.randn(case["tasks"], points, fan_in, generator=generator, dtype=torch.float64))
        if case["loss"] == "cross_entropy":
            tensors.append(torch.randint(0, fan_out, (case["tasks"], points), generator=generator))
        else:
            tensors.append(torch.randn(case["tasks"], points, fan_out, generator=generator, dtype=torch.float64))
    return tuple(tensors)


def global_hook(module, inputs, output):
    """Scales the output of every activation, wherever it is."""
    return 1.25 * output if isinstance(module, (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.GELU)) else None


def flat(tensors):
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def assert_close(actual, expected, what):
    assert relative_error(actual.detach(), expected.detach()) <= TOLERANCE[torch.float64], what


def check_backend(model, batch, options, backend, expected_loss, expected_grad):
    """The backend's meta-loss and meta-gradient (through autograd and through meta_gradient) are
    the oracle's; or it refuses the model, naming why (`auto` always finds a backend). Where the
    oracle itself fails (expected_loss None), the backend fails too. Returns the backend used."""
    params = list(adapted_parameters(model).values())
    try:
        maml = pymaml.MAML(model, backend=backend, **options)
    except RuntimeError as error:
        assert backend != "auto" and "cannot run this model" in str(error), str(error)
        return None
    if expected_loss is None:
        with pytest.raises(Exception):
            maml(*batch).loss.backward()
        return maml.backend
    out = maml(*batch)
    grads = _meta_gradient(out.loss, params)
    what = f"{backend} ({maml.backend}, {maml.backend_choice})"
    assert_close(out.loss, expected_loss, what + ": loss")
    assert_close(flat(grads), expected_grad, what + ": gradient")
    for p in params:
        p.grad = None
    out = maml.meta_gradient(*batch, accumulate=False)
    assert_close(out.loss, expected_loss, what + ": meta_gradient loss")
    # A parameter the loss does not use keeps .grad None, as after loss.backward().
    assert_close(flat(torch.zeros_like(p) if p.grad is None else p.grad for p in params), expected_grad,
                 what + ": meta_gradient .grad")
    for p in params:
        p.grad = None
    return maml.backend


def _meta_gradient(loss, params):
    """The gradient of the meta-loss with respect to params, zero for a parameter the loss does not
    use; all zero where no parameter that requires grad reaches the loss (a frozen layer and an
    unused parameter), which leaves the loss without a graph to differentiate."""
    if not loss.requires_grad:
        return [torch.zeros_like(p) for p in params]
    return torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)


def oracle(model, batch, options):
    """The oracle's meta-loss and flat meta-gradient, or (None, None) where it cannot run the model."""
    params = list(adapted_parameters(model).values())
    try:
        loss = pymaml.reference.meta_loss(model, *batch, **options)
        grads = _meta_gradient(loss, params)
    except RuntimeError:  # e.g. a backward hook around an in-place activation
        return None, None
    return loss.detach(), flat(grads)


@settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_every_backend_gives_the_oracles_meta_gradient_or_refuses(case):
    handle = torch.nn.modules.module.register_module_forward_hook(global_hook) if case["model_kind"] == "global-hook" else None
    try:
        model = build_model(case)
        batch, options = make_batch(case), case["options"]
        params = list(adapted_parameters(model).values())
        if not params:
            with pytest.raises(ValueError, match="no parameters that require grad"):
                pymaml.MAML(model, **options)
            return
        expected_loss, expected_grad = oracle(model, batch, options)
        assert check_backend(model, batch, options, "auto", expected_loss, expected_grad) is not None
        for backend in EXPLICIT_BACKENDS:
            check_backend(model, batch, options, backend, expected_loss, expected_grad)
    finally:
        if handle is not None:
            handle.remove()


PLAIN_CASES = cases(linear_kinds=("plain",), activation_kinds=("relu", "relu-inplace", "tanh", "sigmoid", "identity"),
                    model_kinds=("plain",), bias_modes=("all", "none"), mixed_activations=False)


@pytest.mark.skipif(not pymaml.build_info()["extension"], reason="pymaml._C is not built")
@settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
@given(case=PLAIN_CASES)
def test_plain_mlps_are_taken_by_the_fused_kernel(case):
    """The refusals are exact: a model made only of what the kernel computes is accepted."""
    model = build_model(case)
    assert pymaml.MAML(model, **case["options"]).backend == "cpp"
    batch, options = make_batch(case), case["options"]
    assert check_backend(model, batch, options, "cpp", *oracle(model, batch, options)) == "cpp"


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("steps", [0, 1, 2])
def test_a_loss_that_reaches_no_trainable_parameter_has_a_zero_meta_gradient(steps, first_order):
    """A frozen layer beside a parameter the forward never uses (a case hypothesis found): the
    oracle's inner gradients are zero rather than an error, its meta-gradient is zero, and every
    backend gives the same loss and gradient or refuses the model."""
    case = dict(widths=[1, 1], biases=[False], linear_kinds=["frozen-weight"], activation_kinds=[],
                model_kind="extra-parameter", loss="mse", seed=0, tasks=1, shots=1, queries=1,
                options=dict(inner_steps=steps, first_order=first_order, inner_lr=0.1, loss="mse"))
    model, batch = build_model(case), make_batch(case)
    expected_loss, expected_grad = oracle(model, batch, case["options"])
    assert expected_loss is not None and torch.equal(expected_grad, torch.zeros(1, dtype=torch.float64))
    assert check_backend(model, batch, case["options"], "auto", expected_loss, expected_grad) == "func"
    for backend in (*EXPLICIT_BACKENDS, "reference"):
        check_backend(model, batch, case["options"], backend, expected_loss, expected_grad)
