"""The fused op pymaml::meta_step on MLPs: registration, twin, binding checks, determinism, numpy inputs."""

import re

import numpy as np
import pytest
import torch

import pymaml
from helpers import TOLERANCE, make_batch, make_mlp, oracle_meta_gradient, relative_error
from pymaml.backends.cpp import mlp_layout
from pymaml.ops import encode_mlp, meta_step, meta_step_torch
from pymaml.ops.meta_step import as_mlp, fused_forward, output_features
from pymaml.ops.meta_step.cpu import fused_cpu

needs_extension = pytest.mark.skipif(pymaml.build_info()["extension"] is False, reason="pymaml._C is not built")


def op_arguments(widths=(3, 5, 2), activation="tanh", loss="mse", steps=2, tasks=3, shots=4, dtype=torch.float64,
                 first_order=False, lr_grad=True, seed=0, bias=True):
    if bias:
        model = make_mlp(widths, activation, dtype, seed=seed)
    else:
        torch.manual_seed(seed)
        model = pymaml.models.mlp(widths, {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh}[activation], bias=False)
        model = model.to(dtype)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    generator = torch.Generator().manual_seed(seed + 1)
    lrs = 0.1 + 0.2 * torch.rand(steps, theta.numel(), generator=generator, dtype=dtype)
    step_weights = torch.rand(steps, generator=generator, dtype=dtype)
    batch = make_batch(tasks, shots, widths[0], widths[-1], loss, dtype, seed=seed + 2)
    return (theta, lrs, step_weights, *batch, *encode_mlp(widths, activation, bias), loss, first_order, lr_grad)


@needs_extension
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("first_order", [False, True])
def test_fused_equals_torch_twin(loss, first_order):
    arguments = op_arguments(loss=loss, first_order=first_order)
    fused = meta_step(*arguments)
    twin = meta_step_torch(*arguments)
    for name, a, b in zip(["meta_loss", "task_losses", "pre_losses", "step_losses", "grad_theta", "grad_lrs"], fused, twin):
        assert a.shape == b.shape, name
        assert relative_error(a, b) <= TOLERANCE[torch.float64], name


@pytest.mark.parametrize("steps", [0, 1, 3])
def test_opcheck(steps):
    arguments = op_arguments(steps=steps)
    theta, lrs, step_weights = (t.clone().requires_grad_() for t in arguments[:3])
    torch.library.opcheck(torch.ops.pymaml.meta_step.default, (theta, lrs, step_weights, *arguments[3:]))


def test_backward_scales_the_gradients_and_reaches_every_input():
    theta, lrs, step_weights, *rest = op_arguments(steps=2)
    inputs = [t.clone().requires_grad_() for t in (theta, lrs, step_weights)]
    outputs = meta_step(*inputs, *rest)
    (3.0 * outputs[0]).backward()
    assert torch.allclose(inputs[0].grad, 3.0 * outputs[4], rtol=1e-15, atol=0)
    assert torch.allclose(inputs[1].grad, 3.0 * outputs[5], rtol=1e-15, atol=0)
    assert torch.allclose(inputs[2].grad, 3.0 * outputs[3], rtol=1e-15, atol=0)


def test_differentiating_the_backward_again_raises():
    model = make_mlp((3, 5, 2), "tanh")
    batch = make_batch(3, 4, 3, 2, "mse")
    maml = pymaml.MAML(model, inner_lr=0.1, backend="cpp" if pymaml.build_info()["extension"] else "auto")
    loss = maml(*batch).loss
    if maml.backend != "cpp":
        pytest.skip("pymaml._C is not built")
    with pytest.raises(RuntimeError, match="cannot be differentiated again"):
        torch.autograd.grad(loss, list(model.parameters()), create_graph=True)


@needs_extension
def test_results_do_not_depend_on_the_thread_count():
    # About 31 MFLOP: enough work for the launcher to use both threads (one per ~2 MFLOP).
    arguments = op_arguments(widths=(4, 64, 48, 3), tasks=13, steps=3, shots=8, dtype=torch.float32)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = meta_step(*arguments)
        torch.set_num_threads(2)
        two = meta_step(*arguments)
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


@needs_extension
def test_gradient_into_a_list_of_buffers():
    """grad_theta may be the parameters' own buffers (sizes adding up to P, in order)."""
    arguments = op_arguments(widths=(3, 5, 2), steps=2)
    whole = fused_cpu(*arguments)
    sizes = [15, 5, 10, 2]
    parts = [torch.full((n,), float("nan"), dtype=torch.float64) for n in sizes]
    out = fused_cpu(*arguments, all_step_losses=True, grad_out=parts)
    assert out[4] is None
    assert torch.equal(torch.cat(parts), whole[4])
    with pytest.raises(ValueError, match="hold 31 values; the network has 32 parameters"):
        fused_cpu(*arguments, all_step_losses=True, grad_out=[torch.empty(n, dtype=torch.float64) for n in [15, 5, 10, 1]])
    with pytest.raises(TypeError, match=r"grad_theta\[1\] has dtype float32"):
        fused_cpu(*arguments, all_step_losses=True, grad_out=[torch.empty(15, dtype=torch.float64), torch.empty(17)])


@needs_extension
def test_skipped_step_losses_are_nan_and_change_nothing_else():
    """all_step_losses=False skips L_query(θ_s) where w_s = 0; those entries come back NaN."""
    arguments = list(op_arguments(steps=3, dtype=torch.float64))
    arguments[2] = torch.tensor([0.0, 0.7, 1.0], dtype=torch.float64)
    every = fused_forward(*arguments)
    skipped = fused_forward(*arguments, all_step_losses=False)
    assert torch.isnan(skipped[3][0]) and torch.equal(skipped[3][1:], every[3][1:])
    assert not torch.isnan(every[3]).any()
    for index in (0, 1, 2, 4, 5):
        assert torch.equal(skipped[index], every[index])
    # The public op always returns every step loss; a learnable step weight gets its gradient.
    assert not torch.isnan(meta_step(*arguments)[3]).any()


@needs_extension
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_reused_workspace_is_not_poisoned_by_a_diverged_call(bias, activation):
    """The kernel keeps its per-thread workspace between calls of one layout: a call at a NaN
    theta (diverged training) must leave the next call exact."""
    arguments = list(op_arguments(widths=(3, 20, 18, 1), activation=activation, steps=2, dtype=torch.float32,
                                  bias=bias))
    fresh = meta_step(*arguments)
    poisoned = list(arguments)
    poisoned[0] = torch.full_like(arguments[0], float("nan"))
    assert torch.isnan(meta_step(*poisoned)[4]).any()
    again = meta_step(*arguments)
    assert all(torch.equal(a, b) for a, b in zip(fresh, again))
    assert relative_error(again[4], meta_step_torch(*arguments)[4]) <= TOLERANCE[torch.float32]


@needs_extension
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_numpy_arrays_through_dlpack(loss):
    arguments = op_arguments(loss=loss, dtype=torch.float32)
    theta, lrs, step_weights, sx, sy, qx, qy, layers, constants, loss, first_order, _ = arguments
    expected = meta_step(*arguments[:-1], True)
    tasks, steps, params = sx.shape[0], lrs.shape[0], theta.shape[0]
    outputs = dict(meta_loss=np.empty((), np.float32), task_losses=np.empty(tasks, np.float32),
                   pre_losses=np.empty(tasks, np.float32), step_losses=np.empty(steps, np.float32),
                   grad_theta=np.empty(params, np.float32), grad_lrs=np.empty((steps, params), np.float32))
    pymaml._extension.extension().meta_step(
        theta=theta.numpy(), lrs=lrs.numpy(), step_weights=step_weights.numpy(), support_x=sx.numpy(),
        support_y=sy.numpy(), query_x=qx.numpy(), query_y=qy.numpy(), layers=layers, layer_constants=constants,
        loss=loss, first_order=first_order, **outputs,
    )
    for name, value in zip(outputs, expected):
        assert np.array_equal(outputs[name], value.numpy()), name


def _call_binding(**overrides):
    theta, lrs, step_weights, sx, sy, qx, qy, layers, constants, loss, first_order, _ = op_arguments(
        loss=overrides.pop("loss_kind", "mse"))
    tasks, steps, params = sx.shape[0], lrs.shape[0], theta.shape[0]
    empty = lambda *shape: torch.empty(shape, dtype=theta.dtype)  # noqa: E731
    arguments = dict(theta=theta, lrs=lrs, step_weights=step_weights, support_x=sx, support_y=sy, query_x=qx,
                     query_y=qy, layers=layers, layer_constants=constants, loss=loss, first_order=first_order,
                     meta_loss=empty(), task_losses=empty(tasks), pre_losses=empty(tasks), step_losses=empty(steps),
                     grad_theta=empty(params), grad_lrs=None, threads=1)
    arguments.update(overrides)
    pymaml._extension.extension().meta_step(**arguments)


@needs_extension
@pytest.mark.parametrize("overrides,error,message", [
    (dict(theta=torch.zeros(5, dtype=torch.float64)), ValueError, r"theta must have shape \(32,\)"),
    (dict(theta=torch.zeros(32, dtype=torch.float16)), TypeError, "theta has dtype float16 but must be float32 or float64"),
    (dict(support_x=torch.zeros(3, 4, 2, dtype=torch.float64)), ValueError, r"support_x must have shape \(3, 4, 3\)"),
    (dict(query_x=torch.zeros(2, 4, 3, dtype=torch.float64)), ValueError, r"query_x must have shape \(3, 4, 3\)"),
    (dict(query_x=torch.zeros(3, 4, 3, dtype=torch.float32)), TypeError, "query_x has dtype float32 but must be float64"),
    (dict(support_y=torch.zeros(3, 4, 2, dtype=torch.int64)), TypeError, "support_y has dtype int64 but must be float64"),
    (dict(support_x=torch.zeros(3, 3, 4, dtype=torch.float64).transpose(1, 2)), ValueError, "support_x must be contiguous"),
    (dict(lrs=torch.zeros(2, 5, dtype=torch.float64)), ValueError, r"lrs must have shape \(2, 32\)"),
    (dict(step_weights=torch.zeros(3, dtype=torch.float64)), ValueError, r"step_weights must have shape \(2,\)"),
    (dict(grad_theta=torch.zeros(3, dtype=torch.float64)), ValueError, r"grad_theta must have shape \(32,\)"),
    # The (3, 5, 2) tanh MLP's encoding with a Linear of 0 outputs, then with an unknown activation.
    (dict(layers=[3, 1, 1, 0, 0, 0, 1, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0, 2, 0, 2, 0, 1, 0, 1, 0, 0]), ValueError,
     "the layers do not form a network the fused kernel takes"),
    (dict(layers=[3, 1, 1, 0, 5, 0, 1, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0, 99, 0, 2, 0, 1, 0, 1, 0, 0]), ValueError,
     "layer 1 has an unknown activation"),
    (dict(layers=[3, 1, 1, 0, 5]), ValueError, "layers must be the input shape"),
    (dict(layer_constants=[0.0]), ValueError, "layer_constants must hold one value per layer: 3, got 1"),
    (dict(loss="huber"), ValueError, "loss must be 'mse' or 'cross_entropy'"),
    (dict(threads=0), ValueError, "threads must be >= 1"),
    (dict(theta=[0.0] * 32), TypeError, "theta must be a torch tensor or numpy array"),
    (dict(loss="cross_entropy", loss_kind="mse"), TypeError, "support_y has dtype float64 but must be int64"),
    (dict(loss="cross_entropy", loss_kind="cross_entropy", support_y=torch.full((3, 4), 2)), ValueError,
     r"support_y has label 2 outside \[0, 2\)"),
])
def test_binding_names_the_bad_argument(overrides, error, message):
    with pytest.raises(error, match=message):
        _call_binding(**overrides)


@pytest.mark.parametrize("model,fragment", [
    (torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(), torch.nn.Linear(4, 2)), "layer 1 (Dropout)"),
    (torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), torch.nn.Flatten(),
                         torch.nn.Linear(8, 2)), "layer 0 (Conv2d) has padding_mode='reflect'"),
    (torch.nn.Sequential(torch.nn.Conv1d(3, 4, 1)), "layer 0 (Conv1d)"),
])
def test_unsupported_models_name_the_layer(model, fragment):
    layout, reason = mlp_layout(model)
    assert layout is None and fragment in reason
    if pymaml.build_info()["extension"]:
        with pytest.raises(RuntimeError, match="backend .cpp. cannot run this model on cpu: .*" + re.escape(fragment)):
            pymaml.MAML(model, backend="cpp")
    auto = pymaml.MAML(model, backend="auto")
    assert auto.backend == "func"
    if pymaml.build_info()["extension"]:
        assert "cpp: " in auto.backend_choice and fragment in auto.backend_choice


@needs_extension
def test_auto_picks_cpp_for_a_supported_mlp():
    maml = pymaml.MAML(make_mlp((1, 40, 40, 1), "relu", torch.float32))
    assert maml.backend == "cpp"


@needs_extension
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", [torch.nn.Sigmoid, torch.nn.Identity])
def test_other_activations_and_no_bias(activation, bias):
    torch.manual_seed(0)
    model = pymaml.models.mlp((3, 6, 5, 2), activation, bias=bias).double()
    batch = make_batch(4, 5, 3, 2, "cross_entropy")
    options = dict(inner_lr=0.3, inner_steps=2, first_order=False, loss="cross_entropy")
    expected_loss, expected_grad = oracle_meta_gradient(model, batch, **options)
    out = pymaml.MAML(model, backend="cpp", **options)(*batch)
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(out.loss, list(model.parameters()))])
    assert relative_error(out.loss.detach(), expected_loss) <= TOLERANCE[torch.float64]
    assert relative_error(grad, expected_grad) <= TOLERANCE[torch.float64]


@needs_extension
def test_cpp_backend_sees_edits_to_the_model():
    """The backend caches each model's layout; replacing a layer or a parameter must not go unnoticed."""
    model = make_mlp((3, 6, 2), "relu")
    batch = make_batch(3, 4, 3, 2, "mse")
    options = dict(inner_lr=0.3, inner_steps=2, first_order=False, loss="mse")
    maml = pymaml.MAML(model, backend="cpp", **options)
    maml(*batch)
    model[1] = torch.nn.Tanh()
    with torch.no_grad():
        model[2].weight = torch.nn.Parameter(torch.randn(2, 6, dtype=torch.float64))
    out = maml(*batch)
    expected_loss, expected_grad = oracle_meta_gradient(model, batch, **options)
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(out.loss, list(model.parameters()))])
    assert relative_error(out.loss.detach(), expected_loss) <= TOLERANCE[torch.float64]
    assert relative_error(grad, expected_grad) <= TOLERANCE[torch.float64]


@pytest.mark.parametrize("widths,activation,bias", [((3, 5, 2), "tanh", True), ((1, 40, 40, 1), "relu", False),
                                                    ((6, 3), "none", True), ((4, 7, 7, 7, 2), "sigmoid", True)])
def test_an_mlp_is_encoded_as_a_network(widths, activation, bias):
    """encode_mlp gives the encoding the backends give the same model, and as_mlp recovers the MLP
    (the Triton kernel's description) from it; networks that are not of that form give None."""
    layers, constants = encode_mlp(widths, activation, bias)
    model = pymaml.models.mlp(widths, {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU, "none": torch.nn.Identity,
                                       "sigmoid": torch.nn.Sigmoid}[activation], bias=bias)
    layout, reason = mlp_layout(model)
    assert reason is None and layout.network((widths[0],)) == (layers, constants)
    assert as_mlp(layers, constants) == (list(widths), activation, bias)
    assert output_features(layers, constants) == widths[-1]
    two_linears = layers[:3] + layers[3:11] + layers[3:11]
    assert as_mlp(two_linears, [0.0, 0.0]) is None
    assert as_mlp(layers[:-8], constants[:-1]) is None or len(widths) == 2


def test_output_features_of_a_conv_network():
    from pymaml.ops.meta_step.network import LayerSpec, encode

    layers, constants = encode((3, 11, 9), [LayerSpec("conv2d", out=4, kernel=3, stride=2, padding=1),
                                            LayerSpec("max_pool", kernel=2, stride=2), LayerSpec("flatten")])
    assert output_features(layers, constants) == 4 * 3 * 2
    assert as_mlp(layers, constants) is None


@pytest.mark.parametrize("widths,activation", [((3, 0, 2), "tanh"), ((3,), "tanh"), ((3, 2), "gelu")])
def test_encode_mlp_names_the_bad_argument(widths, activation):
    with pytest.raises(ValueError, match="widths must be|activation must be"):
        encode_mlp(widths, activation, True)
