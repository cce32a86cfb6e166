"""Convolutional networks on the fused `cpp` backend against the oracle: a pairwise grid over
convolution shapes, BatchNorm, pooling, activations, inner steps, order, loss and dtype; learned
step sizes, step weights, ANIL, the fused Adam step, the fused HVP, the paper's Conv4 through
`auto`, thread counts and every CPU ISA level; and the adversarial cases of conv nets (settings
changed in place, images that do not fit, NaN in the images, running statistics).

A convolution's bias before a BatchNorm has a true gradient of 0, so gradients are compared as
one flat vector (relative error over the whole of it), never per tensor.
"""

import copy
import itertools
import random
import re

import pytest
import torch
from torch import nn

import pymaml
from helpers import TOLERANCE, backend_meta_gradient, flat_grad, oracle_meta_gradient, relative_error
from pymaml import reference
from pymaml._extension import extension
from pymaml.backends import get_backend

FUSED_BACKEND = "cpp"
HAS_EXTENSION = pymaml.build_info()["extension"]
LEVELS = pymaml.build_info().get("cpu_levels", [])
pytestmark = pytest.mark.skipif(not HAS_EXTENSION, reason="pymaml._C is not built")

ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.1), "elu": nn.ELU, "tanh": nn.Tanh,
               "sigmoid": nn.Sigmoid, "identity": nn.Identity}
OUTPUTS = {"mse": 3, "cross_entropy": 5}  # MSE targets per point; classes
DTYPES = {"f64": torch.float64, "f32": torch.float32}


def randomized(model: nn.Module, dtype=torch.float64, seed=0) -> nn.Module:
    """The model in `dtype` with parameters drawn afresh (BatchNorm weights around 1), so that no
    parameter holds torch's structured initial value (BatchNorm's weight 1 and bias 0)."""
    generator = torch.Generator().manual_seed(seed)
    model = model.to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 1 / max(1, p[0].numel()) ** 0.5 if p.dim() > 1 else 0.3
            p.copy_(scale * torch.randn(p.shape, generator=generator, dtype=torch.float64))
            if name.endswith("weight") and p.dim() == 1:
                p.add_(1.0)
    return model


def image_batch(tasks, shots, queries, image, loss, dtype=torch.float64, seed=1):
    """x ~ N(0, 1) of shape [T, K, C, H, W]; MSE targets [T, K, 3] ~ N(0, 1) or labels [T, K] in [0, 5)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for points in (shots, queries):
        tensors.append(torch.randn(tasks, points, *image, generator=generator, dtype=torch.float64).to(dtype))
        if loss == "cross_entropy":
            tensors.append(torch.randint(0, OUTPUTS[loss], (tasks, points), generator=generator))
        else:
            tensors.append(torch.randn(tasks, points, OUTPUTS[loss], generator=generator,
                                       dtype=torch.float64).to(dtype))
    return tuple(tensors)


def assert_matches_oracle(model, batch, **options):
    """The fused backend's meta-loss and flat meta-gradient against the oracle's, within the
    dtype's tolerance; the oracle's gradient is not zero (the comparison compares something)."""
    dtype = next(model.parameters()).dtype
    expected_loss, expected_grad = oracle_meta_gradient(model, batch, **options)
    actual_loss, actual_grad = backend_meta_gradient(model, batch, FUSED_BACKEND, **options)
    assert expected_grad.abs().max() > 0
    loss_error, grad_error = relative_error(actual_loss, expected_loss), relative_error(actual_grad, expected_grad)
    assert loss_error <= TOLERANCE[dtype], f"meta-loss relative error {loss_error:.3g}"
    assert grad_error <= TOLERANCE[dtype], f"meta-gradient relative error {grad_error:.3g}"


# The grid: every pair of values of every two factors appears in some case (pairwise coverage).
FACTORS = {
    "channels": [1, 3],
    "size": [7, 9, 11],
    "kernel": [1, 3, 5],
    "stride": [1, 2],
    "padding": [0, 1],
    "conv_bias": [True, False],
    "norm": ["none", "affine", "plain"],
    "pool": ["none", "max", "avg"],
    "activation": sorted(ACTIVATIONS),
    "steps": [0, 1, 2, 3],
    "first_order": [False, True],
    "loss": ["mse", "cross_entropy"],
    "depth": [1, 2],
    "dtype": sorted(DTYPES),
}


def pairwise(factors: dict[str, list], seed: int = 0, candidates: int = 30) -> list[dict]:
    """A short list of cases in which every pair of values of every two factors appears: greedy
    (AETG): each new case starts from an uncovered pair and fills the other factors one at a time
    with the value covering the most uncovered pairs, the best of `candidates` tries kept."""
    rng = random.Random(seed)
    names = list(factors)
    uncovered = {(a, i, b, j) for x, a in enumerate(names) for b in names[x + 1:]
                 for i in range(len(factors[a])) for j in range(len(factors[b]))}

    def new_pairs(row):
        return {(a, row[a], b, row[b]) for x, a in enumerate(names) for b in names[x + 1:]
                if a in row and b in row} & uncovered

    cases = []
    while uncovered:
        a, i, b, j = min(uncovered)
        best = None
        for _ in range(candidates):
            row = {a: i, b: j}
            rest = [name for name in names if name not in row]
            rng.shuffle(rest)
            for name in rest:
                scores = [len(new_pairs({**row, name: value})) for value in range(len(factors[name]))]
                top = max(scores)
                row[name] = rng.choice([value for value, score in enumerate(scores) if score == top])
            if best is None or len(new_pairs(row)) > len(new_pairs(best)):
                best = row
        uncovered -= new_pairs(best)
        cases.append({name: factors[name][best[name]] for name in names})
    return cases


GRID = pairwise(FACTORS)


def grid_model(case) -> nn.Sequential:
    """[conv (the case's kernel, stride, padding, bias) → norm → activation → pool], with depth 2
    then [3×3 conv, padding 1 → norm → activation], then Flatten → Linear."""
    def block(channels_in, channels_out, kernel, stride, padding):
        layers = [nn.Conv2d(channels_in, channels_out, kernel, stride=stride, padding=padding,
                            bias=case["conv_bias"])]
        if case["norm"] != "none":
            layers.append(nn.BatchNorm2d(channels_out, affine=case["norm"] == "affine", track_running_stats=False))
        return layers + [ACTIVATIONS[case["activation"]]()]

    layers = block(case["channels"], 4, case["kernel"], case["stride"], case["padding"])
    size = (case["size"] + 2 * case["padding"] - case["kernel"]) // case["stride"] + 1
    if case["pool"] != "none":
        layers.append(nn.MaxPool2d(2) if case["pool"] == "max" else nn.AvgPool2d(2))
        size //= 2
    channels = 4
    if case["depth"] == 2:
        layers += block(4, 5, 3, 1, 1)
        channels = 5
    layers += [nn.Flatten(), nn.Linear(channels * size * size, OUTPUTS[case["loss"]])]
    return nn.Sequential(*layers)


def _grid_id(case):
    order = "first" if case["first_order"] else "second"
    return (f"c{case['channels']}-{case['size']}px-k{case['kernel']}s{case['stride']}p{case['padding']}"
            f"{'-bias' if case['conv_bias'] else ''}-bn:{case['norm']}-pool:{case['pool']}-{case['activation']}"
            f"-d{case['depth']}-S{case['steps']}-{order}-{case['loss']}-{case['dtype']}")


def test_the_grid_covers_every_pair_of_settings():
    names = list(FACTORS)
    for x, a in enumerate(names):
        for b in names[x + 1:]:
            seen = {(case[a], case[b]) for case in GRID}
            assert seen == set(itertools.product(FACTORS[a], FACTORS[b])), (a, b)


@pytest.mark.parametrize("case", [pytest.param(case, id=_grid_id(case))
                                  for case in GRID])
def test_grid_matches_oracle(case):
    dtype = DTYPES[case["dtype"]]
    model = randomized(grid_model(case), dtype)
    # 5 and 6 points: a BatchNorm on the 1-pixel images some cases leave normalizes over that few
    # values per channel, and over 3 or 4 its second-order meta-gradient is so ill-conditioned that
    # float32 rounding alone (the oracle's own) comes near the float32 tolerance.
    batch = image_batch(2, 5, 6, (case["channels"], case["size"], case["size"]), case["loss"], dtype)
    assert_matches_oracle(model, batch, inner_lr=0.1, inner_steps=case["steps"], first_order=case["first_order"],
                          loss=case["loss"])


def rich_net() -> nn.Sequential:
    """Every native layer kind on 3×11×11 images: conv → BatchNorm2d → LeakyReLU → max-pool
    (11 → 5); a strided conv without bias → BatchNorm2d without affine → ELU → avg-pool (5 → 3 → 1);
    then Flatten and a head with BatchNorm1d and Sigmoid."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False), nn.LeakyReLU(0.1),
        nn.MaxPool2d(2), nn.Conv2d(4, 5, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(5, affine=False, track_running_stats=False), nn.ELU(), nn.AvgPool2d(3),
        nn.Flatten(), nn.Linear(5, 6), nn.BatchNorm1d(6, track_running_stats=False), nn.Sigmoid(),
        nn.Linear(6, OUTPUTS["cross_entropy"]))


RICH_IMAGE = (3, 11, 11)
HEAD = "12"  # the last Linear of rich_net


def rich_batch(loss="cross_entropy", dtype=torch.float64, seed=1, tasks=2):
    return image_batch(tasks, 4, 5, RICH_IMAGE, loss, dtype, seed)




@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_every_layer_kind_in_one_network(first_order, dtype):
    model = randomized(rich_net(), DTYPES[dtype])
    assert_matches_oracle(model, rich_batch(dtype=DTYPES[dtype]), inner_lr=0.2, inner_steps=2,
                          first_order=first_order, loss="cross_entropy")


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("channels", [15, 16, 17, 64, 70, 129])
def test_batch_norm_channel_counts_across_chunks_and_channel_groups(channels, dtype):
    """BatchNorm's sums take the channels of a pixel together, in whole 16-lane chunks and a
    partial one, up to 64 at a time: counts below, at and above both bounds; 10 + 12 points of
    6×6 pixels give each channel several blocks of 128 values to sum."""
    model = randomized(nn.Sequential(
        nn.Conv2d(2, channels, 3, padding=1), nn.BatchNorm2d(channels, track_running_stats=False), nn.ReLU(),
        nn.Conv2d(channels, 3, 1), nn.BatchNorm2d(3, affine=False, track_running_stats=False), nn.Flatten(),
        nn.Linear(3 * 36, OUTPUTS["cross_entropy"])), DTYPES[dtype])
    batch = image_batch(2, 10, 12, (2, 6, 6), "cross_entropy", DTYPES[dtype])
    assert_matches_oracle(model, batch, inner_lr=0.1, inner_steps=2, first_order=False, loss="cross_entropy")


def learned_maml(mode, steps=3, first_order=False, step_weights=None, adapt=None, seed=0):
    model = randomized(rich_net(), seed=seed)
    maml = pymaml.MAML(model, inner_lr=0.1, inner_steps=steps, first_order=first_order, loss="cross_entropy",
                       backend=FUSED_BACKEND, learn_inner_lr=mode, step_weights=step_weights, adapt=adapt)
    if maml.inner_lrs is not None:
        generator = torch.Generator().manual_seed(seed + 7)
        with torch.no_grad():  # distinct step sizes everywhere, so that a misplaced one shows
            for p in maml.inner_lrs.parameters() if isinstance(maml.inner_lrs, nn.ParameterList) else [maml.inner_lrs]:
                p.copy_(0.02 + 0.2 * torch.rand(p.shape, generator=generator, dtype=p.dtype))
    return maml


def assert_maml_matches_oracle(maml, batch):
    """Meta-loss and flat gradient over every parameter of `maml` (the model's and the learned
    step sizes) against the oracle run with maml's step sizes, step weights and adapted set."""
    parameters = list(maml.parameters())
    out = maml(*batch)
    actual = flat_grad(out.loss, parameters)
    expected_loss = reference.meta_loss(maml.module, *batch, inner_lr=maml.inner_lr, inner_steps=maml.inner_steps,
                                        first_order=maml.first_order, loss=maml.config.loss,
                                        step_weights=maml.step_weights, adapt=maml.adapted_names)
    expected = flat_grad(expected_loss, parameters)
    assert expected.abs().max() > 0
    assert relative_error(out.loss.detach(), expected_loss.detach()) <= TOLERANCE[torch.float64]
    assert relative_error(actual, expected) <= TOLERANCE[torch.float64]
    return expected


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("mode", ["scalar", "per_layer_per_step", "per_parameter"])
def test_learned_step_sizes(mode, first_order):
    maml = learned_maml(mode, steps=2, first_order=first_order)
    expected = assert_maml_matches_oracle(maml, rich_batch())
    model_size = sum(p.numel() for p in maml.module.parameters())
    assert expected[model_size:].abs().max() > 0  # the step sizes do get gradients


@pytest.mark.parametrize("first_order,mode", [(False, None), (True, "per_layer_per_step")],
                         ids=["second-fixed-lr", "first-lslr"])
def test_step_weights(first_order, mode):
    maml = learned_maml(mode, steps=3, first_order=first_order, step_weights=(0.2, 0.3, 0.5))
    assert_maml_matches_oracle(maml, rich_batch())


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("adapt,mode", [([HEAD], None), (lambda name, p: not name.startswith(("0.", "1.")), "per_parameter")],
                         ids=["head-only", "all-but-the-first-block-meta-sgd"])
def test_partial_adaptation(adapt, mode, first_order):
    maml = learned_maml(mode, steps=2, first_order=first_order, adapt=adapt)
    assert maml.adapted_names is not None
    assert_maml_matches_oracle(maml, rich_batch())


def _flat(tensors):
    return torch.cat([torch.as_tensor(t).detach().double().reshape(-1) for t in tensors])


def test_meta_train_step_with_adam_equals_the_oracle_and_torchs_adam():
    """Three fused training steps (the Adam step inside the kernel call) against the oracle's
    meta-gradient followed by torch.optim.Adam's own step: the same parameters, moments and counts."""
    batches = [rich_batch(seed=seed) for seed in range(3)]
    options = dict(inner_lr=0.1, inner_steps=2, loss="cross_entropy")
    fused_model = randomized(rich_net())
    oracle_model = copy.deepcopy(fused_model)
    maml = pymaml.MAML(fused_model, backend=FUSED_BACKEND, **options)
    fused_adam = torch.optim.Adam(fused_model.parameters(), lr=1e-2, weight_decay=0.01)
    oracle_adam = torch.optim.Adam(oracle_model.parameters(), lr=1e-2, weight_decay=0.01)
    for batch in batches:
        out = maml.meta_train_step(*batch, fused_adam)
        loss = reference.meta_loss(oracle_model, *batch, **options)
        oracle_adam.zero_grad()
        loss.backward()
        oracle_adam.step()
        assert relative_error(out.loss.detach(), loss.detach()) <= TOLERANCE[torch.float64]
    assert relative_error(_flat(fused_model.parameters()), _flat(oracle_model.parameters())) <= 1e-10
    assert relative_error(_flat(p.grad for p in fused_model.parameters()),
                          _flat(p.grad for p in oracle_model.parameters())) <= 1e-10
    for key in ("exp_avg", "exp_avg_sq", "step"):
        fused_state = _flat(fused_adam.state[p][key] for p in fused_model.parameters())
        oracle_state = _flat(oracle_adam.state[p][key] for p in oracle_model.parameters())
        assert relative_error(fused_state, oracle_state) <= 1e-10, key
    assert not torch.equal(_flat(fused_model.parameters()), _flat(randomized(rich_net()).parameters()))


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_fused_hvp_of_a_conv_net_matches_torch_func(dtype, loss):
    dtype = DTYPES[dtype]
    model = randomized(rich_net(), dtype)
    if loss == "mse":
        model[-1] = randomized(nn.Linear(6, OUTPUTS["mse"]), dtype)
    generator = torch.Generator().manual_seed(5)
    tasks = 3
    params = {n: p.detach() + 0.1 * torch.randn(tasks, *p.shape, generator=generator, dtype=torch.float64).to(dtype)
              for n, p in model.named_parameters()}
    v = {n: torch.randn(tasks, *p.shape, generator=generator, dtype=torch.float64).to(dtype)
         for n, p in model.named_parameters()}
    x, y, _, _ = image_batch(tasks, 6, 1, RICH_IMAGE, loss, dtype, seed=6)
    fused = pymaml.hvp(model, params, x, y, v, loss=loss, fused=True)
    expected = pymaml.hvp(model, params, x, y, v, loss=loss, fused=False)
    for t in range(tasks):
        wanted = torch.cat([expected[n][t].reshape(-1) for n in params])
        assert wanted.abs().max() > 0
        assert relative_error(torch.cat([fused[n][t].reshape(-1) for n in params]), wanted) <= TOLERANCE[dtype]


OMNIGLOT = dict(in_channels=1, ways=5, hidden=64, image_size=28, strided=True)
MINI_IMAGENET = dict(in_channels=3, ways=5, hidden=8, image_size=20, strided=False)


@pytest.mark.parametrize("variant,dtype,steps,first_order", [
    (OMNIGLOT, torch.float32, 1, False), (OMNIGLOT, torch.float64, 2, True),
    (MINI_IMAGENET, torch.float64, 2, False), (MINI_IMAGENET, torch.float32, 3, True),
], ids=["omniglot-f32-S1-second", "omniglot-f64-S2-first", "miniimagenet-f64-S2-second", "miniimagenet-f32-S3-first"])
def test_conv4_through_auto(variant, dtype, steps, first_order):
    torch.manual_seed(0)
    model = pymaml.models.Conv4(**variant).to(dtype)
    options = dict(inner_lr=0.4, inner_steps=steps, first_order=first_order, loss="cross_entropy")
    assert pymaml.MAML(model, **options).backend == FUSED_BACKEND
    size = variant["image_size"]
    batch = image_batch(2, 5, 5, (variant["in_channels"], size, size), "cross_entropy", dtype)
    expected_loss, expected_grad = oracle_meta_gradient(model, batch, **options)
    actual_loss, actual_grad = backend_meta_gradient(model, batch, "auto", **options)
    assert relative_error(actual_loss, expected_loss) <= TOLERANCE[dtype]
    assert relative_error(actual_grad, expected_grad) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_results_do_not_depend_on_the_thread_count(dtype):
    """Enough work for the launcher to use both threads; loss, task losses and every gradient bitwise equal."""
    dtype = DTYPES[dtype]
    torch.manual_seed(0)
    model = pymaml.models.Conv4(**{**OMNIGLOT, "hidden": 32}).to(dtype)
    maml = pymaml.MAML(model, inner_lr=0.4, inner_steps=2, loss="cross_entropy", backend=FUSED_BACKEND)
    batch = image_batch(4, 5, 5, (1, 28, 28), "cross_entropy", dtype)
    previous, results = torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = maml.meta_gradient(*batch, accumulate=False)
            results.append([out.loss, out.task_losses, *(p.grad.clone() for p in model.parameters())])
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.fixture
def cpu_level(request):
    """Runs the test on the named level, then restores the best one."""
    extension().set_cpu_level(request.param)
    yield request.param
    extension().set_cpu_level(LEVELS[0])


@pytest.mark.parametrize("cpu_level", LEVELS, indirect=True)
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_every_cpu_level_matches_oracle(cpu_level, dtype):
    assert pymaml.build_info()["cpu_level"] == cpu_level
    model = randomized(rich_net(), DTYPES[dtype])
    assert_matches_oracle(model, rich_batch(dtype=DTYPES[dtype]), inner_lr=0.2, inner_steps=2, loss="cross_entropy")


def small_conv_net() -> nn.Sequential:
    """1×7×7 → 3×3 conv (stride 1, no padding) → 4×5×5 → ReLU → Flatten → Linear(100, 3)."""
    return randomized(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(100, OUTPUTS["mse"])))


SMALL_OPTIONS = dict(inner_lr=0.2, inner_steps=2, loss="mse")


def test_stride_and_padding_changed_in_place_are_computed_on_the_next_call():
    """Stride and padding are settings, not parameters: changing them between calls must not leave
    the fused kernel computing the old network. 7 + 2·2 - 3 over stride 2 gives the same 5×5 output,
    so the Linear still fits; then a padding that makes 4×4 fails as torch does, naming the Linear."""
    model = small_conv_net()
    maml = pymaml.MAML(model, backend=FUSED_BACKEND, **SMALL_OPTIONS)
    batch = image_batch(3, 4, 5, (1, 7, 7), "mse")
    first = maml(*batch).loss.item()
    model[0].stride, model[0].padding = (2, 2), (2, 2)
    out = maml(*batch)
    expected_loss, expected_grad = oracle_meta_gradient(model, batch, **SMALL_OPTIONS)
    assert out.loss.item() != first
    assert relative_error(out.loss.detach(), expected_loss) <= TOLERANCE[torch.float64]
    assert relative_error(flat_grad(out.loss, model.parameters()), expected_grad) <= TOLERANCE[torch.float64]
    model[0].padding = (1, 1)
    with pytest.raises(RuntimeError):
        reference.meta_loss(model, *batch, **SMALL_OPTIONS)
    with pytest.raises(ValueError, match=r"layer 3 \(Linear\) takes 100 inputs after a layer of 64"):
        maml(*batch)
    model[0].padding = (1, 2)
    with pytest.raises(RuntimeError, match=r"layer 0 \(Conv2d\) has padding \(1, 2\)"):
        maml(*batch)


@pytest.mark.parametrize("image,message", [
    ((1, 9, 9), r"layer 3 \(Linear\) takes 100 inputs after a layer of 196"),
    ((3, 7, 7), r"layer 0 \(Conv2d\) takes images of 1 channels, got \[3, 7, 7\]"),
    ((1, 2, 2), r"layer 0 \(Conv2d\) has a 3×3 kernel, larger than its padded input \[1, 2, 2\]"),
    ((49,), r"layer 0 \(Conv2d\) takes images of 1 channels, got \[49\]"),
], ids=["larger-image", "more-channels", "smaller-than-the-kernel", "vectors"])
def test_images_that_do_not_fit_raise_naming_the_layer(image, message):
    model = small_conv_net()
    batch = image_batch(2, 3, 3, image, "mse")
    with pytest.raises(RuntimeError):  # torch fails on them too
        reference.meta_loss(model, *batch, **SMALL_OPTIONS)
    maml = pymaml.MAML(model, backend=FUSED_BACKEND, **SMALL_OPTIONS)
    with pytest.raises(ValueError, match=message):
        maml(*batch)
    pooled = randomized(nn.Sequential(nn.Conv2d(1, 2, 1), nn.MaxPool2d(3), nn.Flatten(), nn.Linear(2, 3)))
    with pytest.raises(ValueError, match=r"layer 1 \(MaxPool2d\) takes images of at least 3×3, got \[2, 2, 2\]"):
        pymaml.MAML(pooled, backend=FUSED_BACKEND, **SMALL_OPTIONS)(*image_batch(2, 3, 3, (1, 2, 2), "mse"))


@pytest.mark.parametrize("tensor", ["support_x", "query_x"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_images_are_rejected(tensor, value):
    model = small_conv_net()
    batch = dict(zip(["support_x", "support_y", "query_x", "query_y"], image_batch(2, 3, 4, (1, 7, 7), "mse")))
    with torch.no_grad():
        batch[tensor][1, 2, 0, 3, 4] = value
    for check_inputs in (True, False):  # MAML's own scan, then the kernel binding's
        maml = pymaml.MAML(model, backend=FUSED_BACKEND, check_inputs=check_inputs, **SMALL_OPTIONS)
        with pytest.raises(ValueError, match=f"{tensor} contains NaN or Inf"):
            maml(*batch.values())


def test_batch_norm_with_running_statistics_falls_back_with_the_reason():
    """Running statistics are refused by name; `auto` then runs `func`, which gives the oracle's numbers."""
    model = randomized(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                     nn.Linear(100, OUTPUTS["mse"])))
    reason = r"layer 1 \(BatchNorm2d\) tracks running statistics \(track_running_stats=True\)"
    assert get_backend("cpp").unsupported_reason(model, pymaml.backends.MetaConfig(2, False, "mse"),
                                                 torch.device("cpu")) is not None
    with pytest.raises(RuntimeError, match=reason):
        pymaml.MAML(model, backend="cpp", **SMALL_OPTIONS)
    auto = pymaml.MAML(model, **SMALL_OPTIONS)
    assert auto.backend == "func"
    assert re.search(reason, auto.backend_choice), auto.backend_choice
    batch = image_batch(3, 4, 5, (1, 7, 7), "mse")
    expected_loss, expected_grad = oracle_meta_gradient(model, batch, **SMALL_OPTIONS)
    actual_loss, actual_grad = backend_meta_gradient(model, batch, "auto", **SMALL_OPTIONS)
    assert relative_error(actual_loss, expected_loss) <= TOLERANCE[torch.float64]
    assert relative_error(actual_grad, expected_grad) <= TOLERANCE[torch.float64]
