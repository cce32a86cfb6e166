"""The fused backends accept exactly the MLPs they compute: anything else makes `auto` fall back
(with the reason in maml.backend_choice) and an explicit fused backend raise, naming the layer.
Models that change after the backend was chosen: `auto` chooses again on the next call, an
explicit request raises."""

import gc
import re
import warnings
import weakref

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import pymaml
from helpers import TOLERANCE, assert_backend_matches_oracle, make_batch, relative_error
from pymaml.backends import MetaConfig, get_backend
from pymaml.backends.cpp import mlp_layout

HAS_EXTENSION = pymaml.build_info()["extension"]
needs_extension = pytest.mark.skipif(not HAS_EXTENSION, reason="pymaml._C is not built")
WIDTHS = (2, 5, 4, 2)
OPTIONS = dict(inner_lr=0.3, inner_steps=2)
BATCH = make_batch(3, 4, 2, 2, "mse")
CONFIG = MetaConfig(2, False, "mse")


def mlp(activation=nn.Tanh, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    return pymaml.models.mlp(WIDTHS, activation).double()


def with_layer(index: int, layer: nn.Module, model: nn.Sequential | None = None) -> nn.Sequential:
    """`model` (default: mlp()) with layer `index` replaced by `layer`, which takes over its parameters."""
    model = mlp() if model is None else model
    if isinstance(layer, nn.Linear):
        layer = layer.double()
        layer.load_state_dict(model[index].state_dict(), strict=False)
    model[index] = layer
    return model


class DoubledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class PlainLinearSubclass(nn.Linear):
    """Computes what nn.Linear computes; refused all the same (the kernel takes nn.Linear itself)."""


class LoraLinear(nn.Linear):
    """nn.Linear plus a trainable low-rank term up @ down."""

    def __init__(self, fan_in, fan_out, rank=2):
        super().__init__(fan_in, fan_out)
        generator = torch.Generator().manual_seed(3)
        self.down = nn.Parameter(0.5 * torch.randn(rank, fan_in, generator=generator))
        self.up = nn.Parameter(0.5 * torch.randn(fan_out, rank, generator=generator))

    def forward(self, x):
        return super().forward(x) + x @ self.down.T @ self.up.T


class LeakyReLU(nn.ReLU):
    def forward(self, x):
        return torch.relu(x) + 0.1 * x


class ShiftedTanh(nn.Tanh):
    def forward(self, x):
        return torch.tanh(x) + 0.5


class ScaledSigmoid(nn.Sigmoid):
    def forward(self, x):
        return 2 * torch.sigmoid(x)


class ResidualSequential(nn.Sequential):
    def forward(self, x):
        return super().forward(x) + x


class Doubled(nn.Module):
    """A parametrization: the weight used is twice the stored one."""

    def forward(self, weight):
        return 2 * weight


def changed(change):
    """The test MLP after `change(model)` (a hook, a buffer, a submodule, ...)."""
    model = mlp()
    change(model)
    return model


def legacy_weight_norm():
    model = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.nn.utils.weight_norm(model[0])
    return model


def spectral_norm_eval():
    model = mlp()
    parametrizations.spectral_norm(model[2])
    return model.eval()


def instance_forward(index):
    model = mlp()
    layer_forward = model[index].forward
    model[index].forward = lambda x: 2 * layer_forward(x)
    return model


def sequential_forward():
    model = mlp()
    sequential_forward = model.forward
    model.forward = lambda x: sequential_forward(x) + 1
    return model


def doubled_weight():
    model = mlp()
    parametrize.register_parametrization(model[0], "weight", Doubled())
    return model


def with_bias_mix():
    model = mlp()
    model[2] = nn.Linear(5, 4, bias=False).double()
    return model


# Models the fused kernels must refuse, and a fragment of the reason they give.
REFUSED = {
    "linear-subclass-with-forward": (lambda: with_layer(0, DoubledLinear(2, 5)), r"layer 0 \(DoubledLinear\) is a subclass of nn.Linear"),
    "linear-subclass": (lambda: with_layer(4, PlainLinearSubclass(4, 2)), r"layer 4 \(PlainLinearSubclass\) is a subclass"),
    "lora-linear": (lambda: with_layer(2, LoraLinear(5, 4)), r"layer 2 \(LoraLinear\) is a subclass"),
    "forward-hook": (lambda: changed(lambda m: m[0].register_forward_hook(lambda mod, i, o: 2 * o)),
                     r"layer 0 \(Linear\) has a forward hook"),
    "forward-pre-hook": (lambda: changed(lambda m: m[2].register_forward_pre_hook(lambda mod, i: (2 * i[0],))),
                         r"layer 2 \(Linear\) has a forward pre-hook"),
    "forward-hook-with-kwargs": (lambda: changed(lambda m: m[4].register_forward_hook(
        lambda mod, args, kwargs, o: o - 1, with_kwargs=True)), r"layer 4 \(Linear\) has a forward hook"),
    "sequential-forward-hook": (lambda: changed(lambda m: m.register_forward_hook(lambda mod, i, o: o + 1)),
                                r"the nn.Sequential has a forward hook"),
    "sequential-forward-pre-hook": (lambda: changed(lambda m: m.register_forward_pre_hook(lambda mod, i: (i[0] ** 2,))),
                                    r"the nn.Sequential has a forward pre-hook"),
    "activation-forward-hook": (lambda: changed(lambda m: m[1].register_forward_hook(lambda mod, i, o: 3 * o)),
                                r"layer 1 \(Tanh\) has a forward hook"),
    "activation-forward-pre-hook": (lambda: changed(lambda m: m[3].register_forward_pre_hook(lambda mod, i: (i[0] + 1,))),
                                    r"layer 3 \(Tanh\) has a forward pre-hook"),
    "full-backward-hook": (lambda: changed(lambda m: m[2].register_full_backward_hook(lambda mod, gi, go: (2 * gi[0],))),
                           r"layer 2 \(Linear\) has a backward hook"),
    "full-backward-pre-hook": (lambda: changed(lambda m: m[2].register_full_backward_pre_hook(lambda mod, go: (2 * go[0],))),
                               r"layer 2 \(Linear\) has a backward pre-hook"),
    "parameter-gradient-hook": (lambda: changed(lambda m: m[0].weight.register_hook(lambda g: 2 * g)),
                                r"parameter 0.weight has a gradient hook"),
    "weight-norm": (lambda: changed(lambda m: parametrizations.weight_norm(m[0])),
                    r"layer 0 \(ParametrizedLinear\) has parametrized weight"),
    "legacy-weight-norm": (legacy_weight_norm, r"layer 0 \(Linear\) has a forward pre-hook"),
    "spectral-norm": (spectral_norm_eval, r"layer 2 \(ParametrizedLinear\) has parametrized weight"),
    "orthogonal": (lambda: changed(lambda m: parametrizations.orthogonal(m[2])), r"layer 2 .* has parametrized weight"),
    "custom-parametrization": (doubled_weight, r"layer 0 .* has parametrized weight"),
    "sequential-subclass": (lambda: ResidualSequential(*mlp()), r"the model is ResidualSequential, a subclass of nn.Sequential"),
    "relu-subclass": (lambda: with_layer(3, LeakyReLU(), with_layer(1, LeakyReLU(), mlp(nn.ReLU))),
                      r"layer 1 \(LeakyReLU\) is a subclass of nn.ReLU"),
    "tanh-subclass": (lambda: with_layer(3, ShiftedTanh()), r"layer 3 \(ShiftedTanh\) is a subclass of nn.Tanh"),
    "sigmoid-subclass": (lambda: with_layer(1, ScaledSigmoid(), with_layer(3, nn.Sigmoid(), mlp())),
                         r"layer 1 \(ScaledSigmoid\) is a subclass of nn.Sigmoid"),
    "linear-buffer": (lambda: changed(lambda m: m[0].register_buffer("scale", torch.ones(5, dtype=torch.float64))),
                      r"layer 0 \(Linear\) holds buffers \['scale'\]"),
    "linear-submodule": (lambda: changed(lambda m: m[2].add_module("extra", nn.Linear(5, 4).double())),
                         r"layer 2 \(Linear\) holds submodules \['extra'\]"),
    "linear-extra-parameter": (lambda: changed(lambda m: m[0].register_parameter(
        "gain", nn.Parameter(torch.ones(5, dtype=torch.float64)))), r"layer 0 \(Linear\) holds parameters \['gain'\]"),
    "linear-instance-forward": (lambda: instance_forward(0), r"layer 0 \(Linear\) has its own forward set on the instance"),
    "linear-instance-call": (lambda: changed(lambda m: setattr(m[2], "__call__", lambda x: 2 * x)),
                             r"layer 2 \(Linear\) has its own __call__ set on the instance"),
    "activation-instance-forward": (lambda: instance_forward(1), r"layer 1 \(Tanh\) has its own forward set on the instance"),
    "sequential-instance-forward": (sequential_forward, r"the nn.Sequential has its own forward set on the instance"),
    "sequential-parameter": (lambda: changed(lambda m: setattr(m, "gain", nn.Parameter(torch.ones(2, dtype=torch.float64)))),
                             r"the nn.Sequential holds parameters \['gain'\] of its own"),
    "sequential-buffer": (lambda: changed(lambda m: m.register_buffer("offset", torch.ones(2, dtype=torch.float64))),
                          r"the nn.Sequential holds buffers \['offset'\]"),
    "frozen-bias": (lambda: changed(lambda m: m[2].bias.requires_grad_(False)), r"parameter 2.bias is frozen"),
}
# Refused models that `func` runs, against the oracle; the others fall back to `reference`.
FALLBACK = {name: "func" for name in REFUSED}
FALLBACK.update({"full-backward-hook": "reference", "full-backward-pre-hook": "reference",
                 "parameter-gradient-hook": "reference"})
# Refusals that are about training, not about what the model computes: pymaml.hvp takes such models.
TRAINING_ONLY = {"parameter-gradient-hook", "frozen-bias"}


@pytest.fixture(params=sorted(REFUSED))
def refused(request):
    build, reason = REFUSED[request.param]
    return request.param, build, reason


def test_every_fused_backend_refuses_and_names_the_layer(refused):
    _, build, reason = refused
    model = build()
    for name, device in (("cpp", "cpu"), ("cuda", "cuda"), ("triton", "cuda")):
        why = get_backend(name).unsupported_reason(model, CONFIG, torch.device(device))
        assert why is not None and re.search(reason, why), (name, why)


@needs_extension
def test_explicit_cpp_raises_with_the_reason(refused):
    _, build, reason = refused
    with pytest.raises(RuntimeError, match="backend 'cpp' cannot run this model on cpu: .*" + reason):
        pymaml.MAML(build(), backend="cpp", **OPTIONS)


def test_auto_falls_back_with_the_reason_and_matches_the_oracle(refused):
    name, build, reason = refused
    model = build()
    maml = pymaml.MAML(model, **OPTIONS)
    assert maml.backend == FALLBACK[name]
    if HAS_EXTENSION:
        assert re.search("cpp: .*" + reason, maml.backend_choice), maml.backend_choice
    assert_backend_matches_oracle(model, BATCH, "auto", **OPTIONS)


GLOBAL_HOOKS = {
    "register_module_forward_hook": (lambda module, inputs, output: None, "func"),
    "register_module_forward_pre_hook": (lambda module, inputs: None, "func"),
    "register_module_full_backward_hook": (lambda module, grad_input, grad_output: None, "reference"),
    "register_module_full_backward_pre_hook": (lambda module, grad_output: None, "reference"),
}


@pytest.mark.parametrize("register", sorted(GLOBAL_HOOKS))
def test_global_hooks_are_refused(register):
    model = mlp()
    hook, fallback = GLOBAL_HOOKS[register]
    handle = getattr(torch.nn.modules.module, register)(hook)
    try:
        why = get_backend("cpp").unsupported_reason(model, CONFIG, torch.device("cpu"))
        assert why is not None and register in why
        assert pymaml.MAML(model, **OPTIONS).backend == fallback
        if HAS_EXTENSION:
            with pytest.raises(RuntimeError, match=register):
                pymaml.MAML(model, backend="cpp", **OPTIONS)
    finally:
        handle.remove()
    assert mlp_layout(model)[0] is not None


def test_a_global_forward_hook_that_changes_outputs_falls_back_to_the_oracles_numbers():
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, inputs, output: 1.5 * output if isinstance(module, nn.Tanh) else None)
    try:
        model = mlp()
        assert pymaml.MAML(model, **OPTIONS).backend == "func"
        assert_backend_matches_oracle(model, BATCH, "auto", **OPTIONS)
    finally:
        handle.remove()


def test_post_accumulate_grad_hook_is_refused():
    model = mlp()
    calls = []
    model[4].bias.register_post_accumulate_grad_hook(lambda p: calls.append(p))
    why = get_backend("cpp").unsupported_reason(model, CONFIG, torch.device("cpu"))
    assert why is not None and "parameter 4.bias has a post-accumulate-grad hook" in why
    maml = pymaml.MAML(model, **OPTIONS)
    assert maml.backend == "func"
    maml.meta_gradient(*BATCH, accumulate=False)
    assert len(calls) == 1


@pytest.mark.parametrize("model", [
    pytest.param(lambda: mlp(lambda: nn.ReLU(inplace=True)), id="inplace-relu"),
    pytest.param(lambda: changed(lambda m: m[0].register_forward_hook(lambda mod, i, o: None).remove()),
                 id="removed-hook"),
    pytest.param(lambda: changed(lambda m: m[2].register_state_dict_pre_hook(lambda *args: None)),
                 id="state-dict-hook"),
    pytest.param(lambda: changed(lambda m: setattr(m[2], "weight", nn.Parameter(m[2].weight.detach().t().contiguous().t()))),
                 id="non-contiguous-weight"),
])
@needs_extension
def test_models_the_kernel_computes_are_accepted(model):
    model = model()
    assert pymaml.MAML(model, **OPTIONS).backend == "cpp"
    assert_backend_matches_oracle(model, BATCH, "cpp", **OPTIONS)
    maml = pymaml.MAML(model, backend="cpp", **OPTIONS)
    out = maml.meta_gradient(*BATCH, accumulate=False)
    expected = pymaml.reference.meta_loss(model, *BATCH, **OPTIONS)
    gradient = torch.autograd.grad(expected, list(model.parameters()))
    assert relative_error(out.loss, expected.detach()) <= TOLERANCE[torch.float64]
    for p, g in zip(model.parameters(), gradient):
        assert relative_error(p.grad, g) <= TOLERANCE[torch.float64]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_parameters_are_refused(dtype):
    model = mlp().to(dtype)
    why = get_backend("cpp").unsupported_reason(model, CONFIG, torch.device("cpu"))
    assert why is not None and f"parameter 0.weight is {dtype}" in why


def test_mixed_dtypes_are_refused():
    model = mlp()
    model[4].float()
    why = mlp_layout(model)[1]
    assert why is not None and "parameter 4.weight is torch.float32 but 0.weight is torch.float64" in why


# Changes made after the MAML was built, each of which the next call must notice.
def add_forward_hook(model):
    model[2].register_forward_hook(lambda mod, i, o: 2 * o)


def add_activation_pre_hook(model):
    model[1].register_forward_pre_hook(lambda mod, i: (i[0] + 1,))


def add_sequential_hook(model):
    model.register_forward_hook(lambda mod, i, o: o - 1)


def add_backward_hook(model):
    model[0].register_full_backward_hook(lambda mod, gi, go: None)


def add_parameter_hook(model):
    model[4].weight.register_hook(lambda g: 2 * g)


def add_accumulate_hook(model):
    model[4].weight.register_post_accumulate_grad_hook(lambda p: None)


def add_weight_norm(model):
    parametrizations.weight_norm(model[0])


def add_instance_forward(model):
    linear_forward = model[0].forward
    model[0].forward = lambda x: 2 * linear_forward(x)


def add_extra_parameter(model):
    model[2].register_parameter("gain", nn.Parameter(torch.ones(4, dtype=torch.float64)))


def swap_in_gelu(model):
    model[1] = nn.GELU()


def freeze(model):
    model[0].weight.requires_grad_(False)


def swap_in_subclass(model):
    with_layer(0, DoubledLinear(2, 5), model)


def reshape_weight(model):
    model[2].weight = nn.Parameter(torch.randn(3, 5, dtype=torch.float64))


CHANGES = {
    "forward-hook": (add_forward_hook, r"layer 2 \(Linear\) has a forward hook"),
    "activation-pre-hook": (add_activation_pre_hook, r"layer 1 \(Tanh\) has a forward pre-hook"),
    "sequential-hook": (add_sequential_hook, r"the nn.Sequential has a forward hook"),
    "backward-hook": (add_backward_hook, r"layer 0 \(Linear\) has a backward hook"),
    "parameter-hook": (add_parameter_hook, r"parameter 4.weight has a gradient hook"),
    "accumulate-hook": (add_accumulate_hook, r"parameter 4.weight has a post-accumulate-grad hook"),
    "weight-norm": (add_weight_norm, r"layer 0 \(ParametrizedLinear\) has parametrized weight"),
    "instance-forward": (add_instance_forward, r"layer 0 \(Linear\) has its own forward"),
    "extra-parameter": (add_extra_parameter, r"layer 2 \(Linear\) holds parameters \['gain'\]"),
    "swapped-in-gelu": (swap_in_gelu, r"layer 1 \(GELU\) is not supported"),
    "frozen": (freeze, r"parameter 0.weight is frozen"),
    "subclass": (swap_in_subclass, r"layer 0 \(DoubledLinear\) is a subclass"),
    "reshaped-weight": (reshape_weight, r"layer 2 \(Linear\) has a bias of shape \(4,\) for a weight of shape \(3, 5\)"),
    "parametrization": (lambda model: parametrize.register_parametrization(model[2], "weight", Doubled()),
                        r"layer 2 \(ParametrizedLinear\) has parametrized weight"),
}
CALLS = {
    "forward": lambda maml, model: maml(*BATCH),
    "meta_gradient": lambda maml, model: maml.meta_gradient(*BATCH),
    "meta_gradient-replace": lambda maml, model: maml.meta_gradient(*BATCH, accumulate=False),
    "meta_train_step": lambda maml, model: maml.meta_train_step(*BATCH, torch.optim.Adam(model.parameters(), 1e-3)),
}


def _changed_model_and_maml(backend, change):
    model = mlp()
    maml = pymaml.MAML(model, backend=backend, **OPTIONS)
    assert maml.backend == "cpp"
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    maml.meta_train_step(*BATCH, optimizer)  # a held plan and a cached layout, both to be re-checked
    maml.meta_gradient(*BATCH, accumulate=False)
    apply, reason = CHANGES[change]
    apply(model)
    return model, maml, reason


@needs_extension
@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_model_changed_after_an_explicit_choice_raises_on_the_next_call(change, call):
    model, maml, reason = _changed_model_and_maml("cpp", change)
    with pytest.raises(RuntimeError, match="backend 'cpp' cannot run this model on cpu any more: " + reason):
        CALLS[call](maml, model)
    rebuilt = pymaml.MAML(model, **OPTIONS)
    assert rebuilt.backend != "cpp" and re.search(reason, rebuilt.backend_choice)


@needs_extension
@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_model_changed_after_auto_chose_gets_a_new_choice_and_the_oracles_numbers(change, call):
    model, maml, reason = _changed_model_and_maml("auto", change)
    if change == "reshaped-weight":  # no backend runs it: torch's own layers refuse the shapes
        with pytest.raises(RuntimeError, match="shape|size"):
            CALLS[call](maml, model)
        assert maml.backend != "cpp" and re.search(reason, maml.backend_choice)
        return
    out = CALLS[call](maml, model)
    assert maml.backend != "cpp" and re.search(reason, maml.backend_choice)
    if call == "forward":
        expected = pymaml.reference.meta_loss(model, *BATCH, **OPTIONS).detach()
        assert relative_error(out.loss.detach(), expected) <= TOLERANCE[torch.float64]


@needs_extension
@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_model_changed_after_a_refused_call_is_checked_again(change, call):
    """A call that checks the model, then fails on its batch, leaves nothing that lets the next
    call skip the check of a model changed in between."""
    model = mlp()
    maml = pymaml.MAML(model, backend="cpp", **OPTIONS)
    maml.meta_gradient(*BATCH, accumulate=False)
    with pytest.raises(ValueError, match="task dimension"):
        maml.meta_gradient(BATCH[0][:1], *BATCH[1:], accumulate=False)
    apply, reason = CHANGES[change]
    apply(model)
    with pytest.raises(RuntimeError, match="backend 'cpp' cannot run this model on cpu any more: " + reason):
        CALLS[call](maml, model)


@needs_extension
def test_a_removed_hook_makes_the_model_acceptable_again():
    model = mlp()
    maml = pymaml.MAML(model, backend="cpp", **OPTIONS)
    maml.meta_gradient(*BATCH, accumulate=False)
    handle = model[2].register_forward_hook(lambda mod, i, o: 2 * o)
    with pytest.raises(RuntimeError, match="forward hook"):
        maml.meta_gradient(*BATCH, accumulate=False)
    handle.remove()
    out = maml.meta_gradient(*BATCH, accumulate=False)
    assert relative_error(out.loss, pymaml.reference.meta_loss(model, *BATCH, **OPTIONS).detach()) <= TOLERANCE[torch.float64]


@needs_extension
def test_a_replaced_parameter_of_the_same_shape_is_used():
    model = mlp()
    maml = pymaml.MAML(model, backend="cpp", **OPTIONS)
    maml.meta_gradient(*BATCH, accumulate=False)
    model[2].weight = nn.Parameter(torch.randn(4, 5, dtype=torch.float64))
    out = maml.meta_gradient(*BATCH, accumulate=False)
    expected = pymaml.reference.meta_loss(model, *BATCH, **OPTIONS)
    assert relative_error(out.loss, expected.detach()) <= TOLERANCE[torch.float64]
    assert relative_error(model[2].weight.grad, torch.autograd.grad(expected, model[2].weight)[0]) <= TOLERANCE[torch.float64]


# pymaml.hvp: the fused kernel takes the same models; otherwise fused=None uses torch.func and fused=True raises.
def hvp_inputs(model, tasks=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    named = dict(model.named_parameters())
    params = {n: p.detach() + 0.1 * torch.randn(tasks, *p.shape, generator=generator, dtype=p.dtype) for n, p in named.items()}
    v = {n: torch.randn(tasks, *p.shape, generator=generator, dtype=p.dtype) for n, p in named.items()}
    x, y, _, _ = make_batch(tasks, 4, WIDTHS[0], WIDTHS[-1], "mse")
    return params, v, x, y


# Refusals that hvp shares: what the model computes, where torch.func can compute it.
HVP_REFUSED = sorted(name for name in REFUSED if name not in TRAINING_ONLY and FALLBACK[name] == "func")


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("name", HVP_REFUSED)
def test_hvp_refuses_what_the_kernel_does_not_compute(name):
    build, reason = REFUSED[name]
    model = build()
    params, v, x, y = hvp_inputs(model)
    try:
        expected = pymaml.hvp(model, params, x, y, v, fused=False)
    except NotImplementedError:  # torch.func has no forward-mode derivative for this model (weight norm)
        with pytest.raises(NotImplementedError):
            pymaml.hvp(model, params, x, y, v)
    else:
        actual = pymaml.hvp(model, params, x, y, v)
        for key in expected:
            assert relative_error(actual[key], expected[key]) <= TOLERANCE[torch.float64], key
    if HAS_EXTENSION:
        with pytest.raises(RuntimeError, match="the fused HVP cannot run here: .*" + reason):
            pymaml.hvp(model, params, x, y, v, fused=True)


@needs_extension
@pytest.mark.parametrize("change", ["forward-hook", "instance-forward", "parametrization", "subclass", "swapped-in-gelu",
                                    "extra-parameter"])
def test_hvp_notices_a_model_changed_between_calls(change):
    model = mlp()
    params, v, x, y = hvp_inputs(model)
    pymaml.hvp(model, params, x, y, v, fused=True)
    apply, reason = CHANGES[change]
    apply(model)
    params, v, x, y = hvp_inputs(model)
    with pytest.raises(RuntimeError, match="the fused HVP cannot run here: .*" + reason):
        pymaml.hvp(model, params, x, y, v, fused=True)
    expected = pymaml.hvp(model, params, x, y, v, fused=False)
    actual = pymaml.hvp(model, params, x, y, v)
    for key in expected:
        assert relative_error(actual[key], expected[key]) <= TOLERANCE[torch.float64], key


@pytest.mark.parametrize("fused", [None, True, False])
@pytest.mark.parametrize("which", ["params", "v"])
def test_hvp_names_a_wrongly_shaped_tensor(which, fused):
    if fused is True and not HAS_EXTENSION:
        pytest.skip("pymaml._C is not built")
    model = mlp()
    params, v, x, y = hvp_inputs(model)
    chosen = params if which == "params" else v
    chosen["2.weight"] = chosen["2.weight"].transpose(1, 2).contiguous()
    with pytest.raises(ValueError, match=re.escape(f"{which}['2.weight'] must be [T, *2.weight.shape] = [3, 4, 5], got [3, 5, 4]")):
        pymaml.hvp(model, params, x, y, v, fused=fused)
    chosen["2.weight"] = chosen["2.weight"].reshape(3, -1)
    with pytest.raises(ValueError, match=re.escape(f"{which}['2.weight'] must be")):
        pymaml.hvp(model, params, x, y, v, fused=fused)


def test_hvp_names_an_unknown_tensor():
    model = mlp()
    params, v, x, y = hvp_inputs(model)
    params["9.weight"], v["9.weight"] = params["0.weight"], v["0.weight"]
    with pytest.raises(ValueError, match="params names '9.weight', which is neither a parameter nor a buffer"):
        pymaml.hvp(model, params, x, y, v)


@needs_extension
def test_fused_hvp_of_linear_layers_with_and_without_biases_matches_torch_func():
    """Not an MLP for the MLP kernels (Triton, CUDA), but a network the native core computes."""
    model = with_bias_mix()
    params, v, x, y = hvp_inputs(model)
    fused = pymaml.hvp(model, params, x, y, v, fused=True)
    plain = pymaml.hvp(model, params, x, y, v, fused=False)
    for name in params:
        assert relative_error(fused[name], plain[name]) <= TOLERANCE[torch.float64], name


@needs_extension
def test_the_backend_does_not_keep_a_model_alive():
    model = mlp()
    maml = pymaml.MAML(model, backend="cpp", **OPTIONS)
    maml.meta_gradient(*BATCH, accumulate=False)
    maml(*BATCH)
    params, v, x, y = hvp_inputs(model)
    pymaml.hvp(model, params, x, y, v, fused=True)
    alive = weakref.ref(model)
    del model, maml
    gc.collect()
    assert alive() is None
